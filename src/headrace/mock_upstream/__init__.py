"""``headrace mock-upstream``: a fast OpenAI-compatible server with fault injection.

For tests, demos and benchmarks. It stands alone: nothing here imports the gateway.
"""

from headrace.mock_upstream.app import (
    MOCK_UPSTREAM,
    MockStats,
    MockUpstream,
    ServerOptions,
    build_app,
    serve,
)
from headrace.mock_upstream.faults import Decision, FaultConfig, FaultKind, LatencyDist, decide

__all__ = [
    "MOCK_UPSTREAM",
    "Decision",
    "FaultConfig",
    "FaultKind",
    "LatencyDist",
    "MockStats",
    "MockUpstream",
    "ServerOptions",
    "build_app",
    "decide",
    "serve",
]
