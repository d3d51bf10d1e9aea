"""Reference .tar checkpoints and our model-version folders load exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import load_model, save_model_version
from models.errors import CheckpointError
from models.text_encoder import default_text_encoder_dir
from tests.conftest import tiny_model

REFERENCE_B2_CONFIG = {
    "model": {
        "name": "clip_custom", "temperature": 0.07,
        "image_encoder": {"source": "cnn", "name": "tf_efficientnetv2-detect", "pretrained": True,
                          "model_type": "cnn"},
        "text_encoder": {"source": "huggingface", "name": "emilyalsentzer/Bio_ClinicalBERT", "pooling": "eos",
                         "cache_dir": "/ocean/projects/asc170022p/shg121/PhD/Breast-CLIP/huggingface"},
        "projection_head": {"name": "linear", "dropout": 0.1, "proj_dim": 512},
    },
    "base": {"text_max_length": 256, "mean": 0.3089279, "std": 0.25053555408335154},
    "tokenizer": {"cache_dir": "/ocean/projects/asc170022p/shg121/PhD/Breast-CLIP/huggingface"},
}


def write_reference_tar(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """The layout the reference trainer's ``torch.save`` writes."""
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 7},
                "config": REFERENCE_B2_CONFIG, "epoch": 10, "train_loss": 0.5}, path)
    return path


@pytest.fixture(scope="module")
def b2_model():
    return tiny_model("efficientnet-b2", 128, 96)


def test_reference_tar_loads_with_no_missing_or_unexpected_keys(b2_model, tmp_path: Path) -> None:
    state = b2_model.state_dict()
    # Older transformers saved this buffer; it must be tolerated, not reported as a mismatch.
    state["text_encoder.text_encoder.embeddings.position_ids"] = torch.arange(512)[None]
    tar = write_reference_tar(tmp_path / "b2-model-best-epoch-10.tar", state)
    loaded = load_model(tar)
    report = loaded.load_report
    assert report.missing == [] and report.unexpected == []
    assert report.ignored == ["text_encoder.text_encoder.embeddings.position_ids"]
    assert loaded.config.image_encoder == "efficientnet-b2"
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_images(x), b2_model.encode_images(x), rtol=0, atol=0)


def test_reference_tar_without_text_directory_asks_for_the_tokenizer(b2_model, tmp_path: Path) -> None:
    loaded = load_model(write_reference_tar(tmp_path / "b2.tar", b2_model.state_dict()))
    with pytest.raises(CheckpointError, match="Bio_ClinicalBERT"):
        loaded.encode_texts(["mass"])


def test_reference_tar_with_text_directory_encodes_texts(tmp_path: Path) -> None:
    from models import ClipConfig, new_model

    source = new_model(ClipConfig(image_encoder="efficientnet-b2")).eval()
    tar = write_reference_tar(tmp_path / "b2.tar", source.state_dict())
    loaded = load_model(tar, text_encoder=default_text_encoder_dir())
    with torch.no_grad():
        embeddings = loaded.encode_texts(["there is a mass in the left breast", "no mass"])
        torch.testing.assert_close(embeddings, source.encode_texts(["there is a mass in the left breast",
                                                                    "no mass"]))
    assert embeddings.shape == (2, 512)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))


def test_mismatched_architecture_is_refused(b2_model, tmp_path: Path) -> None:
    state = {k: v for k, v in b2_model.state_dict().items() if not k.startswith("image_encoder._blocks.3.")}
    with pytest.raises(CheckpointError, match="missing keys"):
        load_model(write_reference_tar(tmp_path / "broken.tar", state))


def test_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_model(junk)
    with pytest.raises(CheckpointError, match="No checkpoint"):
        load_model(tmp_path / "absent.tar")


def test_version_folder_round_trip_is_bit_identical(model, tmp_path: Path) -> None:
    folder = save_model_version(model, tmp_path / "v1", card={"name": "test", "clinical_use": False})
    assert {p.name for p in folder.iterdir()} >= {"weights.safetensors", "config.json", "card.json", "tokenizer"}
    loaded = load_model(folder)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    assert loaded.card["clinical_use"] is False and len(loaded.card["weights_sha256"]) == 64
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert np.array_equal(model.encode_images(x).numpy(), loaded.encode_images(x).numpy())
        assert torch.equal(model.encode_texts(["mass"]), loaded.encode_texts(["mass"]))
