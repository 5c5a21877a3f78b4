"""The shipped Alembic migrations, on SQLite and PostgreSQL: from empty, from the pre-Alembic
schema, concurrently, down and up again, and the check that production start relies on."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Boolean, Column, Float, MetaData, String, Table, Text

from headrace.domain import NO_QUOTA, ApiKey, Role
from headrace.store.engine import create_engine
from headrace.store.migrate import (
    MIGRATIONS_DIR,
    SchemaOutOfDateError,
    alembic_config,
    head_revision,
    migrate,
)
from headrace.store.schema import metadata
from headrace.store.sql import SqlStore

# Every revision the package ships, in order (each migration file starts with its revision).
ALL = sorted(p.name[:4] for p in (MIGRATIONS_DIR / "versions").glob("[0-9]*.py"))

# The api_keys table exactly as the release before Alembic created it (with create_all).
old_metadata = MetaData()
old_api_keys = Table(
    "api_keys",
    old_metadata,
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


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'migrate.db'}"
    value: str = request.getfixturevalue("fresh_database_url")
    return value


async def run(url: str, fn: Any) -> Any:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


def schema_differences(conn: sqlalchemy.Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def test_the_package_ships_one_linear_history() -> None:
    assert head_revision() == ALL[-1]
    assert [f"{n:04d}" for n in range(1, len(ALL) + 1)] == ALL  # no gap, no branch


async def test_upgrade_from_empty_matches_the_schema_module(url: str) -> None:
    assert await migrate(url) == ALL
    assert await migrate(url) == []
    assert await run(url, schema_differences) == []
    store = SqlStore(url, migrate_on_start=False)
    await store.start()  # at head: the check passes
    await store.aclose()


async def test_a_pre_alembic_database_is_stamped_then_upgraded_and_keeps_its_keys(
    url: str,
) -> None:
    old_row = {
        "id": "admin-env",
        "prefix": "hr_abcde",
        "secret_hash": "f" * 64,
        "role": "admin",
        "name": "admin",
        "team_id": None,
        "allowed_models": '["gpt-*"]',
        "revoked": False,
        "created_at": 1_764_000_000.5,
        "metadata": '{"tier": "gold"}',
    }

    def create_old(conn: sqlalchemy.Connection) -> None:
        old_metadata.create_all(conn)
        conn.execute(old_api_keys.insert().values(old_row))

    await run(url, create_old)
    assert await migrate(url) == ALL[1:]  # 0001 was stamped, not run
    assert await run(url, schema_differences) == []

    store = SqlStore(url, migrate_on_start=False)
    await store.start()
    expected = ApiKey(
        id="admin-env",
        prefix="hr_abcde",
        secret_hash="f" * 64,
        role=Role.ADMIN,
        name="admin",
        allowed_models=frozenset({"gpt-*"}),
        quota=NO_QUOTA,
        created_at=1_764_000_000.5,
        metadata={"tier": "gold"},
    )
    assert await store.get_by_hash("f" * 64) == expected
    assert await store.list_keys() == [expected]
    await store.aclose()


async def test_start_migrates_by_default(url: str) -> None:
    store = SqlStore(url)
    await store.start()
    await store.start()  # a restart applies nothing
    assert await store.list_teams() == []
    await store.aclose()


async def test_start_without_migrating_refuses_an_unmigrated_database(url: str) -> None:
    store = SqlStore(url, migrate_on_start=False)
    with pytest.raises(SchemaOutOfDateError, match=r"revision \(none\).*run `headrace migrate`"):
        await store.start()
    await run(url, old_metadata.create_all)  # the pre-Alembic schema is just as out of date
    with pytest.raises(SchemaOutOfDateError, match="run `headrace migrate`"):
        await store.start()
    await migrate(url)
    await store.start()
    await store.aclose()


async def test_a_database_from_a_newer_release_is_refused(url: str) -> None:
    await migrate(url)
    await run(url, lambda c: c.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaOutOfDateError, match=r"9999.*newer Headrace"):
        await migrate(url)
    store = SqlStore(url, migrate_on_start=False)
    with pytest.raises(SchemaOutOfDateError, match=r"9999.*newer Headrace"):
        await store.start()
    await store.aclose()


async def test_concurrent_migrations_apply_each_revision_once(url: str) -> None:
    results = await asyncio.gather(migrate(url), migrate(url), migrate(url))
    assert sorted(results) == [[], [], ALL]


async def test_migrations_go_down_to_empty_and_up_again(url: str) -> None:
    await migrate(url)

    def downgrade(conn: sqlalchemy.Connection) -> list[str]:
        command.downgrade(alembic_config(conn), "base")
        return sorted(sqlalchemy.inspect(conn).get_table_names())

    assert await run(url, downgrade) == ["alembic_version"]
    assert await migrate(url) == ALL
    assert await run(url, schema_differences) == []


async def test_a_failed_upgrade_leaves_the_schema_as_it_was(url: str) -> None:
    # A table in the way of the last step of 0002: the whole upgrade must roll back.
    await run(url, lambda c: c.exec_driver_sql("CREATE TABLE usage_daily (x INTEGER)"))
    with pytest.raises(sqlalchemy.exc.DatabaseError):
        await migrate(url)
    tables = await run(url, lambda c: sorted(sqlalchemy.inspect(c).get_table_names()))
    assert tables == ["usage_daily"]
