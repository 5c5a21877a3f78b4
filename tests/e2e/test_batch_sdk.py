"""The Batch API against a real ``headrace serve``: the official openai SDK, and
``headrace batch submit`` as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

import openai
import pytest
from openai.types import Batch

from tests.e2e.conftest import ADMIN_KEY, Server
from tests.e2e.test_openai_sdk import faults, sync_client

pytestmark = pytest.mark.e2e

CHAT_URL: Final = "/v1/chat/completions"


def write_requests(path: Path, topics: dict[str, str], *, failing: str | None = None) -> Path:
    """One chat request per ``custom_id → topic`` (and one for an unknown model)."""
    requests: list[dict[str, Any]] = [
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": CHAT_URL,
            "body": {"model": "mock-model", "messages": [{"role": "user", "content": topic}]},
        }
        for custom_id, topic in topics.items()
    ]
    if failing is not None:
        body = {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
        requests.append({"custom_id": failing, "method": "POST", "url": CHAT_URL, "body": body})
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    return path


def wait(client: openai.OpenAI, batch_id: str, until: str) -> Batch:
    deadline = time.monotonic() + 30
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status == until:
            return batch
        assert batch.status in ("validating", "in_progress", "finalizing", "cancelling"), batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)


def by_custom_id(text: str) -> dict[str, dict[str, Any]]:
    rows = [json.loads(line) for line in text.splitlines()]
    return {row["custom_id"]: row for row in rows}


def test_the_sdk_runs_a_batch_end_to_end(gateway: Server, tmp_path: Path) -> None:
    client = sync_client(gateway)
    topics = {f"req-{i}": f"topic{i}" for i in range(6)}
    path = write_requests(tmp_path / "requests.jsonl", topics, failing="broken")
    with path.open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="batch")
    assert (uploaded.object, uploaded.purpose, uploaded.bytes) == (
        "file",
        "batch",
        path.stat().st_size,
    )
    assert client.files.retrieve(uploaded.id).filename == "requests.jsonl"

    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=CHAT_URL,
        completion_window="24h",
        metadata={"suite": "e2e"},
    )
    assert batch.status == "in_progress"
    assert batch.metadata == {"suite": "e2e"}
    done = wait(client, batch.id, "completed")
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (7, 6)
    assert done.request_counts.failed == 1
    assert done.usage is not None
    assert done.usage.input_tokens == 6
    assert done.output_file_id is not None
    assert done.error_file_id is not None

    output = by_custom_id(client.files.content(done.output_file_id).text)
    assert sorted(output) == sorted(topics)
    for custom_id, topic in topics.items():
        response = output[custom_id]["response"]
        assert response["status_code"] == 200
        answer = response["body"]["choices"][0]["message"]["content"]
        assert answer.startswith(f"mock answer: {topic} {topic}")
    errors = by_custom_id(client.files.content(done.error_file_id).text)
    assert errors["broken"]["response"]["status_code"] == 404
    assert errors["broken"]["response"]["body"]["error"]["code"] == "model_not_found"

    assert batch.id in [b.id for b in client.batches.list(limit=100)]


def test_the_sdk_sees_bad_lines_as_a_400(gateway: Server, tmp_path: Path) -> None:
    client = sync_client(gateway)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}\n')
    uploaded = client.files.create(file=path, purpose="batch")
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(input_file_id=uploaded.id, endpoint=CHAT_URL, completion_window="24h")
    assert isinstance(caught.value.body, dict)
    [error] = caught.value.body["errors"]["data"]
    assert (error["line"], error["code"]) == (1, "mismatched_endpoint")


def test_the_sdk_cancels_a_batch(gateway: Server, mock_upstream: Server, tmp_path: Path) -> None:
    client = sync_client(gateway)
    path = write_requests(tmp_path / "slow.jsonl", {"a": "x", "b": "y", "c": "z"})
    uploaded = client.files.create(file=path, purpose="batch")
    with faults(mock_upstream, latency_ms=1000):
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint=CHAT_URL, completion_window="24h"
        )
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        done = wait(client, batch.id, "cancelled")
    assert done.cancelled_at is not None
    assert done.request_counts is not None
    assert done.request_counts.completed + done.request_counts.failed == 3


def test_headrace_batch_submit_writes_results_and_errors(gateway: Server, tmp_path: Path) -> None:
    topics = {"one": "alpha", "two": "beta"}
    path = write_requests(tmp_path / "cli.jsonl", topics, failing="nope")
    result = submit(path, gateway)
    assert result.returncode == 0, result.stderr
    assert "completed: 2 succeeded, 1 failed" in result.stderr
    output = by_custom_id((tmp_path / "cli.output.jsonl").read_text())
    assert sorted(output) == ["one", "two"]
    answer = output["one"]["response"]["body"]["choices"][0]["message"]["content"]
    assert answer.startswith("mock answer: alpha")
    errors = by_custom_id((tmp_path / "cli.errors.jsonl").read_text())
    assert list(errors) == ["nope"]

    chosen = tmp_path / "chosen.jsonl"
    refused = submit(path, gateway, "--endpoint", "/v1/embeddings", "--output", str(chosen))
    assert refused.returncode == 1
    assert "HTTP 400: Line 1 of file-" in refused.stderr
    assert not chosen.exists()


def submit(path: Path, gateway: Server, *options: str) -> subprocess.CompletedProcess[str]:
    """``headrace batch submit PATH`` against ``gateway`` as the admin key."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "headrace",
            "batch",
            "submit",
            str(path),
            "--url",
            gateway.url,
            "--poll-s",
            "0.1",
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "HEADRACE_API_KEY": ADMIN_KEY},
    )
