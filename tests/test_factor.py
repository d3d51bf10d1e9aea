"""Mammo-FActOR: projector shapes, the per-channel fix, the loss, maps and boxes, training, save/load, sizes."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import load_model, save_model_version
from models.errors import CheckpointError, ConfigurationError
from models.factor import (
    Factor,
    FactorConfig,
    FactorSizeError,
    attribute_sentences,
    box_to_source,
    build_factor,
    factor_loss,
    load_factor,
    localize_view,
    regions,
    save_factor,
)
from models.preprocess import CropBox
from tests.conftest import python_env, tiny_model
from training.factor.data import FactorRecord
from training.factor.localization import (
    box_iou,
    ceiling_map,
    evaluate_localization,
    factor_method,
    mask_box,
    pointing_hit,
    random_method,
    score,
)
from training.factor.train import FactorTrainConfig, feature_source, fit_factor, labels_of, validation_loss

H, W = 128, 96


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def factor() -> Factor:
    torch.manual_seed(0)
    return build_factor(tiny_model(height=H, width=W)).eval()


def random_factor(channels: int = 16, height: int = 8, width: int = 6, dim: int = 32, seed: int = 0) -> Factor:
    """A FActOR on a (channels, height, width) feature map with random attribute embeddings."""
    torch.manual_seed(seed)
    config = FactorConfig(("mass", "calcification"), height * 16, width * 16, height, width, channels, dim)
    return Factor(config, torch.randn(2, dim))


def test_attribute_sentences_are_templated_like_the_reference() -> None:
    mass = attribute_sentences("mass")
    assert len(mass) == len(set(mass)) > 400
    assert "there is a suspicious mass in the upper outer left breast at mid depth" in mass
    assert all("calcification" in text for text in attribute_sentences("calcification"))
    assert all("dense" in text for text in attribute_sentences("dense"))
    with pytest.raises(ConfigurationError, match="unknown FActOR attribute"):
        attribute_sentences("distortion")


def test_shapes_follow_the_model_input_size(factor: Factor) -> None:
    model = tiny_model(height=H, width=W)
    features = model.image_feature_map(torch.randn(2, 3, H, W))
    c = factor.config
    assert (c.input_height, c.input_width) == (H, W)
    assert (c.channels, c.map_height, c.map_width) == tuple(features.shape[1:])
    assert factor.projectors["mass"][0].in_features == c.region_dim == c.map_height * c.map_width
    assert factor.projectors["mass"][2].out_features == c.embed_dim == model.config.projection_dim
    regions_ = factor.region_embeddings(features)
    assert regions_.shape == (2, 2, c.channels, c.embed_dim)
    assert torch.allclose(regions_.norm(dim=-1), torch.ones(2, 2, c.channels), atol=1e-5)
    assert factor.channel_scores(features).shape == (2, 2, c.channels)
    with torch.no_grad():
        maps = factor.attribution(features)
    assert maps.shape == (2, 2, H, W) and float(maps.min()) >= 0 and float(maps.max()) <= 1 + 1e-6
    assert torch.allclose(factor.text_embeddings.norm(dim=-1), torch.ones(2))


def test_each_region_is_projected_from_its_own_channel_only() -> None:
    """The reference's cat(dim=1) + view mixed channels and attributes; here region (k, c) is pi_k(z_c)."""
    factor = random_factor()
    features = torch.randn(3, 16, 8, 6)
    before = factor.region_embeddings(features)
    changed = features.clone()
    changed[:, 5] += torch.randn(3, 8, 6)
    after = factor.region_embeddings(changed)
    others = [c for c in range(16) if c != 5]
    assert torch.equal(before[:, :, others], after[:, :, others])
    assert not torch.allclose(before[:, :, 5], after[:, :, 5])
    for k, attribute in enumerate(factor.config.attributes):
        direct = F.normalize(factor.projectors[attribute](features[:, 7].flatten(1)), dim=-1)
        assert torch.allclose(before[:, k, 7], direct, atol=1e-6)


def test_loss_matches_the_hand_computed_value() -> None:
    tau = 0.07
    # (N=3, K=2, C=2) cosines; y: image 0 has attribute 0, image 1 both, image 2 none.
    scores = torch.tensor([[[0.2, 0.5], [0.1, -0.3]],
                           [[0.4, 0.3], [0.6, 0.0]],
                           [[-0.1, 0.1], [0.2, 0.25]]])
    labels = torch.tensor([[1, 0], [1, 1], [0, 0]])
    s = [[0.5 / tau, 0.1 / tau], [0.4 / tau, 0.6 / tau], [0.1 / tau, 0.25 / tau]]
    # attribute 0: positives 0 and 1 give 1 each, negative 2 gives exp(s_20)
    background0 = 1 + 1 + math.exp(s[2][0])
    # attribute 1: negatives 0 and 2 give exp(s), positive 1 gives 1
    background1 = math.exp(s[0][1]) + 1 + math.exp(s[2][1])
    terms = [-math.log(math.exp(s[0][0]) / (math.exp(s[0][0]) + background0)),
             -math.log(math.exp(s[1][0]) / (math.exp(s[1][0]) + background0)),
             -math.log(math.exp(s[1][1]) / (math.exp(s[1][1]) + background1))]
    assert factor_loss(scores, labels, tau).item() == pytest.approx(sum(terms) / 3, rel=1e-5)
    assert factor_loss(scores, torch.zeros(3, 2), tau).item() == 0.0


def test_maps_and_boxes_land_on_the_lesion_in_image_and_source_coordinates() -> None:
    factor = random_factor()
    features = torch.zeros(1, 16, 8, 6)
    features[0, :, 5, 2] = torch.linspace(1.0, 2.0, 16)  # every channel peaks at cell (5, 2)
    heatmap = factor.attribution(features)[0, 0].detach().numpy()
    y, x = np.unravel_index(heatmap.argmax(), heatmap.shape)
    assert 5 * 16 <= y < 6 * 16 and 2 * 16 <= x < 3 * 16
    found = regions(heatmap, 0.95)
    assert len(found) == 1 and found[0].area == pytest.approx(0.05 * 128 * 96, rel=0.1)
    x0, y0, x1, y1 = found[0].box
    assert x0 < 40 < x1 and y0 < 88 < y1
    crop = CropBox(top=10, bottom=10 + 256, left=30, right=30 + 192, source_shape=(300, 260))
    assert box_to_source((0, 0, 96, 128), crop, (128, 96)) == (30, 10, 222, 266)
    view = localize_view(factor, features[0], crop)
    assert view.maps["mass"].shape == (300, 260)
    sy, sx = np.unravel_index(view.maps["mass"].argmax(), (300, 260))
    bx0, by0, bx1, by1 = view.regions["mass"][0].box
    assert bx0 <= sx < bx1 and by0 <= sy < by1 and (bx0, by0) == (30 + 2 * x0, 10 + 2 * y0)


def test_localization_metrics_on_hand_made_maps() -> None:
    mask = np.zeros((20, 10), bool)
    mask[4:8, 2:6] = True
    assert mask_box(mask) == (2, 4, 6, 8)
    assert box_iou((0, 0, 4, 4), (2, 2, 6, 6)) == pytest.approx(4 / 28)
    heatmap = np.zeros((20, 10), np.float32)
    heatmap[5, 3] = 1.0
    assert pointing_hit(heatmap, [mask]) and not pointing_hit(np.roll(heatmap, 9, axis=0), [mask])
    assert pointing_hit(np.roll(heatmap, 9, axis=0), [mask], tolerance=7)
    assert not pointing_hit(np.roll(heatmap, 9, axis=0), [mask], tolerance=6)
    ceiling = ceiling_map([mask], (5, 5))  # 4x2 cells: the mask fills cells (1, 1) and (1, 2)
    assert ceiling.shape == (20, 10) and pointing_hit(ceiling, [mask])
    scored = score("m", "mass", [heatmap, ceiling], [[mask], [mask]], 0.95, tolerance=2)
    assert (scored.images, scored.pointing, scored.pointing_near) == (2, 1.0, 1.0)


def lesion_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[dict[int, list[np.ndarray]]]]:
    """128x96 noise images; a third with a bright disk (mass), a third with a dot cluster (calcification)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    images, labels, truths = [], [], []
    for i in range(n):
        image = rng.normal(0.0, 0.3, (H, W)).astype(np.float32)
        truth: dict[int, list[np.ndarray]] = {}
        if i % 3 == 0:
            cy, cx = rng.integers(16, H - 16), rng.integers(16, W - 16)
            truth[0] = [(yy - cy) ** 2 + (xx - cx) ** 2 <= 12 ** 2]
            image[truth[0][0]] += 2.0
        elif i % 3 == 1:
            cy, cx = rng.integers(16, H - 16), rng.integers(16, W - 16)
            for dy, dx in rng.integers(-9, 10, size=(10, 2)):
                image[cy + dy - 1:cy + dy + 1, cx + dx - 1:cx + dx + 1] += 3.0
            truth[1] = [(abs(yy - cy) <= 10) & (abs(xx - cx) <= 10)]
        images.append(image)
        labels.append([int(0 in truth), int(1 in truth)])
        truths.append(truth)
    return torch.from_numpy(np.stack(images))[:, None], torch.tensor(labels, dtype=torch.float32), truths


def toy_encoder(images: torch.Tensor) -> torch.Tensor:
    """A fixed random convolution + ReLU pooled to stride 16: a (16, 8, 6) feature map that keeps locality."""
    generator = torch.Generator().manual_seed(0)
    filters = torch.randn(16, 1, 5, 5, generator=generator)
    return F.avg_pool2d(F.relu(F.conv2d(images, filters, padding=2)), 16)


def test_a_trained_factor_localizes_better_than_a_random_map() -> None:
    train_images, train_labels, _ = lesion_images(96, seed=1)
    test_images, test_labels, truths = lesion_images(48, seed=2)
    train, test = toy_encoder(train_images), toy_encoder(test_images)
    factor, cpu = random_factor(), torch.device("cpu")
    before = validation_loss(factor, lambda p: test[p], test_labels, 8, cpu)
    config = FactorTrainConfig(epochs=5, batch_size=8, learning_rate=3e-3, patience=5, seed=0, progress=False)
    history = fit_factor(factor, lambda p: train[p], train_labels, lambda p: test[p], test_labels, config, cpu)
    assert len(history) == 5  # 60 steps
    assert validation_loss(factor, lambda p: test[p], test_labels, 8, cpu) == min(h["validation_loss"] for h in history)
    assert min(h["validation_loss"] for h in history) < before
    methods = {"factor": factor_method(factor), "random": random_method(factor, seed=0)}
    scores = {(s.method, s.attribute): s for s in evaluate_localization(
        methods, lambda p: test[p], truths, factor.config.attributes, 0.95)}
    for attribute in ("mass", "calcification"):
        trained, chance = scores["factor", attribute], scores["random", attribute]
        assert trained.images == 16
        assert trained.pointing >= chance.pointing + 0.3 and trained.mean_iou > chance.mean_iou


def test_streamed_feature_maps_equal_the_cached_ones_and_train(tmp_path) -> None:
    model = tiny_model(height=H, width=W)
    rng = np.random.default_rng(0)
    records = []
    for i in range(4):
        np.save(tmp_path / f"{i}.npy", rng.integers(0, 255, (H, W), dtype=np.uint8))
        records.append(FactorRecord(str(tmp_path / f"{i}.npy"), i, "L", "CC", (i % 2, i // 2), f"1.2.{i}", ""))
    preprocess = model.config.preprocess()
    cached = feature_source(model, records, preprocess, FactorTrainConfig(progress=False), "cached")
    streamed = feature_source(model, records, preprocess, FactorTrainConfig(feature_cache_mb=0, progress=False), "")
    assert cached([3, 1]).dtype == torch.float16 and streamed([3, 1]).dtype == torch.float32
    assert torch.allclose(cached([3, 1]).float(), streamed([3, 1]).half().float(), rtol=1e-2, atol=0)
    factor = build_factor(model)
    config = FactorTrainConfig(epochs=1, batch_size=2, progress=False)
    history = fit_factor(factor, streamed, labels_of(records), cached, labels_of(records), config, torch.device("cpu"))
    assert len(history) == 1 and math.isfinite(history[0]["validation_loss"])


def test_save_load_round_trip_checks_the_base_model(tmp_path, factor: Factor) -> None:
    version = save_model_version(tiny_model(height=H, width=W), tmp_path / "model")
    model = load_model(version)
    built = build_factor(model, top_k=2)
    assert built.config.base_model_sha256 == model.load_report.sha256 != ""
    folder = save_factor(built, tmp_path / "factor")
    loaded = load_factor(folder, model)
    assert loaded.config == built.config
    for key, value in built.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    features = model.image_feature_map(torch.randn(1, 3, H, W))
    assert torch.equal(built.attribution(features), loaded.attribution(features))
    other = load_model(save_model_version(tiny_model(height=H, width=W, seed=1), tmp_path / "other"))
    with pytest.raises(CheckpointError, match="trained on model weights"):
        load_factor(folder, other)
    (folder / "factor.json").write_text((folder / "factor.json").read_text().replace("mammo-factor/1", "x"))
    with pytest.raises(CheckpointError, match="format"):
        load_factor(folder)


def test_a_mismatched_input_size_is_refused(tmp_path, factor: Factor) -> None:
    other = tiny_model(height=160, width=96)
    with pytest.raises(FactorSizeError, match="built for 128x96 inputs"):
        factor.attribution(other.image_feature_map(torch.randn(1, 3, 160, 96)))
    save_factor(factor, tmp_path / "factor")
    with pytest.raises(FactorSizeError, match="the model takes 160x96"):
        load_factor(tmp_path / "factor", other)
    with pytest.raises(ConfigurationError, match="top_k"):
        FactorConfig(("mass",), H, W, 4, 3, 8, 32, top_k=9)


@pytest.mark.slow
def test_the_benchmark_runs_every_stage_in_quick_mode(tmp_path) -> None:
    """Synthetic archive -> index -> convert -> train_factor -> the table (untrained encoder: no targets)."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, str(root / "benchmarks" / "factor_localization.py"), "--quick",
                             "--threads", "1", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=600, cwd=root,
                            env=python_env())
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("mass", "calcification"))]
    assert [row[0] for row in rows] == ["mass"] * 4 + ["calcification"] * 4
    assert "NOT a clinical model" in result.stdout
    folder = tmp_path / "run" / "factor"
    assert {p.name for p in folder.iterdir()} == {"factor.safetensors", "factor.json", "history.json", "card.json"}
