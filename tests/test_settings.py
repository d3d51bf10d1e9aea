"""Settings from TOML and MAMMO_* variables; bad values stop start-up naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.settings import load_settings
from models.errors import ConfigurationError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("MAMMO_CONFIG", "MAMMO_DEVICE", "MAMMO_DATA_DIR", "MAMMO_MODEL_PATH", "MAMMO_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_toml_file_then_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "node.toml"
    config.write_text('device = "cpu"\ndata_dir = "/srv/mammo"\nlog_level = "DEBUG"\n')
    monkeypatch.setenv("MAMMO_LOG_LEVEL", "WARNING")
    settings = load_settings(config)
    assert settings.device == "cpu" and settings.data_dir == Path("/srv/mammo")
    assert settings.log_level == "WARNING"


def test_bad_environment_value_names_the_key_and_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAMMO_DEVICE", "gpu")
    with pytest.raises(ConfigurationError, match=r"setting 'device' \(env MAMMO_DEVICE\).*'auto', 'cpu' or 'cuda'"):
        load_settings()


def test_an_allow_list_entry_that_is_no_ae_title_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAMMO_ALLOWED_CALLING_AES", '["PACS", "A_TITLE_OF_20_CHARS"]')
    with pytest.raises(ConfigurationError, match="allowed_calling_aes"):
        load_settings()


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("modle_path = '/x'\n")
    with pytest.raises(ConfigurationError, match="modle_path"):
        load_settings(config)


def test_cli_start_up_stops_on_a_bad_value(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "synth", str(tmp_path / "x")],
                            env={"MAMMO_DEVICE": "tpu", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert result.returncode != 0
    assert "MAMMO_DEVICE" in result.stderr and "synthetic" not in result.stdout
