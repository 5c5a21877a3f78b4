import asyncio
import stat
from pathlib import Path

import pytest

from headrace.domain import ApiKey, Role
from headrace.errors import AuthenticationError
from headrace.gateway.auth import (
    ADMIN_KEY_FILE,
    Authenticator,
    ensure_admin_key,
    hash_secret,
    new_key,
    new_secret,
)
from headrace.store.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_generated_admin_key_is_stored_hashed_and_saved_owner_only(tmp_path: Path) -> None:
    store = MemoryStore()
    secret = await ensure_admin_key(store, tmp_path, None)
    assert secret is not None
    assert secret.startswith("hr_")
    (key,) = await store.list_keys()
    assert key.role is Role.ADMIN
    assert key.secret_hash == hash_secret(secret)
    assert secret not in repr(key)
    path = tmp_path / ADMIN_KEY_FILE
    assert path.read_text().strip() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A second start keeps the key and shows nothing.
    assert await ensure_admin_key(store, tmp_path, None) is None
    assert len(await store.list_keys()) == 1


async def test_fixed_admin_key_from_the_environment(tmp_path: Path) -> None:
    store = MemoryStore()
    assert await ensure_admin_key(store, tmp_path, "hr_fixed") is None
    assert not (tmp_path / ADMIN_KEY_FILE).exists()
    principal = await Authenticator(store).authenticate("Bearer hr_fixed")
    assert principal.role is Role.ADMIN


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (None, "Missing API key"),
        ("", "Missing API key"),
        ("Basic abc", "Malformed"),
        ("Bearer ", "Malformed"),
        ("Bearer hr_wrong-key", "Incorrect API key provided: hr_wro****"),
    ],
)
async def test_refusals(header: str | None, fragment: str) -> None:
    with pytest.raises(AuthenticationError, match=fragment.replace("*", r"\*")):
        await Authenticator(MemoryStore()).authenticate(header)


async def test_revoked_key_is_refused_once_the_cache_expires() -> None:
    store = MemoryStore()
    secret = new_secret()
    key = new_key(secret, role=Role.USER, name="team a")
    await store.put(key)
    clock = Clock()
    auth = Authenticator(store, cache_ttl_s=30, clock=clock)
    assert (await auth.authenticate(f"Bearer {secret}")).key_id == key.id
    await store.revoke(key.id)
    # Cached for the TTL...
    assert (await auth.authenticate(f"Bearer {secret}")).key_id == key.id
    clock.now += 31
    with pytest.raises(AuthenticationError):
        await auth.authenticate(f"Bearer {secret}")


async def test_forget_drops_cached_lookups_at_once() -> None:
    store = MemoryStore()
    secret = new_secret()
    key = new_key(secret, role=Role.USER, name="x")
    await store.put(key)
    auth = Authenticator(store, cache_ttl_s=300)
    await auth.authenticate(f"Bearer {secret}")
    await store.revoke(key.id)
    auth.forget()
    with pytest.raises(AuthenticationError):
        await auth.authenticate(f"Bearer {secret}")


async def test_disabled_auth_lets_everyone_in() -> None:
    principal = await Authenticator(MemoryStore(), enabled=False).authenticate(None)
    assert principal.key_id == "anonymous"


async def test_a_store_outage_is_503_but_cached_keys_keep_working() -> None:
    from headrace.domain import ApiKey
    from headrace.errors import OverloadedError

    class FlakyStore(MemoryStore):
        down = False

        async def get_by_hash(self, secret_hash: str) -> ApiKey | None:
            if self.down:
                raise ConnectionError("database unreachable")
            return await super().get_by_hash(secret_hash)

    store = FlakyStore()
    known, unknown = new_secret(), new_secret()
    await store.put(new_key(known, role=Role.USER, name="known"))
    auth = Authenticator(store, cache_ttl_s=60)
    await auth.authenticate(f"Bearer {known}")
    store.down = True
    assert (await auth.authenticate(f"Bearer {known}")).role is Role.USER
    with pytest.raises(OverloadedError) as info:
        await auth.authenticate(f"Bearer {unknown}")
    assert (info.value.status, info.value.code) == (503, "store_unavailable")


class CountingStore(MemoryStore):
    """Counts key reads by id and can hold them, to see concurrent lookups share one."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def get_key(self, key_id: str) -> ApiKey | None:
        self.reads += 1
        await self.gate.wait()
        return await super().get_key(key_id)


async def test_principal_of_is_cached_for_the_ttl_and_read_once_for_concurrent_jobs() -> None:
    store, clock = CountingStore(), Clock()
    key = new_key(new_secret(), role=Role.USER, name="jobs")
    await store.put(key)
    auth = Authenticator(store, cache_ttl_s=10, clock=clock)
    store.gate.clear()
    lookups = [asyncio.ensure_future(auth.principal_of(key.id)) for _ in range(50)]
    await asyncio.sleep(0)
    store.gate.set()
    principals = await asyncio.gather(*lookups)
    assert {p.key_id for p in principals if p is not None} == {key.id}
    assert store.reads == 1
    await auth.principal_of(key.id)
    assert store.reads == 1  # within the TTL: from the cache
    await store.revoke(key.id)
    clock.now += 11  # past the TTL: read again, and the revoke is seen
    assert await auth.principal_of(key.id) is None
    assert store.reads == 2


async def test_forget_drops_cached_principals_at_once() -> None:
    store = CountingStore()
    key = new_key(new_secret(), role=Role.USER, name="jobs")
    await store.put(key)
    auth = Authenticator(store, cache_ttl_s=3600)
    assert await auth.principal_of(key.id) is not None
    await store.revoke(key.id)
    auth.forget()  # what the admin API does after a revoke
    assert await auth.principal_of(key.id) is None


async def test_principal_of_refuses_an_expired_key_even_when_cached() -> None:
    store, wall = MemoryStore(), Clock()
    key = new_key(new_secret(), role=Role.USER, name="jobs", expires_at=wall.now + 5)
    await store.put(key)
    auth = Authenticator(store, cache_ttl_s=3600, wall_clock=wall)
    assert await auth.principal_of(key.id) is not None
    wall.now += 6
    assert await auth.principal_of(key.id) is None
