"""/v1/files and /v1/batches through the in-process app, with the in-process job runner."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import httpx
import orjson
import pytest

from headrace.config import JobsConfig
from headrace.domain import Principal, Role
from headrace.gateway.auth import new_key, new_secret
from headrace.jobs.batches import BatchService
from headrace.queue.batches_sql import store_beside
from headrace.store.migrate import migrate
from headrace.wiring import Runtime
from tests.api.conftest import follow
from tests.conftest import AUTH, GatewayFactory, echo_models

CHAT_URL: Final = "/v1/chat/completions"


USER = {"role": "user", "content": "hello"}


def request(custom_id: str, body: dict[str, Any], **fields: Any) -> bytes:
    """One input line (``fields`` override ``method`` and ``url``)."""
    line = {"custom_id": custom_id, "method": "POST", "url": CHAT_URL, "body": body, **fields}
    return orjson.dumps(line)


def line(custom_id: str, content: str = "hello", model: str = "echo", **fields: Any) -> bytes:
    """A chat request line saying ``content`` to ``model``."""
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    return request(custom_id, body, **fields)


def jsonl(*lines: bytes) -> bytes:
    return b"\n".join(lines) + b"\n"


async def upload(
    client: httpx.AsyncClient, content: bytes, headers: Any = AUTH, purpose: str = "batch"
) -> httpx.Response:
    return await client.post(
        "/v1/files",
        files={"file": ("requests.jsonl", content, "application/jsonl")},
        data={"purpose": purpose},
        headers=headers,
    )


async def create(
    client: httpx.AsyncClient, file_id: str, headers: Any = AUTH, **fields: Any
) -> httpx.Response:
    body = {"input_file_id": file_id, "endpoint": CHAT_URL, "completion_window": "24h", **fields}
    return await client.post("/v1/batches", json=body, headers=headers)


async def start_batch(client: httpx.AsyncClient, content: bytes, **fields: Any) -> dict[str, Any]:
    uploaded = await upload(client, content)
    assert uploaded.status_code == 200, uploaded.text
    created = await create(client, uploaded.json()["id"], **fields)
    assert created.status_code == 200, created.text
    return dict(created.json())


async def wait_batch(
    client: httpx.AsyncClient, batch_id: str, until: frozenset[str] | None = None
) -> dict[str, Any]:
    until = until or frozenset({"completed", "failed", "expired", "cancelled"})
    deadline = time.monotonic() + 15
    while True:
        batch = (await client.get(f"/v1/batches/{batch_id}", headers=AUTH)).json()
        if batch["status"] in until:
            return dict(batch)
        assert time.monotonic() < deadline, batch
        await asyncio.sleep(0.02)


async def lines_of(client: httpx.AsyncClient, file_id: str | None) -> dict[str, dict[str, Any]]:
    """A result file's lines by custom_id."""
    assert file_id is not None
    answer = await client.get(f"/v1/files/{file_id}/content", headers=AUTH)
    assert answer.status_code == 200
    rows = [orjson.loads(raw) for raw in answer.content.splitlines()]
    return {row["custom_id"]: row for row in rows}


async def stop_runner(rt: Runtime) -> None:
    for service in rt.services:  # the jobs stay queued
        await service.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings overrides: the embedded SQLite, or a fresh migrated PostgreSQL database."""
    if request.param == "sqlite":
        return {}
    url: str = request.getfixturevalue("fresh_database_url")
    await migrate(url)
    return {"database_url": url}


async def test_a_batch_runs_each_line_as_a_job_and_writes_output_and_error_files(
    gateway: GatewayFactory, database: dict[str, Any]
) -> None:
    client, _ = await gateway(jobs=True, **database)
    content = jsonl(
        line("first", "one fish"),
        line("second", "two fish"),
        b"",  # blank lines are skipped
        line("third", "red fish"),
        line("lost", model="no-such-model"),
    )
    uploaded = await upload(client, content)
    assert uploaded.status_code == 200
    file = uploaded.json()
    assert file["object"] == "file"
    assert (file["purpose"], file["bytes"], file["filename"]) == (
        "batch",
        len(content),
        "requests.jsonl",
    )
    assert (await client.get(f"/v1/files/{file['id']}", headers=AUTH)).json() == file
    stored = await client.get(f"/v1/files/{file['id']}/content", headers=AUTH)
    assert stored.content == content

    created = await create(client, file["id"], metadata={"run": "nightly"})
    assert created.status_code == 200, created.text
    batch = created.json()
    assert batch["object"] == "batch"
    assert batch["status"] == "in_progress"
    assert batch["request_counts"] == {"total": 4, "completed": 0, "failed": 0}
    assert batch["metadata"] == {"run": "nightly"}
    assert batch["expires_at"] == batch["created_at"] + 86_400

    done = await wait_batch(client, batch["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    assert done["completed_at"] is not None
    assert done["usage"]["input_tokens"] == 2 + 2 + 2  # echo counts words
    output = await lines_of(client, done["output_file_id"])
    assert sorted(output) == ["first", "second", "third"]
    for custom_id, said in (("first", "one fish"), ("second", "two fish"), ("third", "red fish")):
        row = output[custom_id]
        assert row["id"].startswith("batch_req_")
        assert row["error"] is None
        assert row["response"]["status_code"] == 200
        assert row["response"]["body"]["choices"][0]["message"]["content"] == said
    errors = await lines_of(client, done["error_file_id"])
    assert list(errors) == ["lost"]
    failed = errors["lost"]["response"]
    assert failed["status_code"] == 404
    assert failed["body"]["error"]["code"] == "model_not_found"

    # Output files belong to the team; a second read does not write them again.
    again = (await client.get(f"/v1/batches/{batch['id']}", headers=AUTH)).json()
    assert again == done
    outputs = (await client.get("/v1/files?purpose=batch_output", headers=AUTH)).json()
    assert {f["filename"] for f in outputs["data"]} == {
        f"{batch['id']}_output.jsonl",
        f"{batch['id']}_error.jsonl",
    }
    # The requests are jobs, visible as such.
    jobs = (await client.get(f"/v1/jobs?batch_id={batch['id']}", headers=AUTH)).json()["data"]
    assert sorted(j["metadata"]["custom_id"] for j in jobs) == ["first", "lost", "second", "third"]
    assert {j["priority"] for j in jobs} == {"low"}


async def test_progress_is_counted_while_the_batch_runs(gateway: GatewayFactory) -> None:
    client, _ = await gateway(jobs=JobsConfig(concurrency=1), models=echo_models(delay_s=0.1))
    batch = await start_batch(client, jsonl(*(line(f"r{i}") for i in range(5))))
    seen = []
    while True:
        current = (await client.get(f"/v1/batches/{batch['id']}", headers=AUTH)).json()
        seen.append(current["request_counts"]["completed"])
        if current["status"] == "completed":
            break
        await asyncio.sleep(0.03)
    assert seen == sorted(seen)  # never goes back
    assert any(0 < n < 5 for n in seen)  # seen part way
    assert seen[-1] == 5


async def test_embeddings_batches(gateway: GatewayFactory) -> None:
    client, _ = await gateway(jobs=True)
    body = {"model": "echo-embed", "input": ["a", "b c"]}
    content = request("vec", body, url="/v1/embeddings")
    uploaded = (await upload(client, content)).json()
    created = await create(client, uploaded["id"], endpoint="/v1/embeddings")
    done = await wait_batch(client, created.json()["id"])
    assert done["status"] == "completed"
    body = (await lines_of(client, done["output_file_id"]))["vec"]["response"]["body"]
    assert [d["index"] for d in body["data"]] == [0, 1]


async def test_bad_lines_refuse_the_batch_naming_each_line(gateway: GatewayFactory) -> None:
    client, _ = await gateway(jobs=True)
    content = jsonl(
        line("ok"),
        b"{not json",
        line("ok"),  # duplicate
        line("wrong-url", url="/v1/embeddings"),
        line("get", method="GET"),
        request("no-messages", {"model": "echo"}),
        request("streams", {"model": "echo", "stream": True, "messages": [USER]}),
    )
    file_id = (await upload(client, content)).json()["id"]
    refused = await create(client, file_id)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "input_file_id"
    assert error["code"] == "invalid_batch_input"
    assert error["message"].startswith(f"Line 2 of {file_id}")
    problems = [(e["line"], e["code"], e["param"]) for e in error["errors"]["data"]]
    assert problems == [
        (2, "invalid_json_line", None),
        (3, "duplicate_custom_id", "custom_id"),
        (4, "mismatched_endpoint", "url"),
        (5, "invalid_method", "method"),
        (6, "missing_required_parameter", "body.messages"),
        (7, "invalid_value", "body.stream"),
    ]
    # Nothing was created, nothing runs.
    assert (await client.get("/v1/batches", headers=AUTH)).json()["data"] == []
    assert (await client.get("/v1/jobs", headers=AUTH)).json()["data"] == []


async def test_bad_requests_say_what_to_send(gateway: GatewayFactory) -> None:
    client, _ = await gateway(jobs=True)
    file_id = (await upload(client, line("a"))).json()["id"]
    endpoint = await create(client, file_id, endpoint="/v1/completions")
    assert (endpoint.status_code, endpoint.json()["error"]["param"]) == (400, "endpoint")
    window = await create(client, file_id, completion_window="1h")
    assert (window.status_code, window.json()["error"]["param"]) == (400, "completion_window")
    unknown = await create(client, "file-nope")
    assert unknown.status_code == 404
    extra = await create(client, file_id, colour="red")
    assert (extra.status_code, extra.json()["error"]["param"]) == (400, "colour")
    purpose = await upload(client, line("a"), purpose="fine-tune")
    assert (purpose.status_code, purpose.json()["error"]["code"]) == (400, "unsupported_purpose")
    empty = await upload(client, b"")
    assert empty.status_code == 400
    no_file = await client.post("/v1/files", data={"purpose": "batch"}, headers=AUTH)
    assert (no_file.status_code, no_file.json()["error"]["param"]) == (400, "file")
    blank = (await upload(client, b"\n\n")).json()["id"]
    refused = await create(client, blank)
    assert refused.json()["error"]["errors"]["data"][0]["code"] == "empty_file"


async def test_cancel_stops_queued_requests_and_keeps_finished_ones(
    gateway: GatewayFactory,
) -> None:
    client, _ = await gateway(jobs=JobsConfig(concurrency=1), models=echo_models(delay_s=0.3))
    batch = await start_batch(client, jsonl(*(line(f"r{i}", f"word {i}") for i in range(4))))
    deadline = time.monotonic() + 5
    while True:  # wait until the first request runs
        jobs = (await client.get(f"/v1/jobs?batch_id={batch['id']}", headers=AUTH)).json()
        if any(j["status"] == "running" for j in jobs["data"]):
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    cancelling = await client.post(f"/v1/batches/{batch['id']}/cancel", headers=AUTH)
    assert cancelling.status_code == 200
    # The running request keeps the batch cancelling (unless it ended just before).
    assert cancelling.json()["status"] in ("cancelling", "cancelled")
    assert cancelling.json()["cancelling_at"] is not None
    done = await wait_batch(client, batch["id"])
    assert done["status"] == "cancelled"
    assert done["cancelled_at"] is not None
    counts = done["request_counts"]
    assert counts["total"] == 4
    assert counts["completed"] >= 1  # the one that was running finished and counts
    assert counts["completed"] + counts["failed"] == 4
    output = await lines_of(client, done["output_file_id"])
    assert len(output) == counts["completed"]
    errors = await lines_of(client, done["error_file_id"])
    assert len(errors) == counts["failed"]
    assert {row["error"]["code"] for row in errors.values()} == {"batch_cancelled"}
    assert all(row["response"] is None for row in errors.values())
    # Cancelling again is harmless; a finished batch cannot be cancelled.
    again = await client.post(f"/v1/batches/{batch['id']}/cancel", headers=AUTH)
    assert again.json()["status"] == "cancelled"
    finished = await start_batch(client, line("x"))
    await wait_batch(client, finished["id"])
    late = await client.post(f"/v1/batches/{finished['id']}/cancel", headers=AUTH)
    assert (late.status_code, late.json()["error"]["code"]) == (409, "batch_not_cancellable")


async def test_cancelling_a_batch_that_has_not_started_ends_it_at_once(
    gateway: GatewayFactory,
) -> None:
    client, rt = await gateway(jobs=True)
    await stop_runner(rt)
    batch = await start_batch(client, jsonl(line("a"), line("b")))
    cancelled = (await client.post(f"/v1/batches/{batch['id']}/cancel", headers=AUTH)).json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["output_file_id"] is None
    assert sorted(await lines_of(client, cancelled["error_file_id"])) == ["a", "b"]


async def test_a_batch_cancel_reaches_its_jobs_streams_without_waiting_for_the_poll(
    gateway: GatewayFactory,
) -> None:
    # A poll every 10 s: a stream that waited for it would take 10 s to hear of the cancel.
    client, _ = await gateway(jobs=JobsConfig(events_poll_s=10, run_in_process=False))
    batch = await start_batch(client, jsonl(line("a"), line("b")))
    jobs = (await client.get(f"/v1/jobs?batch_id={batch['id']}", headers=AUTH)).json()["data"]
    assert [job["status"] for job in jobs] == ["queued", "queued"]
    streams = [asyncio.ensure_future(follow(client, job["id"])) for job in jobs]
    await asyncio.sleep(0.2)
    cancelled = await client.post(f"/v1/batches/{batch['id']}/cancel", headers=AUTH)
    assert cancelled.json()["status"] == "cancelled"
    for stream in streams:
        assert await asyncio.wait_for(stream, 2) == ["event: job.queued", "event: job.cancelled"]


async def test_requests_not_started_in_the_completion_window_expire(
    gateway: GatewayFactory,
) -> None:
    _, rt = await gateway(jobs=True)
    await stop_runner(rt)
    assert rt.jobs is not None
    assert rt.job_queue is not None
    # A service whose clock is a day behind: its batch's 24h window ends in 0.2 s.
    behind = BatchService(
        rt.jobs, store_beside(rt.job_queue), clock=lambda: time.time() - 86_400 + 0.2
    )
    admin = Principal(key_id="admin", role=Role.ADMIN)
    source = await behind.upload(
        admin, filename="in.jsonl", purpose="batch", content=jsonl(line("a"), line("b"))
    )
    batch = await behind.create(
        admin, input_file_id=source.id, endpoint=CHAT_URL, completion_window="24h", metadata={}
    )
    await asyncio.sleep(0.3)
    await rt.job_queue.claim("sweeper", 0, 1.0)  # a claim fails the overdue jobs first
    ended = await behind.refresh(batch)
    assert ended.status.value == "expired"
    assert ended.expired_at is not None
    content = await behind.store.file_content(str(ended.error_file_id))
    assert content is not None
    rows = [orjson.loads(raw) for raw in content.splitlines()]
    assert [(r["custom_id"], r["error"]["code"]) for r in rows] == [
        ("a", "batch_expired"),
        ("b", "batch_expired"),
    ]


async def test_a_key_never_sees_another_teams_files_or_batches(gateway: GatewayFactory) -> None:
    client, rt = await gateway(jobs=True)
    headers = []
    for team in ("a", "b"):
        secret = new_secret()
        await rt.store.put(new_key(secret, role=Role.USER, name=team, team_id=team))
        headers.append({"Authorization": f"Bearer {secret}"})
    mine, theirs = headers
    file_id = (await upload(client, line("x"), headers=mine)).json()["id"]
    batch = (await create(client, file_id, headers=mine)).json()
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        assert (await client.get(path, headers=theirs)).status_code == 404
    assert (await client.delete(f"/v1/files/{file_id}", headers=theirs)).status_code == 404
    assert (await create(client, file_id, headers=theirs)).status_code == 404
    assert (await client.get(f"/v1/batches/{batch['id']}", headers=theirs)).status_code == 404
    cancel = await client.post(f"/v1/batches/{batch['id']}/cancel", headers=theirs)
    assert cancel.status_code == 404
    assert (await client.get("/v1/files", headers=theirs)).json()["data"] == []
    assert (await client.get("/v1/batches", headers=theirs)).json()["data"] == []
    # The owner sees both, and pages through its batches.
    second = (await create(client, file_id, headers=mine)).json()
    page = (await client.get("/v1/batches?limit=1", headers=mine)).json()
    assert ([b["id"] for b in page["data"]], page["has_more"]) == ([second["id"]], True)
    rest = (await client.get(f"/v1/batches?after={second['id']}", headers=mine)).json()
    assert ([b["id"] for b in rest["data"]], rest["has_more"]) == ([batch["id"]], False)


async def test_without_jobs_there_are_no_batches(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    answer = await upload(client, line("x"))
    assert answer.status_code == 404
    assert "jobs" in answer.json()["error"]["message"]
