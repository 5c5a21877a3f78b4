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
from headrace.cli._common import ConfigOption, app, runtime_from, settings_from


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
    from headrace.api.wire import validate_job
    from headrace.cli.heap import settled_heap
    from headrace.cli.http import HttpProtocol
    from headrace.observability.logging import configure_logging
    from headrace.worker.process import attach_workers

    settings = settings_from(config)
    configure_logging(settings.log.level, settings.log.format)
    runtime = runtime_from(settings, validate_job=validate_job)
    attach_workers(runtime, run_jobs=settings.jobs.run_in_process)
    runtime.announce_admin_key = _announce_admin_key
    runtime.on_started = settled_heap(settings, runtime.metrics)
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
        http=HttpProtocol,  # uvicorn's httptools protocol, an answer in one write
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

    settings = settings_from(config)
    ok = asyncio.run(run_doctor(settings, typer.echo))
    raise typer.Exit(0 if ok else 1)


@app.command()
def migrate(config: ConfigOption = None) -> None:
    """Bring the database's schema to this release's head revision (safe to run again)."""
    from sqlalchemy.exc import SQLAlchemyError

    from headrace.store.migrate import SchemaOutOfDateError
    from headrace.store.migrate import migrate as upgrade

    settings = settings_from(config)
    url = settings.resolved_database_url
    try:
        applied = asyncio.run(upgrade(url))
        queue_schema = False
        if settings.jobs.backend == "procrastinate":
            from headrace.queue import procrastinate

            queue_schema = asyncio.run(procrastinate.migrate(url))
    except (SchemaOutOfDateError, SQLAlchemyError, OSError) as exc:
        typer.echo(f"migration failed: {exc}", err=True)
        raise typer.Exit(1) from None
    for revision in applied:
        typer.echo(f"applied {revision}")
    if queue_schema:
        typer.echo("applied Procrastinate's schema (jobs.backend: procrastinate)")
    if not applied and not queue_schema:
        typer.echo("already at head")


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


from headrace.cli import admin, batch, bench, jobs  # noqa: E402, F401 - registers their commands
