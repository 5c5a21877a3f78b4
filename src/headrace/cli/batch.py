"""``headrace batch submit``: run a JSONL file of requests through the Batch API and wait."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from headrace.cli._common import UrlOption, app

batch_app = typer.Typer(
    help="Run files of requests through the gateway's Batch API.", no_args_is_help=True
)
app.add_typer(batch_app, name="batch")

ApiKeyOption = Annotated[
    str | None,
    typer.Option("--api-key", envvar="HEADRACE_API_KEY", help="The API key the batch runs as."),
]
_FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
T = TypeVar("T")


@batch_app.command("submit")
def submit(
    file: Annotated[
        Path,
        typer.Argument(
            exists=True,
            dir_okay=False,
            help='JSON Lines: {"custom_id", "method": "POST", "url", "body"} per line.',
        ),
    ],
    endpoint: Annotated[
        str, typer.Option(help="/v1/chat/completions or /v1/embeddings; every line's url.")
    ] = "/v1/chat/completions",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Succeeded requests. Default: FILE.output.jsonl."),
    ] = None,
    errors: Annotated[
        Path | None,
        typer.Option("--errors", help="Failed requests. Default: FILE.errors.jsonl."),
    ] = None,
    poll_s: Annotated[
        float, typer.Option("--poll-s", min=0.05, help="Seconds between progress checks.")
    ] = 1.0,
    url: UrlOption = "http://127.0.0.1:8080",
    api_key: ApiKeyOption = None,
) -> None:
    """Upload FILE, create a batch, show its progress, and write its results when it ends.

    Both result files are written (empty when nothing went there), one line per request in
    OpenAI's batch output format. Exit 0 when the batch completed (even if some requests
    failed: see the errors file), 1 when it failed, expired or was cancelled, or on an error.
    Ctrl-C stops waiting; the batch goes on in the gateway.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from headrace.admin_client import call, fetch, upload

    if not api_key:
        typer.echo("No API key: pass --api-key or set HEADRACE_API_KEY.", err=True)
        raise typer.Exit(2)
    output = output or _beside(file, "output")
    errors = errors or _beside(file, "errors")
    uploaded = _guarded(
        upload,
        url,
        api_key,
        "/v1/files",
        fields={"purpose": "batch"},
        file_field="file",
        filename=file.name,
        content=file.read_bytes(),
    )
    body = {"input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": "24h"}
    batch = _guarded(call, url, api_key, "POST", "/v1/batches", body=body, timeout_s=300.0)
    total = batch["request_counts"]["total"]
    console = Console(stderr=True)
    console.print(f"{batch['id']}: {total} requests from {file.name}")
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(batch["status"], total=total)
            while batch["status"] not in _FINAL:
                time.sleep(poll_s)
                batch = _guarded(call, url, api_key, "GET", f"/v1/batches/{batch['id']}")
                counts = batch["request_counts"]
                done = counts["completed"] + counts["failed"]
                bar.update(task, completed=done, description=batch["status"])
    except KeyboardInterrupt:
        console.print(
            f"Stopped waiting. {batch['id']} goes on in the gateway; "
            f"POST /v1/batches/{batch['id']}/cancel stops it."
        )
        raise typer.Exit(130) from None
    for file_id, path in ((batch["output_file_id"], output), (batch["error_file_id"], errors)):
        content = b""
        if file_id is not None:
            content = _guarded(fetch, url, api_key, f"/v1/files/{file_id}/content")
        path.write_bytes(content)
    counts = batch["request_counts"]
    console.print(
        f"{batch['id']} {batch['status']}: {counts['completed']} succeeded, "
        f"{counts['failed']} failed. Results in {output}, errors in {errors}."
    )
    for error in (batch.get("errors") or {}).get("data") or []:
        console.print(f"  {error.get('code')}: {error.get('message')}")
    raise typer.Exit(0 if batch["status"] == "completed" else 1)


def _beside(file: Path, what: str) -> Path:
    """``requests.jsonl`` → ``requests.<what>.jsonl`` in the same directory."""
    return file.with_name(f"{file.stem}.{what}.jsonl")


def _guarded(request: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """One :mod:`headrace.admin_client` request; on failure, its message and exit 1."""
    from headrace.admin_client import AdminError

    try:
        return request(*args, **kwargs)
    except AdminError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
