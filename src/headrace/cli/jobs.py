"""``headrace worker`` (run jobs, deliver webhooks) and ``headrace jobs`` (dead letters)."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Annotated

import orjson
import typer

from headrace.cli._common import (
    AdminKeyOption,
    ConfigOption,
    UrlOption,
    admin_call,
    admin_key_of,
    app,
    runtime_from,
    settings_from,
)
from headrace.config import Settings

jobs_app = typer.Typer(help="Inspect, replay and discard dead-letter jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


def worker_settings(settings: Settings, concurrency: int | None) -> Settings:
    """A worker's settings: ``--concurrency`` over ``jobs.concurrency``, and model calls
    admitted at once (``router.admission.max_concurrent``) at least that many. A worker's
    calls are its jobs, already bounded by ``jobs.concurrency``; a lower admission limit would
    queue the rest, then shed them with 503 and make them retry."""
    if concurrency is not None:
        jobs = settings.jobs.model_copy(update={"concurrency": concurrency})
        settings = settings.model_copy(update={"jobs": jobs})
    admission = settings.router.admission
    if admission.max_concurrent < settings.jobs.concurrency:
        admission = admission.model_copy(update={"max_concurrent": settings.jobs.concurrency})
        router = settings.router.model_copy(update={"admission": admission})
        settings = settings.model_copy(update={"router": router})
    return settings


@app.command()
def worker(
    config: ConfigOption = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Jobs in flight in this process (jobs.concurrency).")
    ] = None,
) -> None:
    """Run queued jobs and deliver their webhooks; no HTTP API. Start more to scale out.

    SIGTERM or Ctrl-C: stop claiming, let running jobs finish (server.graceful_shutdown_s),
    give the rest back to the queue, exit 0.
    """
    from headrace.api.wire import validate_job
    from headrace.cli.heap import settled_heap
    from headrace.observability.logging import configure_logging
    from headrace.worker.process import attach_workers
    from headrace.worker.runner import IDLE_POLL_S

    settings = worker_settings(settings_from(config), concurrency)
    configure_logging(settings.log.level, settings.log.format)
    runtime = runtime_from(settings, validate_job=validate_job)
    attach_workers(runtime, run_jobs=True, idle_poll_s=IDLE_POLL_S)
    runtime.on_started = settled_heap(settings, runtime.metrics)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await runtime.start()
        typer.echo(f"headrace worker running ({settings.jobs.concurrency} jobs at once)", err=True)
        try:
            await stop.wait()
        finally:
            await runtime.stop()

    if sys.platform != "win32":
        import uvloop

        uvloop.run(run())
    else:
        asyncio.run(run())


def _print(answer: object) -> None:
    typer.echo(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode())


@jobs_app.command("dead")
def jobs_dead(
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    url: UrlOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """List dead-letter jobs with their last error."""
    answer = admin_call(url, admin_key_of(admin_key, config), "GET", "/admin/dead-letters", {})
    if as_json:
        _print(answer)
        return
    assert isinstance(answer, dict)
    for job in answer["data"]:
        error = job.get("error") or {}
        typer.echo(f"{job['id']}  attempts={job['attempts']}  {error.get('message', '')}")
    if not answer["data"]:
        typer.echo("no dead letters", err=True)


@jobs_app.command("replay")
def jobs_replay(
    job_id: Annotated[str | None, typer.Argument(help="One job; omit with --all.")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    url: UrlOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Queue dead letters again (fresh attempts; their error history is kept)."""
    if (job_id is None) == (not everything):
        typer.echo("Give a job id, or --all.", err=True)
        raise typer.Exit(2)
    key = admin_key_of(admin_key, config)
    path = "/admin/dead-letters/replay" if everything else f"/admin/dead-letters/{job_id}/replay"
    _print(admin_call(url, key, "POST", path, {}))


@jobs_app.command("discard")
def jobs_discard(
    job_id: Annotated[str, typer.Argument(help="The dead job to delete for good.")],
    url: UrlOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Delete a dead-letter job."""
    key = admin_key_of(admin_key, config)
    _print(admin_call(url, key, "DELETE", f"/admin/dead-letters/{job_id}", {}))
