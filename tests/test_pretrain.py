"""Pretraining on a small synthetic archive: the loss falls, a killed run resumes bit-exactly, DDP on CPU
(gloo, under torchrun) keeps the ranks identical, and the model card names counts only."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select

from models import load_model, save_model_version
from models.clip import ClipConfig
from models.errors import ConfigurationError
from models.preprocess import PreprocessConfig, normalize
from tests.conftest import free_port, python_env, tiny_model
from training.archive.indexer import index_archive
from training.archive.store import ArchiveImage, ArchiveStudy, open_index
from training.convert import convert_archive
from training.datasets import BreastDataset, BreastItem
from training.pretrain import PretrainConfig, PretrainRun, multiview_clip_loss, pretrain, process_group
from training.provenance import TRAINED_ON_FILE
from training.synthetic import write_studies

ROOT = Path(__file__).resolve().parent.parent
INPUT = PreprocessConfig(height=64, width=48)
BASE = PretrainConfig(steps=12, batch_size=8, learning_rate=3e-3, warmup_fraction=0.1, batch_norm_momentum=0.1,
                      checkpoint_every=1000, workers=0, progress=False, synthetic_data=True)
KILLED = replace(BASE, batch_size=6, accumulation=2, workers=1, checkpoint_every=5)
REPORT = """EXAM: Screening mammogram.
FINDINGS: Scattered areas of fibroglandular density. A 12 mm oval mass in the left breast.
IMPRESSION: BI-RADS 4: Suspicious. Tissue sampling is advised.
RECOMMENDATION: Ultrasound-guided biopsy (the reference trains on FINDINGS and IMPRESSION only)."""


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """16 synthetic studies indexed with their manifest as label table (no reports) and converted at 64x48;
    one training image is truncated before conversion, so its conversion fails."""
    root = tmp_path_factory.mktemp("pretrain")
    manifest = write_studies(root / "studies", 16, seed=31, rows=256, cols=160, progress=False)
    index_archive(root / "studies", open_index(root / "index"), None, manifest, seed=5, progress=False)
    with open_index(root / "index").begin() as session:
        broken = session.scalars(select(ArchiveImage).join(ArchiveStudy).where(ArchiveStudy.split == "train")
                                 .order_by(ArchiveImage.id)).first()
        Path(broken.path).write_bytes(Path(broken.path).read_bytes()[:2000])
    summary = convert_archive(open_index(root / "index"), root / "cache", INPUT, workers=1, progress=False)
    assert (summary.converted, summary.failed) == (63, 1)
    save_model_version(tiny_model(), root / "tiny")
    return {"root": root, "index": root / "index", "manifest": manifest, "tiny": root / "tiny"}


def _history(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k != "images_per_s"} for h in history]


def test_dataset_pairs_views_uses_reports_and_counts_what_it_left_out(
        tmp_path: Path, archive: dict[str, Path]) -> None:
    index = tmp_path / "index"
    index.mkdir()
    with sqlite3.connect(archive["index"] / "archive.sqlite") as source, \
            sqlite3.connect(index / "archive.sqlite") as copy:
        source.backup(copy)  # a copy of the WAL-mode index to change
    with open_index(index).begin() as session:
        studies = session.scalars(select(ArchiveStudy).where(ArchiveStudy.split == "train")
                                  .order_by(ArchiveStudy.id)).all()
        studies[-1].report_text, studies[-1].report_source = REPORT, "reports.csv"  # a reader's report
        studies[-1].images[0].cache_key = None  # converted at another size only
        reported = {image.laterality for image in studies[-1].images}
    evaluation = BreastDataset(index, "train", INPUT, augment=None)
    assert evaluation.left_out == {"images whose conversion failed": 1, "images not converted at 64x48": 1}
    count = len(studies)  # four views each; two images left out
    assert (len(evaluation), evaluation.images, evaluation.studies) == (2 * count, 4 * count - 2, count)
    with_report = [item for item in evaluation.items if item.sections]
    assert {item.laterality for item in with_report} == reported
    # "birads 4 :" — the reference tokenizes with wordpunct and joins tokens with spaces
    assert with_report[0].sections == ("scattered areas of fibroglandular density a 12 mm oval mass in the left "
                                       "breast", "birads 4 : suspicious tissue sampling is advised")
    single = next(i for i, item in enumerate(evaluation.items) if len(item.views) == 1)
    item = evaluation[single]
    path = next(iter(evaluation.items[single].views.values()))[0]
    assert torch.equal(item["image"], normalize(np.load(path), INPUT))  # the inference normalization
    assert torch.equal(item["image"], item["image_view"])  # one view: paired with itself
    both = next(i for i, item in enumerate(evaluation.items) if len(item.views) == 2)
    assert not torch.equal(evaluation[both]["image"], evaluation[both]["image_view"])  # CC with MLO

    training = BreastDataset(index, "train", INPUT, seed=3)
    first = training[both]
    assert all(torch.equal(first[k], training[both][k]) for k in ("image", "image_view"))  # seeded
    assert not any(torch.equal(first["image"], evaluation[both][k]) for k in ("image", "image_view"))
    training.set_epoch(1)
    assert not torch.equal(first["image"], training[both]["image"])  # a new epoch draws new augmentations


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, archive: dict[str, Path]) -> Path:
    """A tiny model trained 48 steps (no augmentation: the multi-view term learns within them)."""
    run = tmp_path_factory.mktemp("trained")
    config = replace(BASE, steps=48, augment=False)
    return pretrain(archive["index"], run, start_from=archive["tiny"], config=config)


def test_the_loss_falls(trained: Path) -> None:
    history = _history(trained.parent)
    assert [h["step"] for h in history] == list(range(1, 49))
    first, last = history[:8], history[-8:]

    def mean(rows: list[dict[str, float]], key: str) -> float:
        return sum(row[key] for row in rows) / len(rows)

    assert mean(last, "loss") < mean(first, "loss") - 1.0
    assert mean(last, "i2i") < 0.5 * np.log(8)  # CC finds its MLO far better than chance among 8 breasts
    assert history[0]["lr"] < history[5]["lr"] and history[-1]["lr"] < history[10]["lr"]  # warm-up, decay
    assert all(h["images_per_s"] > 0 for h in history)


def test_card_and_curve_name_counts_only(trained: Path, archive: dict[str, Path]) -> None:
    card = json.loads((trained / "card.json").read_text())
    assert card["clinical_use"] is False and "NOT a clinical model" in card["intended_use"]
    with open_index(archive["index"])() as session:
        studies = session.scalars(select(ArchiveStudy)).all()
    count = sum(study.split == "train" for study in studies)
    trained_on = json.loads((trained / TRAINED_ON_FILE).read_text())
    assert trained_on["count"] == count and trained_on["base"] == "unknown" and trained_on["splits"] == ["train"]
    assert card["training_data"] == {"source": "synthetic phantoms", "split": "train", "studies": count,
                                     "breasts": 2 * count, "images": 4 * count - 1,
                                     "left_out": {"images whose conversion failed": 1},
                                     "studies_sha256": trained_on["sha256"]}
    assert card["objective"]["i2i_weight"] == 1.0 and card["objective"]["t2t_weight"] == 0.5
    assert card["training"]["steps"] == 48 and card["objective"]["text_encoder"] == "frozen"
    assert (trained / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (trained / "card.json").read_text() + (trained / TRAINED_ON_FILE).read_text()
    with archive["manifest"].open() as handle:
        rows = list(csv.DictReader(handle))
    identifiers = {study.patient_key for study in studies} | {row[name] for row in rows for name in
                          ("patient_id", "accession_number", "study_instance_uid", "sop_instance_uid")}
    assert not [value for value in identifiers if value in text]
    assert str(archive["root"]) not in text


def test_the_logit_scale_is_clamped_to_100(tmp_path: Path, archive: dict[str, Path]) -> None:
    """A start whose logit scale is past CLIP's cap (exp 1000 > 100) leaves its first step at the cap."""
    hot = tiny_model()
    with torch.no_grad():
        hot.logit_scale.fill_(math.log(1000.0))
    save_model_version(hot, tmp_path / "hot")
    version = pretrain(archive["index"], tmp_path / "run", start_from=tmp_path / "hot", config=replace(BASE, steps=1))
    assert _history(tmp_path / "run")[0]["logit_scale"] == pytest.approx(100.0)
    assert load_model(version).logit_scale.exp().item() == pytest.approx(100.0)


def _killed_run(index: str, out: str, start: str) -> None:
    """Train with ``KILLED`` and SIGKILL this process right after its first checkpoint is written."""

    class KillAtCheckpoint(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("checkpoint"):
                os.kill(os.getpid(), signal.SIGKILL)

    logger = logging.getLogger("training.pretrain")
    logger.setLevel(logging.INFO)
    logger.addHandler(KillAtCheckpoint())
    pretrain(index, Path(out), start_from=Path(start), config=KILLED)


def _script(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _run(command: list[str], **env_changes: str) -> subprocess.CompletedProcess[str]:
    env = python_env(**env_changes)
    return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)


def test_killed_run_resumes_bit_exactly(tmp_path: Path, archive: dict[str, Path]) -> None:
    """With accumulation over batches that do not divide the epoch the kill falls mid-epoch; a worker process
    loads the data."""
    whole = pretrain(archive["index"], tmp_path / "whole", start_from=archive["tiny"], config=KILLED)
    killed = _run(_script("killed", str(archive["index"]), str(tmp_path / "cut"), str(archive["tiny"])))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-00000005.pt"]
    checkpoint = torch.load(tmp_path / "cut" / "checkpoints" / "step-00000005.pt", weights_only=True)
    assert 0 < checkpoint["position"] < checkpoint["dataset_size"] // KILLED.batch_size  # mid-epoch
    assert not (tmp_path / "cut" / "model").exists()
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as handle:  # a step logged after the checkpoint
        handle.write(json.dumps({"step": 6, "loss": 0.0}) + '\n{"step": 7, "lo')  # and one it was killed writing
    scratch = ClipConfig(image_encoder="efficientnet-test", input_height=64, input_width=48)  # tiny's, random
    with pytest.raises(ConfigurationError, match="started from tiny, not random initialization"):
        pretrain(archive["index"], tmp_path / "cut", config=replace(KILLED, resume=True, model=scratch))
    resumed = pretrain(archive["index"], tmp_path / "cut", start_from=archive["tiny"],
                       config=replace(KILLED, resume=True))
    assert _losses(_history(tmp_path / "cut")) == _losses(_history(tmp_path / "whole"))
    assert len(_history(tmp_path / "whole")) == 12
    expected, got = load_file(str(whole / "weights.safetensors")), load_file(str(resumed / "weights.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    with pytest.raises(ConfigurationError, match="already holds a run"):
        pretrain(archive["index"], tmp_path / "cut", start_from=archive["tiny"], config=KILLED)


def _ddp_rank(index: str, out: str, start: str, dump: str) -> None:
    """One torchrun process: train, then leave this rank's final weights for the test to compare."""
    with process_group():
        run = PretrainRun(index, Path(out), start_from=Path(start), config=replace(BASE, steps=4, batch_size=4))
        run.run()
        torch.save(run.model.state_dict(), Path(dump) / f"rank{run.rank}.pt")


def test_more_training_processes_than_gpus_is_refused_before_joining(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda _: pytest.fail("set_device on a GPU that is not there"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigurationError, match=r"process 1 .* no GPU of its own \(1 visible\)"), process_group():
        pass


def test_ddp_on_cpu_under_torchrun(tmp_path: Path, archive: dict[str, Path]) -> None:
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    launched = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                     f"--master_port={free_port()}", *_script("ddp", str(archive["index"]), str(out),
                                                              str(archive["tiny"]), str(dump))[1:]],
                    CUDA_VISIBLE_DEVICES="")  # two processes on the CPU, also on a machine with one GPU
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "model"]
    assert [h["step"] for h in _history(out)] == [1, 2, 3, 4]
    card = json.loads((out / "model" / "card.json").read_text())
    assert card["training"]["processes"] == 2
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    start = load_file(str(archive["tiny"] / "weights.safetensors"))
    assert not torch.equal(ranks[0]["image_projection.projection.weight"],
                           start["image_projection.projection.weight"])


if __name__ == "__main__":  # the processes the tests above launch
    {"killed": _killed_run, "ddp": _ddp_rank}[sys.argv[1]](*sys.argv[2:])


def test_texts_of_equal_labels_are_positives_of_each_other_but_views_are_not() -> None:
    """Breasts 0 and 1 have texts phrased from equal labels: each image's target in the image-text terms is
    spread over both texts (no false negative), while the CC-MLO and text-text terms keep the breast's own as
    the one positive. A breast with a report keeps its own texts only (as the reference)."""
    torch.manual_seed(0)
    image, view, text, text2 = (torch.nn.functional.normalize(torch.randn(3, 8), dim=1) for _ in range(4))
    scale = torch.tensor(10.0)
    soft = multiview_clip_loss(image, view, text, text2, scale, meanings=torch.tensor([7, 7, -3]))
    hard = multiview_clip_loss(image, view, text, text2, scale)
    assert soft["i2i"] == hard["i2i"] and soft["t2t"] == hard["t2t"]
    assert not torch.isclose(soft["i2t"], hard["i2t"])
    spread = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    cross = torch.nn.functional.cross_entropy
    same = multiview_clip_loss(image, image, text, text, scale, meanings=torch.tensor([7, 7, -3]))
    assert torch.isclose(same["i2t"], cross(scale * image @ text.t(), spread))
    assert torch.isclose(same["t2i"], cross(scale * text @ image.t(), spread))
    labels = {"mass": 1, "calcification": 0, "malignant": 0, "density": "B", "birads": 4}
    left, same_side, right = (BreastItem(side, {}, (), dict(labels)) for side in ("L", "L", "R"))
    assert left.label_meaning == same_side.label_meaning != right.label_meaning  # "left breast" is not "right"
    assert BreastItem("L", {}, ("FINDINGS: a mass.",), dict(labels)).label_meaning is None  # a report: its own


def test_breasts_phrased_from_equal_labels_share_a_meaning(archive: dict[str, Path]) -> None:
    dataset = BreastDataset(archive["index"], "train", INPUT, augment=None)
    meanings = [dataset[index]["meaning"] for index in range(len(dataset))]
    assert meanings == [item.label_meaning for item in dataset.items]  # a label table, no reports
    assert min(meanings) >= 0 and len(set(meanings)) < len(meanings)  # several breasts share side and labels


def test_pretraining_with_grouped_positives_learns(tmp_path: Path, archive: dict[str, Path]) -> None:
    out = pretrain(archive["index"], tmp_path / "run", start_from=archive["tiny"],
                   config=replace(BASE, steps=24, augment=False, group_positives=True))
    history = _history(out.parent)
    assert history[-1]["loss"] < history[0]["loss"]
    assert "equal labels" in json.loads((out / "card.json").read_text())["objective"]["positives"]
