"""The HTTP edge in-process, on the echo provider: shapes, headers, errors, streaming."""

from __future__ import annotations

import orjson
import pytest

from tests.conftest import AUTH, GatewayFactory

USER = [{"role": "user", "content": "hello there"}]


async def test_chat_json(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    response = await client.post(
        "/v1/chat/completions", json={"model": "echo", "messages": USER}, headers=AUTH
    )
    assert response.status_code == 200
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "hello there"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert response.headers["x-headrace-model"] == "echo"
    assert response.headers["x-headrace-deployment"] == "echo/0"
    assert response.headers["x-headrace-attempts"] == "1"
    assert len(response.headers["x-request-id"]) == 32


async def test_incoming_request_id_is_honoured(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    response = await client.get("/health/live", headers={"X-Request-Id": "trace-123"})
    assert response.headers["x-request-id"] == "trace-123"


def events(text: str) -> list[bytes]:
    return [line[6:].encode() for line in text.split("\n\n") if line.startswith("data: ")]


@pytest.mark.parametrize("include_usage", [True, False])
async def test_chat_stream(gateway: GatewayFactory, include_usage: bool) -> None:
    client, _ = await gateway()
    body = {
        "model": "echo",
        "messages": USER,
        "stream": True,
        "stream_options": {"include_usage": include_usage},
    }
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    data = events(response.text)
    assert data[-1] == b"[DONE]"
    chunks = [orjson.loads(d) for d in data[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "hello there"
    usage_chunks = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert usage_chunks == [chunks[-1]]
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] == 2
    else:
        assert usage_chunks == []


async def test_embeddings_float_and_base64(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    floats = await client.post(
        "/v1/embeddings", json={"model": "echo-embed", "input": ["a b", "c"]}, headers=AUTH
    )
    assert floats.status_code == 200
    body = floats.json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    encoded = await client.post(
        "/v1/embeddings",
        json={"model": "echo-embed", "input": ["a b", "c"], "encoding_format": "base64"},
        headers=AUTH,
    )
    import base64

    import numpy as np

    first = np.frombuffer(base64.b64decode(encoded.json()["data"][0]["embedding"]), "<f4")
    assert np.allclose(first, body["data"][0]["embedding"], atol=1e-6)


async def test_models_lists_the_catalog(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    response = await client.get("/v1/models", headers=AUTH)
    assert [m["id"] for m in response.json()["data"]] == ["echo", "echo-embed"]
    one = await client.get("/v1/models/echo", headers=AUTH)
    assert one.json()["id"] == "echo"
    missing = await client.get("/v1/models/nope", headers=AUTH)
    assert missing.status_code == 404


def assert_openai_error(response: object, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    error = response.json()["error"]  # type: ignore[attr-defined]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_json", None),
        (
            b'{"messages": [{"role": "user", "content": "x"}]}',
            400,
            "missing_required_parameter",
            "model",
        ),
        (b'{"model": "echo", "messages": []}', 400, "invalid_value", "messages"),
        (
            b'{"model": "echo", "messages": [{"role": "robot", "content": "x"}]}',
            400,
            "invalid_value",
            "messages[0].role",
        ),
        (
            b'{"model": "echo", "messages": [{"role": "user"}], "temperature": 3}',
            400,
            "invalid_value",
            "temperature",
        ),
        (
            b'{"model": "echo", "messages": [{"role": "user"}], "max_tokens": 0}',
            400,
            "invalid_value",
            "max_tokens",
        ),
        (
            b'{"model": "echo", "messages": [{"role": "user"}], "stream": "yes"}',
            400,
            "invalid_value",
            "stream",
        ),
        (
            b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "model_not_found",
            "model",
        ),
        (
            b'{"model": "echo-embed", "messages": [{"role": "user", "content": "x"}]}',
            400,
            "model_not_supported",
            "model",
        ),
    ],
)
async def test_bad_chat_requests(
    gateway: GatewayFactory, body: bytes, status: int, code: str, param: str | None
) -> None:
    client, _ = await gateway()
    response = await client.post(
        "/v1/chat/completions",
        content=body,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    error = assert_openai_error(response, status, code)
    assert error["param"] == param
    if code == "model_not_found":
        assert "echo" in error["message"]  # lists the available models


async def test_unknown_fields_are_accepted(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    response = await client.post(
        "/v1/chat/completions",
        json={"model": "echo", "messages": USER, "logit_bias": {"1": 2}, "x_vendor": [1]},
        headers=AUTH,
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "echo-embed", "input": ""}, "input"),
        ({"model": "echo-embed", "input": ["ok", ""]}, "input[1]"),
        ({"model": "echo-embed", "input": [1, 2, 3]}, "input"),
        ({"model": "echo-embed", "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "echo", "input": "x"}, "model"),
    ],
)
async def test_bad_embedding_requests(gateway: GatewayFactory, body: dict, param: str) -> None:
    client, _ = await gateway()
    response = await client.post("/v1/embeddings", json=body, headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


async def test_body_over_the_limit_is_413(gateway: GatewayFactory) -> None:
    client, _ = await gateway(server={"max_body_bytes": 1000})
    big = {"model": "echo", "messages": [{"role": "user", "content": "x" * 2000}]}
    response = await client.post("/v1/chat/completions", json=big, headers=AUTH)
    assert_openai_error(response, 413, "payload_too_large")

    async def chunked():  # no Content-Length: the limit applies while reading
        yield b'{"model": "echo", "messages": [{"role": "user", "content": "'
        yield b"x" * 2000
        yield b'"}]}'

    response = await client.post("/v1/chat/completions", content=chunked(), headers=AUTH)
    assert_openai_error(response, 413, "payload_too_large")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/v1/models"])
async def test_auth_is_required(gateway: GatewayFactory, path: str) -> None:
    client, _ = await gateway()
    method = client.get if path == "/v1/models" else client.post
    kwargs = {} if path == "/v1/models" else {"json": {"model": "echo", "messages": USER}}
    missing = await method(path, **kwargs)
    assert_openai_error(missing, 401, "invalid_api_key")
    wrong = await method(path, headers={"Authorization": "Bearer hr_nope"}, **kwargs)
    assert_openai_error(wrong, 401, "invalid_api_key")


async def test_unknown_route_and_method(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    assert_openai_error(await client.get("/v1/nothing"), 404)
    assert_openai_error(await client.get("/v1/chat/completions", headers=AUTH), 405)


async def test_health_and_metrics(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    assert (await client.get("/health/live")).json() == {"status": "ok"}
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"]["deployment:echo/0"] == {"status": "ok"}
    await client.post(
        "/v1/chat/completions", json={"model": "echo", "messages": USER}, headers=AUTH
    )
    text = (await client.get("/metrics")).text
    assert 'headrace_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert "headrace_overhead_seconds_bucket" in text
    assert 'gen_ai_client_token_usage_count{gen_ai_operation_name="chat"' in text
    assert "headrace_active_requests" in text


async def test_unreachable_upstream_is_503_and_fails_readiness(gateway: GatewayFactory) -> None:
    from headrace.config import DeploymentConfig, ModelConfig

    client, _ = await gateway(
        models=[
            ModelConfig(
                name="remote",
                deployments=[
                    DeploymentConfig(
                        provider="openai_compatible",
                        model="m",
                        base_url="http://127.0.0.1:9/v1",
                        api_key_env="HEADRACE_TEST_SECRET_KEY",
                    )
                ],
            )
        ]
    )
    response = await client.post(
        "/v1/chat/completions", json={"model": "remote", "messages": USER}, headers=AUTH
    )
    error = assert_openai_error(response, 503, "upstream_unavailable")
    assert "remote/0" in error["message"]
    ready = await client.get("/health/ready")
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["deployment:remote/0"]["status"] == "failed"
    assert body["checks"]["store"] == {"status": "ok"}


async def test_priority_comes_from_the_header_or_the_key(gateway: GatewayFactory) -> None:
    import dataclasses

    from headrace.domain import Priority, Role
    from headrace.gateway.auth import new_key, new_secret

    client, rt = await gateway()
    secret = new_secret()
    key = dataclasses.replace(
        new_key(secret, role=Role.USER, name="batch"), metadata={"priority": "low"}
    )
    await rt.store.put(key)
    seen: list[Priority] = []
    original = rt.gateway._admission.slot  # type: ignore[attr-defined]

    def spy(priority: Priority):  # type: ignore[no-untyped-def]
        seen.append(priority)
        return original(priority)

    rt.gateway._admission.slot = spy  # type: ignore[attr-defined]
    body = {"model": "echo", "messages": USER}
    await client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
    )
    await client.post(
        "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {secret}", "X-Headrace-Priority": "high"},
    )
    await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert seen == [Priority.LOW, Priority.HIGH, Priority.NORMAL]
    bad = await client.post(
        "/v1/chat/completions", json=body, headers={**AUTH, "X-Headrace-Priority": "urgent"}
    )
    assert bad.status_code == 400
