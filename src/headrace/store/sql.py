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

The two usage statements are built once and run as the driver's SQL
(:mod:`headrace.store.usage_sql`).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Row,
    Table,
    delete,
    exists,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from headrace.domain import ApiKey, BudgetPeriod, Feedback, Quota, Role, Team, UsageRecord
from headrace.store.aggregates import NO_TEAM, aggregate, utc_day
from headrace.store.base import GroupBy, UsageRow
from headrace.store.engine import create_engine, is_sqlite
from headrace.store.migrate import check_engine, upgrade_engine
from headrace.store.schema import api_keys, teams, usage_daily, usage_records
from headrace.store.schema import feedback as feedback_table
from headrace.store.usage_sql import COUNTERS, UsageSql, record_values

_GROUP_COLUMNS = {"day": "day", "key": "key_id", "team": "team_id", "model": "model"}
_BY_ID = operator.attrgetter("id")


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
        self._usage_sql = UsageSql(self._engine.dialect)

    @property
    def engine(self) -> AsyncEngine:
        """The database engine, for what lives in the same database (the job queue): one
        connection pool per process, not one per component."""
        return self._engine

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
        ordered = sorted(records, key=_BY_ID)
        rows = [record_values(r) for r in ordered]
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
                (day, key_id, team_id, model, *(getattr(totals, name) for name in COUNTERS))
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
        sums = [func.sum(usage_daily.c[name]).label(name) for name in COUNTERS]
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
                    **{name: int(getattr(row, name)) for name in COUNTERS},
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

    async def purge_usage(self, created_before: float, limit: int) -> int:
        c = usage_records.c
        picked = (  # by ix_usage_records_created_at
            select(c.id)
            .where(c.created_at < created_before)
            .order_by(c.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)  # PostgreSQL (SQLite has one writer at a time)
        )
        async with self._engine.begin() as conn:  # one statement: SQLite takes its lock once
            result = await conn.execute(delete(usage_records).where(c.id.in_(picked)))
        return int(result.rowcount)

    async def request_recorded(
        self, request_id: str, *, team_id: str | None = None, key_id: str | None = None
    ) -> bool:
        c = usage_records.c
        found = select(c.id).where(  # by ix_usage_records_request_id
            c.request_id == request_id, *_equal(usage_records, team_id=team_id, key_id=key_id)
        )
        async with self._engine.connect() as conn:
            return bool(await conn.scalar(select(exists(found))))

    async def add_feedback(self, feedback: Feedback) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(insert(feedback_table).values(_feedback_to_row(feedback)))

    async def list_feedback(
        self,
        *,
        team_id: str | None = None,
        key_id: str | None = None,
        request_id: str | None = None,
        limit: int = 100,
    ) -> Sequence[Feedback]:
        c = feedback_table.c
        query = (
            select(feedback_table)
            .where(*_equal(feedback_table, team_id=team_id, key_id=key_id, request_id=request_id))
            .order_by(c.created_at.desc(), c.id.desc())
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_row_to_feedback(row) for row in rows]

    async def count_usage_records(self) -> int:
        async with self._engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(usage_records)) or 0)


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
    return filters + _equal(usage_daily, team_id=team_id, key_id=key_id, model=model)


def _equal(table: Table, **values: str | None) -> list[ColumnElement[bool]]:
    """``column == value`` for each value given (not None): optional filters."""
    return [table.c[name] == value for name, value in values.items() if value is not None]


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


def _feedback_to_row(feedback: Feedback) -> dict[str, Any]:
    row = dataclasses.asdict(feedback)
    row["metadata"] = orjson.dumps(row["metadata"]).decode()
    return row


def _row_to_feedback(row: Row[Any]) -> Feedback:
    values = dict(row._mapping)
    values["metadata"] = orjson.loads(values["metadata"])
    return Feedback(**values)
