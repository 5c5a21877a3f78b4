"""The ``headrace mock-upstream`` command: run the mock until interrupted.

Registered by the CLI as ``app.command("mock-upstream")(mock_upstream_command)``. Fault
flags share their names with ``PUT /_mock/faults`` fields (``--error-rate`` is
``error_rate``), so a run can start with flags and change at run time over HTTP.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from aiohttp import web

from headrace.mock_upstream.app import ServerOptions, build_app
from headrace.mock_upstream.faults import FaultConfig, LatencyDist, format_statuses, parse_statuses

__all__ = ["mock_upstream_command"]

_DEFAULT_STATUSES = format_statuses(FaultConfig().error_statuses)


def mock_upstream_command(
    *,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 8100,
    output_tokens: Annotated[
        int, typer.Option(min=0, help="Words (= completion tokens) per chat answer.")
    ] = 16,
    embedding_dimensions: Annotated[
        int, typer.Option(min=1, help="Embedding length when the request gives no 'dimensions'.")
    ] = 16,
    require_key: Annotated[
        str | None,
        typer.Option(help="Answer 401 unless 'Authorization: Bearer KEY' matches (default: any)."),
    ] = None,
    latency_ms: Annotated[
        float, typer.Option(min=0, help="Wait before the response headers.")
    ] = 0.0,
    latency_jitter_ms: Annotated[
        float, typer.Option(min=0, help="Latency spread: ± range (uniform) or std. dev. (normal).")
    ] = 0.0,
    latency_dist: Annotated[
        LatencyDist, typer.Option(help="How the jitter is drawn.")
    ] = LatencyDist.UNIFORM,
    ttft_ms: Annotated[
        float, typer.Option(min=0, help="Streams: wait before the first chunk.")
    ] = 0.0,
    inter_chunk_ms: Annotated[
        float, typer.Option(min=0, help="Streams: wait between chunks.")
    ] = 0.0,
    error_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of requests answered with an error status.")
    ] = 0.0,
    error_statuses: Annotated[
        str, typer.Option(help="Statuses for --error-rate, e.g. '429,500' or '429:2,500:1'.")
    ] = _DEFAULT_STATUSES,
    retry_after_s: Annotated[
        float, typer.Option(min=0, help="Retry-After (and retry-after-ms) on injected 429s.")
    ] = 1.0,
    hang_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of requests never answered.")
    ] = 0.0,
    cut_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of answers whose connection drops halfway.")
    ] = 0.0,
    malformed_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of 200 answers with invalid JSON/SSE data.")
    ] = 0.0,
    seed: Annotated[
        int | None, typer.Option(help="Seed for fault decisions (default: random).")
    ] = None,
) -> None:
    """Run a fast OpenAI-compatible mock server with fault injection (see /_mock/*)."""
    try:
        faults = FaultConfig(
            latency_ms=latency_ms,
            latency_jitter_ms=latency_jitter_ms,
            latency_dist=latency_dist,
            ttft_ms=ttft_ms,
            inter_chunk_ms=inter_chunk_ms,
            error_rate=error_rate,
            error_statuses=parse_statuses(error_statuses),
            retry_after_s=retry_after_s,
            hang_rate=hang_rate,
            cut_rate=cut_rate,
            malformed_rate=malformed_rate,
        )
        options = ServerOptions(
            output_tokens=output_tokens,
            embedding_dimensions=embedding_dimensions,
            require_key=require_key,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    app = build_app(faults, seed=seed, options=options)
    typer.echo(f"mock-upstream faults: {faults.to_json()}", err=True)
    web.run_app(
        app,
        host=host,
        port=port,
        print=_announce,
        access_log=None,
        shutdown_timeout=1.0,
        loop=_new_loop(),
    )


def _announce(message: str) -> None:
    # Flushed so that a parent process reading our stdout sees the line at once.
    print(message, flush=True)


def _new_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed (faster), else asyncio's default."""
    try:
        import uvloop  # optional, and only the command needs it
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
