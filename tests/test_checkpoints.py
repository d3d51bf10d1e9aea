"""Reference .tar checkpoints and our model-version folders load exactly."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import types
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models import load_model, save_model_version
from models.checkpoints import _torch_load
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


def write_reference_tar(path: Path, state: dict[str, torch.Tensor], config: Any = REFERENCE_B2_CONFIG) -> Path:
    """The layout the reference trainer's ``torch.save`` writes."""
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 7},
                "config": config, "epoch": 10, "train_loss": 0.5}, path)
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


def test_a_version_saved_before_the_voi_flag_keeps_its_windowed_input(model, tmp_path: Path) -> None:
    folder = save_model_version(model, tmp_path / "v1")
    assert json.loads((folder / "config.json").read_text())["clip"]["apply_voi"] is False
    assert load_model(folder).config.preprocess().apply_voi is False
    config = json.loads((folder / "config.json").read_text())
    del config["clip"]["apply_voi"]
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(folder).config.preprocess().apply_voi is True


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


# Classes named and pickled as omegaconf 2.x's (base.py, nodes.py, basecontainer.py, dictconfig.py,
# listconfig.py): the metadata are dataclasses (resolver cache: a defaultdict); a node's ``__getstate__`` is its
# ``__dict__`` without ``_flags_cache``, a container's also copies its metadata.
@dataclass
class Metadata:
    ref_type: Any
    object_type: Any
    optional: bool
    key: Any
    flags: dict[str, bool] | None = None
    flags_root: bool = False
    resolver_cache: dict[str, Any] = field(default_factory=lambda: defaultdict(dict))


@dataclass
class ContainerMetadata(Metadata):
    key_type: Any = None
    element_type: Any = None


class AnyNode:
    def __init__(self, value: Any, key: Any, parent: Any) -> None:
        self.__dict__.update(_metadata=Metadata(Any, None, True, key, {}), _parent=parent, _flags_cache=None,
                             _val=value)

    def __getstate__(self) -> dict[str, Any]:
        state = copy.copy(self.__dict__)
        del state["_flags_cache"]
        return state


class _Container:
    def __init__(self, content: Any, key: Any, parent: Any, object_type: type, key_type: Any) -> None:
        metadata = ContainerMetadata(Any, object_type, True, key, {}, key_type=key_type, element_type=Any)
        self.__dict__.update(_metadata=metadata, _parent=parent, _flags_cache=None)
        pairs = content.items() if isinstance(content, dict) else enumerate(content)
        nodes = {k: (DictConfig if isinstance(v, dict) else ListConfig if isinstance(v, list) else AnyNode)(v, k, self)
                 for k, v in pairs}
        self.__dict__["_content"] = nodes if isinstance(content, dict) else list(nodes.values())

    def __getstate__(self) -> dict[str, Any]:
        state = copy.copy(self.__dict__)
        state.pop("_flags_cache", None)
        state["_metadata"] = copy.copy(state["_metadata"])
        return state


class DictConfig(_Container):
    def __init__(self, content: dict[str, Any], key: Any = None, parent: Any = None) -> None:
        super().__init__(content, key, parent, dict, Any)


class ListConfig(_Container):
    def __init__(self, content: list[Any], key: Any, parent: Any) -> None:
        super().__init__(content, key, parent, list, int)


def convert_dictconfig_to_dict(cfg: Any) -> Any:
    """The reference's (breastclip/util/utils.py): only DictConfig becomes a dict, a ListConfig stays."""
    if isinstance(cfg, DictConfig):
        return {k: convert_dictconfig_to_dict(v if isinstance(v, _Container) else v._val)
                for k, v in cfg._content.items()}
    return cfg


def _install(patch: pytest.MonkeyPatch, modules: dict[str, tuple[type, ...]]) -> None:
    """Make ``modules`` (name -> its classes, renamed into it) importable while ``patch`` lasts."""
    for module_name, classes in modules.items():
        for name in (module_name.split(".")[0], module_name):
            if name not in sys.modules:
                patch.setitem(sys.modules, name, types.ModuleType(name))
        for cls in classes:
            cls.__module__, cls.__qualname__ = module_name, cls.__name__
            setattr(sys.modules[module_name], cls.__name__, cls)


OMEGACONF = {"omegaconf.base": (Metadata, ContainerMetadata), "omegaconf.nodes": (AnyNode,),
             "omegaconf.dictconfig": (DictConfig,), "omegaconf.listconfig": (ListConfig,)}


def test_a_config_pickled_with_omegaconf_objects_loads_without_omegaconf(b2_model, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    config = {**copy.deepcopy(REFERENCE_B2_CONFIG),
              "transform": {"train": {"transform": {"affine_scale": [0.8, 1.2], "p": 1.0}}}}
    config["base"].update(image_size_h=1520, image_size_w=912, mean=0.3, std=0.25)
    config["model"]["image_encoder"]["name"] = "TF_EfficientNetV2-detect"  # the reference lowercases it
    root = DictConfig(config)
    root._metadata.flags["struct"] = True  # as hydra leaves it
    saved = convert_dictconfig_to_dict(root)
    assert isinstance(saved["transform"]["train"]["transform"]["affine_scale"], ListConfig)
    tar = tmp_path / "b2.tar"
    with monkeypatch.context() as patch:
        _install(patch, OMEGACONF)
        torch.save({"model": b2_model.state_dict(), "config": saved, "epoch": 10,
                    "train_loss": np.float64(0.5)}, tar)
    assert importlib.util.find_spec("omegaconf") is None
    checkpoint = _torch_load(str(tar), allow_pickle=False)  # no full unpickle: the restricted one reads it all
    json.dumps(checkpoint["config"])  # plain values only
    assert checkpoint["config"]["transform"]["train"]["transform"] == {"affine_scale": [0.8, 1.2], "p": 1.0}
    assert checkpoint["train_loss"] == 0.5
    loaded = load_model(str(tar), allow_pickle=False)
    assert loaded.load_report.missing == loaded.load_report.unexpected == []
    assert (loaded.config.image_encoder, loaded.config.input_height, loaded.config.input_width) == (
        "efficientnet-b2", 1520, 912)
    preprocess = loaded.config.preprocess()
    assert (preprocess.mean, preprocess.std, preprocess.apply_voi) == (0.3, 0.25, False)


def test_a_checkpoint_needing_a_module_not_installed_is_a_checkpoint_error(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    class Thing:
        pass

    tar = tmp_path / "other.tar"
    with monkeypatch.context() as patch:
        _install(patch, {"only_at_save_time": (Thing,)})
        torch.save({"model": {}, "config": {"thing": Thing()}}, tar)
    with pytest.raises(CheckpointError, match=r"only_at_save_time\.Thing.*only for a trusted file"):
        load_model(tar, allow_pickle=False)
    with pytest.raises(CheckpointError, match=r"cannot be unpickled.*ModuleNotFoundError"):
        load_model(tar)


@pytest.mark.parametrize(("section", "entry", "message"), [
    ("projection_head", {"name": "mlp", "dropout": 0.1, "proj_dim": 512}, "linear projection head"),
    ("projection_head", None, "linear projection head"),
    ("image_encoder", {"source": "cnn", "name": "resnet152"}, "Unsupported reference image encoder"),
])
def test_an_unsupported_reference_architecture_is_refused(tmp_path: Path, section: str, entry: Any,
                                                          message: str) -> None:
    config = copy.deepcopy(REFERENCE_B2_CONFIG)
    config["model"].pop(section)
    if entry is not None:
        config["model"][section] = entry
    with pytest.raises(CheckpointError, match=message):
        load_model(write_reference_tar(tmp_path / "other.tar", {}, config))


def test_a_text_encoder_of_another_size_is_a_checkpoint_error(b2_model, tmp_path: Path) -> None:
    state = dict(b2_model.state_dict())
    state["text_projection.projection.weight"] = torch.zeros(512, 7)
    with pytest.raises(CheckpointError, match="tensor shapes"):
        load_model(write_reference_tar(tmp_path / "other.tar", state))
