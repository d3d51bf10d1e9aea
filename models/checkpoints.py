"""Loading and saving models: the reference ``.tar`` checkpoints and our model-version folders.

A model version is a folder with ``weights.safetensors``, ``config.json`` (architecture), ``card.json``
(provenance, metrics, intended use) and ``tokenizer/`` (the text tokenizer files), so it is self-contained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import BertConfig

from models.clip import ClipConfig, MammoClip
from models.errors import CheckpointError
from models.text_encoder import (
    TextEncoder,
    bert_config_from_state_dict,
    default_text_encoder_dir,
    load_bert_config,
    load_tokenizer,
)

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "card.json"
TOKENIZER_DIR = "tokenizer"
TEXT_PREFIX = "text_encoder.text_encoder."

# Reference image-encoder names (configs/model/*.yaml) -> our EfficientNet variants.
REFERENCE_IMAGE_ENCODERS = {
    "tf_efficientnet_b5_ns-detect": "efficientnet-b5",
    "tf_efficientnetv2-detect": "efficientnet-b2",
}
# Buffers that older transformers saved in the state dict and newer ones recompute.
IGNORABLE_KEYS = ("text_encoder.text_encoder.embeddings.position_ids",)


@dataclass
class LoadReport:
    """What happened to each checkpoint key: all loaded, or which were missing, unexpected or ignored."""

    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    sha256: str = ""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _torch_load(path: Path, allow_pickle: bool) -> dict[str, Any]:
    """``weights_only`` load first; a full unpickle only for a checkpoint the operator chose to trust."""
    with Path(path).open("rb") as handle:
        head = handle.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":  # torch zip archive or legacy pickle
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a torch archive nor a pickle).")
    safe_numpy = [np.dtype, np.core.multiarray.scalar, np.float64, np.float32, np.int64]
    try:
        with torch.serialization.safe_globals(safe_numpy):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {error}") from error
        if not allow_pickle:
            raise CheckpointError(f"{path} needs a full unpickle; allow it only for a trusted file.") from error
        log.warning("checkpoint %s holds non-tensor Python objects; loading it with full unpickling", path.name)
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, OSError, EOFError) as error:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {error}") from error


def _strict_load(model: MammoClip, state: dict[str, Tensor], report: LoadReport) -> None:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    report.ignored = [k for k in IGNORABLE_KEYS if k in state]
    for key in report.ignored:
        state.pop(key)
    result = model.load_state_dict(state, strict=False)
    report.missing, report.unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if report.missing or report.unexpected:
        raise CheckpointError(
            f"{report.source} does not match the {model.config.image_encoder} architecture: "
            f"{len(report.missing)} missing keys (first: {report.missing[:3]}), "
            f"{len(report.unexpected)} unexpected (first: {report.unexpected[:3]})."
        )


def _reference_clip_config(model_cfg: dict[str, Any], base_cfg: dict[str, Any]) -> ClipConfig:
    name = model_cfg.get("image_encoder", {}).get("name", "")
    if name not in REFERENCE_IMAGE_ENCODERS:
        raise CheckpointError(
            f"Unsupported reference image encoder {name!r}; supported: {sorted(REFERENCE_IMAGE_ENCODERS)}."
        )
    pooling = model_cfg.get("text_encoder", {}).get("pooling", "eos")
    if pooling != "eos":
        raise CheckpointError(f"Only 'eos' text pooling (the released checkpoints) is supported, not {pooling!r}.")
    return ClipConfig(
        image_encoder=REFERENCE_IMAGE_ENCODERS[name],
        projection_dim=int(model_cfg.get("projection_head", {}).get("proj_dim", 512)),
        text_max_length=int(base_cfg.get("text_max_length", 256)),
        temperature=float(model_cfg.get("temperature", 0.07)),
    )


def load_reference_checkpoint(path: Path, text_encoder: Path | None = None, *,
                              allow_pickle: bool = True) -> MammoClip:
    """A reference ``.tar`` (``{"model": state_dict, "config": cfg, ...}``) -> ``MammoClip``.

    Architecture comes from ``config["model"]``; the cluster paths inside the config are never used.
    ``text_encoder`` is the local text-model directory (Bio_ClinicalBERT) whose config and tokenizer go
    with the checkpoint's text weights; without it the text shape is inferred from the weights and
    ``encode_texts`` asks for the tokenizer.
    """
    checkpoint = _torch_load(path, allow_pickle)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise CheckpointError(f"{path} is not a Mammo-CLIP reference checkpoint (no 'model' and 'config' entries).")
    config = checkpoint["config"]
    clip_config = _reference_clip_config(dict(config.get("model", {})), dict(config.get("base", {})))
    state = checkpoint["model"]
    if text_encoder is not None:
        bert_config, tokenizer = load_bert_config(text_encoder), load_tokenizer(text_encoder)
    else:
        bert_config, tokenizer = bert_config_from_state_dict(state, TEXT_PREFIX), None
    model = MammoClip(clip_config, TextEncoder.from_config(bert_config, tokenizer, clip_config.text_max_length))
    report = LoadReport(source=str(path), sha256=file_sha256(path))
    _strict_load(model, state, report)
    model.load_report = report
    log.info("loaded reference checkpoint %s (%s, sha256 %s)", path.name, clip_config.image_encoder,
             report.sha256[:12])
    return model


def load_model_version(folder: Path) -> MammoClip:
    """A model-version folder written by ``save_model_version``."""
    folder = Path(folder)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (folder / name).exists():
            raise CheckpointError(f"{folder} is not a model version: {name} is missing.")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if "clip" not in config:
        kind = config.get("architecture") or config.get("kind") or "unknown"
        raise CheckpointError(f"{folder} is not a Mammo-CLIP model version ({kind!r}); four-view models, detectors "
                              "and FActOR projectors are served with one: `mammo-node model register BASE "
                              "--multiview|--detector|--factor FOLDER`.")
    clip_config = ClipConfig.from_dict(config["clip"])
    bert_config = BertConfig.from_dict(config["text_encoder"])
    tokenizer_dir = folder / TOKENIZER_DIR
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir.exists() else None
    model = MammoClip(clip_config, TextEncoder.from_config(bert_config, tokenizer, clip_config.text_max_length))
    report = LoadReport(source=str(folder), sha256=file_sha256(folder / WEIGHTS_FILE))
    _strict_load(model, load_file(str(folder / WEIGHTS_FILE)), report)
    model.load_report = report
    model.card = read_card(folder)
    return model


def read_card(folder: Path) -> dict[str, Any]:
    """The model card of a version folder (empty when there is none)."""
    card_path = Path(folder) / CARD_FILE
    return json.loads(card_path.read_text()) if card_path.exists() else {}


def save_model_version(model: MammoClip, folder: Path, card: dict[str, Any] | None = None) -> Path:
    """Write ``weights.safetensors``, ``config.json``, ``card.json`` and ``tokenizer/`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    config = {"clip": model.config.to_dict(), "text_encoder": model.text_encoder.text_encoder.config.to_dict()}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
    if model.text_encoder.tokenizer is not None:
        model.text_encoder.tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    full_card = {"created": datetime.now(UTC).isoformat(timespec="seconds"),
                 "weights_sha256": file_sha256(folder / WEIGHTS_FILE), **(card or {})}
    (folder / CARD_FILE).write_text(json.dumps(full_card, indent=2, default=str))
    return folder


def new_model(config: ClipConfig, text_encoder: Path | None = None) -> MammoClip:
    """A model with a pretrained text tower from a local directory (default: the embedded MiniLM)
    and a randomly initialised image tower."""
    directory = text_encoder or default_text_encoder_dir()
    return MammoClip(config, TextEncoder.from_pretrained(directory, config.text_max_length))


def load_model(path: Path | str, *, text_encoder: Path | str | None = None, device: str = "cpu",
               allow_pickle: bool = True) -> MammoClip:
    """Load a reference ``.tar`` checkpoint or one of our model-version folders, in eval mode on ``device``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"No checkpoint or model version at {path}.")
    if path.is_dir():
        model = load_model_version(path)
    else:
        model = load_reference_checkpoint(path, Path(text_encoder) if text_encoder else None,
                                          allow_pickle=allow_pickle)
    return model.to(device).eval()
