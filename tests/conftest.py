"""Shared fixtures: tiny random-weight models and small synthetic studies."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy.orm import sessionmaker
from transformers import BertConfig

from dicom_node.demo import free_port  # noqa: F401  (the tests import it from here)
from models import ClipConfig, MammoClip
from models.text_encoder import TextEncoder, default_text_encoder_dir, load_tokenizer

IN_CI = bool(os.environ.get("CI"))


REPOSITORY = Path(__file__).resolve().parent.parent


def python_env(**changes: str) -> dict[str, str]:
    """The environment for a child Python process that runs this checkout: the repository first on PYTHONPATH,
    then the caller's own entries (where the packages may live), then ``changes``."""
    path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **changes}


def require_tool(path: str) -> str:
    """A Debian tool the test needs: fail under CI when absent, skip on a developer machine."""
    if shutil.which(path) is None:
        message = f"{path} is not installed (bash deploy/install-system-deps.sh)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors on a shared 2-core machine: one torch thread is faster than two that contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert_config() -> BertConfig:
    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512)


def tiny_model(image_encoder: str = "efficientnet-test", height: int = 64, width: int = 48,
               seed: int = 0) -> MammoClip:
    """A tiny random-weight model (the same weights for the same seed)."""
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(default_text_encoder_dir())
    config = ClipConfig(image_encoder=image_encoder, input_height=height, input_width=width)
    return MammoClip(config, TextEncoder.from_config(tiny_bert_config(), tokenizer)).eval()


@pytest.fixture
def model() -> MammoClip:
    return tiny_model()


def wait_for(condition: Callable[[], object], what: str = "condition", timeout: float = 60.0) -> object:
    """The first truthy value of ``condition()``, polled every 50 ms; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.05)
    return value


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small four-view studies written once per session."""
    from training.synthetic import write_studies

    root = tmp_path_factory.mktemp("synthetic")
    write_studies(root, 3, seed=11, rows=256, cols=160, progress=False)
    return root


def _postgres_admin_url() -> str:
    return os.environ.get("MAMMO_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database: SQLite in a temp folder, and PostgreSQL when the server is there
    (required under CI)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    from worklist.db import make_engine, upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
        return
    admin = create_engine(_postgres_admin_url(), isolation_level="AUTOCOMMIT")
    name = f"mammo_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as error:
        message = f"PostgreSQL is not reachable at {_postgres_admin_url()}: {error.orig}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    url = _postgres_admin_url().rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker]:
    """Worklist sessions on the ``db_url`` database (already migrated)."""
    from worklist.db import make_engine, session_factory

    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()
