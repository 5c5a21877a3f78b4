"""Bringing a database's schema to the head revision (Alembic), or checking that it is there.

The migrations ship inside the package (:mod:`headrace.store.migrations`), so no
``alembic.ini`` is needed at run time. Two ways in:

- embedded (SQLite by default): :meth:`SqlStore.start` migrates;
- production (PostgreSQL by default): ``headrace migrate`` (:func:`migrate`) when deploying,
  and :meth:`SqlStore.start` only checks, raising :class:`SchemaOutOfDateError` if behind.

A database created by the release before Alembic (an ``api_keys`` table and no
``alembic_version``) is stamped at the baseline revision, then upgraded. Concurrent
migrations serialise: PostgreSQL on an advisory lock, SQLite on ``BEGIN IMMEDIATE``. On both,
one upgrade is one transaction (DDL included), so a failed one leaves the schema as it was.
See docs/adr/0008.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from headrace.store.engine import SQLITE_BEGIN_IMMEDIATE, create_engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
BASELINE = "0001"  # the api_keys table of the release before Alembic
_PG_LOCK_ID = 0x68726D67  # "hrmg": any fixed number; only Headrace's migrations take it


class SchemaOutOfDateError(RuntimeError):
    """The database is not at the schema revision this release needs (raised at start)."""


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the shipped migrations, run on ``connection`` when given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None  # the package ships at least the baseline
    return head


def current_revision(connection: Connection) -> str | None:
    """The database's revision; None when Alembic never ran on it."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(connection: Connection) -> list[str]:
    """Upgrade the schema on ``connection`` (inside its transaction) to head.

    Returns the revisions applied, oldest first (empty when already at head).
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
    config = alembic_config(connection)
    current = current_revision(connection)
    if current is None and inspect(connection).has_table("api_keys"):
        command.stamp(config, BASELINE)  # made by the release before Alembic
        current = BASELINE
    script = ScriptDirectory.from_config(config)
    try:
        pending = [s.revision for s in script.iterate_revisions("heads", current or "base")]
    except (CommandError, RevisionError) as exc:  # an unknown revision
        raise SchemaOutOfDateError(_unknown(current)) from exc
    if pending:
        command.upgrade(config, "head")
    return pending[::-1]


def check(connection: Connection) -> None:
    """Raise :class:`SchemaOutOfDateError` unless the database is at the head revision."""
    current = current_revision(connection)
    head = head_revision()
    if current == head:
        return
    if current is not None:
        try:
            ScriptDirectory.from_config(alembic_config()).get_revision(current)
        except (CommandError, RevisionError) as exc:  # an unknown revision
            raise SchemaOutOfDateError(_unknown(current)) from exc
    url = connection.engine.url.render_as_string(hide_password=True)
    raise SchemaOutOfDateError(
        f"the database {url} is at schema revision {current or '(none)'}, and this release "
        f"needs {head}: run `headrace migrate` against it (same database_url) before "
        "starting, or set store.migrate_on_start: true to migrate at start"
    )


def _unknown(current: str | None) -> str:
    return (
        f"the database is at schema revision {current}, which this release does not know: "
        "a newer Headrace migrated it. Run that release (or newer)."
    )


async def upgrade_engine(engine: AsyncEngine) -> list[str]:
    """:func:`upgrade` in one transaction on a connection of ``engine``."""
    async with engine.connect() as conn:
        await conn.execution_options(**SQLITE_BEGIN_IMMEDIATE)  # changes conn in place
        async with conn.begin():
            return await conn.run_sync(upgrade)


async def check_engine(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.run_sync(check)


async def migrate(url: str) -> list[str]:
    """Bring the database at ``url`` to the head revision; the revisions applied, oldest first.

    What ``headrace migrate`` runs. Safe to run again (applies nothing) and concurrently.
    """
    engine = create_engine(url)
    try:
        return await upgrade_engine(engine)
    finally:
        await engine.dispose()
