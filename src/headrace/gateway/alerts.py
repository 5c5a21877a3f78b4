"""Budget alerts to a webhook: one JSON POST per alert, best effort, logged either way."""

from __future__ import annotations

import aiohttp
import structlog

from headrace.gateway.quota import BudgetAlert
from headrace.providers.http import SessionPool

log = structlog.get_logger("headrace")


class WebhookAlerts:
    def __init__(self, url: str, http: SessionPool, *, timeout_s: float = 5.0) -> None:
        self._url = url
        self._http = http
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def __call__(self, alert: BudgetAlert) -> None:
        body = {
            "type": "budget.soft_threshold_crossed",
            "scope": alert.scope,
            "id": alert.id,
            "period": alert.period,
            "spent_usd": alert.spent_micro_usd / 1e6,
            "budget_usd": alert.budget_micro_usd / 1e6,
            "threshold": alert.threshold,
        }
        try:
            session = self._http.get()
            async with session.post(self._url, json=body, timeout=self._timeout) as response:
                delivered = response.status < 300
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("budget_alert_webhook_failed", url=self._url, error=str(exc))
            return
        if delivered:
            log.info("budget_alert_webhook_delivered", url=self._url, status=status)
        else:
            log.warning("budget_alert_webhook_failed", url=self._url, status=status)
