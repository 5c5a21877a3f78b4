"""Attach the job runner and the webhook outbox to a runtime (``serve`` or ``worker``)."""

from __future__ import annotations

import os
from pathlib import Path

from headrace.events.signing import new_secret
from headrace.events.webhooks import WebhookSender
from headrace.wiring import Runtime
from headrace.worker.outbox import OutboxDispatcher
from headrace.worker.runner import NUDGED_IDLE_POLL_S, JobRunner

WEBHOOK_SECRET_FILE = "webhook-secret"  # noqa: S105 - a file name, not a secret


def webhook_secret(rt: Runtime) -> str:
    """The configured signing secret, or one generated once into ``data_dir`` (mode 0600)."""
    options = rt.jobs_options
    if options is not None and options.webhook_secret:
        return options.webhook_secret
    path = Path(rt.data_dir) / WEBHOOK_SECRET_FILE
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_text(encoding="utf-8").strip()
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secret + "\n")
    return secret


def attach_workers(
    rt: Runtime, *, run_jobs: bool = True, idle_poll_s: float = NUDGED_IDLE_POLL_S
) -> JobRunner | None:
    """Add the runner (if ``run_jobs``) and the outbox dispatcher to ``rt.services``.

    Submissions to ``rt`` wake the runner at once; ``idle_poll_s`` is how often it looks for
    others' when it has nothing to do (see :mod:`headrace.worker.runner`).
    """
    options = rt.jobs_options
    if rt.job_queue is None or options is None:
        return None
    sender = WebhookSender(
        timeout_s=options.webhook_timeout_s,
        allow_private=options.allow_private_webhooks,
        allow_hosts=options.allow_webhook_hosts,
    )
    outbox = OutboxDispatcher(
        rt.job_queue,
        sender,
        webhook_secret(rt),
        max_attempts=options.webhook_max_attempts,
        tracing=rt.tracing,
    )
    runner = None
    if run_jobs:
        runner = JobRunner(
            rt.job_queue,
            rt.gateway,
            rt.authenticator.principal_of,
            concurrency=options.concurrency,
            lease_s=options.lease_s,
            heartbeat_s=options.heartbeat_s,
            retry_base_s=options.retry_base_s,
            retry_cap_s=options.retry_cap_s,
            retention_s=options.retention_s,
            idle_poll_s=idle_poll_s,
            on_webhook=outbox.nudge,
            on_jobs_changed=None if rt.jobs is None else rt.jobs.nudge,
            tracing=rt.tracing,
        )
        rt.services.append(runner)
        rt.on_job_submitted = runner.nudge
    rt.services.append(outbox)
    return runner
