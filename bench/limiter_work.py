"""Instructions per acquire + settlement of the Redis limiter, two revisions side by side.

    .venv/bin/python bench/limiter_work.py                              # working tree against HEAD
    .venv/bin/python bench/limiter_work.py --baseline REV --commit REV

For each revision, a process of its own runs under valgrind's callgrind against the Redis of
bench/tenancy.py (``--redis-url``): ``RedisLimiter.acquire`` of the tenancy benchmark's six
demands (a key's RPM, TPM, parallel and budget, its team's RPM and budget) and ``settle`` of
the four that settle, awaited one after the other, ``--warmup`` times, then counted over
``--iterations`` (callgrind's counters zeroed between, dumped after). Prints instructions per
iteration: the limiter's own client work, with the event loop's share of the round trips,
without Redis's. The same code counts the same to about 0.02 %. Needs Debian's valgrind.
About a minute.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
from _procs import Code
from _tenants import DEFAULT_REDIS_URL


async def exercise(redis_url: str, warmup: int, iterations: int) -> None:
    """The loop that is counted (runs in the child, under valgrind)."""
    from headrace.limits.base import Demand, LimitKind, Settlement
    from headrace.limits.redis import RedisLimiter

    rate, parallel, budget = LimitKind.RATE, LimitKind.CONCURRENCY, LimitKind.BUDGET
    tag = uuid.uuid4().hex[:8]
    key, team = f"key:bench-{tag}", f"team:bench-{tag}"
    demands = [
        Demand(f"{key}:rpm", rate, 10**9, 1),
        Demand(f"{key}:tpm", rate, 2**31 - 1, 40),
        Demand(f"{key}:parallel", parallel, 10_000, 1, 300.0),
        Demand(f"{key}:budget:total", budget, 10**12, 30, 10**9),
        Demand(f"{team}:rpm", rate, 10**9, 1),
        Demand(f"{team}:budget:total", budget, 10**12, 30, 10**9),
    ]
    settlements = [
        Settlement(f"{key}:tpm", rate, -10, 60.0, 2**31 - 1),
        Settlement(f"{key}:parallel", parallel, 0, 300.0, 10_000),
        Settlement(f"{key}:budget:total", budget, -5, 10**9, 10**12),
        Settlement(f"{team}:budget:total", budget, -5, 10**9, 10**12),
    ]
    prefix = f"headrace-bench:lim:{tag}:"
    limiter = RedisLimiter(redis_url, prefix=prefix)
    try:
        for i in range(warmup + iterations):
            if i == warmup:
                _callgrind("-z")
            lease = f"lease-{i}"
            if not (await limiter.acquire(demands, lease)).allowed:
                raise RuntimeError("a demand was refused: the counters are not fresh")
            await limiter.settle(settlements, lease)
        _callgrind("-d")
    finally:
        await limiter.aclose()
        import redis

        client = redis.Redis.from_url(redis_url)
        for name in client.scan_iter(f"{prefix}*"):
            client.delete(name)
        client.close()


def _callgrind(flag: str) -> None:
    subprocess.run(["callgrind_control", flag, str(os.getpid())], check=True, capture_output=True)


def count(code: Code, args: argparse.Namespace, workdir: Path) -> int:
    """Instructions per iteration of :func:`exercise` with ``code``."""
    out = workdir / "callgrind.out"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"]
    argv += [_procs.PYTHON, __file__, "--child", "--redis-url", args.redis_url]
    argv += ["--warmup", str(args.warmup), "--iterations", str(args.iterations)]
    env = {**os.environ, "PYTHONHASHSEED": "0", **code.env()}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the counted process failed:\n{done.stdout}{done.stderr[-3000:]}")
    # The dump asked for after the loop is <file>.<pid>.1 (the one at exit has no suffix).
    for dump in workdir.glob("callgrind.out.*.1"):
        found = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.MULTILINE)
        if found:
            return round(int(found.group(1)) / args.iterations)
    raise RuntimeError(f"callgrind wrote no counts after the loop:\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    _procs.add_revision_options(parser)
    parser.add_argument(
        "--redis-url", default=os.environ.get("HEADRACE_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    )
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import uvloop

        uvloop.run(exercise(args.redis_url, args.warmup, args.iterations))
        return
    with tempfile.TemporaryDirectory(prefix="headrace-limiter-work-") as tmp:
        counts = {}
        for label, code, workdir in _procs.revisions(args, Path(tmp)):
            counts[label] = count(code, args, workdir)
        (a, first), (b, second) = counts.items()
    print("\nRedisLimiter acquire (6 demands) + settle (4), instructions per iteration:")
    print(
        f"  {a}: {first:,}\n  {b}: {second:,}\n  difference: {second - first:+,} "
        f"({100 * (second - first) / first:+.1f} %)"
    )


if __name__ == "__main__":
    main()
