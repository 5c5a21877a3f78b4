"""The ``headrace`` command line."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from headrace import __version__
from headrace.config import ConfigError, Settings, load_settings

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


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _announce_admin_key(secret: str, data_dir: Path) -> None:
    line = "-" * 72
    typer.echo(
        f"{line}\nHeadrace created an admin API key. It is shown only this once:\n\n"
        f"    {secret}\n\nIt is also saved, readable only by you, in "
        f"{data_dir / 'admin-key'}\n{line}",
        err=True,
    )


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Overrides server.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Overrides server.port.")] = None,
) -> None:
    """Run the gateway."""
    import uvicorn

    from headrace.api import create_app
    from headrace.observability.logging import configure_logging
    from headrace.wiring import build_runtime

    settings = _settings(config)
    configure_logging(settings.log.level, settings.log.format)
    runtime = build_runtime(settings)
    runtime.announce_admin_key = _announce_admin_key
    application = create_app(runtime)

    server_host = host or settings.server.host
    server_port = settings.server.port if port is None else port
    typer.echo(f"Headrace {__version__} listening on http://{server_host}:{server_port}", err=True)
    # uvicorn drains on SIGTERM, then re-raises the signal to the handler it found: this one,
    # so that a completed drain exits 0 rather than dying by the signal (status 143).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        application,
        host=server_host,
        port=server_port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=int(settings.server.graceful_shutdown_s),
        server_header=False,
    )


@app.command()
def doctor(config: ConfigOption = None) -> None:
    """Check the configuration, local models and every dependency; exit 1 if any fails."""
    from headrace.doctor import run_doctor

    settings = _settings(config)
    ok = asyncio.run(run_doctor(settings, typer.echo))
    raise typer.Exit(0 if ok else 1)


cache_app = typer.Typer(help="Inspect and purge a running gateway's response cache.")
app.add_typer(cache_app, name="cache")

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


def _admin_key(given: str | None, config: Path | None) -> str:
    if given:
        return given
    path = _settings(config).data_dir / "admin-key"
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        typer.echo(
            f"No admin key: pass --admin-key or set HEADRACE_ADMIN_KEY ({path} is unreadable).",
            err=True,
        )
        raise typer.Exit(2) from None


def _admin_call(url: str, key: str, method: str, path: str, query: dict[str, str]) -> object:
    from headrace.admin_client import AdminError, call

    try:
        return call(url, key, method, path, query)
    except AdminError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None


@cache_app.command("stats")
def cache_stats(
    url: UrlOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Entries, bytes, evictions and hit/miss/bypass counts."""
    stats = _admin_call(url, _admin_key(admin_key, config), "GET", "/admin/cache", {})
    assert isinstance(stats, dict)
    for name in ("entries", "bytes", "evictions"):
        typer.echo(f"{name:<10} {stats[name]}")
    for result, count in sorted(stats["requests"].items()):
        typer.echo(f"{result:<10} {count}")


@cache_app.command("purge")
def cache_purge(
    model: Annotated[str | None, typer.Option(help="Only this model's entries.")] = None,
    team: Annotated[str | None, typer.Option(help="Only this team's entries.")] = None,
    key: Annotated[str | None, typer.Option(help="Only entries made with this key id.")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Purge every entry.")] = False,
    url: UrlOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Delete cached responses by model, team or key (or --all)."""
    query = {k: v for k, v in (("model", model), ("team", team), ("key", key)) if v}
    if not query and not everything:
        typer.echo("Say what to purge: --model, --team, --key, or --all.", err=True)
        raise typer.Exit(2)
    result = _admin_call(url, _admin_key(admin_key, config), "DELETE", "/admin/cache", query)
    assert isinstance(result, dict)
    typer.echo(f"purged {result['purged']} entries")


@app.command()
def version() -> None:
    """Print Headrace's version."""
    typer.echo(__version__)


def _register_mock_upstream() -> None:
    from headrace.mock_upstream.command import mock_upstream_command

    app.command(
        "mock-upstream",
        help="Run a fast OpenAI-compatible mock upstream with fault injection.",
    )(mock_upstream_command)


_register_mock_upstream()


def main() -> None:
    app()
