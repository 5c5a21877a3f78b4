"""The dashboard in a real browser (Debian's Chromium through Playwright) against a real
``headrace serve``: the admin key opens it, it shows what the gateway holds, a wrong key is
refused, and a key's name that looks like markup stays text.

Skipped without Playwright or Chromium, except in CI (``HEADRACE_TEST_BROWSER=1``, which
``.ci/run`` sets after installing Chromium), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ADMIN_KEY, Server

CHROMIUM = os.environ.get("HEADRACE_TEST_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("HEADRACE_TEST_BROWSER") == "1"
WAIT_MS = 20_000  # the page reads every 5 s; usage records reach the store within 1 s

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    if REQUIRED:
        raise
    pytest.skip("needs playwright (pip install -e '.[dev]')", allow_module_level=True)

if not shutil.which(CHROMIUM):
    if REQUIRED:
        raise RuntimeError(f"HEADRACE_TEST_BROWSER=1 but there is no Chromium at {CHROMIUM}")
    pytest.skip(f"needs Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

expect.set_options(timeout=WAIT_MS)

MARKUP_NAME = '<img src=x onerror="document.title=`owned`">'


@pytest.fixture(scope="module")
def tenant(gateway: Server) -> dict[str, Any]:
    """A team, a user key that made one request, and a key whose name looks like markup."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=gateway.url, headers=admin, timeout=30) as client:
        client.post("/admin/teams", json={"id": "dash-team"}).raise_for_status()
        made = client.post(
            "/admin/keys", json={"name": "dash-key", "team_id": "dash-team", "rpm": 100}
        )
        made.raise_for_status()
        client.post("/admin/keys", json={"name": MARKUP_NAME}).raise_for_status()
        answer = client.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {made.json()['key']}"},
            json={"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]},
        )
        answer.raise_for_status()
        feedback = client.post(
            "/v1/feedback",
            headers={"Authorization": f"Bearer {made.json()['key']}"},
            json={
                "request_id": answer.headers["x-request-id"],
                "score": -1,
                "label": "dash-label",
                "comment": MARKUP_NAME,
            },
        )
        assert feedback.status_code == 201, feedback.text
    return made.json()


@pytest.fixture
def page(gateway: Server) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            yield page
        finally:
            browser.close()


def watch(page: Page) -> list[str]:
    """What went wrong in the page: script errors, console errors (a blocked request or a
    Content-Security-Policy violation shows there) and dialogs."""
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"error: {error}"))
    page.on(
        "console",
        lambda message: (
            problems.append(f"console: {message.text}") if message.type == "error" else None
        ),
    )
    page.on("dialog", lambda dialog: problems.append(f"dialog: {dialog.message}"))
    return problems


def test_the_admin_key_opens_what_the_gateway_holds(
    gateway: Server, tenant: dict[str, Any], page: Page
) -> None:
    problems = watch(page)
    page.goto(f"{gateway.url}/dashboard")
    expect(page.locator("#board")).to_be_hidden()
    page.fill("#key", ADMIN_KEY)
    page.click("#login button[type=submit]")

    # The shared gateway's deployments may be mid-fault for another test: the status is
    # whichever /health/ready gives, the store's row is always there and up.
    expect(page.locator("#health-status")).to_have_text(
        re.compile(r"^(ready|degraded|unavailable)$")
    )
    expect(page.locator("#health tbody tr", has_text="store")).to_contain_text("ok")
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#board")).to_be_visible()
    expect(page.locator("#usage-model tbody")).to_contain_text("mock-model")
    expect(page.locator("#usage-team tbody")).to_contain_text("dash-team")
    dash_key = page.locator("#keys tbody tr", has_text="dash-key")
    expect(dash_key).to_contain_text(tenant["id"])
    expect(dash_key).to_contain_text("active")
    expect(page.locator("#process")).to_contain_text("API requests answered since start")
    expect(page.locator("#process")).to_contain_text("2xx")
    mock = page.locator("#deployments tbody tr", has_text="mock-model/0")
    expect(mock).to_contain_text("openai_compatible")
    expect(mock).to_contain_text("closed")
    expect(page.locator("#updated")).to_contain_text("updated")

    # Markup in a key's name is shown as its text, and nothing in it runs.
    expect(page.locator("#keys tbody td", has_text="onerror")).to_have_text(MARKUP_NAME)
    assert page.locator("#keys img").count() == 0
    said = page.locator("#feedback tbody tr", has_text="dash-label")
    expect(said).to_contain_text("dash-team")
    expect(said.locator("td", has_text="onerror")).to_have_text(MARKUP_NAME)  # as text
    assert page.locator("#feedback img").count() == 0
    assert page.title() == "Headrace dashboard"

    # The key lives in the tab; "Forget key" drops it and the data with it.
    assert page.evaluate("sessionStorage.getItem('headrace-admin-key')") == ADMIN_KEY
    page.click("#forget")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#board")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('headrace-admin-key')") is None
    assert problems == []


def test_a_key_that_is_not_an_admin_key_is_refused(
    gateway: Server, tenant: dict[str, Any], page: Page
) -> None:
    page.goto(f"{gateway.url}/dashboard")
    page.fill("#key", "hr_not-a-key")
    page.click("#login button[type=submit]")
    expect(page.locator("#error")).to_contain_text("The key was refused")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#board")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('headrace-admin-key')") is None
