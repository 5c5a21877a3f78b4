import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from headrace import __version__
from headrace.cli import app
from tests.sockets import free_port

runner = CliRunner()

ECHO_CONFIG = """
models:
  - name: echo
    deployments: [{provider: echo, model: e}]
"""


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HEADRACE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HEADRACE_ADMIN_KEY", "hr_cli-test")
    return tmp_path / "data"


def test_version() -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.output.strip() == __version__


def test_doctor_passes_on_a_working_config(tmp_path: Path) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text(ECHO_CONFIG)
    result = runner.invoke(app, ["doctor", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "deployment:echo/0: ok" in result.output
    assert "all checks passed" in result.output


def test_doctor_names_what_fails(tmp_path: Path) -> None:
    config = tmp_path / "down.yaml"
    config.write_text(
        "models:\n  - name: remote\n    deployments:\n"
        "      - {provider: openai_compatible, model: m, base_url: 'http://127.0.0.1:9/v1'}\n"
    )
    result = runner.invoke(app, ["doctor", "--config", str(config)])
    assert result.exit_code == 1
    assert "deployment:remote/0: FAILED - Could not connect" in result.output


def test_bad_config_exits_2_with_the_reason(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("sever: {port: 1}\n")
    result = runner.invoke(app, ["serve", "--config", str(config)])
    assert result.exit_code == 2
    assert "sever: unknown key" in result.output


def test_doctor_names_a_limiter_url_option_it_would_not_honour(tmp_path: Path) -> None:
    config = tmp_path / "limits.yaml"
    config.write_text(
        "limits: {backend: redis, redis_url: 'redis://127.0.0.1:6379/0?socket_timeout=1'}\n"
    )
    result = runner.invoke(app, ["doctor", "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert "runtime: FAILED - limits.redis_url" in result.output
    assert "socket_timeout" in result.output


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_limiter_url_option_it_would_not_honour_exits_2_with_its_name(
    tmp_path: Path, command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Logging stays as the tests have it: configured here, it would write to the runner's
    # output, closed once the command returns, for every later test.
    monkeypatch.setattr("headrace.observability.logging.configure_logging", lambda *_: None)
    config = tmp_path / "limits.yaml"
    config.write_text(
        "limits: {backend: redis, redis_url: 'redis://127.0.0.1:6379/0?socket_timeout=1'}\n"
    )
    result = runner.invoke(app, [command, "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "limits.redis_url" in result.output
    assert "socket_timeout" in result.output


def test_a_worker_admits_as_many_model_calls_as_it_runs_jobs() -> None:
    from headrace.cli.jobs import worker_settings
    from headrace.config import Settings

    default = Settings()
    assert default.router.admission.max_concurrent < 3000
    big = worker_settings(default, 3000)
    assert big.jobs.concurrency == 3000
    assert big.router.admission.max_concurrent == 3000
    small = worker_settings(default, 10)  # never lowered
    assert small.router.admission.max_concurrent == default.router.admission.max_concurrent
    assert worker_settings(default, None).jobs.concurrency == default.jobs.concurrency


def test_bench_without_a_key_names_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADRACE_ADMIN_KEY")
    result = runner.invoke(app, ["bench", "--url", "http://127.0.0.1:9", "--requests", "1"])
    assert result.exit_code == 2
    assert "No admin key: pass --key" in result.output


def test_bench_counts_requests_nothing_answered_and_exits_1() -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = runner.invoke(app, ["bench", "--url", closed, "--requests", "3", "--json"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.output)
    assert (summary["ok"], summary["failed"]) == (0, 3)
    assert summary["failures"] == {"no answer: ClientConnectorError": 3}
