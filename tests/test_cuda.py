"""The CUDA serving path, where a GPU is visible (skipped elsewhere; CI has none): the image tower in float32 and
in bf16 against float32 on the CPU, and a whole study analysed on the GPU against the same study on the CPU."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dicom_node.analysis import Analyzer
from dicom_node.serving import model_identity
from models.inference import SCREENING_VIEWS, embed_views
from models.optimize import inference_copy
from tests.conftest import tiny_model
from tests.test_served_heads import first_study

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def float32_on_cuda() -> Iterator[None]:
    """TF32 off for the block, so that float32 on the GPU is float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_the_image_tower_on_cuda_agrees_with_the_cpu(float32_on_cuda: None) -> None:
    model = tiny_model("efficientnet-b0", 256, 160, seed=3)
    torch.manual_seed(5)
    images = {key: torch.randn(3, 256, 160) for key in SCREENING_VIEWS}
    on_cpu = embed_views(inference_copy(model), images)
    on_gpu = inference_copy(copy.deepcopy(model).to("cuda"))
    float32 = embed_views(on_gpu, images, cuda_autocast=None)
    bf16 = embed_views(on_gpu, images)  # the worker's path: four views in one batch, bf16 autocast
    one_by_one = embed_views(on_gpu, images, batch_size=1)
    for key in SCREENING_VIEWS:
        assert float(on_cpu[key].norm()) == pytest.approx(1.0, abs=1e-5)
        assert float((float32[key] - on_cpu[key]).abs().max()) < 1e-4
        assert float(F.cosine_similarity(bf16[key], on_cpu[key], dim=0)) > 0.99
        assert float((one_by_one[key] - bf16[key]).abs().max()) < 2e-2


def test_a_study_analysed_on_cuda_matches_the_cpu_and_reports_its_peak(synthetic_root: Path, tmp_path: Path) -> None:
    model = tiny_model("efficientnet-b0", 256, 160, seed=7)
    identity = model_identity(model, "cuda-test")
    study_uid, instances, _ = first_study(synthetic_root)
    on_cpu = Analyzer(model, identity, tmp_path / "cpu").analyse(study_uid, 1, instances)
    on_gpu_analyser = Analyzer(copy.deepcopy(model).to("cuda"), identity, tmp_path / "gpu")
    resident = torch.cuda.memory_allocated()  # both models' weights: the peak counts them too
    on_gpu = on_gpu_analyser.analyse(study_uid, 1, instances)

    assert on_cpu.gpu_memory_peak_bytes is None
    assert on_gpu.gpu_memory_peak_bytes is not None and on_gpu.gpu_memory_peak_bytes > resident  # its activations
    assert [o.kind for o in on_gpu.objects] == ["SR", "SEG", "SEG", "SEG", "SEG"]
    assert all(o.path.stat().st_size > 0 for o in on_gpu.objects)
    for cpu_view, gpu_view in zip(on_cpu.findings.views, on_gpu.findings.views, strict=True):
        assert cpu_view.name == gpu_view.name
        for kind in ("scores", "density", "birads"):
            expected = getattr(cpu_view, kind)
            assert getattr(gpu_view, kind) == pytest.approx(expected, abs=0.05), (cpu_view.name, kind)
