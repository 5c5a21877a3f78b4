"""In-memory key store: the test fake, and the store when persistence is switched off."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from headrace.domain import ApiKey


class MemoryKeyStore:
    def __init__(self) -> None:
        self._by_id: dict[str, ApiKey] = {}

    async def start(self) -> None:
        return None

    async def get_by_hash(self, secret_hash: str) -> ApiKey | None:
        return next((k for k in self._by_id.values() if k.secret_hash == secret_hash), None)

    async def put(self, key: ApiKey) -> None:
        self._by_id[key.id] = key

    async def list_keys(self) -> Sequence[ApiKey]:
        return sorted(self._by_id.values(), key=lambda k: k.created_at)

    async def revoke(self, key_id: str) -> bool:
        key = self._by_id.get(key_id)
        if key is None:
            return False
        self._by_id[key_id] = dataclasses.replace(key, revoked=True)
        return True

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
