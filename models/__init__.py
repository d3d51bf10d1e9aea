"""Mammo-CLIP models: pure PyTorch (no DICOM networking, no database).

Public API: ``load_model``, ``save_model_version``, ``new_model``, ``MammoClip``, ``ClipConfig``.
"""

from transformers.utils import logging as _hf_logging

from models.checkpoints import load_model, new_model, save_model_version
from models.clip import ClipConfig, MammoClip

_hf_logging.disable_progress_bar()

__all__ = ["ClipConfig", "MammoClip", "load_model", "new_model", "save_model_version"]
