"""Key store on SQLAlchemy 2 (async): SQLite (WAL) embedded, PostgreSQL in production.

The schema is created at start with ``create_all``; Alembic migrations replace this when the
store grows beyond keys (tenancy issue), and will adopt this table as their baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    Boolean,
    Column,
    Float,
    MetaData,
    String,
    Table,
    Text,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from headrace.domain import ApiKey, Role

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("prefix", String(32), nullable=False),
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("name", String(200), nullable=False, default=""),
    Column("team_id", String(64), nullable=True),
    Column("allowed_models", Text, nullable=False, default="[]"),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
    Column("metadata", Text, nullable=False, default="{}"),
)


def _row_to_key(row: Any) -> ApiKey:
    return ApiKey(
        id=row.id,
        prefix=row.prefix,
        secret_hash=row.secret_hash,
        role=Role(row.role),
        name=row.name,
        team_id=row.team_id,
        allowed_models=frozenset(orjson.loads(row.allowed_models)),
        revoked=bool(row.revoked),
        created_at=row.created_at,
        metadata=orjson.loads(row.metadata),
    )


def _key_to_row(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "prefix": key.prefix,
        "secret_hash": key.secret_hash,
        "role": key.role.value,
        "name": key.name,
        "team_id": key.team_id,
        "allowed_models": orjson.dumps(sorted(key.allowed_models)).decode(),
        "revoked": key.revoked,
        "created_at": key.created_at,
        "metadata": orjson.dumps(dict(key.metadata)).decode(),
    }


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class SqlKeyStore:
    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self._is_sqlite = parsed.get_backend_name() == "sqlite"
        if self._is_sqlite and parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self._engine: AsyncEngine = create_async_engine(url, pool_pre_ping=not self._is_sqlite)
        if self._is_sqlite:
            event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)

    async def start(self) -> None:
        async with self._engine.begin() as conn:
            await conn.run_sync(metadata.create_all)

    async def get_by_hash(self, secret_hash: str) -> ApiKey | None:
        async with self._engine.connect() as conn:
            result = await conn.execute(
                select(api_keys).where(api_keys.c.secret_hash == secret_hash)
            )
            row = result.first()
        return None if row is None else _row_to_key(row)

    async def put(self, key: ApiKey) -> None:
        values = _key_to_row(key)
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(api_keys).where(api_keys.c.id == key.id).values(**values)
            )
            if result.rowcount == 0:
                await conn.execute(insert(api_keys).values(**values))

    async def list_keys(self) -> Sequence[ApiKey]:
        async with self._engine.connect() as conn:
            result = await conn.execute(select(api_keys).order_by(api_keys.c.created_at))
            return [_row_to_key(row) for row in result]

    async def revoke(self, key_id: str) -> bool:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(api_keys).where(api_keys.c.id == key_id).values(revoked=True)
            )
            return bool(result.rowcount)

    async def check(self) -> None:
        async with self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def aclose(self) -> None:
        await self._engine.dispose()
