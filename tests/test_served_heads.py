"""Trained heads served by the node: registered with a version, checked against it, scoring in the analysis,
named in the SR."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import torch
from safetensors.torch import load_file, save_file

from dicom_node.analysis import Analyzer, SourceInstance
from dicom_node.heads import load_heads
from dicom_node.serving import model_identity
from models import load_model, save_model_version
from models.errors import ConfigurationError
from models.heads import HEAD_WEIGHTS, Head, load_head, save_head, score_images
from tests.conftest import tiny_model
from tests.test_results import assert_valid, text_values
from training.registry import activate, active_model, register


def write_head(folder: Path, target: str, classes: list[str], base_sha: str, *, height: int = 64,
               seed: int = 0) -> Path:
    """A linear head as `train finetune` writes it, with random weights."""
    torch.manual_seed(seed)
    info = {"target": target, "classes": classes, "mode": "linear", "image_encoder": "efficientnet-test",
            "feature_dim": 0, "own_encoder": False, "adapter_channels": [], "adapter_reduction": 8,
            "input_height": height, "input_width": 48, "base_model_sha256": base_sha}
    encoder_dim = tiny_model().image_encoder.out_dim
    info["feature_dim"] = encoder_dim
    head = Head(encoder_dim, 1 if len(classes) == 2 else len(classes), None, None, info)
    torch.nn.init.normal_(head.linear.weight, std=2.0)
    folder.mkdir(parents=True)
    save_head(head, folder)
    return folder


def first_study(root: Path) -> tuple[str, list[SourceInstance], dict[tuple[str, str], pydicom.Dataset]]:
    """The first synthetic study under ``root``: its UID, its instances as the worklist lists them, and its
    datasets by (laterality, view)."""
    study = next(p for p in sorted(root.iterdir()) if p.is_dir())
    instances, datasets = [], {}
    for path in sorted(study.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        datasets[(ds.ImageLaterality, ds.ViewPosition)] = ds
        instances.append(SourceInstance(path, ds.SOPInstanceUID, ds.ImageLaterality, ds.ViewPosition))
    return str(ds.StudyInstanceUID), instances, datasets


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model_version(tiny_model(seed=4), tmp_path_factory.mktemp("version") / "v1",
                              card={"name": "site", "clinical_use": False})


@pytest.fixture(scope="module")
def base_sha(version: Path) -> str:
    return load_model(version).load_report.sha256


def test_heads_are_registered_with_their_version_and_checked(sessions, version: Path, base_sha: str,
                                                             tmp_path: Path) -> None:
    mass = write_head(tmp_path / "mass", "mass", ["no mass", "mass"], base_sha)
    density = write_head(tmp_path / "density", "density", ["A", "B", "C", "D"], base_sha)
    registered = register(sessions, version, name="v1-heads", heads=[mass, density])
    assert registered.heads == {"mass": str(mass.resolve()), "density": str(density.resolve())}
    activate(sessions, "v1-heads")
    assert active_model(sessions).heads == {"mass": mass.resolve(), "density": density.resolve()}
    with pytest.raises(ConfigurationError, match="other weights or heads"):
        register(sessions, version, name="v1-heads", heads=[mass])
    with pytest.raises(ConfigurationError, match="another model's encoder"):
        register(sessions, version, name="bad", heads=[write_head(tmp_path / "other", "mass", ["n", "m"], "ab" * 32)])
    with pytest.raises(ConfigurationError, match="trained on 96x48"):
        register(sessions, version, name="bad", heads=[write_head(tmp_path / "big", "mass", ["n", "m"], base_sha,
                                                                   height=96)])
    with pytest.raises(ConfigurationError, match="two heads for mass"):
        register(sessions, version, name="bad", heads=[mass, write_head(tmp_path / "m2", "mass", ["n", "m"],
                                                                         base_sha, seed=1)])


def test_a_head_changed_since_registration_is_refused_at_activation_and_by_the_worker(
        db_url: str, sessions, version: Path, base_sha: str, tmp_path: Path) -> None:
    """Every component is checked like the main weights: a head's weights copied over after registration stop
    its activation, and a worker serving the version refuses it (each job fails with the reason)."""
    from dicom_node import tasks
    from dicom_node.settings import Settings

    mass = write_head(tmp_path / "mass", "mass", ["no mass", "mass"], base_sha)
    register(sessions, version, name="v1-mass", heads=[mass])
    activate(sessions, "v1-mass")
    weights = mass / HEAD_WEIGHTS  # retrained in place after activation
    save_file({name: tensor + 1 for name, tensor in load_file(weights).items()}, weights)
    context = tasks._Context(Settings(data_dir=tmp_path / "data", db_url=db_url, device="cpu"))
    with pytest.raises(ConfigurationError, match=r"changed since it was registered: mass head"):
        context.analyzer  # noqa: B018
    with pytest.raises(ConfigurationError, match=r"changed since it was registered: mass head"):
        activate(sessions, "v1-mass")


def test_the_analysis_serves_head_scores_and_the_sr_names_the_head(version: Path, base_sha: str, tmp_path: Path,
                                                                  synthetic_root: Path) -> None:
    model = load_model(version)
    identity = model_identity(model, "v1-heads")
    mass = write_head(tmp_path / "mass", "mass", ["no mass", "mass"], base_sha)
    density = write_head(tmp_path / "density", "density", ["A", "B", "C", "D"], base_sha, seed=2)
    analyzer = Analyzer(model, identity, tmp_path / "results",
                        load_heads({"mass": mass, "density": density}, model, identity))
    study_uid, instances, _ = first_study(synthetic_root)
    output = analyzer.analyse(study_uid, 1, instances)
    findings = output.findings
    assert findings.source("mass").name == "Mammo-CLIP mass head (linear)"
    assert findings.source("density").name == "Mammo-CLIP density head (linear)"
    assert findings.source("calcification") == identity

    # The served mass scores are the head's own, computed the way `train finetune` evaluates it.
    from models.inference import load_study_images

    images = load_study_images([instance.path for instance in instances], model)
    expected = score_images(model, load_head(mass), torch.stack(list(images.values())))
    by_view = dict(zip(images, expected.tolist(), strict=True))
    for view in findings.views:
        assert view.scores["mass"] == pytest.approx(by_view[(view.laterality, view.view)], abs=1e-4)
        assert sum(view.density.values()) == pytest.approx(1.0)
    for breast in findings.breasts:
        views = [v.scores["mass"] for v in findings.views if v.laterality == breast.laterality]
        assert breast.scores["mass"] == pytest.approx(max(views))

    sr_path = next(o.path for o in output.objects if o.kind == "SR")
    assert_valid(sr_path)
    texts = text_values(pydicom.dcmread(sr_path))
    assert "Mammo-CLIP mass head (linear)" in texts and "Mammo-CLIP density head (linear)" in texts
    assert identity.name in texts


def test_a_four_view_model_gives_the_study_score_and_the_sr_says_so(sessions, version: Path, tmp_path: Path,
                                                                    synthetic_root: Path) -> None:
    from dicom_node.heads import load_multiview_model
    from models.multiview import MultiViewConfig, build_multiview, preprocess_view, save_multiview, study_probability
    from training.multiview_train import write_random_clip

    config = MultiViewConfig(input_height=48, input_width=32, benign_prompts=("benign",),
                             malignant_prompts=("malignant",))
    folder = save_multiview(build_multiview(write_random_clip(tmp_path / "clip"), config), tmp_path / "mv",
                            card={"name": "mv-test", "clinical_use": False})
    registered = register(sessions, version, name="v1-mv", multiview=folder)
    activate(sessions, "v1-mv")
    assert active_model(sessions).multiview_path == folder.resolve() and registered.heads == {}

    model = load_model(version)
    identity = model_identity(model, "v1-mv")
    analyzer = Analyzer(model, identity, tmp_path / "results",
                        multiview=load_multiview_model(folder, identity, "cpu"))
    study_uid, instances, datasets = first_study(synthetic_root)
    output = analyzer.analyse(study_uid, 1, instances)

    served = analyzer.multiview.model
    expected = study_probability(served, {key: preprocess_view(d, served.config) for key, d in datasets.items()})
    assert output.findings.case_score == pytest.approx(expected, abs=1e-6)
    assert output.findings.suspicion == output.findings.case_score
    assert output.findings.source("case").name == "MV-Mammo-CLIP four-view fusion (Chen 2024)"
    sr_path = next(o.path for o in output.objects if o.kind == "SR")
    assert_valid(sr_path)
    texts = text_values(pydicom.dcmread(sr_path))
    assert "MV-Mammo-CLIP four-view fusion (Chen 2024)" in texts
    assert "Study score: the four-view fusion model, from the analysed views together." in texts


@pytest.fixture(scope="module")
def square_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A version at 64 x 64: the detector's P7 level (stride 128) needs at least that."""
    return save_model_version(tiny_model(height=64, width=64, seed=5), tmp_path_factory.mktemp("square") / "v2",
                              card={"name": "site-square", "clinical_use": False})


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the registry runs on both in the tests above
def test_detector_and_factor_are_served_with_their_version(sessions, square_version: Path, tmp_path: Path,
                                                           synthetic_root: Path) -> None:
    version = square_version
    from dicom_node.heads import served_components
    from dicom_node.results.seg import FACTOR_PREFIX
    from models.detector import detector_from_clip, save_detector
    from models.factor import build_factor, save_factor

    model = load_model(version)
    detector = save_detector(detector_from_clip(model, score_threshold=0.0), tmp_path / "detector",
                             card={"name": "det-test"})
    factor = save_factor(build_factor(model), tmp_path / "factor")
    register(sessions, version, name="v1-loc", detector=detector, factor=factor)
    activate(sessions, "v1-loc")
    active = active_model(sessions)
    assert (active.detector_path, active.factor_path) == (detector.resolve(), factor.resolve())

    identity = model_identity(model, "v1-loc")
    analyzer = Analyzer(model, identity, tmp_path / "results", **served_components(active, model, identity, "cpu"))
    study_uid, instances, _ = first_study(synthetic_root)
    output = analyzer.analyse(study_uid, 1, instances)

    findings = output.findings
    assert findings.source("detector").name == "Mammo-CLIP lesion detector (RetinaNet)"
    assert findings.detections, "a detector with no score threshold reports boxes"
    sources = {instance.sop_instance_uid for instance in instances}
    assert all(d.sop_instance_uid in sources and d.finding in ("mass", "calcification") for d in findings.detections)
    sr_path = next(o.path for o in output.objects if o.kind == "SR")
    assert_valid(sr_path)
    import highdicom as hd

    assert len(hd.sr.srread(sr_path).content.get_planar_roi_measurement_groups()) == len(findings.detections)

    seg_path = next(o.path for o in output.objects if o.kind == "SEG")
    assert_valid(seg_path)
    segments = {item.SegmentLabel: item for item in pydicom.dcmread(seg_path).SegmentSequence}
    assert set(segments) == {"malignancy heatmap", "mass heatmap", "calcification heatmap",
                             f"{FACTOR_PREFIX}mass heatmap", f"{FACTOR_PREFIX}calcification heatmap"}
    factor_algorithm = segments[f"{FACTOR_PREFIX}mass heatmap"].SegmentationAlgorithmIdentificationSequence[0]
    assert factor_algorithm.AlgorithmName == "Mammo-FActOR attribute maps"
    assert sum(1 for path in output.draw_overlays() if "overlay_factor_" in path.name) == 8
