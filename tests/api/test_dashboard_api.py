"""The dashboard's files through the HTTP edge: served to anyone (they hold no data), under a
strict Content-Security-Policy, and pointing only at APIs that need the admin key or hold no
secret. The page itself is checked in a real browser in tests/e2e/test_dashboard_browser.py."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ADMIN_KEY, GatewayFactory


async def test_the_page_and_its_files_are_served_without_a_key(gateway: GatewayFactory) -> None:
    client, _ = await gateway()
    page = await client.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script src="/dashboard/app.js" defer></script>' in page.text
    assert ADMIN_KEY not in page.text
    script = await client.get("/dashboard/app.js")
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    style = await client.get("/dashboard/style.css")
    assert style.headers["content-type"] == "text/css; charset=utf-8"
    for response in (page, script, style):
        assert response.status_code == 200
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-cache"


async def test_the_policy_allows_this_origin_only_and_no_inline_code(
    gateway: GatewayFactory,
) -> None:
    client, _ = await gateway()
    page = await client.get("/dashboard")
    policy = dict(
        part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert "<script>" not in page.text
    assert "style=" not in page.text


async def test_the_script_writes_data_as_text_and_calls_only_gateway_routes(
    gateway: GatewayFactory,
) -> None:
    client, _ = await gateway()
    script = (await client.get("/dashboard/app.js")).text
    assert "innerHTML" not in script
    assert "insertAdjacentHTML" not in script
    assert "localStorage" not in script  # the key lives in the tab only (sessionStorage)
    assert script.count("fetch(") == 1  # in get(), which every read goes through
    assert re.findall(r"(?<!function )\bget\((\S+?)[,)]", script) == [
        "ROUTES.health",
        "ROUTES.metrics",
        'usage("model"',
        'usage("team"',
        "ROUTES.keys",
        "ROUTES.deployments",
        "recent",  # ROUTES.feedback with a limit
    ]
    routes = re.search(r"const ROUTES = \{(.*?)\};", script, re.S)
    assert routes is not None
    paths = re.findall(r'"(/[^"]+)"', routes.group(1))
    assert paths == [
        "/health/ready",
        "/metrics",
        "/admin/usage",
        "/admin/keys",
        "/admin/deployments",
        "/admin/feedback",
    ]
    for path in ("/health/ready", "/metrics"):
        assert (await client.get(path)).status_code == 200
    for path in ("/admin/usage", "/admin/keys", "/admin/deployments", "/admin/feedback"):
        assert (await client.get(path)).status_code == 401  # the page must send the key


@pytest.mark.parametrize("name", ["nope.js", "..%2Fdashboard.py", "index.html"])
async def test_other_names_are_404_in_openai_shape(gateway: GatewayFactory, name: str) -> None:
    client, _ = await gateway()
    response = await client.get(f"/dashboard/{name}")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
