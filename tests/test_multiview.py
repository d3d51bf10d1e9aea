"""Four-view CLIP with adapters (models.multiview, training.multiview_train) on a tiny random CLIP directory:
equivalence with transformers' CLIP, masks with 1-4 views, parameter fraction, positions, frozen backbone,
training, save/load, the node's DICOM path and the training protocols on synthetic phantoms."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sqlalchemy import update
from transformers import CLIPConfig, CLIPModel

from models.errors import CheckpointError, ConfigurationError
from models.multiview import (
    VIEW_NAMES,
    MissingViewsError,
    MultiViewClip,
    MultiViewConfig,
    build_multiview,
    clip_pixels,
    interpolate_positions,
    load_multiview,
    preprocess_view,
    save_multiview,
    study_probability,
)
from models.preprocess import PreprocessConfig
from training import multiview_train
from training.archive.indexer import index_archive
from training.archive.store import ArchiveImage, open_index
from training.convert import convert_archive
from training.multiview_train import (
    MultiviewTrainConfig,
    case_label,
    fit,
    load_studies,
    load_study_batch,
    train_multiview,
    train_step,
    write_random_clip,
)
from training.synthetic import write_studies

SIZE = (48, 32)  # a 6 x 4 patch grid from CLIP's 4 x 4 (32 px, patch 8)
CONFIG = MultiViewConfig(input_height=SIZE[0], input_width=SIZE[1], benign_prompts=("benign",),
                         malignant_prompts=("malignant", "cancer"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CLIP saved as a local Hugging Face directory: hidden 64 (adapter bottleneck 2), two layers
    per tower, 32 px images in 8 px patches."""
    return write_random_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def perturb(model: MultiViewClip, seed: int = 1) -> MultiViewClip:
    """Give every trained tensor random values, as if trained (untrained adapters are the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.dim():
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def model(clip_dir: Path) -> MultiViewClip:
    return perturb(build_multiview(clip_dir, CONFIG))


def studies(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, len(VIEW_NAMES), 3, *SIZE, generator=torch.Generator().manual_seed(seed))


SUBSETS = [subset for k in range(1, 5) for subset in itertools.combinations(range(4), k)]


def masks(subsets: list[tuple[int, ...]]) -> torch.Tensor:
    present = torch.zeros(len(subsets), 4, dtype=torch.bool)
    for row, subset in enumerate(subsets):
        present[row, list(subset)] = True
    return present


# ----------------------------------------------------------------------------------------- the model


def test_untrained_model_is_clip_on_one_view_at_native_size(clip_dir: Path) -> None:
    model = build_multiview(clip_dir, MultiViewConfig(input_height=32, input_width=32)).eval()
    clip = CLIPModel.from_pretrained(str(clip_dir)).eval()
    pixels = torch.randn(3, 3, 32, 32)
    batch = torch.zeros(3, 4, 3, 32, 32)
    batch[:, 2] = pixels
    with torch.no_grad():
        ours = model.encode_studies(batch, masks([(2,)] * 3))
        theirs = clip.get_image_features(pixel_values=pixels)
        texts = ["a mammogram of a benign case", "cancer"]
        tokens = model.tokenizer(texts, padding=True, return_tensors="pt")
        text_theirs = clip.get_text_features(**tokens)
    theirs = getattr(theirs, "pooler_output", theirs)
    text_theirs = getattr(text_theirs, "pooler_output", text_theirs)
    torch.testing.assert_close(ours, F.normalize(theirs, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.encode_texts(texts).detach(), F.normalize(text_theirs, dim=-1),
                               atol=1e-5, rtol=1e-5)
    assert model.config.n_local == 1 and model.grid == (4, 4)


def test_every_subset_of_views_scores_and_batches_do_not_mix(model: MultiViewClip) -> None:
    pixels, present = studies(len(SUBSETS)), masks(SUBSETS)
    with torch.no_grad():
        batched = model.encode_studies(pixels, present)
        alone = torch.cat([model.encode_studies(pixels[i:i + 1], present[i:i + 1]) for i in range(len(SUBSETS))])
        probability = model.malignancy_probability(pixels, present)
    assert batched.shape == (15, 32) and probability.shape == (15,)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(15))
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    assert ((probability > 0) & (probability < 1)).all()
    assert len({round(p, 5) for p in probability.tolist()}) == 15  # every subset gives its own score


def test_absent_views_are_masked_out(model: MultiViewClip) -> None:
    pixels, present = studies(4, seed=2), masks([(0,), (1, 3), (0, 1, 2), (2,)])
    noisy = pixels.clone()
    noisy[~present] = 100 * torch.randn_like(noisy[~present])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_studies(pixels, present), model.encode_studies(noisy, present),
                                   atol=0, rtol=0)
        changed = pixels.clone()
        changed[0, 0] += 1.0  # a present view does change the score
        assert not torch.equal(model.encode_studies(changed[:1], present[:1]), model.encode_studies(pixels[:1],
                                                                                                      present[:1]))


def _outside_single_view_span(model: MultiViewClip) -> float:
    """Distance of the (LCC, RCC) case embedding from the plane of the two single-view embeddings."""
    pixels = studies(1, seed=3)
    with torch.no_grad():
        pair = model.encode_studies(pixels, masks([(0, 1)]))[0, :, None]
        basis = torch.cat([model.encode_studies(pixels, masks([(view,)])) for view in (0, 1)]).T
        return float((basis @ torch.linalg.lstsq(basis, pair).solution - pair).norm())


def test_global_blocks_fuse_the_views(clip_dir: Path) -> None:
    """Without global blocks (late fusion) a case embedding is a mix of the single-view ones; with them the views
    attend to each other and it is not."""
    late = perturb(build_multiview(clip_dir, MultiViewConfig(n_local=2, input_height=SIZE[0], input_width=SIZE[1])))
    assert _outside_single_view_span(late) < 1e-5
    assert _outside_single_view_span(perturb(build_multiview(clip_dir, CONFIG))) > 1e-3


def test_a_study_without_views_is_a_clear_error(model: MultiViewClip) -> None:
    present = masks([(0, 1)] * 2)
    present[1] = False
    with pytest.raises(MissingViewsError, match=r"studies \[1\] of the batch have no views"):
        model.encode_studies(studies(2), present)
    with pytest.raises(MissingViewsError, match="no views"):
        study_probability(model, {})
    with pytest.raises(MissingViewsError, match="unknown view"):
        study_probability(model, {"LXCC": torch.zeros(3, *SIZE)})
    with pytest.raises(ValueError, match="expected"):
        model.encode_studies(torch.zeros(1, 4, 3, 32, 32), masks([(0,)]))


def test_study_probability_takes_either_key_style(model: MultiViewClip) -> None:
    pixels = studies(1, seed=4)[0]
    by_name = study_probability(model, {"LCC": pixels[0], "RMLO": pixels[3]})
    by_tuple = study_probability(model, {("L", "CC"): pixels[0], ("R", "MLO"): pixels[3]})
    with torch.no_grad():
        batched = model.malignancy_probability(pixels[None], masks([(0, 3)]))
    assert by_name == by_tuple == pytest.approx(float(batched[0]), abs=1e-6)
    assert 0 < by_name < 1


# --------------------------------------------------------------------------------- parameters and positions


def test_adapters_are_about_one_percent_of_the_tiny_model(model: MultiViewClip) -> None:
    count = model.parameter_count()
    trained = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("clip."))
    assert count.trainable == trained and 0.005 <= count.fraction <= 0.02
    assert str(count).endswith(f"({100 * count.fraction:.2f}%)")


@pytest.mark.parametrize(("name", "clip_config", "width", "backbone"), [
    ("ViT-B/16", CLIPConfig(vision_config={"patch_size": 16}), 288, 149_620_737),
    ("ViT-L/14", CLIPConfig(projection_dim=768,
                            text_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
                            vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                           "num_attention_heads": 16, "patch_size": 14}), 280, 427_616_513),
])
def test_adapter_fraction_of_real_clip_shapes_on_the_meta_device(name: str, clip_config: CLIPConfig, width: int,
                                                                  backbone: int) -> None:
    with torch.device("meta"):
        model = MultiViewClip(CLIPModel(clip_config), None, MultiViewConfig(input_width=width))
    count = model.parameter_count()
    assert count.total - count.trainable == backbone, name  # OpenAI CLIP's parameter count
    assert 0.005 <= count.fraction <= 0.02, f"{name}: {count}"


def test_position_interpolation(model: MultiViewClip) -> None:
    table = model.clip.vision_model.embeddings.position_embedding.weight.detach()
    assert interpolate_positions(table, (4, 4)) is table
    resized = interpolate_positions(table, (6, 4))
    theirs = model.clip.vision_model.embeddings.interpolate_pos_encoding(torch.zeros(1, 25, 64), 48, 32)[0]
    torch.testing.assert_close(resized, theirs.detach(), atol=1e-6, rtol=1e-6)
    ramp = torch.cat([torch.zeros(1, 2), torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0),
                                                                    indexing="ij"), -1).reshape(16, 2)])
    grid = interpolate_positions(ramp, (8, 8))[1:].reshape(8, 8, 2)
    assert (grid[1:, :, 0] >= grid[:-1, :, 0] - 1e-5).all() and (grid[:, 1:, 1] >= grid[:, :-1, 1] - 1e-5).all()
    assert torch.equal(interpolate_positions(ramp, (8, 8))[0], ramp[0])


def test_clip_pixels_uses_clip_normalization() -> None:
    image = np.tile(np.linspace(10, 200, 64).astype(np.uint8)[:, None], (1, 48))
    pixels = clip_pixels(image, CONFIG)
    assert pixels.shape == (3, *SIZE)
    for channel, (mean, std) in enumerate(zip(CONFIG.pixel_mean, CONFIG.pixel_std, strict=True)):
        assert float(pixels[channel].min()) == pytest.approx(-mean / std, abs=1e-5)
        assert float(pixels[channel].max()) == pytest.approx((1 - mean) / std, abs=1e-5)


# ------------------------------------------------------------------------------------ training and folders


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 synthetic studies (each with a finding, half malignant), indexed and converted at 48x32; the first
    study's LMLO is marked as failed, so that study has three views."""
    root = tmp_path_factory.mktemp("multiview")
    manifest = write_studies(root / "studies", 30, seed=5, rows=256, cols=160, finding_prevalence=1.0,
                             malignancy_prevalence=0.5, progress=False)
    index_archive(root / "studies", open_index(root / "index"), None, manifest, seed=3, progress=False)
    convert_archive(open_index(root / "index"), root / "cache", PreprocessConfig(*SIZE), workers=1, progress=False)
    with open_index(root / "index").begin() as session:
        session.execute(update(ArchiveImage).where(ArchiveImage.study_id == 1, ArchiveImage.laterality == "L",
                                                   ArchiveImage.view == "MLO").values(convert_error="test"))
    return root / "index"


@pytest.mark.parametrize(("labels", "expected"), [
    ({"L": {"malignant": 1}, "R": {"malignant": 0}}, 1), ({"L": {"malignant": 0}, "R": {"malignant": 0}}, 0),
    ({"L": {"malignant": 0}}, None), ({"R": {"malignant": 1}}, 1), (None, None)])
def test_case_label(labels: dict | None, expected: int | None) -> None:
    assert case_label(labels) == expected


def test_training_steps_reduce_the_loss_and_leave_the_backbone_frozen(clip_dir: Path, archive: Path) -> None:
    torch.manual_seed(0)
    model = build_multiview(clip_dir, CONFIG)
    records, left_out = load_studies(archive, PreprocessConfig(*SIZE))
    assert len(records) == 30 and left_out == {"images whose conversion failed": 1}
    assert records[0].paths[VIEW_NAMES.index("LMLO")] is None and all(all(r.paths) for r in records[1:])
    batch = records[:8]
    pixels, present = load_study_batch(batch, model.config)
    labels = torch.tensor([record.label for record in batch])
    backbone = {k: v.clone() for k, v in model.clip.state_dict().items()}
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    losses = [train_step(model, optimizer, scaler, pixels, present, labels) for _ in range(25)]
    assert losses[-1] < 0.7 * losses[0] and losses[-1] < min(losses[:5]) - 0.1, losses
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert all(not p.requires_grad and p.grad is None for p in model.clip.parameters())
    assert all(torch.equal(backbone[k], v) for k, v in model.clip.state_dict().items())
    assert not model.clip.training and model.image_adapters.training


def test_the_best_epoch_is_kept_on_cpu(clip_dir: Path, archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation AUC falls after epoch 1: ``fit`` must end with epoch 1's weights, not the last epoch's (a
    "best state" that shares storage with the live CPU weights would follow them)."""
    torch.manual_seed(0)
    model = build_multiview(clip_dir, CONFIG)
    records, _ = load_studies(archive, PreprocessConfig(*SIZE))
    aucs, snapshots = iter([0.9, 0.5, 0.4]), []

    def scripted_auc(*_: object) -> float:
        snapshots.append({k: v.clone() for k, v in model.state_dict().items() if not k.startswith("clip.")})
        return next(aucs)

    monkeypatch.setattr(multiview_train, "auc_or_none", scripted_auc)
    config = MultiviewTrainConfig(epochs=3, batch_size=4, learning_rate=1e-2, augment=False, progress=False)
    history = fit(model, records[1:5], records[5:7], config, "test")
    assert [h["validation_auc"] for h in history] == [0.9, 0.5, 0.4]
    kept = model.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in snapshots[0].items())
    assert not all(torch.equal(kept[k], v) for k, v in snapshots[-1].items())


def test_mixed_precision_forward_and_backward(clip_dir: Path) -> None:
    """The CUDA path runs under bf16 autocast; the same dtype mixing is checked here with CPU autocast."""
    model = perturb(build_multiview(clip_dir, CONFIG)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(studies(3, seed=7), masks([(0, 1, 2, 3), (1,), (0, 2)]))
    F.cross_entropy(logits.float(), torch.tensor([0, 1, 1])).backward()
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_version_folder_round_trip(model: MultiViewClip, clip_dir: Path, tmp_path: Path) -> None:
    folder = save_multiview(model, tmp_path / "version", card={"name": "tiny"})
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "config.json", "tokenizer", "weights.safetensors"]
    card = json.loads((folder / "card.json").read_text())
    assert card["parameters"] == model.parameter_count().to_dict() and card["name"] == "tiny"
    assert (folder / "weights.safetensors").stat().st_size < 100_000  # the frozen CLIP is referenced, not copied
    loaded = load_multiview(folder)
    pixels, present = studies(3, seed=6), masks([(0, 1, 2, 3), (2,), (1, 3)])
    with torch.no_grad():
        assert torch.equal(loaded.malignancy_probability(pixels, present), model.malignancy_probability(pixels,
                                                                                                        present))
    assert loaded.config == model.config and loaded.card["name"] == "tiny"
    moved = shutil.copytree(clip_dir, tmp_path / "moved-clip")
    assert load_multiview(folder, clip_dir=moved).backbone.path == str(moved.resolve())
    other = write_random_clip(tmp_path / "other-clip", seed=1)
    with pytest.raises(CheckpointError, match="is not the one"):
        load_multiview(folder, clip_dir=other)
    with pytest.raises(CheckpointError, match="not a mammo-multiview-clip"):
        load_multiview(clip_dir)


def test_four_dicom_views_to_a_case_score(model: MultiViewClip, synthetic_root: Path) -> None:
    """The node's path: the study's DICOM files -> ``preprocess_view`` -> ``study_probability``."""
    import pydicom

    files = sorted(synthetic_root.rglob("*.dcm"))
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    views = {}
    for path in files:
        ds = pydicom.dcmread(path)
        if ds.StudyInstanceUID == study:
            views[(ds.ImageLaterality, ds.ViewPosition)] = preprocess_view(ds, model.config)
    assert len(views) == 4
    assert 0 < study_probability(model, views) < 1
    del views[("L", "MLO")]
    assert 0 < study_probability(model, views) < 1


def test_cross_validation_and_few_shot_split(clip_dir: Path, archive: Path, tmp_path: Path) -> None:
    config = MultiviewTrainConfig(protocol="cv", folds=3, epochs=2, batch_size=6, learning_rate=5e-3,
                                  n_bootstrap=50, synthetic_data=True, progress=False)
    out = train_multiview(archive, clip_dir, tmp_path / "cv", model_config=CONFIG, config=config)
    metrics = json.loads((out / "metrics.json").read_text())
    aucs = [fold["auc"] for fold in metrics["folds"]]
    assert len(aucs) == 3 and all(0 <= auc <= 1 for auc in aucs)
    assert metrics["auc_mean"] == pytest.approx(np.mean(aucs), abs=1e-3)
    assert metrics["auc_sd"] == pytest.approx(np.std(aucs, ddof=1), abs=1e-3)
    assert sum(fold["test"]["studies"] for fold in metrics["folds"]) == metrics["out_of_fold"]["n"] == 30
    assert metrics["out_of_fold"]["bootstrap"] == "cluster"
    assert metrics["data"]["studies_by_views_present"] == {"3": 1, "4": 29}
    assert metrics["left_out"] == {"images whose conversion failed": 1}
    assert metrics["parameters"]["fraction"] == pytest.approx(0.0110, abs=0.005)
    card = json.loads((out / "fold-1" / "card.json").read_text())
    assert "NOT a clinical model" in card["intended_use"] and card["parameters"]["trainable"] > 0
    assert load_multiview(out / "fold-2").config == build_multiview(clip_dir, CONFIG).config
    with pytest.raises(ConfigurationError, match="already holds"):
        train_multiview(archive, clip_dir, out, model_config=CONFIG, config=config)

    few = MultiviewTrainConfig(protocol="split", k_shot=3, epochs=2, batch_size=6, n_bootstrap=50,
                               synthetic_data=True, progress=False)
    out = train_multiview(archive, clip_dir, tmp_path / "split", model_config=CONFIG, config=few)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"]["train"]["studies_per_class"] == {"benign": 3, "malignant": 3}
    assert metrics["test"]["n"] == metrics["counts"]["test"]["studies"] and len(metrics["history"]) == 2
    assert metrics["test"]["bootstrap"] == "cluster"  # the CI resamples patients, not studies
    assert (out / "model" / "weights.safetensors").exists() and (out / "roc.png").exists()
