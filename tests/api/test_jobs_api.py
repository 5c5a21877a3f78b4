"""/v1/jobs through the in-process app, with the in-process runner and webhook outbox."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from headrace.api import jobs as jobs_api
from headrace.config import DeploymentConfig, JobsConfig, ModelConfig
from headrace.domain import Job, JobEvent, Role
from headrace.events.signing import verify
from headrace.gateway.auth import new_key, new_secret
from headrace.worker.process import webhook_secret
from tests.api.conftest import Receiver, follow
from tests.conftest import AUTH, GatewayFactory, echo_models
from tests.fakes.recording_store import RecordingStore

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello jobs"}]}
FAST = JobsConfig(heartbeat_s=0.5, lease_s=2, retry_base_s=0.05, retry_cap_s=0.1, max_attempts=3)


async def wait_final(client: httpx.AsyncClient, job_id: str, headers: Any = AUTH) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        job = (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
        if job["status"] not in ("queued", "running"):
            return dict(job)
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.02)


async def submit(client: httpx.AsyncClient, body: Any = None, **fields: Any) -> httpx.Response:
    headers = {**AUTH, **fields.pop("headers", {})}
    return await client.post("/v1/jobs", json={"body": body or CHAT, **fields}, headers=headers)


async def test_a_job_is_accepted_at_once_and_runs_through_the_gateway(
    gateway: GatewayFactory,
) -> None:
    client, _ = await gateway(jobs=True, models=echo_models(delay_s=0.2))
    accepted = await submit(client, metadata={"ticket": "42"})
    assert accepted.status_code == 202
    job = accepted.json()
    # Answered before the upstream (0.2 s) could have: the job is still queued.
    assert (job["status"], job["result"], job["metadata"]) == ("queued", None, {"ticket": "42"})
    assert accepted.headers["location"] == f"/v1/jobs/{job['id']}"
    done = await wait_final(client, job["id"])
    assert done["status"] == "succeeded"
    assert done["result"]["choices"][0]["message"]["content"] == "hello jobs"
    assert done["attempts"] == 1
    listed = (await client.get("/v1/jobs", headers=AUTH)).json()
    assert [j["id"] for j in listed["data"]] == [job["id"]]


async def test_embeddings_jobs_return_openai_shaped_results(gateway: GatewayFactory) -> None:
    client, _ = await gateway(jobs=True)
    job = await submit(client, {"model": "echo-embed", "input": ["a", "b c"]}, kind="embeddings")
    done = await wait_final(client, job.json()["id"])
    assert done["status"] == "succeeded"
    assert [d["index"] for d in done["result"]["data"]] == [0, 1]


async def test_bad_submissions_are_400_naming_the_field(gateway: GatewayFactory) -> None:
    client, _ = await gateway(jobs=True)
    no_messages = await submit(client, {"model": "echo"})
    assert no_messages.status_code == 400
    assert no_messages.json()["error"]["param"] == "messages"
    stream = await submit(client, {**CHAT, "stream": True})
    assert stream.status_code == 400
    unknown = await client.post("/v1/jobs", json={"body": CHAT, "colour": "red"}, headers=AUTH)
    assert (unknown.status_code, unknown.json()["error"]["param"]) == (400, "colour")
    ssrf = await submit(client, webhook_url="http://169.254.169.254/latest")
    assert ssrf.status_code == 400
    assert "allow_private_targets" in ssrf.json()["error"]["message"]


async def test_idempotency_key_returns_the_same_job_and_409s_a_different_body(
    gateway: GatewayFactory,
) -> None:
    client, _ = await gateway(jobs=True)
    key = {"Idempotency-Key": "order-17"}
    answers = await asyncio.gather(*(submit(client, headers=key) for _ in range(10)))
    assert sorted(a.status_code for a in answers) == [200] * 9 + [202]
    assert len({a.json()["id"] for a in answers}) == 1
    other = await submit(client, {**CHAT, "temperature": 0.5}, headers=key)
    assert (other.status_code, other.json()["error"]["code"]) == (409, "idempotency_key_reused")


async def test_a_key_never_sees_another_teams_jobs(gateway: GatewayFactory) -> None:
    client, rt = await gateway(jobs=True)
    headers = []
    for team in ("a", "b"):
        secret = new_secret()
        await rt.store.put(new_key(secret, role=Role.USER, name=team, team_id=team))
        headers.append({"Authorization": f"Bearer {secret}"})
    mine = (await client.post("/v1/jobs", json={"body": CHAT}, headers=headers[0])).json()
    theirs = await client.get(f"/v1/jobs/{mine['id']}", headers=headers[1])
    assert theirs.status_code == 404
    cancel = await client.post(f"/v1/jobs/{mine['id']}/cancel", headers=headers[1])
    assert cancel.status_code == 404
    assert (await client.get("/v1/jobs", headers=headers[1])).json()["data"] == []


async def test_events_stream_status_changes_until_final(gateway: GatewayFactory) -> None:
    client, _ = await gateway(jobs=True, models=echo_models(delay_s=0.1))
    job = (await submit(client)).json()
    statuses = []
    async with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=AUTH) as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        async for line in events.aiter_lines():
            if line.startswith("event: "):
                statuses.append(line.removeprefix("event: "))
    assert statuses == ["job.queued", "job.running", "job.succeeded"]


async def test_the_runners_changes_reach_streams_without_waiting_for_the_poll(
    gateway: GatewayFactory,
) -> None:
    # A poll every 10 s: a stream that waited for it would take 10 s for each change.
    client, _ = await gateway(jobs=JobsConfig(events_poll_s=10), models=echo_models(delay_s=0.1))
    job = (await submit(client)).json()
    run = await asyncio.wait_for(follow(client, job["id"]), 3)  # the claim, then the result
    assert run == ["event: job.queued", "event: job.running", "event: job.succeeded"]


async def test_a_cancel_reaches_streams_without_waiting_for_the_poll(
    gateway: GatewayFactory,
) -> None:
    client, _ = await gateway(jobs=JobsConfig(events_poll_s=10, run_in_process=False))
    job = (await submit(client)).json()
    stream = asyncio.ensure_future(follow(client, job["id"]))
    await asyncio.sleep(0.2)
    await client.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH)
    assert await asyncio.wait_for(stream, 2) == ["event: job.queued", "event: job.cancelled"]


async def test_open_streams_share_one_poll_and_read_only_when_their_job_moves(
    gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, rt = await gateway(jobs=JobsConfig(run_in_process=False))
    queue = rt.job_queue
    assert queue is not None
    reads: list[str] = []
    polls: list[list[str]] = []
    events, event_seqs = queue.events, queue.event_seqs

    async def counted_events(job_id: str, after_seq: int = 0) -> list[JobEvent]:
        reads.append(job_id)
        return await events(job_id, after_seq)

    async def counted_seqs(job_ids: Sequence[str]) -> dict[str, int]:
        polls.append(sorted(job_ids))
        return await event_seqs(job_ids)

    monkeypatch.setattr(queue, "events", counted_events)
    monkeypatch.setattr(queue, "event_seqs", counted_seqs)
    ids = sorted([(await submit(client)).json()["id"] for _ in range(10)])
    streams = [asyncio.ensure_future(follow(client, job_id)) for job_id in ids]
    await asyncio.sleep(0.25)
    polls.clear()
    await asyncio.sleep(1.0)
    # Ten idle streams: each read its job's events once, and one poll a turn (0.1 s) asked
    # for all ten jobs; before, each stream read its job twice every 0.2 s.
    assert sorted(reads) == ids
    assert 3 <= len(polls) <= 12
    assert all(asked == ids for asked in polls)
    cancelled = await client.post(f"/v1/jobs/{ids[0]}/cancel", headers=AUTH)
    assert cancelled.json()["status"] == "cancelled"
    assert await asyncio.wait_for(streams[0], 2) == ["event: job.queued", "event: job.cancelled"]
    assert reads.count(ids[0]) == 2
    assert len(reads) == 11  # the others were not woken
    for job_id in ids[1:]:
        await client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    assert all(lines[-1] == "event: job.cancelled" for lines in await asyncio.gather(*streams))


async def test_an_idle_stream_sends_keep_alive_comments(
    gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_api, "KEEPALIVE_S", 0.1)
    client, _ = await gateway(jobs=JobsConfig(run_in_process=False))
    job_id = (await submit(client)).json()["id"]
    stream = asyncio.ensure_future(follow(client, job_id))
    await asyncio.sleep(0.45)
    await client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    lines = await asyncio.wait_for(stream, 2)
    assert lines[0] == "event: job.queued"
    assert lines[-1] == "event: job.cancelled"
    assert 2 <= lines.count(": keep-alive") <= 5


async def test_a_stream_resumed_after_the_final_event_ends_at_once(
    gateway: GatewayFactory,
) -> None:
    client, _ = await gateway(jobs=JobsConfig(run_in_process=False))
    job_id = (await submit(client)).json()["id"]
    await client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    assert await follow(client, job_id) == ["event: job.queued", "event: job.cancelled"]
    resumed = await asyncio.wait_for(
        client.get(f"/v1/jobs/{job_id}/events", headers={**AUTH, "Last-Event-ID": "2"}), 2
    )
    assert (resumed.status_code, resumed.text) == (200, "")


async def test_transient_failures_retry_then_dead_letter_and_replay(
    gateway: GatewayFactory,
) -> None:
    failing = ModelConfig(
        name="broken",
        retry={"max_attempts": 1},
        deployments=[
            DeploymentConfig(
                provider="openai_compatible",
                model="x",
                base_url="http://127.0.0.1:9/v1",
                timeouts={"connect_s": 0.2},
            )
        ],
    )
    client, _ = await gateway(jobs=FAST, models=[*echo_models(), failing])
    job = (await submit(client, {**CHAT, "model": "broken"})).json()
    dead = await wait_final(client, job["id"])
    assert dead["status"] == "dead"
    assert dead["attempts"] == 3
    assert [e["status"] for e in dead["errors"]] == [503, 503, 503]
    letters = (await client.get("/admin/dead-letters", headers=AUTH)).json()["data"]
    assert [j["id"] for j in letters] == [job["id"]]
    replayed = await client.post(f"/admin/dead-letters/{job['id']}/replay", headers=AUTH)
    assert replayed.json()["status"] == "queued"
    assert (await wait_final(client, job["id"]))["status"] == "dead"
    gone = await client.delete(f"/admin/dead-letters/{job['id']}", headers=AUTH)
    assert gone.status_code == 200
    assert (await client.get(f"/v1/jobs/{job['id']}", headers=AUTH)).status_code == 404


async def test_permanent_failures_fail_at_once(gateway: GatewayFactory) -> None:
    client, _ = await gateway(jobs=True)
    job = (await submit(client, {**CHAT, "model": "no-such-model"})).json()
    failed = await wait_final(client, job["id"])
    assert (failed["status"], failed["attempts"]) == ("failed", 1)
    assert failed["error"]["code"] == "model_not_found"


async def test_webhook_is_signed_retried_and_has_a_delivery_history(
    gateway: GatewayFactory, receiver: Receiver
) -> None:
    url, seen = receiver
    config = JobsConfig(webhooks={"allow_private_targets": True})
    client, rt = await gateway(jobs=config)
    job = (await submit(client, webhook_url=url)).json()
    assert (await wait_final(client, job["id"]))["status"] == "succeeded"
    deadline = time.monotonic() + 10
    while len(seen) < 2:
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.05)
    secret = webhook_secret(rt)
    for headers, body in seen:
        verify(secret, {k.lower(): v for k, v in headers.items()}, body)
    ids = {headers["webhook-id"] for headers, _ in seen}
    assert len(ids) == 1  # one stable event id across retries
    assert not [h for h, _ in seen if "traceparent" in h]  # tracing off: no trace context
    history = (await client.get(f"/v1/jobs/{job['id']}/deliveries", headers=AUTH)).json()
    assert [(d["attempt"], d["status_code"]) for d in history["data"]] == [(1, 500), (2, 204)]


async def test_queue_depth_per_priority_is_exported(gateway: GatewayFactory) -> None:
    client, rt = await gateway(jobs=True)
    for service in rt.services:  # stop the runner so the jobs stay queued
        await service.stop()
    await submit(client, priority="low")
    await submit(client, priority="low")
    await submit(client, priority="high")
    metrics = (await client.get("/metrics")).text
    assert 'headrace_queue_depth{priority="low"} 2.0' in metrics
    assert 'headrace_queue_depth{priority="high"} 1.0' in metrics


async def test_chat_idempotency_key_runs_once_and_replays_the_answer(
    gateway: GatewayFactory,
) -> None:
    store = RecordingStore()
    client, rt = await gateway(jobs=True, models=echo_models(delay_s=0.2), store=store)
    headers = {**AUTH, "Idempotency-Key": "chat-1"}
    answers = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=CHAT, headers=headers) for _ in range(5))
    )
    assert [a.status_code for a in answers] == [200] * 5
    assert len({a.json()["id"] for a in answers}) == 1  # the same stored answer
    assert sorted(a.headers.get("idempotent-replayed", "") for a in answers) == [""] + ["true"] * 4
    assert rt.usage is not None
    await rt.usage.flush()
    # One record per request; one upstream call, billed once: the repeats cost nothing.
    assert len(store.records) == 5
    billed = [r for r in store.records if not r.cache_hit]
    assert len(billed) == 1
    assert billed[0].completion_tokens > 0
    replays = [r for r in store.records if r.cache_hit]
    assert {(r.status, r.cost_micro_usd, r.completion_tokens) for r in replays} == {(200, 0, 0)}
    other = await client.post(
        "/v1/chat/completions", json={**CHAT, "temperature": 1}, headers=headers
    )
    assert (other.status_code, other.json()["error"]["code"]) == (409, "idempotency_key_reused")


async def test_repeats_of_an_in_flight_request_wait_on_the_watch_not_a_poll_each(
    gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, rt = await gateway(jobs=True, models=echo_models(delay_s=1.0))
    queue = rt.job_queue
    assert queue is not None
    reads: list[str] = []
    get = queue.get

    async def counted_get(job_id: str) -> Job | None:
        reads.append(job_id)
        return await get(job_id)

    monkeypatch.setattr(queue, "get", counted_get)
    headers = {**AUTH, "Idempotency-Key": "slow-1"}
    first = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT, headers=headers))
    await asyncio.sleep(0.2)
    repeats = [client.post("/v1/chat/completions", json=CHAT, headers=headers) for _ in range(10)]
    answers = await asyncio.gather(first, *repeats)
    assert {a.json()["id"] for a in answers} == {answers[0].json()["id"]}
    # Each repeat read the job when it arrived and once more when the watch woke it; a poll
    # of its own every 50 ms would have been about 16 reads each.
    assert len(reads) <= 2 * 10 + 2


async def test_chat_idempotency_replays_the_first_error_too(gateway: GatewayFactory) -> None:
    client, _ = await gateway(jobs=True)
    headers = {**AUTH, "Idempotency-Key": "chat-2"}
    body = {**CHAT, "model": "no-such-model"}
    first = await client.post("/v1/chat/completions", json=body, headers=headers)
    again = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert first.status_code == again.status_code == 404
    assert first.json()["error"]["code"] == again.json()["error"]["code"] == "model_not_found"
    stream = await client.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    )
    assert stream.status_code == 400
