"""Asynchronous jobs: submission, scoping and idempotency (the runner is in headrace.worker)."""
