"""Alembic environment: runs on the connection :mod:`headrace.store.migrate` hands over.

Headrace runs Alembic in code (``headrace migrate``, or at start), passing an open
connection in ``config.attributes["connection"]``. For developers writing a migration,
``alembic -x url=sqlite+aiosqlite:///dev.db revision --autogenerate -m "..."`` (with an
``alembic.ini`` whose ``script_location`` points here) works too: without a connection, this
script opens one from the ``url`` argument.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection

from headrace.store.engine import create_engine
from headrace.store.schema import metadata


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,  # SQLite can only ALTER TABLE by copying the table
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_from_url(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("Headrace migrations run online only: `headrace migrate`")

connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("pass the database URL: alembic -x url=... <command>")
    asyncio.run(run_from_url(url))
