"""The KeyStore contract, run against every backend: memory, SQLite, PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy

from headrace.domain import Role
from headrace.gateway.auth import hash_secret, new_key, new_secret
from headrace.store.base import KeyStore
from headrace.store.memory import MemoryStore
from headrace.store.sql import SqlStore


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KeyStore]:
    backend: KeyStore
    if request.param == "memory":
        backend = MemoryStore()
    elif request.param == "sqlite":
        backend = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}")
    else:
        backend = SqlStore(request.getfixturevalue("fresh_database_url"))
    await backend.start()
    yield backend
    await backend.aclose()


async def test_put_then_get_by_hash(store: KeyStore) -> None:
    secret = new_secret()
    key = new_key(secret, role=Role.USER, name="team-a")
    await store.put(key)
    found = await store.get_by_hash(hash_secret(secret))
    assert found == key
    assert await store.get_by_hash(hash_secret("hr_other")) is None


async def test_put_replaces_by_id(store: KeyStore) -> None:
    first = new_key(new_secret(), role=Role.USER, name="a", key_id="fixed")
    second = new_key(new_secret(), role=Role.ADMIN, name="b", key_id="fixed")
    await store.put(first)
    await store.put(second)
    keys = await store.list_keys()
    assert [(k.id, k.name, k.role) for k in keys] == [("fixed", "b", Role.ADMIN)]
    assert await store.get_by_hash(first.secret_hash) is None


async def test_list_is_oldest_first_and_revoke_marks(store: KeyStore) -> None:
    keys = [new_key(new_secret(), role=Role.USER, name=str(i)) for i in range(3)]
    for key in reversed(keys):
        await store.put(key)
    assert [k.id for k in await store.list_keys()] == [k.id for k in keys]
    assert await store.revoke(keys[1].id) is True
    assert await store.revoke(f"key_{uuid.uuid4().hex}") is False
    revoked = await store.get_by_hash(keys[1].secret_hash)
    assert revoked is not None
    assert revoked.revoked is True


async def test_check_succeeds_when_reachable(store: KeyStore) -> None:
    await store.check()


async def test_unreachable_database_fails_its_check() -> None:
    bad = SqlStore("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(sqlalchemy.exc.OperationalError):
        await bad.check()
    await bad.aclose()
