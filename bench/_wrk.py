"""Saturation with ``wrk`` (C, one thread), when it is installed: far less load-generator CPU
per request than Python, so the server, not the client, is what saturates.

``apt-get install -y wrk`` installs it on Debian; without it the benchmark falls back to the
Python load generator (``_load.py``, closed mode) and says so.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass(frozen=True, slots=True)
class WrkResult:
    ok: int  # answered 2xx
    errors: int  # non-2xx answers and socket errors
    cpu_s: float  # wrk's own user + system CPU over its whole run
    elapsed_s: float
    latency_mean_ms: float  # wrk's mean latency per request


def available() -> bool:
    return shutil.which("wrk") is not None


def _lua(body: str, headers: dict[str, str]) -> str:
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body)}"]
    for name, value in {"Content-Type": "application/json", **headers}.items():
        lines.append(f"wrk.headers[ {_lua_string(name)} ] = {_lua_string(value)}")
    return "\n".join(lines) + "\n"


def _lua_string(text: str) -> str:
    """A Lua long string: no escapes to get wrong. (``t[ [==[k]==] ]`` needs the spaces.)"""
    return "[==[" + text + "]==]"


def run(
    url: str, body: str, headers: dict[str, str], connections: int, duration_s: float
) -> WrkResult:
    """``wrk -t1 -c<connections> -d<duration>`` POSTing ``body``; raises on a wrk failure."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_lua(body, headers))
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s"]
    argv += ["--timeout", "10s", "-s", script.name, url]
    try:
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            status, cpu_s = _wait_with_cpu(proc, timeout_s=duration_s + 30)
            out.seek(0)
            text = out.read().decode(errors="replace")
    finally:
        Path(script.name).unlink(missing_ok=True)
    if status != 0:
        raise RuntimeError(f"wrk failed ({status}):\n{text}")
    return _parse(text, cpu_s)


def _wait_with_cpu(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[int, float]:
    """Reap ``proc`` with ``os.wait4`` (killing it after ``timeout_s``): exit status, CPU s."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, usage.ru_utime + usage.ru_stime
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.05)
    finally:
        if proc.returncode is None:  # interrupted: do not leave wrk running
            proc.kill()
            proc.wait()


def _parse(text: str, cpu_s: float) -> WrkResult:
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if done is None:
        raise RuntimeError(f"cannot read wrk's output:\n{text}")
    requests = int(done.group(1))
    elapsed_s = float(done.group(2)) * _UNITS_S[done.group(3)]
    socket_errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    failed = int(non_2xx.group(1)) if non_2xx else 0
    latency = re.search(r"Latency\s+([\d.]+)(us|ms|s|m)\b", text)
    mean_ms = float(latency.group(1)) * _UNITS_S[latency.group(2)] * 1000 if latency else math.nan
    return WrkResult(
        # Only successful answers count: an error page is cheaper than a completion.
        ok=requests - failed,
        errors=failed + socket_errors,
        cpu_s=cpu_s,
        elapsed_s=elapsed_s,
        latency_mean_ms=mean_ms,
    )
