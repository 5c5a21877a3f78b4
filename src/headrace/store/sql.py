"""The store on SQLAlchemy 2 (async): SQLite (WAL) embedded, PostgreSQL in production.

One :class:`SqlStore` implements keys, teams and usage on one engine. The schema belongs to
Alembic (:mod:`headrace.store.migrate`): ``start`` migrates, or only checks when the operator
migrates at deploy time (``migrate_on_start=False``).

Usage is written append-only and exactly once: a batch is inserted with ``ON CONFLICT (id) DO
NOTHING RETURNING id``, and only the returned (newly inserted) records are added to the
per-day aggregates, in the same transaction. A replayed batch therefore adds nothing twice.
On PostgreSQL both statements are ``INSERT ... SELECT FROM unnest(<one array per column>)``:
one statement with one parameter per column, whatever the batch size. The multi-row
``VALUES`` that SQLAlchemy builds otherwise ("insertmanyvalues") carries a parameter per
cell, and psycopg's client-side parsing of such a statement capped a writer near 4,000
records/s; unnest sustains several times that (see docs/adr/0008). SQLite keeps
multi-row ``VALUES``: it is in process, and fast that way.

The usage statements are built once and run as the driver's SQL (:class:`_UsageSql`): the
writer runs on the gateway's event loop, and SQLAlchemy's per-batch work (building and
compiling the statement, and for SQLite its per-row parameter processing) cost more than the
driver's. PostgreSQL's arrays travel in psycopg's binary format: its text format quotes every
element through a regular expression, four times the cost.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import (
    ClauseElement,
    ColumnElement,
    Row,
    String,
    Table,
    Text,
    bindparam,
    cast,
    delete,
    exists,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.types import TypeEngine

from headrace.domain import ApiKey, BudgetPeriod, Quota, Role, Team, UsageRecord
from headrace.store.aggregates import NO_TEAM, DailyTotals, aggregate, utc_day
from headrace.store.base import GroupBy, UsageRow
from headrace.store.engine import create_engine, is_sqlite
from headrace.store.migrate import check_engine, upgrade_engine
from headrace.store.schema import api_keys, teams, usage_daily, usage_records

_COUNTERS = tuple(f.name for f in dataclasses.fields(DailyTotals))  # usage_daily's sums
_DAILY_KEY = ("day", "key_id", "team_id", "model")
_DAILY_COLUMNS = (*_DAILY_KEY, *_COUNTERS)
_GROUP_COLUMNS = {"day": "day", "key": "key_id", "team": "team_id", "model": "model"}


class SqlStore:
    """Keys, teams and usage in one SQL database (see the module docstring).

    ``url``: an async SQLAlchemy URL (``sqlite+aiosqlite:///path``,
    ``postgresql+psycopg://...``; a bare ``sqlite://`` or ``postgresql://`` gets those
    drivers). ``migrate_on_start``: True migrates in :meth:`start`; False only checks that
    the schema is at head and raises
    :class:`~headrace.store.migrate.SchemaOutOfDateError` telling the operator to run
    ``headrace migrate``.
    """

    def __init__(self, url: str, migrate_on_start: bool = True) -> None:
        self._engine: AsyncEngine = create_engine(url)
        self._sqlite = is_sqlite(self._engine.url)
        self._migrate_on_start = migrate_on_start
        insert_daily = self._insert_many(usage_daily, _DAILY_COLUMNS)
        upsert_daily = insert_daily.on_conflict_do_update(
            index_elements=[usage_daily.c[name] for name in _DAILY_KEY],
            set_={name: usage_daily.c[name] + insert_daily.excluded[name] for name in _COUNTERS},
        )
        insert_records = (
            self._insert_many(usage_records, _RECORD_COLUMNS)
            .on_conflict_do_nothing(index_elements=[usage_records.c.id])
            .returning(usage_records.c.id)
        )
        self._usage_sql = _UsageSql(
            self._sqlite, self._engine.dialect, insert_records, upsert_daily
        )

    async def start(self) -> None:
        if self._migrate_on_start:
            await upgrade_engine(self._engine)
        else:
            await check_engine(self._engine)

    async def check(self) -> None:
        async with self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def aclose(self) -> None:
        await self._engine.dispose()

    def _insert(self, table: Table) -> postgresql.Insert | sqlite.Insert:
        return sqlite.insert(table) if self._sqlite else postgresql.insert(table)

    def _insert_many(self, table: Table, names: Sequence[str]) -> postgresql.Insert | sqlite.Insert:
        """An INSERT of many rows with the columns ``names``; see :meth:`_many` for its parameters.

        PostgreSQL: one ``INSERT ... SELECT * FROM unnest(:col1, :col2, ...)`` taking one array
        per column. SQLite: a plain INSERT executed with the list of rows (multi-row VALUES).
        """
        if self._sqlite:
            return sqlite.insert(table)
        # Strings travel as text[]: a cast to varchar(n)[] would cut long values silently,
        # where the column's own assignment refuses them, as a plain INSERT does.
        arrays = [
            cast(bindparam(name), postgresql.ARRAY(_array_element(table.c[name].type)))
            for name in names
        ]
        source = func.unnest(*arrays).table_valued(*names).render_derived()
        return postgresql.insert(table).from_select(list(names), select(source))

    # -- keys -------------------------------------------------------------------------------

    async def get_by_hash(self, secret_hash: str) -> ApiKey | None:
        async with self._engine.connect() as conn:
            result = await conn.execute(
                select(api_keys).where(api_keys.c.secret_hash == secret_hash)
            )
            row = result.first()
        return None if row is None else _row_to_key(row)

    async def get_key(self, key_id: str) -> ApiKey | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        return None if row is None else _row_to_key(row)

    async def put(self, key: ApiKey) -> None:
        await self._upsert(api_keys, _key_to_row(key))

    async def list_keys(self, team_id: str | None = None) -> Sequence[ApiKey]:
        query = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        if team_id is not None:
            query = query.where(api_keys.c.team_id == team_id)
        async with self._engine.connect() as conn:
            return [_row_to_key(row) for row in await conn.execute(query)]

    async def revoke(self, key_id: str) -> bool:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(api_keys).where(api_keys.c.id == key_id).values(revoked=True)
            )
            return bool(result.rowcount)

    # -- teams ------------------------------------------------------------------------------

    async def get_team(self, team_id: str) -> Team | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(teams).where(teams.c.id == team_id))).first()
        return None if row is None else _row_to_team(row)

    async def put_team(self, team: Team) -> None:
        await self._upsert(teams, _team_to_row(team))

    async def list_teams(self) -> Sequence[Team]:
        async with self._engine.connect() as conn:
            result = await conn.execute(select(teams).order_by(teams.c.created_at, teams.c.id))
            return [_row_to_team(row) for row in result]

    async def delete_team(self, team_id: str) -> bool:
        owns_keys = exists().where(api_keys.c.team_id == team_id)
        async with self._engine.begin() as conn:
            # One statement, so no key can be added between the check and the delete.
            deleted = await conn.execute(delete(teams).where(teams.c.id == team_id, ~owns_keys))
            if deleted.rowcount:
                return True
            found = await conn.execute(select(teams.c.id).where(teams.c.id == team_id))
            if found.first() is None:
                return False
            owned = await conn.scalar(
                select(func.count()).select_from(api_keys).where(api_keys.c.team_id == team_id)
            )
        raise ValueError(f"team {team_id!r} still owns {owned} key(s): move or delete them first")

    async def _upsert(self, table: Table, row: Mapping[str, Any]) -> None:
        insert = self._insert(table)
        statement = insert.values(row).on_conflict_do_update(
            index_elements=[table.c.id],
            set_={name: insert.excluded[name] for name in row if name != "id"},
        )
        async with self._engine.begin() as conn:
            await conn.execute(statement)

    # -- usage ------------------------------------------------------------------------------

    async def write_usage(self, records: Sequence[UsageRecord]) -> int:
        if not records:
            return 0
        # Ascending ids and aggregate keys: concurrent writers take row locks in one order.
        ordered = sorted(records, key=lambda r: r.id)
        rows = [_record_values(r) for r in ordered]
        async with self._engine.begin() as conn:
            inserted = await self._usage_sql.insert_records(conn, rows)
            if not inserted:
                return 0
            new: list[UsageRecord] = []
            for record in ordered:  # a batch may repeat an id: the first one went in
                if record.id in inserted:
                    inserted.discard(record.id)
                    new.append(record)
            daily = [
                (day, key_id, team_id, model, *(getattr(totals, name) for name in _COUNTERS))
                for (day, key_id, team_id, model), totals in sorted(aggregate(new).items())
            ]
            await self._usage_sql.upsert_daily(conn, daily)
        return len(new)

    async def usage_summary(
        self,
        group_by: Sequence[GroupBy],
        *,
        since_day: str | None = None,
        until_day: str | None = None,
        team_id: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
    ) -> Sequence[UsageRow]:
        fields = list(dict.fromkeys(group_by))
        groups = [usage_daily.c[_GROUP_COLUMNS[f]] for f in fields]
        sums = [func.sum(usage_daily.c[name]).label(name) for name in _COUNTERS]
        query = select(*groups, *sums).where(
            *_daily_filters(since_day, until_day, team_id, key_id, model)
        )
        if groups:
            # Byte order on both backends (SQLite's default; PostgreSQL's "C" collation).
            order = groups if self._sqlite else [c.collate("C") for c in groups]
            query = query.group_by(*groups).order_by(*order)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        out = []
        for row in rows:
            if row.requests is None:  # no group-by and nothing matched
                continue
            named = dict(zip(fields, row[: len(fields)], strict=True))
            team = named.get("team")
            out.append(
                UsageRow(
                    day=named.get("day"),
                    key_id=named.get("key"),
                    team_id=None if team == NO_TEAM else team,
                    model=named.get("model"),
                    **{name: int(getattr(row, name)) for name in _COUNTERS},
                )
            )
        return out

    async def spend_since(self, *, key_id: str | None, team_id: str | None, since: float) -> int:
        query = select(func.coalesce(func.sum(usage_daily.c.cost_micro_usd), 0)).where(
            usage_daily.c.day >= utc_day(since)
        )
        if key_id is not None:
            query = query.where(usage_daily.c.key_id == key_id)
        elif team_id is not None:
            query = query.where(usage_daily.c.team_id == team_id)
        async with self._engine.connect() as conn:
            return int(await conn.scalar(query) or 0)

    async def count_usage_records(self) -> int:
        async with self._engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(usage_records)) or 0)


class _UsageSql:
    """:meth:`SqlStore.write_usage`'s two statements, built once, run as the driver's SQL.

    Rows are tuples in ``_RECORD_COLUMNS`` / ``_DAILY_COLUMNS`` order. PostgreSQL: the unnest
    statements compiled once, each parameter an array in binary format (``%(name)b``).
    SQLite: the records as multi-row ``VALUES`` with one flat tuple of parameters, in chunks
    of a power of two rows (at most ``_SQLITE_ROWS``: SQLite's limit on parameters), so that
    the connection's prepared statements are reused: compiling a new 200-row statement for
    each batch cost SQLite more than inserting the rows. The few aggregate rows go through
    SQLAlchemy.
    """

    def __init__(
        self,
        embedded: bool,
        dialect: Dialect,
        insert_records: ClauseElement,
        upsert_daily: postgresql.Insert | sqlite.Insert,
    ) -> None:
        self._sqlite = embedded
        self._upsert_daily = upsert_daily
        if embedded:
            columns = ", ".join(_RECORD_COLUMNS)
            values = f"({', '.join('?' * len(_RECORD_COLUMNS))})"
            # Names from this module's constants, values all parameters.
            self._sqlite_inserts = {
                rows: f"INSERT INTO {usage_records.name} ({columns}) VALUES "  # noqa: S608
                + ", ".join([values] * rows)
                + " ON CONFLICT (id) DO NOTHING RETURNING id"
                for rows in (1 << bit for bit in range(_SQLITE_ROWS.bit_length()))
            }
        else:
            self._insert_records_sql = _binary_parameters(insert_records, dialect)
            self._upsert_daily_sql = _binary_parameters(upsert_daily, dialect)

    async def insert_records(self, conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> set[str]:
        """Insert the rows whose ids are new; return those ids."""
        if not self._sqlite:
            columns = dict(zip(_RECORD_COLUMNS, map(list, zip(*rows, strict=True)), strict=True))
            result = await conn.exec_driver_sql(self._insert_records_sql, columns)
            return set(result.scalars())
        inserted: set[str] = set()
        start = 0
        while start < len(rows):
            size = min(_SQLITE_ROWS, 1 << ((len(rows) - start).bit_length() - 1))
            params = tuple(value for row in rows[start : start + size] for value in row)
            result = await conn.exec_driver_sql(self._sqlite_inserts[size], params)
            inserted.update(result.scalars())
            start += size
        return inserted

    async def upsert_daily(self, conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> None:
        """Add the rows to the per-day aggregates."""
        if self._sqlite:
            await conn.execute(
                self._upsert_daily, [dict(zip(_DAILY_COLUMNS, row, strict=True)) for row in rows]
            )
            return
        columns = dict(zip(_DAILY_COLUMNS, map(list, zip(*rows, strict=True)), strict=True))
        await conn.exec_driver_sql(self._upsert_daily_sql, columns)


def _binary_parameters(statement: ClauseElement, dialect: Dialect) -> str:
    """``statement`` compiled for psycopg, its ``%(name)s`` parameters in binary format."""
    compiled = statement.compile(dialect=dialect)
    sql, count = re.subn(r"%\((\w+)\)s", r"%(\1)b", str(compiled))
    assert count == len(compiled.params), "every parameter is a named one"
    return sql


def _array_element(column_type: TypeEngine[Any]) -> TypeEngine[Any]:
    return Text() if isinstance(column_type, String) else column_type


def _daily_filters(
    since_day: str | None,
    until_day: str | None,
    team_id: str | None,
    key_id: str | None,
    model: str | None,
) -> list[ColumnElement[bool]]:
    c = usage_daily.c
    filters: list[ColumnElement[bool]] = []
    if since_day is not None:
        filters.append(c.day >= since_day)
    if until_day is not None:
        filters.append(c.day <= until_day)
    if team_id is not None:
        filters.append(c.team_id == team_id)
    if key_id is not None:
        filters.append(c.key_id == key_id)
    if model is not None:
        filters.append(c.model == model)
    return filters


def _quota_to_row(quota: Quota) -> dict[str, Any]:
    return {
        "rpm": quota.rpm,
        "tpm": quota.tpm,
        "max_parallel": quota.max_parallel,
        "budget_micro_usd": quota.budget_micro_usd,
        "budget_period": quota.budget_period.value,
        "soft_budget_ratio": quota.soft_budget_ratio,
    }


def _row_to_quota(row: Row[Any]) -> Quota:
    return Quota(
        rpm=row.rpm,
        tpm=row.tpm,
        max_parallel=row.max_parallel,
        budget_micro_usd=row.budget_micro_usd,
        budget_period=BudgetPeriod(row.budget_period),
        soft_budget_ratio=row.soft_budget_ratio,
    )


def _key_to_row(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "prefix": key.prefix,
        "secret_hash": key.secret_hash,
        "role": key.role.value,
        "name": key.name,
        "team_id": key.team_id,
        "user": key.user,
        "allowed_models": orjson.dumps(sorted(key.allowed_models)).decode(),
        **_quota_to_row(key.quota),
        "expires_at": key.expires_at,
        "revoked": key.revoked,
        "created_at": key.created_at,
        "metadata": orjson.dumps(dict(key.metadata)).decode(),
    }


def _row_to_key(row: Row[Any]) -> ApiKey:
    return ApiKey(
        id=row.id,
        prefix=row.prefix,
        secret_hash=row.secret_hash,
        role=Role(row.role),
        name=row.name,
        team_id=row.team_id,
        user=row.user,
        allowed_models=frozenset(orjson.loads(row.allowed_models)),
        quota=_row_to_quota(row),
        expires_at=row.expires_at,
        revoked=bool(row.revoked),
        created_at=row.created_at,
        metadata=orjson.loads(row.metadata),
    )


def _team_to_row(team: Team) -> dict[str, Any]:
    return {
        "id": team.id,
        "name": team.name,
        "organization": team.organization,
        **_quota_to_row(team.quota),
        "metadata": orjson.dumps(dict(team.metadata)).decode(),
        "created_at": team.created_at,
    }


def _row_to_team(row: Row[Any]) -> Team:
    return Team(
        id=row.id,
        name=row.name,
        organization=row.organization,
        quota=_row_to_quota(row),
        metadata=orjson.loads(row.metadata),
        created_at=row.created_at,
    )


_RECORD_COLUMNS = (
    "id",
    "request_id",
    "created_at",
    "operation",
    "key_id",
    "team_id",
    "model",
    "requested_model",
    "deployment",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost_micro_usd",
    "baseline_cost_micro_usd",
    "latency_ms",
    "status",
    "error",
    "cache_hit",
    "degraded",
    "stream",
)
_SQLITE_ROWS = 1024  # 20 parameters a row; SQLite takes at most 32,766 per statement


def _record_values(record: UsageRecord) -> tuple[Any, ...]:
    """A record's row, in ``_RECORD_COLUMNS`` order."""
    # Coerced to one Python type per column: psycopg sends a list as an array of one type.
    return (
        record.id,
        record.request_id,
        float(record.created_at),
        record.operation,
        record.key_id,
        record.team_id,
        record.model,
        record.requested_model,
        record.deployment,
        int(record.prompt_tokens),
        int(record.completion_tokens),
        int(record.cached_tokens),
        int(record.cost_micro_usd),
        int(record.baseline_cost_micro_usd),
        float(record.latency_ms),
        int(record.status),
        record.error,
        bool(record.cache_hit),
        bool(record.degraded),
        bool(record.stream),
    )
