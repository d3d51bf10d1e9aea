"""Lesion detector: a RetinaNet on the Mammo-CLIP EfficientNet, for masses and calcifications (§5.4 of the
reference notes).

Layout of the reference's ``Detectors/retinanet``: C3 is the output of the last stride-16 block, C4 that of
the second-to-last block (stride 32) and C5 the encoder's head map (stride 32); B5 takes blocks 26 and 37
(176, 512, 2048 channels), B2 blocks 15 and 21 (120, 352, 1408). Its FPN upsamples the C4 and C3 laterals
before adding them, so P3-P7 keep strides 8-128 with 256 channels; 3 ratios x 3 scales of anchors centred on
the cells, sides 32-512; box deltas scaled by (0.1, 0.1, 0.2, 0.2); focal loss (alpha 0.25, gamma 2). The
RetinaNet machinery (heads, matcher, focal loss, decoding, per-class NMS) is torchvision's; its
``GeneralizedRCNNTransform`` is neutralized (no resize, no normalization, no padding): ``models.preprocess``
is the only preprocessing, and boxes live in model-input pixels until ``detect_views`` maps them back to the
source image through its ``CropBox``.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from models.checkpoints import LoadReport, _torch_load, file_sha256
from models.clip import REFERENCE_MEAN, REFERENCE_STD, MammoClip
from models.efficientnet import (
    B0_STAGES,
    EFFICIENTNET_SPECS,
    EfficientNetEncoder,
    StaticSameConv2d,
    _same_padding,
    round_filters,
    round_repeats,
)
from models.errors import CheckpointError
from models.preprocess import CropBox, PreprocessConfig, normalize, prepare_dicom
from models.sop_classes import ViewKey

DEFAULT_CLASSES = ("mass", "calcification")
PADDINGS = ("stage", "nominal")
ANCHOR_RATIOS = (0.5, 1.0, 2.0)  # height / width
ANCHOR_SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
LEVEL_STRIDES = (8, 16, 32, 64, 128)  # P3-P7
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # the reference's delta std (0.1, 0.1, 0.2, 0.2)
REFERENCE_INPUT = (512, 512)  # the reference trains and tests its detectors at 512 x 512
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "card.json"
KIND = "mammo-clip-detector"


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture, input contract and output thresholds of one detector (its ``config.json``).

    ``anchor_size`` is the side of the smallest P3 anchor; it doubles per level (32-512 in the reference).
    ``base_model_sha256`` names the Mammo-CLIP weights the backbone started from ("" when none).
    ``padding``: "stage" pads every convolution for its stage's nominal size, as the Mammo-CLIP encoder
    (lukemelas 0.7); "nominal" pads all of them for the variant's input size, as the older EfficientNet the
    reference's detectors vendor (stride-2 convolutions at odd stage sizes differ by one pixel).
    """

    classes: tuple[str, ...] = DEFAULT_CLASSES
    image_encoder: str = "efficientnet-b5"
    input_height: int = 1520
    input_width: int = 912
    pixel_mean: float = REFERENCE_MEAN
    pixel_std: float = REFERENCE_STD
    fpn_channels: int = 256
    anchor_size: float = 32.0
    score_threshold: float = 0.2
    nms_threshold: float = 0.5
    detections_per_image: int = 100
    padding: str = "stage"
    base_model_sha256: str = ""
    apply_voi: bool = False  # the input starts from VOI-windowed pixels (``models.preprocess.PreprocessConfig``)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise CheckpointError(f"detector classes must be distinct and non-empty, got {self.classes}")
        if self.image_encoder not in EFFICIENTNET_SPECS:
            raise CheckpointError(f"image_encoder {self.image_encoder!r} is not one of {sorted(EFFICIENTNET_SPECS)}")
        if self.padding not in PADDINGS:
            raise CheckpointError(f"padding {self.padding!r} is not one of {PADDINGS}")
        if min(self.input_height, self.input_width) < 64:
            raise CheckpointError("the detector input must be at least 64 x 64 pixels (P7 has stride 128)")

    @property
    def input_size(self) -> tuple[int, int]:
        return self.input_height, self.input_width

    def preprocess(self) -> PreprocessConfig:
        """The image preprocessing this detector expects."""
        return PreprocessConfig(height=self.input_height, width=self.input_width, mean=self.pixel_mean,
                                std=self.pixel_std, apply_voi=self.apply_voi)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectorConfig:
        """A saved config; one saved before ``apply_voi`` existed is a detector trained on VOI-windowed input."""
        known = {f.name for f in fields(cls)}
        return cls(**{"apply_voi": True, **{k: v for k, v in data.items() if k in known}})


# ---------------------------------------------------------------------------------------------- backbone


@dataclass(frozen=True)
class FeatureLayout:
    """Which blocks give C3 and C4, and the channels of C3, C4 and C5."""

    indices: tuple[int, int]
    channels: tuple[int, int, int]


def feature_layout(variant: str) -> FeatureLayout:
    """C3 = last block of the last stride-16 stage (stage 5), C4 = second-to-last block, C5 = head map.

    This reproduces the reference's hand-set indices (B5 [26, 37], B2 [15, 21]) for every variant.
    """
    spec = EFFICIENTNET_SPECS[variant]
    repeats = [round_repeats(stage.repeats, spec.depth) for stage in B0_STAGES]
    c3 = sum(repeats[:5]) - 1
    c4 = sum(repeats) - 2
    stage_of = [index for index, count in enumerate(repeats) for _ in range(count)]
    channels = tuple(round_filters(B0_STAGES[stage_of[i]].out_channels, spec.width) for i in (c3, c4))
    return FeatureLayout((c3, c4), (*channels, round_filters(1280, spec.width)))


def nominal_padding(encoder: EfficientNetEncoder) -> None:
    """Pad every convolution for the variant's nominal input size (the reference detectors' EfficientNet)."""
    size = EFFICIENTNET_SPECS[encoder.variant].nominal_size
    for module in encoder.modules():
        if isinstance(module, StaticSameConv2d):
            top, bottom = _same_padding(size, module.kernel_size[0], module.stride[0])
            module.static_pad = (top, bottom, top, bottom)


class PyramidFeatures(nn.Module):
    """The reference's FPN: laterals of C3 (stride 16), C4 and C5 (stride 32) build P3 (8), P4 (16), P5 (32);
    P6 and P7 come from C5 by stride-2 convolutions. Upsampling is nearest, to the size of the finer map."""

    def __init__(self, channels: tuple[int, int, int], out_channels: int) -> None:
        super().__init__()
        c3, c4, c5 = channels
        self.lateral3 = nn.Conv2d(c3, out_channels, 1)
        self.lateral4 = nn.Conv2d(c4, out_channels, 1)
        self.lateral5 = nn.Conv2d(c5, out_channels, 1)
        self.output3 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.output4 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.output5 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.p6 = nn.Conv2d(c5, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, c3: Tensor, c4: Tensor, c5: Tensor) -> OrderedDict[str, Tensor]:
        middle = c3.shape[-2:]
        fine = (2 * middle[0], 2 * middle[1])
        top5 = self.lateral5(c5)
        top4 = F.interpolate(top5, size=middle) + F.interpolate(self.lateral4(c4), size=middle)
        top3 = F.interpolate(top4, size=fine) + F.interpolate(self.lateral3(c3), size=fine)
        p6 = self.p6(c5)
        return OrderedDict([("p3", self.output3(top3)), ("p4", self.output4(top4)), ("p5", self.output5(top5)),
                            ("p6", p6), ("p7", self.p7(F.relu(p6)))])


class DetectorBackbone(nn.Module):
    """The Mammo-CLIP image encoder (``encoder``, reference key names) returning C3/C4/C5, and the FPN."""

    def __init__(self, variant: str, out_channels: int = 256, padding: str = "stage") -> None:
        super().__init__()
        self.encoder = EfficientNetEncoder(variant)
        if padding == "nominal":
            nominal_padding(self.encoder)
        self.layout = feature_layout(variant)
        self.fpn = PyramidFeatures(self.layout.channels, out_channels)
        self.out_channels = out_channels

    def features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """C3, C4 and C5 of the encoder (the same block loop as ``EfficientNetEncoder.forward_features``)."""
        encoder, (i3, i4) = self.encoder, self.layout.indices
        x = F.silu(encoder._bn0(encoder._conv_stem(x)))
        count = len(encoder._blocks)
        taps: dict[int, Tensor] = {}
        for index, block in enumerate(encoder._blocks):
            x = block(x, encoder.drop_connect_rate * index / count)
            if index in (i3, i4):
                taps[index] = x
        return taps[i3], taps[i4], F.silu(encoder._bn1(encoder._conv_head(x)))

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(*self.features(x))


# ----------------------------------------------------------------------------------------------- anchors


class CenteredAnchorGenerator(AnchorGenerator):
    """The reference's anchors: 3 ratios x 3 scales per cell, centred on the cell ((i + 0.5) * stride), with
    the fixed stride of each level and unrounded sides. (torchvision's own puts them on the cell corners, rounds
    the sides and derives strides by integer division, which drifts on 1520 x 912 inputs.)"""

    def __init__(self, base_size: float = 32.0, strides: tuple[int, ...] = LEVEL_STRIDES) -> None:
        sizes = tuple(tuple(base_size * 2 ** level * scale for scale in ANCHOR_SCALES) for level in range(len(strides)))
        super().__init__(sizes, (ANCHOR_RATIOS,) * len(strides))
        self.strides = strides

    def generate_anchors(self, scales: Sequence[float], aspect_ratios: Sequence[float],
                         dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
        scales_t = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        heights = (ratios.sqrt()[:, None] * scales_t[None, :]).reshape(-1)
        widths = ((1 / ratios.sqrt())[:, None] * scales_t[None, :]).reshape(-1)
        return torch.stack([-widths, -heights, widths, heights], dim=1) / 2

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        # at least float32 even under autocast: bfloat16 would round anchor corners to 8 px at 1520 rows
        dtype, device = torch.promote_types(feature_maps[0].dtype, torch.float32), feature_maps[0].device
        levels = []
        for feature_map, stride, cell in zip(feature_maps, self.strides, self.cell_anchors, strict=True):
            rows, cols = feature_map.shape[-2:]
            ys = (torch.arange(rows, dtype=dtype, device=device) + 0.5) * stride
            xs = (torch.arange(cols, dtype=dtype, device=device) + 0.5) * stride
            shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
            levels.append((shifts + cell.to(dtype=dtype, device=device).view(1, -1, 4)).reshape(-1, 4))
        anchors = torch.cat(levels)
        return [anchors for _ in image_list.image_sizes]


class PreprocessedTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform made a no-op: images arrive normalized at the model input size from
    ``models.preprocess``, so there is no resize, no mean/std and no padding to a multiple of 32."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__(min(height, width), max(height, width), [0.0] * 3, [1.0] * 3, size_divisible=1)

    def normalize(self, image: Tensor) -> Tensor:
        return image

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target


# ----------------------------------------------------------------------------------------------- detector


class MammoDetector(RetinaNet):
    """RetinaNet for ``config.classes`` on the Mammo-CLIP EfficientNet.

    ``forward`` is torchvision's: in train mode ``(images, targets)`` -> ``{"classification", "bbox_regression"}``
    losses (targets: ``boxes`` (n, 4) x0, y0, x1, y1 in model-input pixels, ``labels`` (n,) class indices);
    in eval mode ``images`` -> per image ``{"boxes", "scores", "labels"}``.
    """

    def __init__(self, config: DetectorConfig) -> None:
        backbone = DetectorBackbone(config.image_encoder, config.fpn_channels, config.padding)
        anchors = CenteredAnchorGenerator(config.anchor_size)
        head = RetinaNetHead(config.fpn_channels, anchors.num_anchors_per_location()[0], len(config.classes))
        super().__init__(backbone, len(config.classes), anchor_generator=anchors, head=head,
                         score_thresh=config.score_threshold, nms_thresh=config.nms_threshold,
                         detections_per_img=config.detections_per_image)
        self.transform = PreprocessedTransform(config.input_height, config.input_width)
        self.box_coder = BoxCoder(weights=BOX_WEIGHTS)
        self.head.regression_head.box_coder = self.box_coder
        self.config = config
        for tower in (self.head.classification_head.conv, self.head.regression_head.conv):
            he_normal(tower)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def predict(self, images: Tensor | Sequence[Tensor],
                score_threshold: float | None = None) -> list[dict[str, Tensor]]:
        """Eval-mode detections per image in model-input pixels (``score_threshold`` overrides the config's)."""
        was_training, saved = self.training, self.score_thresh
        self.eval()
        self.score_thresh = saved if score_threshold is None else score_threshold
        try:
            with torch.inference_mode():
                return self([image.to(self.device) for image in images])
        finally:
            self.score_thresh = saved
            self.train(was_training)


def he_normal(module: nn.Module) -> None:
    """The reference's head initialization, N(0, 2 / (k * k * out_channels)) and zero bias: torchvision's
    N(0, 0.01) leaves the four-convolution towers nearly silent, and short runs then barely move at first."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)


def detector_from_clip(model: MammoClip, classes: Sequence[str] = DEFAULT_CLASSES, **overrides: Any) -> MammoDetector:
    """A detector whose backbone starts from a Mammo-CLIP model's image encoder (FPN and heads random).

    The input size and normalization default to the model's; ``overrides`` set any other ``DetectorConfig`` field.
    """
    report = getattr(model, "load_report", None)
    config = {"classes": tuple(classes), "image_encoder": model.config.image_encoder,
              "input_height": model.config.input_height, "input_width": model.config.input_width,
              "pixel_mean": model.config.pixel_mean, "pixel_std": model.config.pixel_std,
              "apply_voi": model.config.apply_voi, "base_model_sha256": report.sha256 if report else ""}
    detector = MammoDetector(DetectorConfig(**{**config, **overrides}))
    detector.backbone.encoder.load_state_dict(model.image_encoder.state_dict())
    return detector


# ------------------------------------------------------------------------------------------- coordinates


def _scale(crop: CropBox, input_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    height, width = input_size
    sx, sy = (crop.right - crop.left) / width, (crop.bottom - crop.top) / height
    return np.array([sx, sy, sx, sy]), np.array([crop.left, crop.top, crop.left, crop.top], dtype=np.float64)


def to_source_boxes(boxes: np.ndarray, crop: CropBox, input_size: tuple[int, int]) -> np.ndarray:
    """(n, 4) x0, y0, x1, y1 in model-input pixels -> source-image pixels (0, 0 = top-left pixel's corner)."""
    scale, offset = _scale(crop, input_size)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale + offset


def to_model_boxes(boxes: np.ndarray, crop: CropBox, input_size: tuple[int, int]) -> np.ndarray:
    """(n, 4) source-image boxes -> model-input pixels, clipped to the input (a box outside it gets no area)."""
    scale, offset = _scale(crop, input_size)
    mapped = (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) - offset) / scale
    height, width = input_size
    return np.clip(mapped, 0, [width, height, width, height])


@dataclass(frozen=True)
class BoxDetection:
    """One detected lesion on a source image: class, score and box (x0, y0, x1, y1) in source pixels
    (column, row; 0, 0 the top-left corner of the top-left pixel, as SCOORD image coordinates)."""

    finding: str
    score: float
    box: tuple[float, float, float, float]


def view_detections(output: Mapping[str, Tensor], crop: CropBox, config: DetectorConfig) -> list[BoxDetection]:
    """One image's eval output -> detections in source pixels, best first (boxes without area dropped)."""
    boxes = to_source_boxes(output["boxes"].float().cpu().numpy(), crop, config.input_size)
    scores = output["scores"].float().cpu().numpy()
    labels = output["labels"].cpu().numpy()
    found = [BoxDetection(config.classes[int(label)], float(score), tuple(float(v) for v in box))
             for box, score, label in zip(boxes, scores, labels, strict=True) if box[2] > box[0] and box[3] > box[1]]
    return sorted(found, key=lambda d: -d.score)


def detect_views(detector: MammoDetector, images: Mapping[ViewKey, Tensor], crops: Mapping[ViewKey, CropBox],
                 batch_size: int = 4) -> dict[ViewKey, list[BoxDetection]]:
    """Per view, detections in SOURCE-image pixels; ``images`` are ``detector.config.preprocess()`` tensors."""
    keys = list(images)
    results: dict[ViewKey, list[BoxDetection]] = {}
    for start in range(0, len(keys), batch_size):
        chunk = keys[start:start + batch_size]
        for key, output in zip(chunk, detector.predict([images[k] for k in chunk]), strict=True):
            results[key] = view_detections(output, crops[key], detector.config)
    return results


def detect_datasets(detector: MammoDetector, datasets: Mapping[ViewKey, Dataset]) -> dict[ViewKey, list[BoxDetection]]:
    """Preprocess each view's DICOM at the detector's input size and detect (source-image pixels)."""
    config = detector.config.preprocess()
    images: dict[ViewKey, Tensor] = {}
    crops: dict[ViewKey, CropBox] = {}
    for key, ds in datasets.items():
        image, crops[key] = prepare_dicom(ds, config)
        images[key] = normalize(image, config)
    return detect_views(detector, images, crops)


# ------------------------------------------------------------------------------------------ save and load


def save_detector(detector: MammoDetector, folder: Path | str, card: Mapping[str, Any] | None = None) -> Path:
    """Write ``weights.safetensors``, ``config.json`` and ``card.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in detector.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({"kind": KIND, "detector": detector.config.to_dict()}, indent=2))
    full_card = {"created": datetime.now(UTC).isoformat(timespec="seconds"),
                 "weights_sha256": file_sha256(folder / WEIGHTS_FILE), **(card or {})}
    (folder / CARD_FILE).write_text(json.dumps(full_card, indent=2, default=str))
    return folder


def load_detector(folder: Path | str, device: str = "cpu") -> MammoDetector:
    """A detector folder written by ``save_detector``, in eval mode on ``device``."""
    folder = Path(folder)
    config_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.exists() or not weights.exists():
        raise CheckpointError(f"{folder} is not a detector folder ({CONFIG_FILE} and {WEIGHTS_FILE} needed).")
    data = json.loads(config_path.read_text())
    if data.get("kind") != KIND:
        raise CheckpointError(f"{folder} holds a {data.get('kind', 'Mammo-CLIP')!r} model, not a detector.")
    detector = MammoDetector(DetectorConfig.from_dict(data["detector"]))
    report = LoadReport(source=str(folder), sha256=file_sha256(weights))
    _load_strict(detector, load_file(str(weights)), report)
    detector.load_report = report
    return detector.to(device).eval()


def _load_strict(detector: MammoDetector, state: Mapping[str, Tensor], report: LoadReport) -> None:
    result = detector.load_state_dict(dict(state), strict=False)
    report.missing, report.unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if report.missing or report.unexpected:
        raise CheckpointError(f"{report.source} does not match the detector: missing {report.missing}, "
                              f"unmatched {report.unexpected}.")


# ------------------------------------------------------------------------------ reference detector checkpoints

# Reference key (``Detectors/retinanet/detector_model.py``) -> ours; ``None``: known and deliberately unused.
REFERENCE_KEY_RULES: tuple[tuple[str, str | None], ...] = (
    (r"^efficientnet\._fc\.", None),  # the reference backbone's unused classifier
    (r"^efficientnet\.", "backbone.encoder."),
    (r"^fpn\.P([345])_1\.", r"backbone.fpn.lateral\1."),
    (r"^fpn\.P([345])_2\.", r"backbone.fpn.output\1."),
    (r"^fpn\.P6\.", "backbone.fpn.p6."),
    (r"^fpn\.P7_2\.", "backbone.fpn.p7."),
    (r"^regressionModel\.output\.", "head.regression_head.bbox_reg."),
    (r"^classificationModel\.output\.", "head.classification_head.cls_logits."),
)
_HEAD_CONV = re.compile(r"^(regression|classification)Model\.conv([1-4])\.")


def reference_key(key: str) -> str | None:
    """Our name for a reference detector key; None for a known unused key; KeyError when unknown."""
    head = _HEAD_CONV.match(key)
    if head:
        return f"head.{head[1]}_head.conv.{int(head[2]) - 1}.0." + key[head.end():]
    for pattern, target in REFERENCE_KEY_RULES:
        if re.match(pattern, key):
            return None if target is None else re.sub(pattern, target, key, count=1)
    raise KeyError(key)


def _reference_state(path: Path, allow_pickle: bool) -> dict[str, Tensor]:
    checkpoint = _torch_load(path, allow_pickle)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or "fpn.P5_1.weight" not in {k.removeprefix("module.") for k in state}:
        raise CheckpointError(f"{path} is not a reference RetinaNet checkpoint (no 'fpn.P5_1.weight').")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _reference_config(state: Mapping[str, Tensor], classes: Sequence[str], source: Path) -> DetectorConfig:
    channels = tuple(int(state[f"fpn.P{level}_1.weight"].shape[1]) for level in (3, 4, 5))
    variants = [v for v in EFFICIENTNET_SPECS if feature_layout(v).channels == channels]
    if not variants:
        raise CheckpointError(f"{source}: backbone channels {channels} match no EfficientNet variant.")
    outputs = int(state["classificationModel.output.weight"].shape[0])
    n_anchors = len(ANCHOR_RATIOS) * len(ANCHOR_SCALES)
    if outputs != n_anchors * len(classes):
        raise CheckpointError(f"{source} predicts {outputs // n_anchors} class(es); {len(classes)} named: "
                              f"{list(classes)} (the reference trains one detector per finding).")
    height, width = REFERENCE_INPUT
    return DetectorConfig(classes=tuple(classes), image_encoder=variants[0], input_height=height, input_width=width,
                          fpn_channels=int(state["fpn.P5_1.weight"].shape[0]), padding="nominal")


def load_reference_detector(path: Path | str, classes: Sequence[str], *, device: str = "cpu",
                            allow_pickle: bool = True) -> MammoDetector:
    """A reference ``Detectors/retinanet`` checkpoint (``{"state_dict": ..., "MAP": ...}``) -> ``MammoDetector``.

    The reference trains one detector per finding, so ``classes`` names its class(es), e.g. ``("mass",)``.
    Every key is mapped by ``reference_key``; ``efficientnet._fc.*`` is ignored (reported in ``load_report``);
    an unknown, unmatched or missing key raises ``CheckpointError`` naming them. Input: 512 x 512.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"No detector checkpoint at {path}.")
    state = _reference_state(path, allow_pickle)
    detector = MammoDetector(_reference_config(state, classes, path))
    report = LoadReport(source=str(path), sha256=file_sha256(path))
    mapped: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        try:
            target = reference_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if target is None:
            report.ignored.append(key)
        else:
            mapped[target] = value
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} reference key(s) have no counterpart here: {unknown}.")
    try:
        _load_strict(detector, mapped, report)
    except RuntimeError as error:  # shape mismatch
        raise CheckpointError(f"{path}: tensor shapes differ from the detector's: {error}") from error
    detector.load_report = report
    return detector.to(device).eval()

