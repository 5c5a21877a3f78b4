"""The PostgreSQL engine replaces a pooled connection that died while it sat idle."""

import pytest
from sqlalchemy import text

from headrace.store import engine as engine_module
from headrace.store.engine import create_engine


async def _kill_backends(url: str, application_pid: int) -> None:
    killer = create_engine(url)
    try:
        async with killer.connect() as conn:
            await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": application_pid})
    finally:
        await killer.dispose()


async def test_a_connection_killed_while_idle_is_replaced_before_use(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = create_engine(fresh_database_url)
    try:
        async with engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await _kill_backends(fresh_database_url, pid)
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
        async with engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await _kill_backends(fresh_database_url, pid)
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
