"""uvicorn's httptools protocol against ``headrace serve``'s (headrace.cli.http): one write per
answer instead of two, measured on its own.

    .venv/bin/python bench/http_protocol.py            # about a minute
    .venv/bin/python bench/http_protocol.py --blocks 12

Two servers of the same small ASGI app (a chat-sized JSON answer, as a gateway sends), one
with ``http="httptools"`` and one with :class:`headrace.cli.http.HttpProtocol`, both on uvloop
and pinned to core 0; ``wrk`` on core 1 saturates each in turn (ABBA blocks of 2 s, 64
connections), then one connection at a time. Prints requests/s, the server's CPU per request
and wrk's mean latency with one connection, medians over the blocks. The app does almost
nothing, so the server's own work per answer (parsing, the ASGI calls, the system calls) is
what is compared; bench/revisions.py measures the whole gateway.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
import _wrk
from _procs import CpuSample, Server
from _report import Table, fmt

# About what the gateway answers a non-streamed chat with.
BODY = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1764440000,"model":"mock-model",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello, benchmark! '
    b'This answer is about as long as a short chat completion."},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":16,"total_tokens":28}}'
)
HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
    (b"x-request-id", b"01JBENCHMARKREQUESTID0000000"),
    (b"x-headrace-cost-usd", b"0.000012"),
]
SIDES = {"httptools": "uvicorn's httptools", "headrace": "headrace.cli.http.HttpProtocol"}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def serve(protocol: str, port: int) -> None:
    import uvicorn

    from headrace.cli.http import HttpProtocol

    http: Any = "httptools" if protocol == "httptools" else HttpProtocol
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http=http, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=8, help="blocks per side (default 8)")
    parser.add_argument("--serve", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    if not _wrk.available():
        sys.exit("needs wrk (apt-get install -y wrk)")
    cores = sorted(_procs.ALL_CORES)
    servers: dict[str, Server] = {}
    workdir = Path(tempfile.mkdtemp(prefix="headrace-http-"))
    try:
        for side in SIDES:
            port = _procs.free_port()
            argv = [sys.executable, __file__, "--serve", side, "--port", str(port)]
            server = Server(side, argv, port, "/", workdir / f"{side}.log", {})
            servers[side] = server
            server.wait_healthy(30)
            _procs.pin(server.pid, frozenset(cores[:1]))
        os.sched_setaffinity(0, set(cores[1:] or cores))
        rates: dict[str, list[float]] = {s: [] for s in SIDES}
        cpu: dict[str, list[float]] = {s: [] for s in SIDES}
        latency: dict[str, list[float]] = {s: [] for s in SIDES}
        for server in servers.values():  # warm both
            _wrk.run(server.url + "/", "{}", {}, 64, 1)
        for block in range(args.blocks):
            order = list(SIDES) if block % 2 == 0 else list(SIDES)[::-1]
            for side in order:
                server = servers[side]
                before = CpuSample.of(server.pid).cpu_s
                result = _wrk.run(server.url + "/", "{}", {}, 64, 2)
                used = CpuSample.of(server.pid).cpu_s - before
                rates[side].append(result.ok / result.elapsed_s)
                cpu[side].append(1e6 * used / max(1, result.ok))
            for side in order:
                one = _wrk.run(servers[side].url + "/", "{}", {}, 1, 1)
                latency[side].append(one.latency_mean_ms)
    finally:
        for server in servers.values():
            server.stop()
    table = Table(
        f"One answer, two protocols: medians of {args.blocks} blocks per side",
        ["figure", *SIDES.values(), "difference"],
    )
    for name, values, digits in (
        ("requests/s at saturation (64 connections)", rates, 0),
        ("server CPU per request at saturation (µs)", cpu, 1),
        ("mean latency, one connection (ms)", latency, 3),
    ):
        a, b = (statistics.median(values[s]) for s in SIDES)
        table.add(name, fmt(a, digits), fmt(b, digits), fmt(b - a, digits, sign=True))
    table.notes.append("servers pinned to core 0, wrk to core 1; ABBA order between blocks")
    print(table.render())


if __name__ == "__main__":
    main()
