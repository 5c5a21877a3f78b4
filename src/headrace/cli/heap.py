"""The garbage collector's settings for a long-running process (``serve``, ``worker``).

CPython's cyclic collector, as it comes, looks at young objects every 700 allocations more
than frees, and now and then walks every object in the process. A gateway holds some 160,000
objects after start (modules, the app, pydantic models, SQLAlchemy's tables), none of which
will ever be garbage, and a request's own objects are freed by reference counting as it ends.
Measured in ``headrace serve`` under load (bench/README.md, "Garbage collection"): about 15 %
of the gateway's CPU went to the collector, most of it to full collections of about 0.1 s
each, stalls on every request in flight.

Once the process has started, :func:`settle_heap` collects what start-up left, moves every
object still alive into the permanent generation (:func:`gc.freeze`), so that no collection
walks them again, and raises the young generation's threshold (``server.gc_threshold``), so
that the objects of requests in flight are not collected, and promoted, before they are
freed. Garbage in cycles is still collected: every ``gc_threshold`` allocations more than
frees. docs/adr/0015-garbage-collection.md says why.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import structlog

from headrace.config import Settings
from headrace.observability.metrics import Metrics

log = structlog.get_logger("headrace")


def settle_heap(*, freeze: bool, threshold: int) -> int:
    """Tune the collector for a process that has finished starting (see the module doc);
    the number of objects frozen."""
    gc.collect()
    if freeze:
        gc.freeze()
    frozen = gc.get_freeze_count()  # walks them all: once, here
    _, middle, old = gc.get_threshold()
    gc.set_threshold(threshold, middle, old)
    log.info("heap_settled", frozen_objects=frozen, gc_threshold=threshold)
    return frozen


def settled_heap(settings: Settings, metrics: Metrics) -> Callable[[], None]:
    """:func:`settle_heap` as ``settings.server`` asks, for :attr:`Runtime.on_started`;
    ``headrace_gc_frozen_objects`` reports what it froze."""
    server = settings.server

    def settle() -> None:
        metrics.gc_frozen.set(settle_heap(freeze=server.gc_freeze, threshold=server.gc_threshold))

    return settle
