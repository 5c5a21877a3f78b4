"""Limits, budgets, selection rules and usage records through the HTTP API, in process."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from headrace.config import DeploymentConfig, ModelConfig, PriceConfig, SelectionRuleConfig
from headrace.domain import NO_QUOTA, BudgetPeriod, Quota, Role, Team
from headrace.gateway.auth import new_key, new_secret
from headrace.wiring import Runtime
from tests.conftest import GatewayFactory
from tests.fakes.recording_store import RecordingStore

USER = [{"role": "user", "content": "one two three"}]


def priced_models() -> list[ModelConfig]:
    def model(name: str, dollars: float) -> ModelConfig:
        price = PriceConfig(input_per_mtok_usd=dollars, output_per_mtok_usd=dollars)
        return ModelConfig(
            name=name,
            cache={"enabled": False},
            deployments=[DeploymentConfig(provider="echo", model=f"{name}-1", price=price)],
        )

    return [model("strong", 10.0), model("cheap", 1.0)]


async def user_key(rt: Runtime, quota: Quota = NO_QUOTA, **fields: Any) -> dict[str, str]:
    secret = new_secret()
    await rt.store.put(new_key(secret, role=Role.USER, name="user", quota=quota, **fields))
    return {"Authorization": f"Bearer {secret}"}


async def test_rpm_refusal_is_429_in_openai_shape_with_ratelimit_headers(
    gateway: GatewayFactory,
) -> None:
    client, rt = await gateway()
    headers = await user_key(rt, Quota(rpm=2))
    body = {"model": "echo", "messages": USER}
    first = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert first.status_code == 200
    assert first.headers["ratelimit-policy"] == '"key-rpm";q=2;w=60'
    assert first.headers["ratelimit"].startswith('"key-rpm";r=1;')
    await client.post("/v1/chat/completions", json=body, headers=headers)
    refused = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["ratelimit"].startswith('"key-rpm";r=0;')


async def test_team_budget_refuses_with_402_before_any_upstream_call(
    gateway: GatewayFactory,
) -> None:
    client, rt = await gateway(models=priced_models())
    # "one two three" → echo answers 3 words; at $10/Mtok each way a call costs 60 µ$ and is
    # estimated at (tokenizer prompt + 10 max_tokens) x $10.
    await rt.store.put_team(Team(id="t1", name="t1", quota=Quota(budget_micro_usd=400)))
    headers = await user_key(rt, team_id="t1")
    body = {"model": "strong", "messages": USER, "max_tokens": 10}
    statuses = [
        (await client.post("/v1/chat/completions", json=body, headers=headers)).status_code
        for _ in range(10)
    ]
    assert statuses[0] == 200
    assert statuses[-1] == 402
    refused = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert refused.json()["error"]["code"] == "budget_exceeded"


async def test_a_request_estimated_above_the_whole_budget_is_refused(
    gateway: GatewayFactory,
) -> None:
    client, rt = await gateway(models=priced_models())
    quota = Quota(budget_micro_usd=100, budget_period=BudgetPeriod.DAY)  # < one estimate
    headers = await user_key(rt, quota)
    body = {"model": "strong", "messages": USER, "max_tokens": 5}
    assert (
        await client.post("/v1/chat/completions", json=body, headers=headers)
    ).status_code == 402


async def test_selection_rule_routes_short_prompts_and_usage_shows_the_saving(
    gateway: GatewayFactory,
) -> None:
    rule = SelectionRuleConfig(
        name="short-to-cheap", when={"models": ["strong"], "max_prompt_tokens": 50}, use="cheap"
    )
    client, rt = await gateway(models=priced_models(), selection=[rule])
    headers = await user_key(rt)
    short = await client.post(
        "/v1/chat/completions", json={"model": "strong", "messages": USER}, headers=headers
    )
    assert short.headers["x-headrace-model"] == "cheap"
    long_text = " ".join(["word"] * 200)
    long = await client.post(
        "/v1/chat/completions",
        json={"model": "strong", "messages": [{"role": "user", "content": long_text}]},
        headers=headers,
    )
    assert long.headers["x-headrace-model"] == "strong"
    assert rt.usage is not None
    await rt.usage.flush()
    (row,) = await rt.store.usage_summary(["model"], model="cheap")
    assert row.requests == 1
    # The cheap model cost a tenth of what the requested one would have.
    assert row.baseline_cost_micro_usd == 10 * row.cost_micro_usd > 0


async def test_every_outcome_leaves_one_usage_record(gateway: GatewayFactory) -> None:
    client, rt = await gateway()
    headers = await user_key(rt, Quota(rpm=2))
    body = {"model": "echo", "messages": USER}
    statuses = [
        (await client.post("/v1/chat/completions", json=body, headers=headers)).status_code
        for _ in range(3)
    ]
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    statuses.append(
        (await client.post("/v1/chat/completions", json=stream, headers=headers)).status_code
    )
    assert statuses == [200, 200, 429, 429]
    assert rt.usage is not None
    await rt.usage.flush()
    assert await rt.store.count_usage_records() == 4
    (row,) = await rt.store.usage_summary(["key"])
    assert (row.requests, row.errors) == (4, 2)
    assert row.prompt_tokens == 2 * 3


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/v1/chat/completions", b'{"model": "echo", "messages": [', "invalid_json"),
        ("/v1/chat/completions", b'{"model": "echo", "messages": "hi"}', "invalid_value"),
        ("/v1/embeddings", b'{"model": "echo-embed"}', "missing_required_parameter"),
    ],
)
async def test_a_request_refused_before_the_gateway_still_leaves_one_usage_record(
    gateway: GatewayFactory, path: str, body: bytes, code: str
) -> None:
    store = RecordingStore()
    client, rt = await gateway(store=store)
    headers = await user_key(rt)
    response = await client.post(
        path, content=body, headers={**headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", code)
    assert rt.usage is not None
    await rt.usage.flush()
    (key,) = [k for k in await rt.store.list_keys() if k.name == "user"]
    (record,) = store.records
    operation = "chat" if path == "/v1/chat/completions" else "embeddings"
    assert (record.key_id, record.operation, record.status) == (key.id, operation, 400)


async def test_a_refusal_by_the_gateway_is_recorded_once_and_one_without_a_key_not_at_all(
    gateway: GatewayFactory,
) -> None:
    store = RecordingStore()
    client, rt = await gateway(store=store)
    headers = await user_key(rt)
    unknown = {"model": "no-such-model", "messages": USER}
    refused = await client.post("/v1/chat/completions", json=unknown, headers=headers)
    assert refused.status_code == 404
    anonymous = await client.post("/v1/chat/completions", content=orjson.dumps(unknown))
    assert anonymous.status_code == 401
    assert rt.usage is not None
    await rt.usage.flush()
    assert [(r.status, r.error) for r in store.records] == [(404, "ModelNotFoundError")]
