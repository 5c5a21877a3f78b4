"""A :class:`MemoryStore` that keeps every usage record written, for tests that read one."""

from __future__ import annotations

from collections.abc import Sequence

from headrace.domain import UsageRecord
from headrace.store.memory import MemoryStore


class RecordingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[UsageRecord] = []  # in the order written, duplicates included

    async def write_usage(self, records: Sequence[UsageRecord]) -> int:
        self.records.extend(records)
        return await super().write_usage(records)
