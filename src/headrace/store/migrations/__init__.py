"""The store's Alembic migrations, shipped in the package (see headrace.store.migrate)."""
