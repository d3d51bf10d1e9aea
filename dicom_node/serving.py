"""The model the node serves: the configured checkpoint or model version, else the demo model."""

from __future__ import annotations

import hashlib
import json
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.settings import Settings

if TYPE_CHECKING:
    from dicom_node.results.findings import ModelIdentity
    from models.clip import MammoClip

log = logging.getLogger(__name__)

NOT_CLINICAL_BANNER = (
    "NOTE: the demo model is trained on synthetic phantoms. It is NOT a clinical model and its scores\n"
    "say nothing about real patients. Load real Mammo-CLIP weights with --model / MAMMO_MODEL_PATH."
)


def software_version() -> str:
    try:
        return version("mammo-clip-node")
    except PackageNotFoundError:
        return "0+unknown"


def load_serving_model(settings: Settings, model_path: Path | None = None, text_encoder: Path | None = None,
                       progress: bool = True) -> MammoClip:
    """Load ``model_path`` (or ``settings.model_path``); with neither, the cached demo model, trained on
    synthetic phantoms on first use (minutes on a CPU)."""
    from models import load_model
    from training.demo import ensure_demo_model

    path = model_path or settings.model_path
    if path is None:
        log.warning("no model configured: using the demo model trained on synthetic phantoms (NOT clinical)")
        path = ensure_demo_model(settings.data_dir / "cache", progress=progress)
    return load_model(path, text_encoder=text_encoder or settings.text_encoder_path,
                      device=settings.resolved_device())


def model_identity(model: MammoClip, version_name: str | None = None) -> ModelIdentity:
    """Algorithm name, software version and model version (registry name, else card name, the hash of the
    weights file loaded and,
    when the card calibrates the zero-shot scores, ``+cal`` and a hash of that calibration: the same weights
    calibrated otherwise give other probabilities) of a loaded model."""
    from dicom_node.results.findings import ModelIdentity, version_label
    from models.zero_shot import CALIBRATION_KEY

    card = getattr(model, "card", {}) or {}
    report = getattr(model, "load_report", None)
    sha = (getattr(report, "sha256", "") or card.get("weights_sha256") or "unknown")[:12]  # of the file loaded
    name = version_name or card.get("name") or Path(getattr(report, "source", "model")).name
    calibration = card.get(CALIBRATION_KEY)
    if calibration:
        sha += "+cal" + hashlib.sha256(json.dumps(calibration, sort_keys=True).encode()).hexdigest()[:8]
    return ModelIdentity(name=f"Mammo-CLIP zero-shot ({model.config.image_encoder})",
                         software_version=software_version(), model_version=version_label(name, sha),
                         clinical=bool(card.get("clinical_use", False)))
