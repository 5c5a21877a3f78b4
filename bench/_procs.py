"""The processes a benchmark runs: mock upstream, gateway and load generators.

Every process is started in its own session (Ctrl-C reaches only this script, which then stops
them in order) and registered on an :class:`contextlib.ExitStack`, so an exception, Ctrl-C or
SIGTERM ends them all. Servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from _load import LoadResult, LoadSpec

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
HEADRACE = str(VENV_BIN / "headrace")
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
LOAD_SCRIPT = str(Path(__file__).resolve().parent / "_load.py")
ADMIN_KEY = "hr_bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ALL_CORES = frozenset(range(os.cpu_count() or 1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http(
    method: str,
    url: str,
    body: object = None,
    timeout_s: float = 5.0,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """A blocking request to a local control endpoint (health, faults, stats, metrics, the
    admin API with ``headers`` carrying its key)."""
    assert url.startswith("http://127.0.0.1:"), url
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        payload: bytes = response.read()
        return payload


def mock_total(mock: Server) -> int:
    """Every request ``headrace mock-upstream`` has answered since its start or last reset."""
    return int(json.loads(http("GET", mock.url + "/_mock/stats"))["total"])


@dataclass(frozen=True, slots=True)
class CpuSample:
    """Cumulative CPU seconds (user + system, all threads) of one process."""

    cpu_s: float

    @staticmethod
    def of(pid: int) -> CpuSample:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        # After "pid (comm)": state is fields[0]; utime and stime are fields 14 and 15 of stat.
        return CpuSample((int(fields[11]) + int(fields[12])) / CLK_TCK)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine_speed() -> str:
    """How fast this machine runs Python, as bench/README.md reads its results against: the
    best of three runs of ``python -c "for i in range(10_000_000): pass"``, interpreter start
    included (fast machines here take 0.19-0.21 s, middling 0.35, slow 0.6 and more)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "for i in range(10_000_000): pass"], check=True)
        best = min(best, time.perf_counter() - start)
    kind = "fast" if best < 0.25 else "middling" if best < 0.45 else "slow"
    return f"a 10-million-step Python loop in {best:.2f} s ({kind})"


def pin(pid: int, cores: frozenset[int]) -> None:
    """Set the CPU affinity of every thread of ``pid``; threads started later inherit it."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cores)


class Server:
    """A started server process with its base URL; :meth:`stop` ends it."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        health: str,
        log: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        env = {**os.environ, "HEADRACE_ADMIN_KEY": ADMIN_KEY, **(env or {})}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.health = health

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError):
                http("GET", self.url + self.health, timeout_s=1.0)
                return
            time.sleep(0.1)
        tail = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{self.name} did not answer {self.health}; the end of its log:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@dataclass(frozen=True, slots=True)
class Code:
    """Which Headrace source the servers run: the working tree (the installed editable
    package), or a snapshot of ``src/`` at ``commit`` put first on their ``PYTHONPATH``."""

    snapshot: Path | None = None
    commit: str = ""

    @staticmethod
    def at(commit: str | None, workdir: Path) -> Code:
        """The working tree, or ``src/`` of ``commit`` extracted into ``workdir`` (read-only
        for the repository: ``git archive``, never a checkout)."""
        if commit is None:
            return Code()
        sha = _git("rev-parse", "--short", commit)
        if not sha:
            raise RuntimeError(f"git does not know the commit {commit!r}")
        with tempfile.TemporaryFile() as archive:
            subprocess.run(
                ["git", "-C", str(ROOT), "archive", sha, "src"], check=True, stdout=archive
            )
            archive.seek(0)
            with tarfile.open(fileobj=archive) as tar:
                tar.extractall(workdir / "code", filter="data")
        return Code(workdir / "code" / "src", sha)

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.snapshot)} if self.snapshot else {}

    def describe(self) -> str:
        if self.snapshot:
            return f"Headrace at commit {self.commit} (src/ snapshot in {self.snapshot})"
        commit = _git("rev-parse", "--short", "HEAD") or "unknown commit"
        changed = len(_git("status", "--porcelain", "--", "src").splitlines())
        dirty = f" plus {changed} uncommitted changed files in src/" if changed else ""
        return f"Headrace working tree at {commit}{dirty}"


def add_revision_options(parser: argparse.ArgumentParser) -> None:
    """``--baseline`` and ``--commit``, for a benchmark that runs two revisions side by side."""
    parser.add_argument("--baseline", default="HEAD", help="the revision to compare against")
    parser.add_argument(
        "--commit", help="the revision to measure (default: the working tree, as installed)"
    )


def revisions(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[str, Code, Path]]:
    """``args.baseline``'s code, then ``args.commit``'s (or the working tree's): its label,
    its :class:`Code` and a working directory of its own in ``workdir`` (``a``, then ``b``)."""
    for rev, where in ((args.baseline, "a"), (args.commit, "b")):
        (workdir / where).mkdir()
        code = Code.at(rev, workdir / where)
        print(f"{where}: {code.describe()}", flush=True)
        yield code.commit or "working tree", code, workdir / where


def _git(*args: str) -> str:
    """A read-only git query in the repository; empty when git or the repository is missing."""
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *args], check=False, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


@dataclass(frozen=True, slots=True)
class Launcher:
    """Starts servers from ``code`` with their files in ``workdir``; ``stack`` stops them."""

    stack: contextlib.ExitStack
    workdir: Path
    code: Code

    def _start(self, server: Server, healthy_within_s: float = 60.0) -> Server:
        self.stack.callback(server.stop)
        server.wait_healthy(healthy_within_s)
        return server

    def mock(self) -> Server:
        port = free_port()
        argv = [HEADRACE, "mock-upstream", "--port", str(port), "--latency-ms", "0"]
        log = self.workdir / "mock.log"
        return self._start(Server("mock-upstream", argv, port, "/health", log, self.code.env()))

    def gateway(
        self,
        name: str,
        config_yaml: str,
        *,
        migrate: bool = False,
        wrapper: tuple[str, ...] = (),
        healthy_within_s: float = 60.0,
    ) -> Server:
        """``headrace serve`` with ``config_yaml``; the access log goes to ``<name>.log``, as a
        log shipper would read it. With ``migrate``, ``python -m headrace migrate`` runs on the
        same configuration first, as a deployment to PostgreSQL does. ``wrapper`` runs the
        server under another program (valgrind), which may make it slow to start."""
        config = self.workdir / f"{name}.yaml"
        config.write_text(config_yaml)
        data_dir = self.workdir / f"{name}-data"
        data_dir.mkdir(exist_ok=True)
        env = {"HEADRACE_DATA_DIR": str(data_dir), **self.code.env()}
        if migrate:
            done = subprocess.run(
                [PYTHON, "-m", "headrace", "migrate", "--config", str(config)],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"headrace migrate failed:\n{done.stdout}{done.stderr}")
        port = free_port()
        argv = [*wrapper, PYTHON, HEADRACE, "serve", "--config", str(config), "--port", str(port)]
        log = self.workdir / f"{name}.log"
        return self._start(Server(name, argv, port, "/health/live", log, env), healthy_within_s)


def mock_gateway_config(
    mock: Server, *, access_log: bool, price_per_mtok_usd: tuple[float, float] | None = None
) -> str:
    """One model, ``mock-model``, served by ``mock``; ``price_per_mtok_usd`` (input, output)
    gives it a price, so that requests cost something and budgets move."""
    price = ""
    if price_per_mtok_usd is not None:
        given, taken = price_per_mtok_usd
        price = f"\n        price: {{input_per_mtok_usd: {given}, output_per_mtok_usd: {taken}}}"
    return f"""\
log: {{access_log: {str(access_log).lower()}}}
models:
  - name: mock-model
    deployments:
      - provider: openai_compatible
        model: mock-model
        base_url: {mock.url}/v1{price}
"""


def _read_event(proc: subprocess.Popen[str], deadline: float) -> dict[str, object]:
    assert proc.stdout is not None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the load generator did not answer in time")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator exited with status {proc.wait()}")
        event: dict[str, object] = json.loads(line)
        return event


@contextlib.contextmanager
def load_generator(spec: LoadSpec, timeout_s: float) -> Iterator[LoadHandle]:
    """Start ``_load.py`` with ``spec``; yield once it is warm. See :class:`LoadHandle`.

    ``timeout_s`` bounds the warm-up and each measured phase.
    """
    proc = subprocess.Popen(
        [PYTHON, LOAD_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(asdict(spec)) + "\n")
        proc.stdin.flush()
        event = _read_event(proc, time.monotonic() + timeout_s)
        assert event.get("event") == "warm", event
        yield LoadHandle(proc, timeout_s)
    finally:
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()  # the generator exits at the end of its input
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class LoadHandle:
    """A warm load generator: each :meth:`run` is one measured phase and returns its result."""

    def __init__(self, proc: subprocess.Popen[str], timeout_s: float) -> None:
        self.proc = proc
        self.timeout_s = timeout_s

    def run(self) -> LoadResult:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        event = _read_event(self.proc, time.monotonic() + self.timeout_s)
        assert event.pop("event") == "result", event
        return LoadResult(**event)  # type: ignore[arg-type]


@contextlib.contextmanager
def bounded_run(
    time_limit_s: int, *, prefix: str = "headrace-bench-", on_interrupt: str = "servers stopped"
) -> Iterator[Path]:
    """A benchmark's whole run: a working directory of its own, removed after, and a bound.

    SIGINT and SIGTERM interrupt it as Ctrl-C does (the processes registered on the run's
    ExitStacks are stopped on the way out) and it exits 130 saying ``on_interrupt``; after
    ``time_limit_s`` it raises :class:`TimeoutError` the same way. The time it took is printed
    at the end.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(time_limit_s)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        try:
            yield Path(tmp)
        except KeyboardInterrupt:
            print(f"\ninterrupted; {on_interrupt}", file=sys.stderr)
            sys.exit(130)
    print(f"\n(finished in {time.monotonic() - started:.0f} s)")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _out_of_time(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError("the benchmark ran past its time limit; its processes were stopped")
