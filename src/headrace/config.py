"""Settings: one YAML file plus ``HEADRACE_*`` environment variables, typed and strict.

Precedence, highest first: environment variables (nested with ``__``, e.g.
``HEADRACE_SERVER__PORT=9000``), then the YAML file, then the defaults here. Unknown keys are
an error that names the key and the file. Units are in the names (``timeout_s``, ``_bytes``).

Only :mod:`headrace.wiring` and :mod:`headrace.cli` import this module (import-linter enforces
it); everything else receives plain values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

Capability = Literal["chat", "embeddings"]
_CHAT: Capability = "chat"


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimeoutsConfig(_Strict):
    connect_s: float = Field(5.0, gt=0, description="TCP connect timeout.")
    first_token_s: float = Field(60.0, gt=0, description="Stream start to first chunk.")
    total_s: float = Field(600.0, gt=0, description="Whole upstream call.")


class DeploymentConfig(_Strict):
    """One upstream serving a public model."""

    provider: str = Field(description="Provider kind: openai_compatible, local, ...")
    model: str = Field(description="The model name the upstream knows.")
    name: str | None = Field(None, description="Defaults to '<public model>/<n>'.")
    base_url: str | None = Field(None, description="e.g. https://api.openai.com/v1")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable that holds the upstream API key."
    )
    timeouts: TimeoutsConfig = TimeoutsConfig()
    options: dict[str, Any] = Field(default_factory=dict, description="Provider-specific.")


class ModelConfig(_Strict):
    """A public model name and the deployments behind it, in preference order."""

    name: str
    deployments: list[DeploymentConfig] = Field(min_length=1)
    capabilities: list[Capability] = Field(default_factory=lambda: [_CHAT])


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Larger bodies get 413.")
    graceful_shutdown_s: float = Field(30.0, ge=0)


class AuthConfig(_Strict):
    enabled: bool = True
    key_cache_ttl_s: float = Field(30.0, ge=0)


class LogConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    access_log: bool = True


def default_models() -> list[ModelConfig]:
    """The embedded default: a local chat model and a local embedding model."""
    return [
        ModelConfig(
            name="smollm2-135m-instruct",
            deployments=[DeploymentConfig(provider="local", model="smollm2-135m-instruct")],
        ),
        ModelConfig(
            name="all-minilm-l6-v2",
            capabilities=["embeddings"],
            deployments=[DeploymentConfig(provider="local_embeddings", model="all-minilm-l6-v2")],
        ),
    ]


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "headrace"


class Settings(BaseSettings):
    """Everything Headrace reads at start. See docs/configuration.md for each key."""

    model_config = SettingsConfigDict(
        env_prefix="HEADRACE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = Field(
        None, description="SQLAlchemy async URL; default: SQLite in data_dir."
    )
    admin_key: SecretStr | None = Field(
        None, description="Fixes the admin key instead of generating one on first start."
    )
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    log: LogConfig = LogConfig()
    models: list[ModelConfig] = Field(default_factory=default_models)

    @model_validator(mode="after")
    def _unique_model_names(self) -> Settings:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'headrace.db'}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file; the file arrives as init kwargs (see load_settings).
        return (env_settings, init_settings)


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"Invalid configuration in {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (check its spelling; see docs/configuration.md)")
        else:
            lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def load_settings(path: Path | None = None) -> Settings:
    """Read ``path`` (YAML) if given, then the environment. Raises :class:`ConfigError`."""
    data: dict[str, Any] = {}
    source = "the environment (HEADRACE_*)"
    if path is not None:
        source = f"{path} or the environment (HEADRACE_*)"
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"Cannot read config file {path}: {exc.strerror}.") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {path} must hold a mapping at the top level.")
        data = loaded
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc
