"""The semantic cache's storage and search: prompt vectors in SQL, nearest match in numpy.

Table ``semantic_cache``: ``seq`` (autoincrement primary key: SQLite ``INTEGER PRIMARY KEY
AUTOINCREMENT``, never reused; PostgreSQL ``BIGSERIAL``), ``id`` (unique text, what callers
see), ``namespace`` (the scope, ``"<team>/<model>"``), ``vector`` (L2-normalised float32,
little-endian), ``value`` (the cached response), ``created_at`` and ``expires_at`` (Unix s).

Search. Each process keeps, per namespace and vector width, a matrix of normalised float32
rows, loaded on the namespace's first search, so cosine similarity is one matrix-vector
product: 10,000 x 384 takes about 0.2 ms on one core. Values stay in the database: a hit
reads its row by id, which also proves no process purged it since (a row found gone is
dropped here and the next candidate tried), so a purge anywhere is never served.

Sync, with bounded staleness. ``add`` updates its own process's matrix at once. A search pulls
its namespace's rows with ``seq`` above the last seen when ``sync_interval_s`` has passed since
the last pull, so every process finds a row at most ``sync_interval_s`` (plus a query) after
``add`` returned. SQLite writers commit in ``seq`` order. PostgreSQL takes sequence numbers
before commit, so a row may commit after a higher one was read: pulls there also re-read rows
created in the last ``_COMMIT_LAG_S`` seconds (deduplicated by ``seq``). A row missed anyway
costs a cache miss, never a wrong answer.

Expiry: expired rows never match; pulls drop them from the matrices, and ``add`` deletes them
from the table at most once per ``_REAP_INTERVAL_S``.

Limits: a process holds every searched namespace's live vectors (1.5 KiB per 384-d row).
Vectors of different widths never meet, but two embedding models of one width would: the
caller puts the embedding model in the namespace. A store that cannot be reached raises
:class:`~headrace.cache.base.CacheUnavailableError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    delete,
    event,
    func,
    insert,
    or_,
    select,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from headrace.cache.base import CacheUnavailableError

DEFAULT_THRESHOLD = 0.997
"""Cosine similarity from which a cached answer is reused (all-MiniLM-L6-v2 vectors).

The lowest threshold with precision >= 0.95 (a wrong cached answer is worse than a miss) on
``tests/fixtures/paraphrases.jsonl``, 176 hand-labelled pairs (88 paraphrases, 73 hard
negatives, 15 unrelated); ``pytest -s -k precision tests/unit/test_semantic_cache.py``
prints the table. No threshold from 0.80 to 0.98 qualifies: precision peaks at 0.72 (recall
0.47) at 0.90 and is 0.33 at 0.98, because MiniLM scores direction swaps above every true
paraphrase (0.9875 at most): "string to integer" / "integer to string" 0.9961, "5 km to
miles" / "5 miles to km" 0.9864. At 0.997: no wrong reuse and recall 0 on the set, so only
near-verbatim repeats hit (spacing, punctuation, "How do I" / "How to"). Lower it only
knowing that table; the test fails if a negative pair reaches it."""

_COMMIT_LAG_S = 5.0  # PostgreSQL: how long a committed row may trail a higher seq
_REAP_INTERVAL_S = 60.0  # how often ``add`` deletes expired rows from the table
_UNREACHABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, OSError)

metadata = MetaData()

semantic_cache = Table(
    "semantic_cache",
    metadata,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("id", String(32), nullable=False, unique=True),
    Column("namespace", String(255), nullable=False),
    Column("vector", LargeBinary, nullable=False),
    Column("value", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_semantic_cache_namespace_seq", "namespace", "seq"),
    Index("ix_semantic_cache_namespace_created_at", "namespace", "created_at"),
    Index("ix_semantic_cache_expires_at", "expires_at"),
    sqlite_autoincrement=True,
)


@dataclass(frozen=True, slots=True)
class SemanticHit:
    entry_id: str
    similarity: float  # cosine similarity of the query and the stored prompt, in [-1, 1]
    value: bytes
    created_at: float  # Unix seconds, when the entry was added


def _normalise(vector: Sequence[float]) -> npt.NDArray[np.float32]:
    row = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(row)) if row.ndim == 1 else 0.0
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError("a vector must be a flat list of finite floats, not all zero")
    return row / np.float32(norm)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers in other processes do not block writers
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


_S = TypeVar("_S", bound=np.generic)


def _grown(array: npt.NDArray[_S], used: int, capacity: int) -> npt.NDArray[_S]:
    """A copy of ``array`` with room for ``capacity`` rows, the first ``used`` kept."""
    bigger = np.empty_like(array, shape=(capacity, *array.shape[1:]))
    bigger[:used] = array[:used]
    return bigger


class _Shard:
    """One namespace's live rows of one width, in this process: parallel arrays, grown by
    doubling, the first ``n`` rows in use."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.n = 0
        self.matrix = np.empty((16, width), dtype=np.float32)
        self.seqs = np.empty(16, dtype=np.int64)
        self.expires = np.empty(16, dtype=np.float64)
        self.ids: list[str] = []
        self.known: set[int] = set()  # seqs held, to skip rows a pull reads twice
        self.last_seq = 0  # highest seq a pull has read
        self.pulled_at = -math.inf  # time.monotonic() of the last pull
        self.lock = asyncio.Lock()  # one pull at a time

    def extend(
        self, seqs: Sequence[int], ids: Sequence[str], vectors: bytes, expires: Sequence[float]
    ) -> None:
        """Append rows (``vectors``: their concatenated float32 bytes) not already held."""
        rows = np.frombuffer(vectors, dtype="<f4").reshape(len(seqs), self.width)
        fresh = [i for i, seq in enumerate(seqs) if seq not in self.known]
        end = self.n + len(fresh)
        if end > len(self.seqs):
            capacity = max(end, 2 * len(self.seqs))
            self.matrix = _grown(self.matrix, self.n, capacity)
            self.seqs = _grown(self.seqs, self.n, capacity)
            self.expires = _grown(self.expires, self.n, capacity)
        self.matrix[self.n : end] = rows[fresh]
        self.seqs[self.n : end] = np.asarray(seqs, dtype=np.int64)[fresh]
        self.expires[self.n : end] = np.asarray(expires, dtype=np.float64)[fresh]
        self.ids.extend(ids[i] for i in fresh)
        self.known.update(seqs[i] for i in fresh)
        self.n = end

    def keep(self, mask: npt.NDArray[np.bool_]) -> None:
        """Keep only the rows where ``mask`` (over the first ``n``) is true."""
        kept = int(mask.sum())
        self.matrix[:kept] = self.matrix[: self.n][mask]
        self.seqs[:kept] = self.seqs[: self.n][mask]
        self.expires[:kept] = self.expires[: self.n][mask]
        self.ids = [entry_id for entry_id, k in zip(self.ids, mask.tolist(), strict=True) if k]
        self.known = set(self.seqs[:kept].tolist())
        self.n = kept


class SemanticIndex:
    """Cached responses keyed by prompt vectors, scoped by namespace; see the module docstring.

    ``url`` is an SQLAlchemy async URL (``sqlite+aiosqlite:///path``,
    ``postgresql+psycopg://…``); ``None`` keeps everything in this process (an in-memory
    SQLite database), for tests and when the store is disabled. ``clock`` returns Unix seconds
    for ``created_at`` and expiry; tests pass a fake one to expire entries without sleeping.
    """

    def __init__(
        self,
        url: str | None,
        *,
        sync_interval_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        parsed = make_url(url or "sqlite+aiosqlite://")
        is_sqlite = parsed.get_backend_name() == "sqlite"
        in_memory = is_sqlite and parsed.database in (None, "", ":memory:")
        if is_sqlite and not in_memory and parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self._engine: AsyncEngine = create_async_engine(parsed, pool_pre_ping=not is_sqlite)
        if is_sqlite and not in_memory:
            event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)
        # In memory, every checkout shares one connection: take turns so transactions never mix.
        self._turns: contextlib.AbstractAsyncContextManager[None] = (
            asyncio.Lock() if in_memory else contextlib.nullcontext()
        )
        self._commit_lag_s = 0.0 if is_sqlite else _COMMIT_LAG_S
        self._sync_interval_s = sync_interval_s
        self._clock = clock
        self._shards: dict[tuple[str, int], _Shard] = {}
        self._reaped_at = -math.inf

    async def start(self) -> None:
        """Create the table and its indexes if they do not exist."""
        async with self._db(begin=True) as conn:
            await conn.run_sync(metadata.create_all)

    async def add(self, namespace: str, vector: Sequence[float], value: bytes, ttl_s: float) -> str:
        """Store ``value`` under ``vector`` for ``ttl_s`` seconds; return the new entry's id.

        This process's searches see it at once, other processes' after their next pull.
        """
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        row = _normalise(vector).astype("<f4").tobytes()
        entry_id, now = uuid.uuid4().hex, self._clock()
        async with self._db(begin=True) as conn:
            result = await conn.execute(
                insert(semantic_cache)
                .values(
                    id=entry_id,
                    namespace=namespace,
                    vector=row,
                    value=value,
                    created_at=now,
                    expires_at=now + ttl_s,
                )
                .returning(semantic_cache.c.seq)
            )
            seq = int(result.scalar_one())
            if now - self._reaped_at >= _REAP_INTERVAL_S:
                self._reaped_at = now
                await conn.execute(delete(semantic_cache).where(semantic_cache.c.expires_at <= now))
        shard = self._shards.get((namespace, len(row) // 4))
        if shard is not None:
            shard.extend([seq], [entry_id], row, [now + ttl_s])
        return entry_id

    async def search(
        self, namespace: str, vector: Sequence[float], threshold: float
    ) -> SemanticHit | None:
        """The live entry of ``namespace`` most similar to ``vector``, if its cosine
        similarity is at least ``threshold``; else None."""
        query = _normalise(vector)
        shard = await self._synced(namespace, query.shape[0])
        now = self._clock()
        scores = shard.matrix[: shard.n] @ query
        scores[shard.expires[: shard.n] <= now] = -np.inf
        above = np.flatnonzero(scores >= threshold)
        # Read ids before awaiting: a concurrent pull may compact the shard.
        candidates = [(shard.ids[i], float(scores[i])) for i in above[np.argsort(-scores[above])]]
        table = semantic_cache.c
        for entry_id, similarity in candidates:
            async with self._db() as conn:
                found = await conn.execute(
                    select(table.value, table.created_at).where(
                        table.id == entry_id, table.expires_at > now
                    )
                )
                hit = found.first()
            if hit is not None:
                return SemanticHit(entry_id, min(similarity, 1.0), hit.value, hit.created_at)
            shard.keep(np.array([i != entry_id for i in shard.ids], dtype=np.bool_))
        return None

    async def purge(self, namespace_prefix: str | None = None) -> int:
        """Delete the entries of namespaces starting with ``namespace_prefix`` (``"team-a/"``
        for one team; None for all); return how many rows were deleted."""
        stmt = delete(semantic_cache)
        if namespace_prefix is not None:
            stmt = stmt.where(
                semantic_cache.c.namespace.startswith(namespace_prefix, autoescape=True)
            )
        async with self._db(begin=True) as conn:
            deleted = (await conn.execute(stmt)).rowcount
        for key in [k for k in self._shards if k[0].startswith(namespace_prefix or "")]:
            del self._shards[key]  # reloaded on the next search
        return int(deleted)

    async def aclose(self) -> None:
        """Close the database connections; the index cannot be used afterwards."""
        self._shards.clear()
        await self._engine.dispose()

    async def _synced(self, namespace: str, width: int) -> _Shard:
        """The shard of ``namespace`` and ``width``, loaded, and pulled if one is due."""
        shard = self._shards.get((namespace, width))
        if shard is None:
            shard = self._shards[namespace, width] = _Shard(width)
        if time.monotonic() - shard.pulled_at >= self._sync_interval_s:
            async with shard.lock:
                if time.monotonic() - shard.pulled_at >= self._sync_interval_s:
                    await self._pull(namespace, shard)
        return shard

    async def _pull(self, namespace: str, shard: _Shard) -> None:
        """Add the namespace's live rows newer than the last pull; drop expired ones."""
        now, table = self._clock(), semantic_cache.c
        newer = table.seq > shard.last_seq
        if self._commit_lag_s and shard.last_seq:
            newer = or_(newer, table.created_at > now - self._commit_lag_s)
        stmt = select(table.seq, table.id, table.vector, table.expires_at).where(
            table.namespace == namespace,
            func.length(table.vector) == 4 * shard.width,
            table.expires_at > now,
            newer,
        )
        async with self._db() as conn:
            rows = (await conn.execute(stmt)).all()
        if shard.n and (expired := shard.expires[: shard.n] <= now).any():
            shard.keep(~expired)
        if rows:
            seqs, vectors = [int(r.seq) for r in rows], b"".join(r.vector for r in rows)
            shard.extend(seqs, [r.id for r in rows], vectors, [r.expires_at for r in rows])
            shard.last_seq = max(shard.last_seq, *seqs)
        shard.pulled_at = time.monotonic()

    @contextlib.asynccontextmanager
    async def _db(self, *, begin: bool = False) -> AsyncIterator[AsyncConnection]:
        """A connection, in a transaction if ``begin``; unreachable: CacheUnavailableError."""
        try:
            async with self._turns:
                connecting = self._engine.begin() if begin else self._engine.connect()
                async with connecting as conn:
                    yield conn
        except _UNREACHABLE as exc:
            raise CacheUnavailableError(
                f"the semantic cache store is unreachable ({type(exc).__name__}: {exc});"
                " check the database URL and that the database is up"
            ) from exc
