"""``/dashboard``: the operator's page, one static document that reads the gateway's own APIs.

The page holds no data and no secret. It asks for an admin API key, keeps it in the tab's
``sessionStorage`` (gone when the tab closes; never in a cookie, so no other site's form can
spend it), and every 5 s reads:

- ``/health/ready``: each dependency's status;
- ``/metrics``: requests in flight and answered by status, usage records not yet stored and
  whether they spool, queued jobs and their oldest age per priority class;
- ``/admin/usage`` grouped by model and by team, for today (UTC): requests, tokens, cost,
  routing savings, cache hits, errors;
- ``/admin/keys``: each key's team, limits, budget, expiry and state;
- ``/admin/deployments``: each deployment's provider, load, latency and circuit breaker;
- ``/admin/feedback``: the 20 latest pieces of feedback on answers (score, label, comment).

So it shows nothing an admin key could not already read, and what it shows is what the
gateway process that serves it sees (metrics and deployments are per process; usage and keys
come from the shared store). No build step and no framework: four files in
``dashboard_static/``, loaded once; the data is written into the page as text, never as
markup (docs/adr/0013-dashboard.md).
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from starlette.responses import Response

from headrace.errors import NotFoundError

router = APIRouter(include_in_schema=False)

_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Scripts, styles and requests from this origin only; no inline code, no frames, no forms
# posted anywhere.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files("headrace.api").joinpath("dashboard_static", name).read_bytes()


_PAGE = _read("index.html")
_FILES = {name: _read(name) for name in _ASSETS}


@router.get("/dashboard")
async def page() -> Response:
    return Response(_PAGE, media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/dashboard/{name}")
async def asset(name: str) -> Response:
    body = _FILES.get(name)
    if body is None:
        raise NotFoundError(f"The dashboard has no file {name!r}.")
    return Response(body, media_type=_ASSETS[name], headers=_HEADERS)
