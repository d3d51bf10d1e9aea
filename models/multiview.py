"""Four-view early-fusion CLIP with adapters: a case-level malignancy score from LCC, RCC, LMLO and RMLO.

After Chen et al., "Mammo-CLIP ... with Multi-view Mammography" (arXiv 2404.15946); no code or weights of that
paper exist, so this is a reconstruction (``docs/multiview.md`` says which parts are the paper's and which are
ours). The model is a frozen OpenAI CLIP (a local Hugging Face directory, ViT-B/16 or ViT-L/14):

- each view is patch-embedded with CLIP's class token and its position table, bicubically interpolated to the
  mammogram's non-square patch grid (448 x 288 -> 28 x 18 patches for ViT-B/16);
- the first ``n_local`` encoder layers run on each view alone (shared weights); a learned side (L/R) and view
  (CC/MLO) embedding is then added to every token; the remaining (global) layers run on the concatenated tokens
  of the four views, a missing view's tokens masked out of attention;
- the class tokens of the present views go through CLIP's post-LayerNorm, are averaged and projected;
- the case embedding is compared (cosine times the learned logit scale) with the text tower's embeddings of
  benign and malignant prompts; P(malignant) is the softmax of the two logits.

Trained: two bottleneck adapters per block in both towers (``models.adapters``), the side/view embeddings and
the logit scale, about 1% of the parameters. A version folder holds only those (``weights.safetensors``); the
frozen CLIP is referenced by its local path and a SHA-256 of its files, checked when the folder is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import CLIPModel, CLIPTokenizer, PreTrainedTokenizerBase

from models.adapters import BlockAdapters, ParameterCount, adapted_block, count_parameters
from models.checkpoints import CARD_FILE, CONFIG_FILE, TOKENIZER_DIR, WEIGHTS_FILE, file_sha256, read_card
from models.errors import CheckpointError, ConfigurationError, NodeError
from models.preprocess import PreprocessConfig, dicom_to_uint8, normalize, resize

ARCHITECTURE = "mammo-multiview-clip"
FORMAT_VERSION = 1
VIEWS: tuple[tuple[str, str], ...] = (("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO"))
VIEW_NAMES = tuple(side + view for side, view in VIEWS)  # index % 2 is the side, index // 2 the view
CLASSES = ("benign", "malignant")
MALIGNANT = CLASSES.index("malignant")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LOGIT_SCALE = math.log(100.0)


class MissingViewsError(NodeError, ValueError):
    """A study holds none of the four screening views (or an unknown one): there is nothing to score."""


@dataclass(frozen=True)
class MultiViewConfig:
    """Architecture and input contract (``config.json``). ``n_local`` is N_l (None: half the image layers);
    the adapters' bottleneck is ``hidden size // adapter_reduction``. ``pixel_mean``/``pixel_std`` are CLIP's
    per-channel normalization (``build_multiview`` takes them from the directory's ``preprocessor_config.json``)."""

    n_local: int | None = None
    input_height: int = 448
    input_width: int = 288
    adapter_reduction: int = 32
    benign_prompts: tuple[str, ...] = ("a mammogram of a benign case", "screening mammogram without malignancy")
    malignant_prompts: tuple[str, ...] = ("a mammogram of a malignant case", "screening mammogram with breast cancer")
    pixel_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    pixel_std: tuple[float, ...] = OPENAI_CLIP_STD
    apply_voi: bool = False  # the views start from VOI-windowed pixels (``models.preprocess.PreprocessConfig``)

    def __post_init__(self) -> None:
        if not self.benign_prompts or not self.malignant_prompts:
            raise ConfigurationError("each class needs at least one prompt")
        if self.adapter_reduction < 1:
            raise ConfigurationError(f"adapter_reduction must be at least 1, got {self.adapter_reduction}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MultiViewConfig:
        """A saved config; one saved before ``apply_voi`` existed is a model trained on VOI-windowed views."""
        known = {f.name for f in fields(cls)}
        return cls(**{"apply_voi": True,
                      **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}})

    def preprocess(self) -> PreprocessConfig:
        """The project's DICOM preprocessing (crop, resize) at this input size; also names the conversion cache."""
        return PreprocessConfig(height=self.input_height, width=self.input_width, apply_voi=self.apply_voi)


@dataclass(frozen=True)
class BackboneRef:
    """Where the frozen CLIP came from and the digest of its files."""

    path: str
    sha256: str


def interpolate_positions(table: Tensor, grid: tuple[int, int]) -> Tensor:
    """CLIP's position table (1 + g*g, D) -> (1 + h*w, D) for an (h, w) patch grid: bicubic on the 2-D layout of
    the patch rows (``align_corners=False``, as ``transformers``' ``interpolate_pos_encoding``); the class token's
    row is kept. The table itself when the grid is unchanged."""
    side = math.isqrt(table.shape[0] - 1)
    if (side, side) == tuple(grid):
        return table
    patches = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(patches.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:1], resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(table.dtype)])


class MultiViewClip(nn.Module):
    """The frozen CLIP (``clip``) with adapters, view/side embeddings and a logit scale (everything else)."""

    def __init__(self, clip: CLIPModel, tokenizer: PreTrainedTokenizerBase | None, config: MultiViewConfig) -> None:
        super().__init__()
        vision, text = clip.config.vision_config, clip.config.text_config
        layers, patch = vision.num_hidden_layers, vision.patch_size
        n_local = layers // 2 if config.n_local is None else config.n_local
        if not 0 <= n_local <= layers:
            raise ConfigurationError(f"n_local must be in 0..{layers} (the image tower's layers), got {n_local}")
        if config.input_height % patch or config.input_width % patch:
            raise ConfigurationError(f"the input {config.input_height}x{config.input_width} must be a multiple of "
                                     f"the patch size {patch} in both directions")
        self.config = replace(config, n_local=n_local)
        self.clip = clip.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.grid = (config.input_height // patch, config.input_width // patch)
        self.image_adapters = nn.ModuleList(
            BlockAdapters(vision.hidden_size, max(1, vision.hidden_size // config.adapter_reduction))
            for _ in range(layers))
        self.text_adapters = nn.ModuleList(
            BlockAdapters(text.hidden_size, max(1, text.hidden_size // config.adapter_reduction))
            for _ in range(text.num_hidden_layers))
        self.side_embedding = nn.Parameter(torch.zeros(2, vision.hidden_size))
        self.view_embedding = nn.Parameter(torch.zeros(2, vision.hidden_size))
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone())
        self.backbone: BackboneRef | None = None
        self.card: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def train(self, mode: bool = True) -> MultiViewClip:
        """Only the trained parts change mode; the frozen CLIP stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    def parameter_count(self) -> ParameterCount:
        return count_parameters(self)

    def embed_views(self, pixels: Tensor) -> Tensor:
        """Views (M, 3, H, W) -> CLIP tokens (M, 1 + h*w, D): patches, class token, interpolated positions and
        CLIP's pre-LayerNorm."""
        vision = self.clip.vision_model
        embeddings = vision.embeddings
        patches = embeddings.patch_embedding(pixels.to(embeddings.patch_embedding.weight.dtype))
        tokens = torch.cat([embeddings.class_embedding.expand(len(pixels), 1, -1), patches.flatten(2).transpose(1, 2)],
                           dim=1)
        return vision.pre_layrnorm(tokens + interpolate_positions(embeddings.position_embedding.weight, self.grid))

    def encode_studies(self, pixels: Tensor, present: Tensor) -> Tensor:
        """Studies (B, 4, 3, H, W) in ``VIEW_NAMES`` order with the views present (B, 4) -> L2-normalized case
        embeddings (B, P). Absent views' pixels are never read."""
        self._check_batch(pixels, present)
        pixels, present = pixels.to(self.device), present.to(self.device)
        n_local = self.config.n_local
        layers = self.clip.vision_model.encoder.layers
        tokens = self.embed_views(pixels[present])
        for layer, adapters in zip(layers[:n_local], self.image_adapters[:n_local], strict=True):
            tokens = adapted_block(layer, adapters, tokens)
        view = present.nonzero()[:, 1]
        tokens = tokens + (self.side_embedding[view % 2] + self.view_embedding[view // 2])[:, None]
        fused = tokens.new_zeros(*present.shape, *tokens.shape[1:])
        fused[present] = tokens
        fused = fused.flatten(1, 2)
        mask = None if present.all() else present.repeat_interleave(tokens.shape[1], dim=1)[:, None, None, :]
        for layer, adapters in zip(layers[n_local:], self.image_adapters[n_local:], strict=True):
            fused = adapted_block(layer, adapters, fused, mask=mask)
        heads = self.clip.vision_model.post_layernorm(fused.unflatten(1, (len(VIEWS), -1))[:, :, 0])
        weights = present.to(heads.dtype)[..., None]
        return F.normalize(self.clip.visual_projection((heads * weights).sum(1) / weights.sum(1)), dim=-1)

    def _check_batch(self, pixels: Tensor, present: Tensor) -> None:
        expected = (len(VIEWS), 3, *self.input_size)
        if pixels.dim() != 5 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"expected studies of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(pixels.shape)}")
        if present.dtype != torch.bool or tuple(present.shape) != tuple(pixels.shape[:2]):
            raise ValueError(f"present must be a boolean (B, {len(VIEWS)}) tensor")
        empty = (~present.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise MissingViewsError(f"studies {empty} of the batch have no views: a case score needs at least one of "
                                    f"{', '.join(VIEW_NAMES)}")

    @property
    def input_size(self) -> tuple[int, int]:
        return self.config.input_height, self.config.input_width

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Texts -> L2-normalized embeddings (N, P): CLIP's text tower (causal, pooled at the end-of-text token)
        with its adapters."""
        if self.tokenizer is None:
            raise CheckpointError("this model has no tokenizer: load it from a CLIP directory or a version folder")
        text = self.clip.text_model
        ids = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                             max_length=self.clip.config.text_config.max_position_embeddings)["input_ids"].to(self.device)
        x = text.embeddings(input_ids=ids)
        for layer, adapters in zip(text.encoder.layers, self.text_adapters, strict=True):
            x = adapted_block(layer, adapters, x, causal=True)
        x = text.final_layer_norm(x)
        end = (ids == self.tokenizer.eos_token_id).int().argmax(dim=-1)
        return F.normalize(self.clip.text_projection(x[torch.arange(len(ids), device=ids.device), end]), dim=-1)

    def class_embeddings(self) -> Tensor:
        """(2, P): the normalized mean embedding of each class's prompts, in ``CLASSES`` order."""
        prompts = (self.config.benign_prompts, self.config.malignant_prompts)
        embedded = self.encode_texts([prompt for group in prompts for prompt in group])
        return F.normalize(torch.stack([part.mean(0) for part in embedded.split([len(g) for g in prompts])]), dim=-1)

    def class_logits(self, case_embeddings: Tensor, class_embeddings: Tensor) -> Tensor:
        """CLIP logits (B, 2): cosine similarity times the learned scale."""
        return self.logit_scale.exp() * case_embeddings @ class_embeddings.to(case_embeddings.dtype).T

    def forward(self, pixels: Tensor, present: Tensor) -> Tensor:
        """Benign/malignant logits (B, 2) of a batch of studies."""
        return self.class_logits(self.encode_studies(pixels, present), self.class_embeddings())

    def malignancy_probability(self, pixels: Tensor, present: Tensor, class_embeddings: Tensor | None = None) -> Tensor:
        """P(malignant) (B,) of a batch of studies; ``class_embeddings`` (from ``class_embeddings()``) may be
        computed once for many batches."""
        classes = self.class_embeddings() if class_embeddings is None else class_embeddings
        logits = self.class_logits(self.encode_studies(pixels, present), classes)
        return torch.softmax(logits.float(), dim=-1)[:, MALIGNANT]


# --------------------------------------------------------------------------------------------------- inputs


def clip_pixels(image: np.ndarray, config: MultiViewConfig) -> Tensor:
    """A preprocessed uint8 view (the conversion cache, ``models.preprocess.dicom_to_uint8``) -> CLIP's input
    (3, H, W): resized to the input size if needed, min-max to [0, 1], CLIP's per-channel mean and std."""
    unit = normalize(resize(np.asarray(image), config.preprocess()), PreprocessConfig(mean=0.0, std=1.0))
    mean, std = (torch.tensor(v, dtype=unit.dtype)[:, None, None] for v in (config.pixel_mean, config.pixel_std))
    return (unit - mean) / std


def preprocess_view(source: Path | Dataset, config: MultiViewConfig) -> Tensor:
    """A DICOM mammogram -> CLIP input (3, H, W), through the node's own preprocessing."""
    return clip_pixels(dicom_to_uint8(source, config.preprocess()), config)


def view_index(key: str | tuple[str, str]) -> int:
    """Position of a view key, "LCC" or ("L", "CC"), in ``VIEW_NAMES``."""
    name = "".join(key).upper() if isinstance(key, tuple) else str(key).upper()
    if name not in VIEW_NAMES:
        raise MissingViewsError(f"unknown view {key!r}: expected one of {', '.join(VIEW_NAMES)}")
    return VIEW_NAMES.index(name)


def stack_study(views: Mapping[str | tuple[str, str], Tensor], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """A study's views (keyed "LCC" or ("L", "CC"), each (3, H, W)) -> pixels (4, 3, H, W), zeros where a view is
    absent, and the views present (4,)."""
    if not views:
        raise MissingViewsError(f"the study has no views: a case score needs at least one of {', '.join(VIEW_NAMES)}")
    pixels = torch.zeros(len(VIEWS), 3, *size)
    present = torch.zeros(len(VIEWS), dtype=torch.bool)
    for key, image in views.items():
        index = view_index(key)
        if tuple(image.shape) != (3, *size):
            raise ValueError(f"view {VIEW_NAMES[index]} has shape {tuple(image.shape)}, "
                             f"expected (3, {size[0]}, {size[1]})")
        pixels[index], present[index] = image, True
    return pixels, present


def study_probability(model: MultiViewClip, views: Mapping[str | tuple[str, str], Tensor]) -> float:
    """P(malignant) of one study from its preprocessed views (``preprocess_view``); any 1 to 4 of LCC, RCC, LMLO,
    RMLO (keyed "LCC" or ("L", "CC")). Raises ``MissingViewsError`` for a study without views."""
    pixels, present = stack_study(views, model.input_size)
    with torch.inference_mode():
        return float(model.eval().malignancy_probability(pixels[None], present[None])[0])


# -------------------------------------------------------------------------------------- backbone and folders


def backbone_files(clip_dir: Path) -> list[Path]:
    """The files that decide the frozen CLIP: ``config.json`` and its weights (safetensors, else ``.bin``)."""
    clip_dir = Path(clip_dir)
    weights = sorted(clip_dir.glob("*.safetensors")) or sorted(clip_dir.glob("*.bin"))
    if not (clip_dir / "config.json").exists() or not weights:
        raise CheckpointError(f"{clip_dir} is not a local Hugging Face CLIP directory (config.json and weights)")
    return [clip_dir / "config.json", *weights]


def backbone_sha256(clip_dir: Path) -> str:
    """SHA-256 over the names and SHA-256s of ``backbone_files``."""
    lines = "".join(f"{path.name}:{file_sha256(path)}\n" for path in backbone_files(clip_dir))
    return hashlib.sha256(lines.encode()).hexdigest()


def _normalization(clip_dir: Path, config: MultiViewConfig) -> MultiViewConfig:
    path = Path(clip_dir) / "preprocessor_config.json"
    settings = json.loads(path.read_text()) if path.exists() else {}
    if "image_mean" in settings and "image_std" in settings:
        return replace(config, pixel_mean=tuple(settings["image_mean"]), pixel_std=tuple(settings["image_std"]))
    return config


def _open_backbone(clip_dir: Path, config: MultiViewConfig, sha256: str, tokenizer_dir: Path) -> MultiViewClip:
    clip = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).float()
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    model = MultiViewClip(clip, tokenizer, config)
    model.backbone = BackboneRef(str(clip_dir), sha256)
    return model


def build_multiview(clip_dir: Path | str, config: MultiViewConfig = MultiViewConfig(),
                    device: str | torch.device = "cpu") -> MultiViewClip:
    """A new (untrained: adapters are the identity) model on the CLIP at ``clip_dir``, never a hub; CLIP's pixel
    normalization comes from the directory's ``preprocessor_config.json`` when it has one."""
    clip_dir = Path(clip_dir).resolve()
    model = _open_backbone(clip_dir, _normalization(clip_dir, config), backbone_sha256(clip_dir), clip_dir)
    return model.to(device)


def trained_state(model: MultiViewClip) -> dict[str, Tensor]:
    """What a version folder stores: every tensor outside the frozen CLIP, copied (on a CPU model too, so the
    copy does not follow later training)."""
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in model.state_dict().items() if not k.startswith("clip.")}


def save_multiview(model: MultiViewClip, folder: Path | str, card: Mapping[str, Any] | None = None) -> Path:
    """Write ``weights.safetensors`` (the trained tensors), ``config.json`` (architecture and backbone reference),
    ``card.json`` (with the trainable parameter count) and ``tokenizer/`` into ``folder``."""
    if model.backbone is None:
        raise CheckpointError("the model has no backbone reference: build it with build_multiview")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(trained_state(model), str(folder / WEIGHTS_FILE))
    config = {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION, "views": list(VIEW_NAMES),
              "classes": list(CLASSES), "multiview": model.config.to_dict(), "backbone": asdict(model.backbone)}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    full_card = {"created": datetime.now(UTC).isoformat(timespec="seconds"),
                 "weights_sha256": file_sha256(folder / WEIGHTS_FILE),
                 "parameters": model.parameter_count().to_dict(), **(card or {})}
    (folder / CARD_FILE).write_text(json.dumps(full_card, indent=2, default=str))
    return folder


def read_config(folder: Path | str) -> dict[str, Any]:
    """``config.json`` of a multi-view version folder; a ``CheckpointError`` for anything else."""
    path = Path(folder) / CONFIG_FILE
    config = json.loads(path.read_text()) if path.exists() else {}
    if config.get("architecture") != ARCHITECTURE:
        raise CheckpointError(f"{folder} is not a {ARCHITECTURE} version folder")
    return config


def load_multiview(folder: Path | str, *, clip_dir: Path | str | None = None,
                   device: str | torch.device = "cpu") -> MultiViewClip:
    """A version folder written by ``save_multiview``, in eval mode. The frozen CLIP is read from ``clip_dir``
    (default: the path recorded at training) and must have the recorded SHA-256."""
    folder = Path(folder)
    config = read_config(folder)
    recorded = config["backbone"]
    source = Path(clip_dir or recorded["path"]).resolve()
    sha = backbone_sha256(source)
    if sha != recorded["sha256"]:
        raise CheckpointError(f"the CLIP at {source} (sha256 {sha[:12]}) is not the one {folder} was trained on "
                              f"({recorded['sha256'][:12]})")
    tokenizer_dir = folder / TOKENIZER_DIR if (folder / TOKENIZER_DIR).exists() else source
    model = _open_backbone(source, MultiViewConfig.from_dict(config["multiview"]), sha, tokenizer_dir)
    result = model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("clip.")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{folder} does not match the model: missing {missing[:3]}, "
                              f"unexpected {list(result.unexpected_keys)[:3]}")
    model.card = read_card(folder)
    return model.to(device).eval()
