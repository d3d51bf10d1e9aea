"""`mammo-node train detector` and `mammo-node train factor` on tiny synthetic data and tiny models, run through
click's CliRunner (in process: a subprocess spends ~20 s importing on 2 busy cores), then registered with
`mammo-node model register --detector/--factor` against a temporary database."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from dicom_node.cli import main
from models import save_model_version
from models.preprocess import PreprocessConfig
from tests.conftest import tiny_model
from training.archive.indexer import index_archive
from training.archive.store import open_index
from training.convert import convert_archive
from training.synthetic import write_studies

pytestmark = pytest.mark.usefixtures("one_torch_thread")

Invoke = Callable[..., Result]


@pytest.fixture
def mammo_node(tmp_path: Path) -> Iterator[Invoke]:
    """Run `mammo-node ARGS...` in process on a data directory (and database) of its own; the umask and the root
    logger the command sets are put back afterwards."""
    runner = CliRunner()
    env = {"MAMMO_DATA_DIR": str(tmp_path / "data"), "MAMMO_DEVICE": "cpu", "MAMMO_DB_URL": None}
    root = logging.getLogger()
    handlers, level, umask = root.handlers[:], root.level, os.umask(0o077)
    os.umask(umask)

    def invoke(*args: str) -> Result:
        try:
            return runner.invoke(main, list(args), env=env, catch_exceptions=False)
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
            os.umask(umask)

    assert invoke("db", "upgrade").exit_code == 0
    yield invoke


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 small synthetic studies, each with a finding (one lands in validation): their manifest.csv."""
    root = tmp_path_factory.mktemp("phantoms")
    return write_studies(root / "studies", 16, seed=5, rows=256, cols=160, finding_prevalence=1.0, progress=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model version at 64x48: the encoder the detector and the FActOR are trained on."""
    return save_model_version(tiny_model(seed=1), tmp_path_factory.mktemp("base") / "tiny",
                              card={"name": "tiny-test-model", "clinical_use": False})


def registered(invoke: Invoke, base: Path, option: str, folder: Path) -> None:
    """Register ``folder`` with ``base`` through the CLI and check the registry lists it."""
    result = invoke("model", "register", str(base), "--name", f"v-{option}", f"--{option}", str(folder))
    assert result.exit_code == 0, result.output
    shown = json.loads(invoke("model", "show", f"v-{option}").stdout)
    assert shown[option] == str(folder.resolve())


def test_help_teaches_data_outputs_serving_and_not_clinical(mammo_node: Invoke) -> None:
    listing = mammo_node("train", "--help").stdout
    assert "train detector" in listing and "train factor" in listing
    for command, option, data in (("detector", "--detector", "VinDr-style box CSV"),
                                  ("factor", "--factor", "archive index")):
        result = mammo_node("train", command, "--help")
        assert result.exit_code == 0 and f"usage: mammo-node train {command}" in result.stdout
        text = " ".join(result.stdout.split())
        assert data in text and "manifest.csv" in text and "metrics.json" in text
        assert "mammo-node model register" in text and option in text and "NOT a clinical model" in text


def test_train_detector_prints_map_per_class_and_registers(mammo_node: Invoke, phantoms: Path, base: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "det"
    args = ("train", "detector", "--manifest", str(phantoms), "--model", str(base), "--input-size", "96", "64",
            "--fpn-channels", "16", "--anchor-size", "8", "--epochs", "1", "--batch-size", "8", "--holdout", "0.25",
            "--eval-score-threshold", "0", "--out", str(out), "--device", "cpu", "--no-progress")
    result = mammo_node(*args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    held = metrics["held_out"]
    assert metrics["data"]["held_out"]["images"] == held["images"] > 0
    assert "held-out mAP@0.5 " in result.stdout and f"on {held['images']} images" in result.stdout
    for name in ("mass", "calcification"):
        ap = held["average_precision"][name]
        assert f"{name:<14} AP@0.5 {'n/a' if ap is None else f'{ap:.3f}':>5}" in result.stdout
    assert f"mammo-node model register {base} --detector {out}" in result.stdout
    assert "NOT a clinical model" in result.stdout
    assert json.loads((out / "card.json").read_text())["clinical_use"] is False
    registered(mammo_node, base, "detector", out)

    again = mammo_node(*args)
    assert again.exit_code == 1 and "already holds a training run" in again.stderr


@pytest.fixture(scope="module")
def archive(phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantoms indexed (their manifest as label table) and converted at the tiny model's 64x48."""
    index = tmp_path_factory.mktemp("archive") / "index"
    index_archive(phantoms.parent, open_index(index), None, phantoms, seed=3, progress=False)
    convert_archive(open_index(index), index.parent / "cache", PreprocessConfig(height=64, width=48), workers=1,
                    progress=False)
    return index


def test_train_factor_prints_localization_per_attribute_and_registers(mammo_node: Invoke, archive: Path,
                                                                      phantoms: Path, base: Path,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "factor"
    result = mammo_node("train", "factor", str(archive), str(base), str(out), "--masks", str(phantoms),
                        "--all-images", "--epochs", "2", "--synthetic-data", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    localization = json.loads((out / "metrics.json").read_text())["localization"]
    rows = {(row["attribute"], row["method"]): row for row in localization["scores"]}
    methods = ("FActOR", "random map", "zero-shot CAM", "ceiling (mask at map size)")
    assert set(rows) == {(a, m) for a in ("mass", "calcification") for m in methods}
    assert localization["split"] == "test" and localization["images"] > 0
    assert "IoU@0.25" in result.stdout and "IoU@0.5" in result.stdout and "pointing" in result.stdout
    for attribute in ("mass", "calcification"):
        row = rows[attribute, "FActOR"]
        printed = next(line.split() for line in result.stdout.splitlines()
                       if line.startswith(attribute) and "FActOR" in line)
        figures = [f"{row[key]:.3f}" if row[key] is not None else "nan" for key in ("iou_25", "iou_50", "pointing")]
        assert printed[2:6] == [str(row["images"]), *figures]
    assert f"mammo-node model register {base} --factor {out}" in result.stdout
    assert "NOT a clinical model" in result.stdout
    assert json.loads((out / "card.json").read_text())["clinical_use"] is False
    registered(mammo_node, base, "factor", out)


def test_box_csv_ground_truth_covers_the_mask_ground_truth(phantoms: Path, tmp_path: Path) -> None:
    """`train factor --boxes`: a VinDr-style CSV of the masks' bounding boxes, matched by file name, gives input
    masks that contain the mask PNGs' own (resizing may drop a mask's edge pixels, never a box's)."""
    import csv

    import cv2
    import numpy as np

    from training.detector_train import mask_box
    from training.factor.data import FactorRecord, GroundTruth, positive_truths

    with phantoms.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["mask_paths"]]
    study = rows[0]["accession_number"]
    views = [row for row in rows if row["accession_number"] == study]  # one study: its file names are unique
    category = {"mass": "Mass", "calcification": "Suspicious Calcification"}
    with (tmp_path / "boxes.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "laterality", "view_position", "finding_categories", "xmin", "ymin", "xmax",
                         "ymax"])
        for row in views:
            for relative in row["mask_paths"].split(";"):
                box = mask_box(cv2.imread(str(phantoms.parent / relative), cv2.IMREAD_GRAYSCALE))
                kind = Path(relative).stem.rsplit("_", 1)[1]
                writer.writerow([Path(row["path"]).stem, row["laterality"], row["view"], f"['{category[kind]}']",
                                 *box])
    records = [FactorRecord("", 0, row["laterality"], row["view"], (int(row["mass"]), int(row["calcification"])),
                            row["sop_instance_uid"], str(phantoms.parent / row["path"])) for row in views]
    preprocess, attributes = PreprocessConfig(height=64, width=48), ("mass", "calcification")
    by_box = positive_truths(records, attributes, GroundTruth.read(boxes=tmp_path / "boxes.csv"), preprocess)
    by_mask = positive_truths(records, attributes, GroundTruth.read(manifest=phantoms), preprocess)
    assert by_box[0] == by_mask[0] and by_box[0]
    for boxes, masks in zip(by_box[1], by_mask[1], strict=True):
        assert boxes.keys() == masks.keys()
        for k in boxes:
            box_union, mask_union = np.logical_or.reduce(boxes[k]), np.logical_or.reduce(masks[k])
            assert mask_union.any() and not (mask_union & ~box_union).any()


def test_db_downgrade_and_upgrade_again(mammo_node: Invoke, tmp_path: Path) -> None:
    downgraded = mammo_node("db", "downgrade", "0009")
    assert downgraded.exit_code == 0 and "at revision 0009" in downgraded.output
    with sqlite3.connect(tmp_path / "data" / "worklist.sqlite") as connection:
        assert "sha256" in {row[1] for row in connection.execute("PRAGMA table_info(instance)")}
    assert "up to date" in mammo_node("db", "upgrade").output
    with sqlite3.connect(tmp_path / "data" / "worklist.sqlite") as connection:
        assert "content_digest" in {row[1] for row in connection.execute("PRAGMA table_info(instance)")}


def _newest_revision() -> str:
    from alembic.script import ScriptDirectory

    from worklist.db import MIGRATIONS

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


@pytest.mark.parametrize("revision", ["base", "head", "newest", "9999"])
def test_db_downgrade_refuses_what_is_not_an_older_revision(mammo_node: Invoke, revision: str) -> None:
    newest = _newest_revision()
    refused = mammo_node("db", "downgrade", newest if revision == "newest" else revision)
    assert refused.exit_code != 0 and f"the database is at {newest}" in refused.output
    assert "Traceback" not in refused.output and "up to date" in mammo_node("db", "upgrade").output
