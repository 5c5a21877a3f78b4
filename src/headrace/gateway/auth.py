"""Bearer API keys: hashing, lookup with a short in-process cache, and the first admin key.

Secrets look like ``hr_<43 url-safe characters>`` (256 bits). Only their SHA-256 is stored;
a lookup hashes the presented secret and compares digests in constant time.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import os
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from headrace.domain import NO_QUOTA, ApiKey, Principal, Quota, Role, Team
from headrace.errors import STORE_RETRY_AFTER_S, AuthenticationError, StoreUnavailableError
from headrace.store.base import KeyStore, Store

SECRET_PREFIX = "hr_"  # noqa: S105 - a visible prefix, not a secret
ADMIN_KEY_FILE = "admin-key"
ENV_ADMIN_KEY_ID = "admin-env"


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_key(
    secret: str,
    *,
    role: Role,
    name: str,
    key_id: str | None = None,
    team_id: str | None = None,
    user: str | None = None,
    allowed_models: frozenset[str] = frozenset(),
    quota: Quota = NO_QUOTA,
    expires_at: float | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ApiKey:
    """A key for ``secret``: only its hash and a short visible prefix are kept."""
    return ApiKey(
        id=key_id or f"key_{uuid.uuid4().hex[:16]}",
        prefix=secret[:8],
        secret_hash=hash_secret(secret),
        role=role,
        name=name,
        team_id=team_id,
        user=user,
        allowed_models=allowed_models,
        quota=quota,
        expires_at=expires_at,
        created_at=time.time(),
        metadata=dict(metadata or {}),
    )


@dataclass(frozen=True, slots=True)
class _Cached:
    principal: Principal | None
    expires_at: float


ANONYMOUS = Principal(key_id="anonymous", role=Role.ADMIN)


class Authenticator:
    """Turns an ``Authorization`` header into a :class:`Principal` or raises 401.

    Lookups are cached for ``cache_ttl_s`` (misses too, so a flood of bad keys does not reach
    the store); :meth:`forget` drops an entry at once, as revoking a key does.
    """

    def __init__(
        self,
        store: Store,
        *,
        enabled: bool = True,
        cache_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._enabled = enabled
        self._ttl = cache_ttl_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._cache: dict[str, _Cached] = {}  # by secret digest
        self._by_id: dict[str, _Cached] = {}  # by key id, for principal_of
        self._reading: dict[str, asyncio.Future[Principal | None]] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        if not self._enabled:
            return ANONYMOUS
        if not authorization:
            raise AuthenticationError(
                "Missing API key. Send it as 'Authorization: Bearer <key>'; the admin key "
                "is printed on first start and saved in the data directory."
            )
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise AuthenticationError("Malformed Authorization header; use 'Bearer <key>'.")
        digest = hash_secret(secret)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is None or cached.expires_at <= now:
            try:
                key = await self._store.get_by_hash(digest)
                team = await self._store.get_team(key.team_id) if key and key.team_id else None
            except Exception as exc:  # any store failure is an outage to the client
                raise StoreUnavailableError(
                    "The key store is unreachable, so this key cannot be checked; keys used "
                    "recently still work. Retry shortly.",
                    headers={"Retry-After": STORE_RETRY_AFTER_S},
                ) from exc
            principal = None
            if key is not None and not key.revoked and hmac.compare_digest(key.secret_hash, digest):
                principal = _principal(key, team)
            cached = _Cached(principal, now + self._ttl)
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[digest] = cached
        principal = cached.principal
        if principal is None:
            raise AuthenticationError(
                f"Incorrect API key provided: {secret[:6]}****. Check the key, or create "
                "one with the admin key."
            )
        if principal.expires_at is not None and principal.expires_at <= self._wall_clock():
            raise AuthenticationError(
                f"The API key {principal.key_id} expired; ask an administrator for a new one.",
                code="expired_api_key",
            )
        return principal

    async def principal_of(self, key_id: str) -> Principal | None:
        """The principal of a stored key by id (a worker acting for a job's key); None when
        the key is gone, revoked or expired.

        Cached like :meth:`authenticate`'s lookups (``cache_ttl_s``, dropped by
        :meth:`forget`), so a revoke reaches running workers as fast as it reaches gateways;
        concurrent lookups of one key share one store read (a worker claims hundreds of jobs
        of one key at once).
        """
        if not self._enabled:
            return ANONYMOUS
        now = self._clock()
        cached = self._by_id.get(key_id)
        if cached is None or cached.expires_at <= now:
            reading = self._reading.get(key_id)
            if reading is None:
                reading = asyncio.ensure_future(self._read_principal(key_id))
                self._reading[key_id] = reading
                reading.add_done_callback(functools.partial(self._read_done, key_id))
            principal = await asyncio.shield(reading)
            if len(self._by_id) > 100_000:
                self._by_id.clear()
            self._by_id[key_id] = cached = _Cached(principal, now + self._ttl)
        principal = cached.principal
        if principal is None:
            return None
        if principal.expires_at is not None and principal.expires_at <= self._wall_clock():
            return None
        return principal

    def _read_done(self, key_id: str, reading: asyncio.Future[Principal | None]) -> None:
        if self._reading.get(key_id) is reading:
            del self._reading[key_id]

    async def _read_principal(self, key_id: str) -> Principal | None:
        key = await self._store.get_key(key_id)
        if key is None or key.revoked:
            return None
        team = await self._store.get_team(key.team_id) if key.team_id else None
        return _principal(key, team)

    def forget(self) -> None:
        """Drop every cached lookup (after a revoke or key change)."""
        self._cache.clear()
        self._by_id.clear()


def _principal(key: ApiKey, team: Team | None) -> Principal:
    return Principal(
        key_id=key.id,
        role=key.role,
        team_id=key.team_id,
        allowed_models=key.allowed_models,
        metadata=key.metadata,
        quota=key.quota,
        team_quota=team.quota if team is not None else NO_QUOTA,
        expires_at=key.expires_at,
    )


def _write_owner_only(path: Path, secret: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secret + "\n")
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file


async def ensure_admin_key(store: KeyStore, data_dir: Path, fixed_secret: str | None) -> str | None:
    """Make sure an admin key exists; return a newly generated secret to show once, else None.

    With ``fixed_secret`` (``HEADRACE_ADMIN_KEY``) that secret is the admin key. Otherwise the
    first start generates one, stores its hash, and writes the secret to
    ``data_dir/admin-key`` readable only by the owner.
    """
    if fixed_secret:
        await store.put(
            new_key(
                fixed_secret,
                role=Role.ADMIN,
                name="admin (HEADRACE_ADMIN_KEY)",
                key_id=ENV_ADMIN_KEY_ID,
            )
        )
        return None
    existing = [
        k
        for k in await store.list_keys()
        if k.role is Role.ADMIN and not k.revoked and k.id != ENV_ADMIN_KEY_ID
    ]
    if existing:
        return None
    secret = new_secret()
    await store.put(new_key(secret, role=Role.ADMIN, name="admin (generated)"))
    _write_owner_only(data_dir / ADMIN_KEY_FILE, secret)
    return secret
