"""The node's one settings object: defaults < TOML file < ``MAMMO_*`` environment variables < CLI flags."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from models.errors import ConfigurationError

CONFIG_ENV = "MAMMO_CONFIG"
DEFAULT_CONFIG_FILE = Path("mammo-node.toml")


AE_TITLE_PATTERN = r"^[ -~]*[!-~][ -~]*$"
AETitle = Annotated[str, StringConstraints(min_length=1, max_length=16, pattern=AE_TITLE_PATTERN)]


class Destination(BaseModel):
    """A DICOM peer that receives the node's results by C-STORE (a PACS, a viewer, a router)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    # the name (DNS, or IP address) the peer's TLS certificate must carry; unset: ``host``
    tls_server_name: str | None = Field(None, min_length=1, max_length=253)


class Settings(BaseSettings):
    """Every setting of the node. Each field is also the environment variable ``MAMMO_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="MAMMO_", extra="forbid", validate_default=True)

    data_dir: Path = Field(Path("mammo-data"), description="Where received studies, results and caches live.")
    model_path: Path | None = Field(
        None, description="A reference Mammo-CLIP .tar checkpoint or a model-version folder. "
                          "Unset: the demo model trained on synthetic phantoms (not clinical).")
    text_encoder_path: Path | None = Field(
        None, description="Local Hugging Face text-encoder directory (Bio_ClinicalBERT) for a reference .tar.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the models run.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or as one JSON object per line (time, level, logger, message, "
                            "pid, and study_uid/job_id where known) for a log collector.")
    db_url: str | None = Field(None, description="SQLAlchemy URL; unset: SQLite file in data_dir.")
    ae_title: str = Field("MAMMO_AI", min_length=1, max_length=16, pattern=AE_TITLE_PATTERN,
                          description="The node's AE title (1-16 printable ASCII characters).")
    bind_host: str = Field("127.0.0.1", description="Address the Storage SCP listens on.")
    port: int = Field(11112, ge=1, le=65535, description="Storage SCP port.")
    allowed_calling_aes: list[AETitle] = Field(
        default_factory=list, description="Calling AE titles allowed to associate; empty: any (logged).")
    store_non_mammography: bool = Field(
        True, description="Store non-MG objects without analysing them (false: refuse them with 0x0122).")
    maximum_associations: int = Field(
        10, ge=1, le=200, description="Associations served at once; more are refused (A-ASSOCIATE-RJ, transient: "
                                      "the sender retries).")
    maximum_pdu_size: int = Field(
        1 << 20, ge=65536, le=1 << 26, description="Largest P-DATA PDU the SCP announces and accepts (bytes); an "
                                                 "association whose peer sends a longer one is aborted.")
    maximum_message_mb: int = Field(
        4096, ge=1, le=1 << 20, description="Largest DIMSE message (a C-STORE's data set, MiB) an association may "
                                            "send; one that grows past it is aborted, so that a peer that never "
                                            "ends a data set cannot fill the memory. Tomosynthesis objects reach "
                                            "~2 GiB.")
    min_free_disk_mb: float = Field(
        500.0, ge=0, description="The Storage SCP refuses instances with 0xA700 (out of resources; the sender "
                                 "retries) while data_dir has less free space than this (MiB), so a full disk "
                                 "never holds a half-written study; checked at most once a second. 0: never.")
    scp_processes: int = Field(
        1, ge=1, le=64, description="Storage SCP processes sharing the port (Linux SO_REUSEPORT), so concurrent "
                                    "associations do not share one interpreter lock; 1: the SCP runs in the node "
                                    "process. Recommended with several senders: the number of CPU cores. "
                                    "maximum_associations applies to each process.")
    result_processes: int = Field(
        2, ge=0, le=16, description="Helper processes of each analysis worker that build the SR and the SEGs (the "
                                    "SEG encoder and highdicom are CPU-bound and cannot share threads); 4 encodes a "
                                    "study's views at once where there are cores for it. 0: the worker builds them.")
    retain_freed_memory: bool = Field(
        True, description="The analysis worker, its result helpers and the Storage SCP keep the memory they free for "
                          "their next studies and instances instead of returning it to the OS (glibc mallopt): "
                          "faulting the pages in again was most of the preprocessing and encoding time at 4096 x "
                          "3328, and a third of the SCP's system time. Their resident size then stays at its peak "
                          "(1.7 GB for a worker at that size, flat over 30 studies).")
    seg_compression: Literal["jpeg-ls", "jpeg2000", "none"] = Field(
        "jpeg-ls", description="Transfer syntax of the heatmap SEGs: JPEG-LS Lossless (fastest compact one), JPEG "
                               "2000 Lossless (smallest, ~2x the encoding CPU) or none (8x larger). A destination "
                               "that does not accept it gets the SEG uncompressed.")
    tls_certificate: Path | None = Field(None, description="PEM certificate: the SCP accepts TLS only.")
    tls_private_key: Path | None = Field(None, description="PEM private key of tls_certificate.")
    tls_ca_certificates: Path | None = Field(
        None, description="PEM CA bundle: with it, callers must present a certificate it signed (mutual TLS), "
                          "and destinations with tls=true are verified against it.")
    destinations: list[Destination] = Field(
        default_factory=list, description="Where results are sent, e.g. "
        '[{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}]; empty: kept on disk only.')
    broker_url: str | None = Field(
        None, description="Celery broker, e.g. redis://127.0.0.1:6379/0; unset: an embedded SQLite broker "
                          "in data_dir (no server to install).")
    study_settle_seconds: float = Field(
        1.0, ge=0, description="A study with all four screening views is analysed once no instance arrived "
                               "for this long, or at once when the association that sent them is released.")
    study_inactivity_timeout: float = Field(
        300.0, gt=0, description="A study missing a view is analysed on what it has after this many seconds "
                                 "without a new instance.")
    job_max_attempts: int = Field(3, ge=1, le=20, description="Analysis attempts before a job is FAILED.")
    job_stale_seconds: float = Field(
        120.0, gt=0, description="A RUNNING job whose worker has not sent a heartbeat for this long is re-sent.")
    job_time_limit_seconds: float = Field(
        1800.0, gt=0, description="An analysis running longer than this is taken as hung: its worker process exits "
                                  "(its supervisor starts another) and the job is retried, up to job_max_attempts.")
    export_max_attempts: int = Field(10, ge=1, le=100, description="C-STORE attempts before an export is FAILED.")
    export_backoff_seconds: float = Field(
        5.0, gt=0, description="First retry delay of a failed export; doubles each attempt (capped at 15 min).")
    triage_order: list[str] = Field(
        default_factory=lambda: ["-suspicion", "last_received_at"],
        description="Order of the triage list's ranked section: keys among suspicion, last_received_at, "
                    "first_received_at, study_date; '-' in front for descending. The default is index-backed.")
    api_bind_host: str = Field("127.0.0.1", description="Address the triage web page and HTTP API listen on.")
    api_port: int = Field(8080, ge=0, le=65535, description="Port of the triage web page and HTTP API (0: any free).")
    api_token: str | None = Field(
        None, repr=False, description="Bearer token of the HTTP API (Authorization: Bearer ...). With no token "
                                      "and no basic user/password every request is refused (401), except /healthz.")
    api_basic_user: str | None = Field(None, description="HTTP basic-auth user of the web page and API.")
    api_basic_password: str | None = Field(
        None, repr=False, description="HTTP basic-auth password (with api_basic_user).")
    api_max_failed_logins: int = Field(
        10, ge=1, description="Wrong credentials one client address may send within api_lockout_seconds before "
                              "the API answers it 429 (Too Many Requests) until that time has passed.")
    api_lockout_seconds: float = Field(
        300.0, gt=0, description="How long a client's wrong credentials are remembered, and how long it is "
                                 "locked out after api_max_failed_logins of them (seconds).")
    api_allow_local_unauthenticated: bool = Field(
        False, description="Let clients on this machine (loopback) in without credentials. For the demo only.")
    api_show_patient_names: bool = Field(
        False, description="Show patient names and IDs on the triage page and in the API (off: never shown).")
    api_min_free_disk_mb: float = Field(
        1024.0, ge=0, description="/readyz reports not ready when data_dir has less free space than this (MiB).")
    api_refresh_seconds: int = Field(30, ge=0, description="Auto-refresh period of the triage pages (0: off).")
    drift_psi_threshold: float = Field(
        0.2, gt=0, description="Score drift alert: a week's PSI of suspicion scores against its model version's "
                               "reference week above this (0.2: a significant shift; 0.1-0.2 moderate).")
    drift_min_studies: int = Field(
        200, ge=1, description="Results a week needs to be compared (and to be a version's reference week). "
                               "Below ~200 the sampling noise of a 10-bin PSI alone crosses 0.2 in many weeks.")
    drift_check_seconds: float = Field(3600.0, gt=0, description="How often the node checks for score drift.")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_FILE))
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=toml_file)

    @property
    def incoming_dir(self) -> Path:
        """Where received instances live."""
        return Path(self.data_dir) / "incoming"

    @property
    def results_dir(self) -> Path:
        """Where the SR, SEG and overlay files of each analysis live."""
        return Path(self.data_dir) / "results"

    def server_ssl_context(self):  # noqa: ANN201  (dicom_node.tls.ReloadingServerContext | None)
        """The SCP's TLS context when a certificate is configured (made again when its files change)."""
        if self.tls_certificate is None:
            return None
        if self.tls_private_key is None:
            raise ConfigurationError("tls_certificate is set but tls_private_key is not")
        from dicom_node.tls import ReloadingServerContext

        return ReloadingServerContext(self.tls_certificate, self.tls_private_key, self.tls_ca_certificates)

    def client_ssl_context(self, destination: Destination):  # noqa: ANN201  (ssl.SSLContext | None)
        """The TLS context for a destination marked ``tls`` (our certificate is offered for mutual TLS)."""
        if not destination.tls:
            return None
        from dicom_node.tls import client_context

        return client_context(self.tls_ca_certificates, self.tls_certificate, self.tls_private_key)

    def to_env(self) -> dict[str, str]:
        """These settings as ``MAMMO_*`` variables, so a child process (the embedded worker) sees the same."""
        env = {}
        for name, value in self.model_dump(mode="json").items():
            if value is not None:
                env[f"MAMMO_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        return env

    def database_url(self) -> str:
        """``db_url``, or the embedded SQLite file under ``data_dir``."""
        from worklist.db import sqlite_url

        return self.db_url or sqlite_url(self.data_dir)

    def resolved_device(self) -> str:
        """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings, turning any invalid value into a ``ConfigurationError`` that names the key."""
    if config_file is not None:
        if not Path(config_file).exists():
            raise ConfigurationError(f"Configuration file {config_file} does not exist.")
        os.environ[CONFIG_ENV] = str(config_file)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as error:
        problems = []
        for item in error.errors():
            key = ".".join(str(part) for part in item["loc"])
            problems.append(f"setting '{key}' (env MAMMO_{key.upper()}): {item['msg']}")
        raise ConfigurationError("Invalid configuration:\n  " + "\n  ".join(problems)) from None
