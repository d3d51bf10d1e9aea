"""The node's one settings object: defaults < TOML file < ``MAMMO_*`` environment variables < CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from models.errors import ConfigurationError

CONFIG_ENV = "MAMMO_CONFIG"
DEFAULT_CONFIG_FILE = Path("mammo-node.toml")


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
    db_url: str | None = Field(None, description="SQLAlchemy URL; unset: SQLite file in data_dir.")
    ae_title: str = Field("MAMMO_AI", min_length=1, max_length=16, pattern=r"^[ -~]*[!-~][ -~]*$",
                          description="The node's AE title (1-16 printable ASCII characters).")
    bind_host: str = Field("127.0.0.1", description="Address the Storage SCP listens on.")
    port: int = Field(11112, ge=1, le=65535, description="Storage SCP port.")
    allowed_calling_aes: list[str] = Field(
        default_factory=list, description="Calling AE titles allowed to associate; empty: any (logged).")
    store_non_mammography: bool = Field(
        True, description="Store non-MG objects without analysing them (false: refuse them with 0x0122).")
    maximum_associations: int = Field(10, ge=1, le=200)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_FILE))
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=toml_file)

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
