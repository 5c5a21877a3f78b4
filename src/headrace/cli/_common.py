"""What the CLI's commands share: the Typer app, common options, settings and the admin API."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from headrace.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from headrace.wiring import Runtime

app = typer.Typer(
    name="headrace",
    help="Headrace: an OpenAI-compatible AI gateway.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML config file; without one, the embedded default (local models, SQLite).",
        exists=True,
        dir_okay=False,
        envvar="HEADRACE_CONFIG",
    ),
]


def settings_from(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def runtime_from(settings: Settings, **options: Any) -> Runtime:
    """The wired runtime (:func:`headrace.wiring.build_runtime`); a configuration it cannot
    build on is reported as :func:`settings_from` reports one it cannot read."""
    from headrace.wiring import build_runtime

    try:
        return build_runtime(settings, **options)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


UrlOption = Annotated[
    str, typer.Option("--url", envvar="HEADRACE_URL", help="The running gateway.")
]
AdminKeyOption = Annotated[
    str | None,
    typer.Option(
        "--admin-key",
        envvar="HEADRACE_ADMIN_KEY",
        help="Default: the key saved in the data directory on first start.",
    ),
]


def admin_key_of(given: str | None, config: Path | None, option: str = "--admin-key") -> str:
    """``given``, else the admin key saved in the data directory; ``option`` is the command's
    own way to give a key, named when there is none."""
    if given:
        return given
    path = settings_from(config).data_dir / "admin-key"
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        typer.echo(
            f"No admin key: pass {option} or set HEADRACE_ADMIN_KEY ({path} is unreadable).",
            err=True,
        )
        raise typer.Exit(2) from None


def admin_call(
    url: str, key: str, method: str, path: str, query: dict[str, str], body: object = None
) -> object:
    from headrace.admin_client import AdminError, call

    try:
        return call(url, key, method, path, query, body=body)
    except AdminError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
