"""``headrace teams|keys|usage`` against a running gateway, the key used by the openai SDK."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import ADMIN_KEY, Server

pytestmark = pytest.mark.e2e


def cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "headrace", *args, "--url", server.url, "--admin-key", ADMIN_KEY],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def usage_json(server: Server, team: str, expect_requests: int) -> dict[str, Any]:
    """``headrace usage --json`` for ``team``, polled until the usage writer has flushed."""
    deadline = time.monotonic() + 10
    while True:
        result = cli(server, "usage", "--json", "--group-by", "team,key,model", "--team", team)
        assert result.returncode == 0, result.stderr
        answer: dict[str, Any] = json.loads(result.stdout)
        if sum(r["requests"] for r in answer["data"]) >= expect_requests:
            return answer
        assert time.monotonic() < deadline, answer
        time.sleep(0.2)


def test_keys_teams_and_usage_through_the_cli(gateway: Server) -> None:
    team = f"e2e-{uuid.uuid4().hex[:8]}"
    made = cli(gateway, "teams", "create", "--id", team, "--name", "E2E", "--budget-usd", "5")
    assert made.returncode == 0, made.stderr
    assert team in made.stdout
    listed = cli(gateway, "teams", "list")
    assert team in listed.stdout
    shown = cli(gateway, "teams", "show", team, "--json")
    assert json.loads(shown.stdout)["budget_usd"] == 5

    created = cli(
        gateway,
        "keys",
        "create",
        "--name",
        "sdk",
        "--team",
        team,
        "--allow-model",
        "mock-*",
        "--rpm",
        "100",
        "--metadata",
        "owner=e2e",
        "--json",
    )
    assert created.returncode == 0, created.stderr
    assert "will not show it again" in created.stderr
    key = json.loads(created.stdout)
    secret, key_id = key["key"], key["id"]
    assert secret.startswith("hr_")
    # Human output: the fields, then the secret alone on the last line.
    human = cli(gateway, "keys", "create", "--team", team, "--name", "human")
    assert human.stdout.strip().splitlines()[-1].startswith("hr_")

    shown_key = cli(gateway, "keys", "show", key_id)
    assert shown_key.returncode == 0, shown_key.stderr
    assert "owner=e2e" in shown_key.stdout
    assert secret not in shown_key.stdout
    key_list = cli(gateway, "keys", "list", "--team", team)
    assert key_id in key_list.stdout
    assert secret not in key_list.stdout

    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=secret, max_retries=0)
    for _ in range(2):
        answer = client.chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "hello"}]
        )
        assert answer.choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model="all-minilm-l6-v2", input="not allowed")

    # The refused request is accounted too: one usage record per request, whatever happened.
    usage = usage_json(gateway, team, expect_requests=3)
    rows = [r for r in usage["data"] if r["key_id"] == key_id and r["model"] == "mock-model"]
    assert len(rows) == 1
    assert rows[0]["team_id"] == team
    assert rows[0]["requests"] == 2
    assert rows[0]["prompt_tokens"] > 0
    as_csv = cli(gateway, "usage", "--csv", "--group-by", "key", "--team", team)
    assert as_csv.returncode == 0, as_csv.stderr
    table = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    (mine,) = [r for r in table if r["key_id"] == key_id]
    assert (int(mine["requests"]), int(mine["errors"])) == (3, 1)
    assert float(mine["cost_usd"]) >= 0
    terminal = cli(gateway, "usage", "--group-by", "team", "--team", team)
    assert terminal.stdout.splitlines()[0].split()[:2] == ["team_id", "requests"]

    revoked = cli(gateway, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "again"}]
        )
    missing = cli(gateway, "keys", "show", "key_missing")
    assert missing.returncode == 1
    assert "HTTP 404" in missing.stderr
    bad = cli(gateway, "keys", "create", "--team", "no-such-team")
    assert bad.returncode == 1
    assert "team_id" in bad.stderr


def test_feedback_through_the_cli(gateway: Server) -> None:
    team = f"e2e-{uuid.uuid4().hex[:8]}"
    assert cli(gateway, "teams", "create", "--id", team).returncode == 0
    made = cli(gateway, "keys", "create", "--team", team, "--json")
    assert made.returncode == 0, made.stderr
    secret = json.loads(made.stdout)["key"]
    auth = {"Authorization": f"Bearer {secret}"}
    with httpx.Client(base_url=gateway.url, headers=auth, timeout=30) as client:
        answer = client.post(
            "/v1/chat/completions",
            json={"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert answer.status_code == 200, answer.text
        request_id = answer.headers["x-request-id"]
        body = {"request_id": request_id, "score": 4, "label": "e2e", "comment": "fine"}
        assert client.post("/v1/feedback", json=body).status_code == 201

    as_json = cli(gateway, "feedback", "--team", team, "--json")
    assert as_json.returncode == 0, as_json.stderr
    [given] = json.loads(as_json.stdout)
    assert (given["request_id"], given["score"], given["label"]) == (request_id, 4.0, "e2e")
    terminal = cli(gateway, "feedback", "--request-id", request_id)
    header, row = terminal.stdout.splitlines()
    assert header.split() == [
        "created_at",
        "team_id",
        "key_id",
        "request_id",
        "score",
        "label",
        "comment",
    ]
    assert row.split()[2:] == [team, given["key_id"], request_id, "4.0", "e2e", "fine"]
    none = cli(gateway, "feedback", "--team", "no-such-team")
    assert none.returncode == 0
    assert "no feedback" in none.stderr


def test_migrate_applies_revisions_once(tmp_path: Path) -> None:
    env = {**os.environ, "HEADRACE_DATA_DIR": str(tmp_path)}
    env.pop("HEADRACE_CONFIG", None)
    env.pop("HEADRACE_DATABASE_URL", None)

    def migrate() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "headrace", "migrate"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )

    first = migrate()
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("applied ")
    assert (tmp_path / "headrace.db").exists()
    again = migrate()
    assert (again.returncode, again.stdout.strip()) == (0, "already at head")
