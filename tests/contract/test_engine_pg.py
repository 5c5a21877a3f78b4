"""The PostgreSQL engine replaces a pooled connection that died while it sat idle."""

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from headrace.store import engine as engine_module
from headrace.store.engine import create_engine


async def _pooled_connection_killed(engine: AsyncEngine, url: str) -> int:
    """Use one of ``engine``'s connections, put it back in the pool, then have the server end
    it (as a restart or an idle-connection timeout would); its backend's pid."""
    async with engine.connect() as conn:
        pid = int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
    killer = create_engine(url)
    try:
        async with killer.connect() as conn:
            await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        await killer.dispose()
    return pid


async def test_a_connection_killed_while_idle_is_replaced_before_use(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = create_engine(fresh_database_url)
    try:
        pid = await _pooled_connection_killed(engine, fresh_database_url)
        monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_S", 0.0)
        async with engine.connect() as conn:  # pinged, found dead, replaced
            again = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        assert again != pid
    finally:
        await engine.dispose()


async def test_a_connection_used_moments_ago_is_not_pinged(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = create_engine(fresh_database_url)
    try:
        await _pooled_connection_killed(engine, fresh_database_url)
        monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_S", 3600.0)
        # Not pinged: the dead connection fails where it is used, and the pool drops it...
        with pytest.raises(Exception, match=r"terminat|closed|connection"):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        # ...so the next use gets a new one.
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()


async def test_a_pinged_connection_can_switch_to_autocommit(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job queue's one-statement calls run in autocommit: the ping before them must not
    leave the connection in a transaction (psycopg refuses the switch then)."""
    engine = create_engine(fresh_database_url)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_S", 0.0)
        autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        async with autocommit.connect() as conn:  # pinged first, then switched
            assert (await conn.execute(text("SELECT 2"))).scalar_one() == 2
    finally:
        await engine.dispose()
