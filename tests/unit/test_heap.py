"""settle_heap: what it does to this process's collector (restored after each test)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from headrace.cli.heap import settle_heap, settled_heap
from headrace.config import ConfigError, Settings, load_settings
from headrace.observability.metrics import Metrics


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_it_freezes_what_is_alive_and_sets_the_young_threshold() -> None:
    _, middle, old = gc.get_threshold()
    alive = [[i] for i in range(1000)]  # tracked objects that outlive the call
    frozen = settle_heap(freeze=True, threshold=12_345)
    assert frozen >= gc.get_freeze_count() >= len(alive)
    assert gc.get_threshold() == (12_345, middle, old)
    assert gc.get_count()[0] < 100  # it collected first


def test_without_freeze_it_only_sets_the_threshold() -> None:
    settle_heap(freeze=False, threshold=700)
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold()[0] == 700


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def test_garbage_in_cycles_made_after_it_is_still_collected() -> None:
    settle_heap(freeze=True, threshold=500)
    nodes = [weakref.ref(_Node()) for _ in range(5000)]
    alive = sum(node() is not None for node in nodes)
    assert alive < 1000  # the automatic collections took the rest, without gc.collect()


def test_the_settings_choose_what_it_does_and_the_metric_reports_it() -> None:
    metrics = Metrics()
    settled_heap(Settings(server={"gc_freeze": False, "gc_threshold": 2000}), metrics)()
    assert gc.get_threshold()[0] == 2000
    assert gc.get_freeze_count() == 0
    assert metrics.registry.get_sample_value("headrace_gc_frozen_objects") == 0
    settled_heap(Settings(), metrics)()
    assert gc.get_threshold()[0] == 10_000
    frozen = metrics.registry.get_sample_value("headrace_gc_frozen_objects")
    assert frozen is not None
    assert frozen >= gc.get_freeze_count() > 0  # frozen objects freed since have left it


def test_a_threshold_under_100_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADRACE_SERVER__GC_THRESHOLD", "0")
    with pytest.raises(ConfigError, match="gc_threshold"):
        load_settings(None)
