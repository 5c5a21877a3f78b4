"""Durable state: API keys now; usage, jobs, batches and files as later issues add them."""
