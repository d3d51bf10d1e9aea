"""Mammo-CLIP models: pure PyTorch (no DICOM networking, no database).

Public API: ``load_model``, ``save_model_version``, ``new_model``, ``MammoClip``, ``ClipConfig``. They are
imported on first use, so light modules (``models.errors``) do not pull in torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"load_model": "models.checkpoints", "new_model": "models.checkpoints",
            "save_model_version": "models.checkpoints", "ClipConfig": "models.clip", "MammoClip": "models.clip"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
