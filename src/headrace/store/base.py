"""The key store seam. Secrets are never stored: only their SHA-256 (see headrace.gateway.auth)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from headrace.domain import ApiKey


class KeyStore(Protocol):
    async def start(self) -> None:
        """Open connections and create the schema if needed."""
        ...

    async def get_by_hash(self, secret_hash: str) -> ApiKey | None:
        """The key whose secret hashes to ``secret_hash`` (revoked ones included), or None."""
        ...

    async def put(self, key: ApiKey) -> None:
        """Insert ``key`` or replace the stored key with the same id."""
        ...

    async def list_keys(self) -> Sequence[ApiKey]:
        """Every key, oldest first."""
        ...

    async def revoke(self, key_id: str) -> bool:
        """Mark the key revoked; False when no such key exists."""
        ...

    async def check(self) -> None:
        """Raise if the store cannot be reached (used by ``/health/ready``)."""
        ...

    async def aclose(self) -> None: ...
