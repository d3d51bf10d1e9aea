"""Loading and saving models: the reference ``.tar`` checkpoints and our model-version folders.

A reference checkpoint is read by torch's weights-only unpickler. Its ``config`` still holds omegaconf objects
(the reference's ``convert_dictconfig_to_dict`` leaves a ``ListConfig`` such as ``affine_scale`` and, through its
parent, the ``DictConfig`` tree): they are read into stand-ins and returned as plain lists and dicts, so omegaconf
is not needed.

A model version is a folder with ``weights.safetensors``, ``config.json`` (architecture), ``card.json``
(provenance, metrics, intended use) and ``tokenizer/`` (the text tokenizer files), so it is self-contained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import typing
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
OMEGACONF_CLASSES = (
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.Metadata",
    "omegaconf.base.ContainerMetadata",
    *(f"omegaconf.nodes.{node}" for node in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
                                             "BytesNode", "InterpolationResultNode")),
)


class _OmegaConfStandIn:
    """What a pickled omegaconf object (a container, a value node, their metadata) becomes here: the unpickler fills
    its ``__dict__`` with the object's pickled state."""

    def plain(self) -> Any:
        """A ``DictConfig``/``ListConfig``'s ``_content`` or a value node's ``_val``, as plain values."""
        state = self.__dict__
        return _plain(state["_content"] if "_content" in state else state.get("_val"))


def _plain(value: Any) -> Any:
    """``value`` with every omegaconf stand-in inside its dicts, lists and tuples replaced by what it holds."""
    if isinstance(value, _OmegaConfStandIn):
        return value.plain()
    if type(value) is dict:
        return {key: _plain(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain(item) for item in value)
    return value


def _plain_dict(default_factory: object = None) -> dict[Any, Any]:
    """Unpickles a ``collections.defaultdict`` (an omegaconf metadata's resolver cache) as a plain dict."""
    return {}


_NUMPY_SCALAR = np.float64(0).__reduce__()[0]  # numpy.core.multiarray.scalar, numpy._core.multiarray since NumPy 2
# Globals a reference checkpoint may hold beyond torch's own: omegaconf objects (as stand-ins), the types their
# metadata names, and NumPy scalars (under their NumPy 1 and 2 names, with the dtype classes they build).
SAFE_GLOBALS: list[Any] = [
    *((_OmegaConfStandIn, name) for name in OMEGACONF_CLASSES),
    (_plain_dict, "collections.defaultdict"),
    typing.Any, list, dict, int,
    (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"), (_NUMPY_SCALAR, "numpy._core.multiarray.scalar"), np.dtype,
    *{type(np.dtype(code)) for code in ("f8", "f4", "f2", "i8", "i4", "i2", "i1", "u1", "?")},
]


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


def _torch_load(path: Path | str, allow_pickle: bool) -> Any:
    """The weights-only unpickler with ``SAFE_GLOBALS`` (omegaconf objects come back as plain lists and dicts); a
    full unpickle only for a checkpoint the operator chose to trust. Any failure is a ``CheckpointError``."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(2)
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error}") from error
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":  # torch zip archive or legacy pickle
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a torch archive nor a pickle).")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return _plain(torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {error}") from error
        reason = str(error).rpartition("WeightsUnpickler error: ")[2].split(". ")[0]
        if not allow_pickle:
            raise CheckpointError(f"{path} holds Python objects beyond tensors and plain values ({reason}); "
                                  "a full unpickle is allowed only for a trusted file.") from error
        return _full_unpickle(path, reason)
    except MemoryError:
        raise
    except Exception as error:  # torch.load raises many types for a damaged file
        message = f"{path} is not a readable PyTorch checkpoint: {type(error).__name__}: {error}"
        raise CheckpointError(message) from error


def _full_unpickle(path: Path, reason: str) -> Any:
    log.warning("checkpoint %s holds Python objects beyond tensors and plain values (%s); loading it with full "
                "unpickling", path.name, reason)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except MemoryError:
        raise
    except Exception as error:  # the pickle imports and calls what it names: e.g. a module not installed here
        raise CheckpointError(f"{path} cannot be unpickled ({reason}): {type(error).__name__}: {error}") from error


def _strict_load(model: MammoClip, state: dict[str, Tensor], report: LoadReport) -> None:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    report.ignored = [k for k in IGNORABLE_KEYS if k in state]
    for key in report.ignored:
        state.pop(key)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of another shape, e.g. a text encoder of another size
        raise CheckpointError(f"{report.source} does not match the {model.config.image_encoder} architecture's "
                              f"tensor shapes: {error}") from error
    report.missing, report.unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if report.missing or report.unexpected:
        raise CheckpointError(
            f"{report.source} does not match the {model.config.image_encoder} architecture: "
            f"{len(report.missing)} missing keys (first: {report.missing[:3]}), "
            f"{len(report.unexpected)} unexpected (first: {report.unexpected[:3]})."
        )


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise CheckpointError(f"The checkpoint's config entry {key!r} is not a mapping: {value!r}.")
    return value


def _reference_clip_config(config: dict[str, Any]) -> ClipConfig:
    """Architecture, input size and normalization from the reference config (``model`` and ``base``); the input is
    never VOI-windowed, as the reference prepared its images."""
    model_cfg, base_cfg = _section(config, "model"), _section(config, "base")
    name = str(_section(model_cfg, "image_encoder").get("name", "")).lower()  # the reference lowercases it
    if name not in REFERENCE_IMAGE_ENCODERS:
        raise CheckpointError(
            f"Unsupported reference image encoder {name!r}; supported: {sorted(REFERENCE_IMAGE_ENCODERS)}."
        )
    head = _section(model_cfg, "projection_head")
    if str(head.get("name", "")).lower() != "linear":
        raise CheckpointError(f"Only a linear projection head (the released checkpoints) is supported, not "
                              f"{head.get('name')!r}.")
    pooling = _section(model_cfg, "text_encoder").get("pooling", "eos")
    if pooling != "eos":
        raise CheckpointError(f"Only 'eos' text pooling (the released checkpoints) is supported, not {pooling!r}.")
    default = ClipConfig()
    try:
        return ClipConfig(
            image_encoder=REFERENCE_IMAGE_ENCODERS[name],
            projection_dim=int(head.get("proj_dim", default.projection_dim)),
            input_height=int(base_cfg.get("image_size_h", default.input_height)),
            input_width=int(base_cfg.get("image_size_w", default.input_width)),
            pixel_mean=float(base_cfg.get("mean", default.pixel_mean)),
            pixel_std=float(base_cfg.get("std", default.pixel_std)),
            text_max_length=int(base_cfg.get("text_max_length", default.text_max_length)),
            temperature=float(model_cfg.get("temperature", default.temperature)),
            apply_voi=False,
        )
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"The checkpoint's config has a value of the wrong type: {error}") from error


def load_reference_checkpoint(path: Path | str, text_encoder: Path | None = None, *,
                              allow_pickle: bool = True) -> MammoClip:
    """A reference ``.tar`` (``{"model": state_dict, "config": cfg, ...}``) -> ``MammoClip``.

    Architecture comes from ``config["model"]``, input size and normalization from ``config["base"]``; the cluster
    paths inside the config are never used.
    ``text_encoder`` is the local text-model directory (Bio_ClinicalBERT) whose config and tokenizer go
    with the checkpoint's text weights; without it the text shape is inferred from the weights and
    ``encode_texts`` asks for the tokenizer.
    """
    path = Path(path)
    checkpoint = _torch_load(path, allow_pickle)
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)
            and isinstance(checkpoint.get("config"), dict)):
        raise CheckpointError(f"{path} is not a Mammo-CLIP reference checkpoint (no 'model' and 'config' entries).")
    clip_config = _reference_clip_config(checkpoint["config"])
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
