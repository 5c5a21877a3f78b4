"""Traces from a real ``headrace serve`` over OTLP/HTTP to a collector stand-in that decodes
them with OpenTelemetry's own protobuf types: the request continues the caller's trace, the
upstream attempt sits under it with the GenAI attributes, the access log names the trace, and
a clean stop exports what was still buffered."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.e2e.conftest import ADMIN_KEY, Server, serve
from tests.sockets import free_port

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


class Collector:
    """Accepts ``POST /v1/traces`` and keeps every span with its resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    resource = _attributes(resource_spans.resource.attributes)
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            collector.spans.append(
                                {
                                    "name": span.name,
                                    "kind": span.kind,
                                    "trace_id": span.trace_id.hex(),
                                    "span_id": span.span_id.hex(),
                                    "parent_span_id": span.parent_span_id.hex(),
                                    "attributes": _attributes(span.attributes),
                                    "status": span.status.code,
                                    "resource": resource,
                                }
                            )
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"


def _attributes(values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in values:
        which = kv.value.WhichOneof("value")
        value = getattr(kv.value, which) if which else None
        if which == "array_value":
            value = [getattr(v, v.WhichOneof("value")) for v in value.values]
        out[kv.key] = value
    return out


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    c.thread.start()
    yield c
    c.server.shutdown()
    c.server.server_close()


def test_a_request_traced_end_to_end(
    tmp_path: Path, mock_upstream: Server, collector: Collector
) -> None:
    config = tmp_path / "headrace.yaml"
    config.write_text(
        f"""
log: {{format: json}}
tracing:
  enabled: true
  endpoint: {collector.url}
  service_name: headrace-e2e
models:
  - name: mock-model
    deployments:
      - provider: openai_compatible
        model: mock-model
        base_url: {mock_upstream.url}/v1
"""
    )
    server = serve(config, tmp_path / "serve.log", tmp_path / "data")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0)
        answer = client.chat.completions.with_raw_response.create(
            model="mock-model",
            messages=[{"role": "user", "content": "trace me"}],
            max_tokens=8,
            extra_headers={"traceparent": f"00-{TRACE}-{PARENT}-01"},
        )
        request_id = answer.headers["x-request-id"]
    finally:
        assert server.stop() == 0  # a clean stop exports what the batch still held

    spans = [s for s in collector.spans if s["trace_id"] == TRACE]
    [request] = [s for s in spans if s["name"] == "POST /v1/chat/completions"]
    [attempt] = [s for s in spans if s["name"] == "chat mock-model"]
    assert request["parent_span_id"] == PARENT
    assert request["resource"]["service.name"] == "headrace-e2e"
    assert request["attributes"]["http.response.status_code"] == 200
    assert request["attributes"]["headrace.request_id"] == request_id
    assert attempt["parent_span_id"] == request["span_id"]
    assert attempt["attributes"]["gen_ai.operation.name"] == "chat"
    assert attempt["attributes"]["gen_ai.provider.name"] == "openai_compatible"
    assert attempt["attributes"]["gen_ai.request.max_tokens"] == 8
    assert attempt["attributes"]["gen_ai.usage.output_tokens"] > 0

    access = [
        orjson.loads(line)
        for line in server.output().splitlines()
        if line.startswith("{") and '"event":"request"' in line
    ]
    [line] = [a for a in access if a["request_id"] == request_id]
    assert line["trace_id"] == TRACE
