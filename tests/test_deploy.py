"""The deployment files: the example settings file, docker-compose, the Dockerfile and the systemd units."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from dicom_node.config_example import DESTINATION_EXAMPLE, example_toml, toml_value
from dicom_node.settings import Settings, load_settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SETTING_LINE = re.compile(r"^# ([a-z_]+) = (.+)$")


def test_the_example_settings_file_is_current() -> None:
    assert (DEPLOY / "mammo-node.toml").read_text() == example_toml(), \
        "deploy/mammo-node.toml is stale: mammo-node config example > deploy/mammo-node.toml"


def test_every_setting_is_in_the_example_and_its_default_round_trips(tmp_path: Path, monkeypatch) -> None:
    uncommented, names = [], set()
    for line in example_toml().replace(DESTINATION_EXAMPLE, "").splitlines():
        match = SETTING_LINE.match(line)
        if match and not match.group(2).strip().startswith("("):
            uncommented.append(f"{match.group(1)} = {match.group(2)}")
        if match:
            names.add(match.group(1))
    assert names | {"destinations"} == set(Settings.model_fields)
    config = tmp_path / "all.toml"
    config.write_text("\n".join(uncommented) + "\n")
    tomllib.loads(config.read_text())  # valid TOML
    for name in list(os.environ):
        if name.startswith("MAMMO_"):
            monkeypatch.delenv(name)
    assert load_settings(config) == Settings(), "an uncommented default differs from the built-in default"


def test_toml_values() -> None:
    assert [toml_value(v) for v in (True, 3, 1.5, "a\"b", Path("x/y"), ["AE1"])] == [
        "true", "3", "1.5", '"a\\"b"', '"x/y"', '["AE1"]']


def _cli_ok(args: list[str]) -> None:
    """The command line exists: `mammo-node ARGS --help` succeeds."""
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", *args, "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, (args, result.stderr)


def test_compose_services_run_real_commands() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "orthanc", "migrate", "node", "worker-gpu0", "worker-io"} <= set(services)
    assert services["worker-gpu0"]["command"][:3] == ["worker", "-Q", "gpu"]
    assert services["worker-io"]["command"][:3] == ["worker", "-Q", "io"]
    assert services["node"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("migrate", "node", "worker-gpu0", "worker-io"):
        _cli_ok(services[name]["command"])
        assert "MAMMO_DB_URL" in services[name]["environment"]
    settings = Settings(destinations=yaml.safe_load(services["node"]["environment"]["MAMMO_DESTINATIONS"]))
    assert settings.destinations[0].host == "orthanc"


def test_dockerfile_copies_every_package() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for package in ("dicom_node", "models", "training", "worklist"):
        assert f"COPY {package} ./{package}" in dockerfile


def test_systemd_units_start_real_commands() -> None:
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert {unit.name for unit in units} == {"mammo-node.service", "mammo-worker-gpu@.service",
                                            "mammo-worker-io.service"}
    for unit in units:
        for line in unit.read_text().splitlines():
            if line.startswith(("ExecStart=", "ExecStartPre=")):
                command = shlex.split(line.split("=", 1)[1])
                assert command[0] == "/opt/mammo-node/venv/bin/mammo-node"
                _cli_ok(command[1:])
        assert "UMask=0077" in unit.read_text()
