"""The usage store's two statements, built once and run as the driver's SQL.

:meth:`SqlStore.write_usage <headrace.store.sql.SqlStore.write_usage>` inserts a batch of
records (``ON CONFLICT (id) DO NOTHING RETURNING id``) and adds the new ones to the per-day
aggregates. The usage writer runs on the gateway's event loop, and SQLAlchemy's per-batch work
(building and compiling the statement; for SQLite, processing every row's parameters) cost
more than the driver's, so :class:`UsageSql` builds the SQL once and hands it to the driver:

- PostgreSQL: ``INSERT ... SELECT FROM unnest(<one array per column>)`` (docs/adr/0008),
  every array in psycopg's binary format: its text format quotes every element through a
  regular expression, four times the cost (a batch of 500: 22 -> 9 ms of CPU with both
  changes).
- SQLite: multi-row ``VALUES`` with one flat tuple of parameters, in chunks of a power of two
  rows, so that the connection's prepared statements are reused (compiling a new 200-row
  statement for each batch cost SQLite more than inserting the rows).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ClauseElement, String, Table, Text, bindparam, cast, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.types import TypeEngine

from headrace.domain import UsageRecord
from headrace.store.aggregates import DailyTotals
from headrace.store.schema import usage_daily, usage_records

COUNTERS = tuple(f.name for f in dataclasses.fields(DailyTotals))  # usage_daily's sums
DAILY_KEY = ("day", "key_id", "team_id", "model")
DAILY_COLUMNS = (*DAILY_KEY, *COUNTERS)
RECORD_COLUMNS = (
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


def record_values(record: UsageRecord) -> tuple[Any, ...]:
    """A record's row, in ``RECORD_COLUMNS`` order."""
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


class UsageSql:
    """The records' insert and the aggregates' upsert for ``dialect`` (see the module doc).

    Rows are tuples in ``RECORD_COLUMNS`` / ``DAILY_COLUMNS`` order. PostgreSQL: both unnest
    statements compiled once, each parameter an array in binary format (``%(name)b``).
    SQLite: the records in chunks of a power of two rows, at most ``_SQLITE_ROWS`` (SQLite's
    limit on parameters); the few aggregate rows through SQLAlchemy.
    """

    def __init__(self, dialect: Dialect) -> None:
        self._sqlite = dialect.name == "sqlite"
        insert_daily = _insert_many(self._sqlite, usage_daily, DAILY_COLUMNS)
        upsert_daily = insert_daily.on_conflict_do_update(
            index_elements=[usage_daily.c[name] for name in DAILY_KEY],
            set_={name: usage_daily.c[name] + insert_daily.excluded[name] for name in COUNTERS},
        )
        self._upsert_daily = upsert_daily
        if self._sqlite:
            columns = ", ".join(RECORD_COLUMNS)
            values = f"({', '.join('?' * len(RECORD_COLUMNS))})"
            # Names from this module's constants, values all parameters.
            self._sqlite_inserts = {
                rows: f"INSERT INTO {usage_records.name} ({columns}) VALUES "  # noqa: S608
                + ", ".join([values] * rows)
                + " ON CONFLICT (id) DO NOTHING RETURNING id"
                for rows in (1 << bit for bit in range(_SQLITE_ROWS.bit_length()))
            }
        else:
            insert_records = (
                _insert_many(False, usage_records, RECORD_COLUMNS)
                .on_conflict_do_nothing(index_elements=[usage_records.c.id])
                .returning(usage_records.c.id)
            )
            self._insert_records_sql = _binary_parameters(insert_records, dialect)
            self._upsert_daily_sql = _binary_parameters(upsert_daily, dialect)

    async def insert_records(self, conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> set[str]:
        """Insert the rows whose ids are new; return those ids."""
        if not self._sqlite:
            columns = dict(zip(RECORD_COLUMNS, map(list, zip(*rows, strict=True)), strict=True))
            result = await conn.exec_driver_sql(self._insert_records_sql, columns)
            return set(result.scalars().all())
        inserted: set[str] = set()
        start = 0
        while start < len(rows):
            size = min(_SQLITE_ROWS, 1 << ((len(rows) - start).bit_length() - 1))
            params = tuple(itertools.chain.from_iterable(rows[start : start + size]))
            result = await conn.exec_driver_sql(self._sqlite_inserts[size], params)
            inserted.update(result.scalars().all())
            start += size
        return inserted

    async def upsert_daily(self, conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> None:
        """Add the rows to the per-day aggregates."""
        if self._sqlite:
            await conn.execute(
                self._upsert_daily, [dict(zip(DAILY_COLUMNS, row, strict=True)) for row in rows]
            )
            return
        columns = dict(zip(DAILY_COLUMNS, map(list, zip(*rows, strict=True)), strict=True))
        await conn.exec_driver_sql(self._upsert_daily_sql, columns)


def _binary_parameters(statement: ClauseElement, dialect: Dialect) -> str:
    """``statement`` compiled for psycopg, its ``%(name)s`` parameters in binary format."""
    compiled = statement.compile(dialect=dialect)
    sql, count = re.subn(r"%\((\w+)\)s", r"%(\1)b", str(compiled))
    assert count == len(compiled.params), "every parameter is a named one"
    return sql


def _insert_many(
    embedded: bool, table: Table, names: Sequence[str]
) -> postgresql.Insert | sqlite.Insert:
    """An INSERT of many rows with the columns ``names``.

    PostgreSQL: one ``INSERT ... SELECT * FROM unnest(:col1, :col2, ...)`` taking one array
    per column. SQLite (``embedded``): a plain INSERT executed with the list of rows.
    """
    if embedded:
        return sqlite.insert(table)
    # Strings travel as text[]: a cast to varchar(n)[] would cut long values silently,
    # where the column's own assignment refuses them, as a plain INSERT does.
    arrays = [
        cast(bindparam(name), postgresql.ARRAY(_array_element(table.c[name].type)))
        for name in names
    ]
    source = func.unnest(*arrays).table_valued(*names).render_derived()
    return postgresql.insert(table).from_select(list(names), select(source))


def _array_element(column_type: TypeEngine[Any]) -> TypeEngine[Any]:
    return Text() if isinstance(column_type, String) else column_type
