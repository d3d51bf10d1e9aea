"""The model registry on SQLite and PostgreSQL, and the `mammo-node model` commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from dicom_node.cli import main
from models import save_model_version
from models.errors import ConfigurationError, NodeError
from tests.conftest import tiny_model
from training.registry import activate, active_model, register, rollback, versions


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("versions")
    return [save_model_version(tiny_model(seed=number), root / f"v{number}",
                               card={"name": "site", "clinical_use": False}) for number in (1, 2, 3)]


def test_register_activate_and_roll_back(sessions, model_folders: list[Path]) -> None:
    first = register(sessions, model_folders[0], name="v1")
    assert register(sessions, model_folders[0], name="v1").id == first.id  # the same weights again: no-op
    with pytest.raises(ConfigurationError, match="exists with other weights"):
        register(sessions, model_folders[1], name="v1")
    second = register(sessions, model_folders[1])
    assert second.name.startswith("site-") and second.sha256 != first.sha256
    assert active_model(sessions) is None
    with pytest.raises(ConfigurationError, match="no earlier active model version"):
        rollback(sessions)
    activate(sessions, "v1")
    activate(sessions, second.name)
    assert active_model(sessions).name == second.name
    assert [v.name for v in versions(sessions) if v.active] == [second.name]
    assert rollback(sessions).name == "v1"
    assert active_model(sessions).sha256 == first.sha256
    with pytest.raises(ConfigurationError, match="no model version named 'v9'"):
        activate(sessions, "v9")


def test_a_second_rollback_goes_further_back(sessions, model_folders: list[Path]) -> None:
    """Rollbacks walk back through the versions served, never to one a rollback took out of service, until it
    is activated by name again."""
    for number, folder in enumerate(model_folders, 1):
        register(sessions, folder, name=f"v{number}")
        activate(sessions, f"v{number}")
    assert rollback(sessions).name == "v2"
    assert rollback(sessions).name == "v1"  # not v3 again, which the first rollback retired
    with pytest.raises(ConfigurationError, match="no earlier active model version"):
        rollback(sessions)
    assert active_model(sessions).name == "v1"
    activate(sessions, "v3")
    assert rollback(sessions).name == "v1"  # v2 stays retired
    assert {v.name: v.rolled_back_at is not None for v in versions(sessions)} == {
        "v1": False, "v2": True, "v3": True}


def test_an_unloadable_path_is_not_registered(sessions, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(NodeError, match=r"not a model version|missing"):
        register(sessions, tmp_path / "empty", name="broken")
    assert versions(sessions) == []


def test_a_moved_version_cannot_be_activated(sessions, model_folders: list[Path], tmp_path: Path) -> None:
    moved = shutil.copytree(model_folders[0], tmp_path / "moving")
    register(sessions, moved, name="moving")
    shutil.rmtree(moved)
    with pytest.raises(ConfigurationError, match="no longer exists"):
        activate(sessions, "moving")


def test_a_version_whose_weights_changed_cannot_be_activated(sessions, model_folders: list[Path],
                                                             tmp_path: Path) -> None:
    changed = shutil.copytree(model_folders[0], tmp_path / "changed")
    register(sessions, changed, name="changed")
    shutil.copy(model_folders[1] / "weights.safetensors", changed / "weights.safetensors")  # copied over later
    with pytest.raises(ConfigurationError, match="changed since it was registered"):
        activate(sessions, "changed")
    assert active_model(sessions) is None


def test_a_worker_refuses_weights_changed_under_the_active_version(db_url: str, sessions, model_folders: list[Path],
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node import serving, tasks
    from dicom_node.settings import Settings

    changing = shutil.copytree(model_folders[0], tmp_path / "changing")
    register(sessions, changing, name="changing")
    activate(sessions, "changing")
    shutil.copy(model_folders[1] / "weights.safetensors", changing / "weights.safetensors")  # after activation
    loads = []
    load = serving.load_serving_model
    monkeypatch.setattr(serving, "load_serving_model", lambda *args, **kw: loads.append(1) or load(*args, **kw))
    context = tasks._Context(Settings(data_dir=tmp_path / "data", db_url=db_url, device="cpu"))
    for _ in range(2):  # every job fails with the reason; the file is loaded and hashed once
        with pytest.raises(ConfigurationError, match="is not the file registered"):
            context.analyzer  # noqa: B018
    assert loads == [1]


def test_model_commands(tmp_path: Path, model_folders: list[Path]) -> None:
    """In process (the command line's own start-up is tested in tests/test_cli.py): each command a fresh
    ``main`` invocation on the same data folder."""
    runner = CliRunner(env={"MAMMO_DATA_DIR": str(tmp_path / "data")})

    def run(*args: str) -> Result:
        return runner.invoke(main, list(args))

    assert run("db", "upgrade").exit_code == 0
    assert "no registered model versions" in run("model", "list").stdout
    registered = run("model", "register", str(model_folders[0]), "--name", "v1")
    assert registered.exit_code == 0 and "registered v1" in registered.stdout, registered.output
    assert run("model", "register", str(model_folders[1]), "--name", "v2").exit_code == 0
    assert "v2 is active" in run("model", "activate", "v2").stdout
    listed = json.loads(run("model", "list", "--json").stdout)
    assert [(row["name"], row["active"]) for row in listed] == [("v1", False), ("v2", True)]
    shown = json.loads(run("model", "show", "v2").stdout)
    assert shown["card"]["name"] == "site" and shown["card"]["clinical_use"] is False
    assert "not for clinical use" in run("model", "list").stdout
    failed = run("model", "rollback")
    assert failed.exit_code == 1 and "no earlier active model version" in failed.stderr
    run("model", "activate", "v1")
    assert "v2 is active again" in run("model", "rollback").stdout
