"""The mammo-node command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from models import save_model_version
from tests.conftest import tiny_model


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MAMMO_DATA_DIR": str(cwd / "data"), "MAMMO_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_teaches_the_commands(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("demo", "synth", "classify", "embed"):
        assert command in result.stdout
    assert "not clinical" in result.stdout.lower()


def test_synth_writes_studies_and_manifest(tmp_path: Path) -> None:
    result = run_cli("synth", str(tmp_path / "out"), "--studies", "2", "--size", "256x160", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = (tmp_path / "out" / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 1 + 2 * 4
    assert len(list((tmp_path / "out").glob("*/*.dcm"))) == 8


def test_synth_rejects_a_bad_size(tmp_path: Path) -> None:
    result = run_cli("synth", str(tmp_path / "out"), "--size", "big", cwd=tmp_path)
    assert result.returncode == 2 and "ROWSxCOLS" in result.stderr


def test_classify_and_embed_with_a_model_version(tmp_path: Path, synthetic_root: Path) -> None:
    version = save_model_version(tiny_model(), tmp_path / "version", card={"clinical_use": False})
    study = next(p for p in synthetic_root.iterdir() if p.is_dir())
    result = run_cli("classify", str(study), "--json", "--model", str(version), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert set(payload["views"]) == {"L_CC", "R_CC", "L_MLO", "R_MLO"}
    assert set(payload["breasts"]) == {"L", "R"} and payload["missing_views"] == []
    assert abs(sum(payload["breasts"]["L"]["density"]) - 1) < 1e-5

    out = tmp_path / "emb.npy"
    images = sorted(study.glob("*.dcm"))[:2]
    result = run_cli("embed", *map(str, images), "--text", "mass", "--model", str(version), "-o", str(out),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    array = np.load(out)
    assert array.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, rtol=1e-5)


def test_classify_reports_a_non_mammogram_clearly(tmp_path: Path, synthetic_root: Path) -> None:
    import pydicom

    version = save_model_version(tiny_model(), tmp_path / "version")
    study = tmp_path / "study"
    study.mkdir()
    source = next(synthetic_root.glob("*/L_CC.dcm"))
    ds = pydicom.dcmread(source)
    ds.Modality = "CT"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.save_as(study / "ct.dcm")
    result = run_cli("classify", str(study), "--model", str(version), cwd=tmp_path)
    assert result.returncode == 1
    assert "only MG images can be analysed" in result.stderr and ds.SOPInstanceUID in result.stderr


def test_db_upgrade_then_serve_receives_a_study(tmp_path: Path, synthetic_root: Path) -> None:
    """`mammo-node db upgrade` and `mammo-node serve` as real processes, fed by DCMTK's storescu."""
    import signal
    import time

    from tests.conftest import free_port, require_tool

    storescu = require_tool("/usr/bin/storescu")
    port = str(free_port())
    version = save_model_version(tiny_model(), tmp_path / "version")
    env = {**os.environ, "MAMMO_DATA_DIR": str(tmp_path / "data"), "MAMMO_PORT": port,
           "MAMMO_MODEL_PATH": str(version)}
    refused = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0 and "mammo-node db upgrade" in refused.stderr
    upgraded = subprocess.run([sys.executable, "-m", "dicom_node.cli", "db", "upgrade"], env=env,
                              capture_output=True, text=True, timeout=120)
    assert upgraded.returncode == 0, upgraded.stderr
    node = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        files = sorted(next(p for p in synthetic_root.iterdir() if p.is_dir()).glob("*.dcm"))
        for _ in range(100):
            sent = subprocess.run([storescu, "-aec", "MAMMO_AI", "127.0.0.1", port, *map(str, files)],
                                  capture_output=True, text=True, timeout=60)
            if sent.returncode == 0:
                break
            time.sleep(0.2)
        assert sent.returncode == 0, sent.stderr
        stored = list((tmp_path / "data" / "incoming" / "studies").rglob("*.dcm"))
        assert len(stored) == 4
    finally:
        node.send_signal(signal.SIGINT)
        node.wait(timeout=30)


def test_a_study_folder_gives_one_image_per_screening_view(tmp_path: Path, synthetic_root: Path) -> None:
    """A repeated LCC: the later acquisition is scored; an XCCL (not a screening view) is left out."""
    import pydicom
    import torch

    from models.inference import load_study_images
    from models.preprocess import preprocess_dicom

    model = tiny_model()
    study = next(p for p in sorted(synthetic_root.iterdir()) if p.is_dir())
    paths = sorted(study.glob("*.dcm"))
    lcc = pydicom.dcmread(study / "L_CC.dcm")
    retake = pydicom.dcmread(study / "R_CC.dcm")  # another image, filed as a later LCC
    retake.ImageLaterality, retake.AcquisitionDate, retake.AcquisitionTime = "L", "29991231", "235959"
    retake.save_as(tmp_path / "z_retake.dcm")
    extra = pydicom.dcmread(study / "L_MLO.dcm")
    extra.ViewPosition = "XCCL"
    extra.save_as(tmp_path / "a_xccl.dcm")
    images = load_study_images([tmp_path / "a_xccl.dcm", *paths, tmp_path / "z_retake.dcm"], model)
    assert set(images) == {("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")}
    config = model.config.preprocess()
    assert torch.equal(images[("L", "CC")], preprocess_dicom(retake, config))
    assert not torch.equal(images[("L", "CC")], preprocess_dicom(lcc, config))
