"""The short versions of the reliability scenarios (``python -m tests.reliability`` runs them all and prints the
table; ``--full`` runs the long versions). Each test fails when its row lost or duplicated anything.

worker_kill and redis_pg need PostgreSQL (tests/conftest.py's server) and /usr/bin/redis-server: they fail
under CI when either is absent, and skip on a developer machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.__main__ import POOL, table
from tests.reliability.harness import make_studies, model_versions
from tests.reliability.scenarios import SCENARIOS, Suite


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Suite:
    work = tmp_path_factory.mktemp("reliability")
    return Suite(work, model_versions(work / "model")["tiny"], make_studies(work / "studies", POOL[False]))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_nothing_lost_nothing_duplicated(suite: Suite, name: str) -> None:
    row = SCENARIOS[name](suite)
    assert row.ok, f"logs under {Path(suite.work) / name}\n" + table([row])
