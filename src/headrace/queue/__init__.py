"""Durable jobs: the job table, its leases, events, webhook outbox and dead letters."""
