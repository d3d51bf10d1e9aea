"""The model registry: versions the node can serve, which one is active, and the way back.

A version is a model-version folder (``weights.safetensors``, ``config.json``, ``card.json``) or a
reference ``.tar`` checkpoint (with its text encoder directory), registered by name in the worklist
database. At most one version is active; the workers load it before their next job, without a restart.
``rollback`` re-activates the version that was active before the current one.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from models.errors import ConfigurationError
from worklist.models import ModelVersion, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActiveModel:
    """What a worker needs to load the active version (a plain copy, detached from any session)."""

    name: str
    path: Path
    sha256: str
    text_encoder_path: Path | None
    heads: dict[str, Path]
    multiview_path: Path | None = None
    detector_path: Path | None = None
    factor_path: Path | None = None
    component_sha256: dict[str, str] | None = None  # recorded at registration (``component_paths``' roles)
    components: dict[str, str] = field(default_factory=dict)  # role -> folder


def component_paths(text_encoder: str | None, heads: dict[str, str] | None, multiview: str | None,
                    detector: str | None, factor: str | None) -> dict[str, str]:
    """A version's component folders by role: ``text encoder``, ``<target> head``, ``four-view model``,
    ``lesion detector``, ``FActOR``."""
    roles = {"text encoder": text_encoder, **{f"{target} head": folder for target, folder in (heads or {}).items()},
             "four-view model": multiview, "lesion detector": detector, "FActOR": factor}
    return {role: str(folder) for role, folder in roles.items() if folder}


def folder_sha256(path: Path) -> str:
    """SHA-256 of a component: of a file its content's, of a folder that of every file's relative path and
    content digest, in path order (a file added, removed, renamed or changed changes it)."""
    from models.checkpoints import file_sha256

    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(item for item in path.rglob("*") if item.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def check_components(name: str, components: dict[str, str], recorded: dict[str, str] | None) -> None:
    """``ConfigurationError`` unless every component folder is there and, where its digest was recorded at
    registration (versions registered from migration 0014 on), still has it."""
    missing = [folder for folder in components.values() if not Path(folder).exists()]
    if missing:
        raise ConfigurationError(f"model version {name!r}: no longer exists: {', '.join(missing)}")
    changed = [f"{role} ({folder})" for role, folder in components.items()
               if recorded and role in recorded and folder_sha256(Path(folder)) != recorded[role]]
    if changed:
        raise ConfigurationError(f"model version {name!r}: changed since it was registered: {', '.join(changed)}; "
                                 "register them under a new name")


def register(sessions: sessionmaker[Session], path: Path, name: str | None = None,
             text_encoder: Path | None = None, heads: list[Path] | tuple[Path, ...] = (),
             multiview: Path | None = None, detector: Path | None = None,
             factor: Path | None = None) -> ModelVersion:
    """Load ``path`` once (it must be a loadable model), check each trained head and the FActOR projectors
    against it and that the four-view model (it gives the study score) and the lesion detector load, and record
    them; registering the same weights and components under the same name again is a no-op, anything else
    under a taken name is refused."""
    from dicom_node.heads import read_head
    from models import load_model

    path = Path(path).resolve()
    model = load_model(path, text_encoder=text_encoder, device="cpu")
    sha = model.load_report.sha256
    head_paths: dict[str, str] = {}
    for folder in heads:
        target = read_head(Path(folder), model, sha).info["target"]
        if target in head_paths:
            raise ConfigurationError(f"two heads for {target}: {head_paths[target]} and {folder}")
        head_paths[target] = str(Path(folder).resolve())
    multiview_path = None
    if multiview is not None:
        from models.multiview import load_multiview

        load_multiview(multiview)
        multiview_path = str(Path(multiview).resolve())
    if detector is not None:
        from models.detector import load_detector

        load_detector(detector)
    if factor is not None:
        from models.factor import load_factor

        load_factor(factor, model)
    detector_path = str(Path(detector).resolve()) if detector else None
    factor_path = str(Path(factor).resolve()) if factor else None
    card: dict[str, Any] = dict(getattr(model, "card", {}) or {})
    name = name or f"{card.get('name') or path.stem}-{sha[:8]}{'-heads' if head_paths else ''}"
    text_encoder_path = str(Path(text_encoder).resolve()) if text_encoder else None
    digests = {role: folder_sha256(Path(folder)) for role, folder in component_paths(
        text_encoder_path, head_paths, multiview_path, detector_path, factor_path).items()}
    with sessions.begin() as session:
        existing = session.scalar(select(ModelVersion).where(ModelVersion.name == name))
        if existing is not None:
            if (existing.sha256, existing.heads or {}, existing.multiview_path, existing.detector_path,
                    existing.factor_path, existing.component_sha256 or digests) != (
                    sha, head_paths, multiview_path, detector_path, factor_path, digests):
                raise ConfigurationError(f"a model version named {name!r} exists with other weights or heads "
                                         f"({existing.sha256[:12]}); choose another --name")
            return existing
        version = ModelVersion(name=name, path=str(path), sha256=sha, card=card, heads=head_paths,
                               multiview_path=multiview_path, detector_path=detector_path,
                               factor_path=factor_path, text_encoder_path=text_encoder_path,
                               component_sha256=digests)
        session.add(version)
    log.info("registered model version %s (%s)%s", name, sha[:12],
             f" with heads for {', '.join(head_paths)}" if head_paths else "")
    return version


def versions(sessions: sessionmaker[Session]) -> list[ModelVersion]:
    with sessions() as session:
        return list(session.scalars(select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.id)))


def get_version(sessions: sessionmaker[Session], name: str) -> ModelVersion:
    with sessions() as session:
        version = session.scalar(select(ModelVersion).where(ModelVersion.name == name))
    if version is None:
        raise ConfigurationError(f"no model version named {name!r} (`mammo-node model list` shows them)")
    return version


def activate(sessions: sessionmaker[Session], name: str) -> ModelVersion:
    """Make ``name`` the only active version (one transaction, the versions' rows locked first, so that two
    activations at once leave one active); its files must still be there, its weights the ones registered. A
    version rolled back from before is back on the rollback path once activated by name."""
    version = _activate(sessions, get_version(sessions, name), retire_current=False)
    log.info("model version %s is now active", name)
    return version


def _activate(sessions: sessionmaker[Session], version: ModelVersion, retire_current: bool) -> ModelVersion:
    """Make ``version`` the only active one; ``retire_current``: mark the version it replaces rolled back."""
    _check_files(version)
    now = utcnow()
    with sessions.begin() as session:
        session.execute(select(ModelVersion.id).with_for_update())  # PostgreSQL: the other activation waits
        session.execute(update(ModelVersion).where(ModelVersion.active.is_(True))
                        .values(active=False, **({"rolled_back_at": now} if retire_current else {})))
        session.execute(update(ModelVersion).where(ModelVersion.id == version.id)
                        .values(active=True, activated_at=now, rolled_back_at=None))
    return get_version(sessions, version.name)


def _check_files(version: ModelVersion) -> None:
    """``ConfigurationError`` unless every file of the version is there and its weights and components hash as
    registered (the workers would refuse every study on it)."""
    from models.checkpoints import WEIGHTS_FILE, file_sha256

    if not Path(version.path).exists():
        raise ConfigurationError(f"model version {version.name!r}: no longer exists: {version.path}")
    check_components(version.name, _components(version), version.component_sha256)
    path = Path(version.path)
    if file_sha256(path / WEIGHTS_FILE if path.is_dir() else path) != version.sha256:
        raise ConfigurationError(f"model version {version.name!r}: the weights at {path} changed since it was "
                                 "registered; register them under a new name")


def rollback(sessions: sessionmaker[Session]) -> ModelVersion:
    """Re-activate the version that was active before the current one, and mark the current one rolled back:
    a second rollback goes further back, never to the version the first took out of service (until it is
    activated by name again)."""
    with sessions() as session:
        previous = session.scalar(
            select(ModelVersion).where(ModelVersion.active.is_(False), ModelVersion.activated_at.is_not(None),
                                       ModelVersion.rolled_back_at.is_(None))
            .order_by(ModelVersion.activated_at.desc()).limit(1))
    if previous is None:
        raise ConfigurationError("no earlier active model version to roll back to")
    version = _activate(sessions, previous, retire_current=True)
    log.info("rolled back: model version %s is active again", version.name)
    return version


def active_model(sessions: sessionmaker[Session]) -> ActiveModel | None:
    """The active version, or None when the registry has none (the configured model is served then)."""
    with sessions() as session:
        version = session.scalar(select(ModelVersion).where(ModelVersion.active.is_(True)))
        if version is None:
            return None
        return ActiveModel(version.name, Path(version.path), version.sha256,
                           Path(version.text_encoder_path) if version.text_encoder_path else None,
                           {target: Path(folder) for target, folder in (version.heads or {}).items()},
                           *(Path(p) if p else None for p in (version.multiview_path, version.detector_path,
                                                               version.factor_path)),
                           component_sha256=version.component_sha256, components=_components(version))


def _components(version: ModelVersion) -> dict[str, str]:
    return component_paths(version.text_encoder_path, version.heads, version.multiview_path, version.detector_path,
                           version.factor_path)
