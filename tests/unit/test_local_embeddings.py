"""The numpy all-MiniLM-L6-v2 against sentence-transformers' own vectors, and its contract.

The reference vectors come from ``tests/fixtures/make_minilm_reference.py``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headrace.domain import ChatRequest, Deployment, EmbeddingRequest
from headrace.errors import InvalidRequestError, UpstreamUnavailableError, ValidationFailedError
from headrace.providers import registry
from headrace.providers.http import SessionPool
from headrace.providers.local_embeddings import MODEL_PACKAGE, MiniLMProvider
from headrace.providers.registry import ProviderContext

REFERENCE = json.loads(
    (Path(__file__).parents[1] / "fixtures" / "minilm_reference.json").read_text(encoding="utf-8")
)
CASES: list[dict[str, Any]] = REFERENCE["cases"]
TEXTS: list[str] = [case["text"] for case in CASES]
WANT = np.array([case["vector"] for case in CASES], dtype=np.float64)
LONG = max(TEXTS, key=len)


def _deployment(**options: Any) -> Deployment:
    return Deployment(
        name="minilm", kind="local_embeddings", model="all-MiniLM-L6-v2", options=options
    )


def _provider(**options: Any) -> MiniLMProvider:
    return MiniLMProvider(_deployment(**options), ProviderContext(http=SessionPool()))


def _request(inputs: Sequence[str], dimensions: int | None = None) -> EmbeddingRequest:
    return EmbeddingRequest(model="minilm", inputs=list(inputs), body={}, dimensions=dimensions)


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return (got * want).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))


@pytest.fixture(scope="module")
def provider() -> Iterator[MiniLMProvider]:
    """One loaded model for the module: loading is per provider, and the tests share it."""
    shared = _provider()
    yield shared
    asyncio.run(shared.aclose())


async def test_matches_sentence_transformers(provider: MiniLMProvider) -> None:
    response = await provider.embed(_request(TEXTS))
    got = np.array(response.vectors)
    assert got.shape == (len(TEXTS), 384)
    cosines = _cosines(got, WANT)
    worst = int(cosines.argmin())
    assert cosines.min() >= 0.9999, f"min cosine {cosines.min():.8f} for {TEXTS[worst][:60]!r}"
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert response.model == "all-MiniLM-L6-v2"
    # Word pieces as sentence-transformers fed them to the model, [CLS] and [SEP] included.
    assert response.usage.prompt_tokens == sum(case["tokens"] for case in CASES)
    assert response.usage.completion_tokens == 0


async def test_batch_equals_single_inputs(provider: MiniLMProvider) -> None:
    texts = [TEXTS[0], LONG, "", TEXTS[16], TEXTS[22], "a"]
    batched = np.array((await provider.embed(_request(texts))).vectors)
    singles = np.array([(await provider.embed(_request([t]))).vectors[0] for t in texts])
    np.testing.assert_allclose(batched, singles, atol=1e-5)
    assert _cosines(batched, singles).min() >= 0.999999


async def test_more_inputs_than_one_batch(provider: MiniLMProvider) -> None:
    small = _provider(max_batch_size=5)
    try:
        got = np.array((await small.embed(_request(TEXTS[:12]))).vectors)
    finally:
        await small.aclose()
    assert _cosines(got, WANT[:12]).min() >= 0.9999


async def test_usage_counts_word_pieces_after_truncation(provider: MiniLMProvider) -> None:
    response = await provider.embed(_request(TEXTS[:20]))
    assert response.usage.prompt_tokens == sum(case["tokens"] for case in CASES[:20])
    # [CLS] hello , world ! [SEP]
    assert (await provider.embed(_request(["Hello, world!"]))).usage.prompt_tokens == 6
    # Truncated at sentence-transformers' max_seq_length, [CLS] and [SEP] included.
    assert (await provider.embed(_request([LONG]))).usage.prompt_tokens == 256


async def test_dimensions_truncates_and_renormalises(provider: MiniLMProvider) -> None:
    full = np.array((await provider.embed(_request(TEXTS[:5]))).vectors)
    short = np.array((await provider.embed(_request(TEXTS[:5], dimensions=64))).vectors)
    assert short.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-6)
    prefix = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(short, prefix, atol=1e-6)
    same = np.array((await provider.embed(_request(TEXTS[:5], dimensions=384))).vectors)
    np.testing.assert_allclose(same, full, atol=1e-7)


@pytest.mark.parametrize("dimensions", [385, 1536, 0, -1])
async def test_dimensions_out_of_range_rejected(provider: MiniLMProvider, dimensions: int) -> None:
    with pytest.raises(ValidationFailedError, match="dimensions") as caught:
        await provider.embed(_request(["hi"], dimensions=dimensions))
    assert caught.value.param == "dimensions"
    assert caught.value.status == 400


async def test_no_inputs_no_vectors(provider: MiniLMProvider) -> None:
    response = await provider.embed(_request([]))
    assert list(response.vectors) == []
    assert response.usage.prompt_tokens == 0


async def test_chat_is_refused(provider: MiniLMProvider) -> None:
    request = ChatRequest(model="minilm", messages=[{"role": "user", "content": "hi"}], body={})
    with pytest.raises(InvalidRequestError, match="embeddings only"):
        await provider.chat(request)
    stream = provider.stream_chat(request)  # calling it is fine; iterating raises
    with pytest.raises(InvalidRequestError, match="embeddings only"):
        await anext(stream)


async def test_concurrent_requests_are_all_correct(provider: MiniLMProvider) -> None:
    picks = [[i % len(TEXTS), (i * 7 + 3) % len(TEXTS)] for i in range(20)]
    responses = await asyncio.gather(
        *(provider.embed(_request([TEXTS[i] for i in pick])) for pick in picks)
    )
    for pick, response in zip(picks, responses, strict=True):
        cosines = _cosines(np.array(response.vectors), WANT[pick])
        assert cosines.min() >= 0.9999, f"min cosine {cosines.min():.8f} for {pick}"
        assert response.usage.prompt_tokens == sum(CASES[i]["tokens"] for i in pick)


async def test_event_loop_stays_responsive(provider: MiniLMProvider) -> None:
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    beat = asyncio.create_task(heartbeat())
    try:
        await provider.embed(_request([LONG] * 8))
    finally:
        beat.cancel()
    # 8 x 256 word pieces take a few hundred ms; a blocked loop would tick zero times.
    assert ticks >= 5


async def test_cancelled_request_leaves_provider_working(provider: MiniLMProvider) -> None:
    small = _provider(max_batch_size=2)
    try:
        task = asyncio.create_task(small.embed(_request([LONG] * 40)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        got = np.array((await small.embed(_request(TEXTS[:3]))).vectors)
    finally:
        await small.aclose()
    assert _cosines(got, WANT[:3]).min() >= 0.9999


async def test_model_dir_option_overrides_the_package(tmp_path: Path) -> None:
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    assert spec is not None
    assert spec.submodule_search_locations
    copy = tmp_path / "minilm"
    # A tree of links: the files elsewhere than the package, without 90 MB of copying.
    shutil.copytree(
        Path(spec.submodule_search_locations[0]) / "model", copy, copy_function=os.symlink
    )
    local = _provider(model_dir=str(copy))
    try:
        await local.check()
        got = np.array((await local.embed(_request(TEXTS[:2]))).vectors)
    finally:
        await local.aclose()
    assert _cosines(got, WANT[:2]).min() >= 0.9999


async def test_missing_model_files_say_how_to_fix(tmp_path: Path) -> None:
    broken = _provider(model_dir=str(tmp_path))
    try:
        with pytest.raises(UpstreamUnavailableError, match=r"options\.model_dir") as caught:
            await broken.check()
        assert caught.value.deployment == "minilm"
        with pytest.raises(UpstreamUnavailableError):  # tried again, not cached
            await broken.embed(_request(["hi"]))
    finally:
        await broken.aclose()


async def test_closing_fails_work_in_flight_with_a_reason() -> None:
    closing = _provider(max_batch_size=2)
    await closing.check()
    task = asyncio.create_task(closing.embed(_request([LONG] * 40)))
    await asyncio.sleep(0.05)
    await closing.aclose()
    with pytest.raises(UpstreamUnavailableError, match="shut down"):
        await task


async def test_closed_provider_refuses_work() -> None:
    closing = _provider()
    await closing.check()
    await closing.aclose()
    await closing.aclose()  # idempotent
    with pytest.raises(UpstreamUnavailableError, match="shut down"):
        await closing.embed(_request(["hi"]))


@pytest.mark.parametrize("options", [{"workers": 0}, {"max_batch_size": "32"}, {"workers": True}])
def test_bad_options_are_named(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        _provider(**options)


def test_registry_builds_it() -> None:
    built = registry.build(_deployment(), ProviderContext(http=SessionPool()))
    assert isinstance(built, MiniLMProvider)
    assert built.deployment.kind == "local_embeddings"
    asyncio.run(built.aclose())
