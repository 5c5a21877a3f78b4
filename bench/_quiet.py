"""Other processes on the machine: how much CPU they take, and waiting out their bursts.

The benchmark machine may be shared (other engineers' tests, builds), and on 2 cores a busy
neighbour moves every latency percentile. So every measured block also records how much CPU
the rest of the machine used meanwhile, a block that others disturbed is measured again while
a time budget lasts, and the tables print what remained.
"""

from __future__ import annotations

import time
from pathlib import Path

from _procs import CLK_TCK


def process_cpu_s() -> float:
    """CPU seconds the whole machine spent in processes (user, nice, system) since boot.

    Interrupt and softirq time is left out: loopback TCP is processed there on behalf of our
    own processes, so counting it would blame our own traffic on other processes.
    """
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values[:3]) / CLK_TCK


class Quiet:
    """Keeps other processes' CPU bursts out of the figures, within a time budget.

    :meth:`wait` holds off until the machine is quiet (all processes together below
    ``threshold`` of one core over half a second; call it when ours are idle). :meth:`retry`
    says whether a block that other processes disturbed should be measured again. Both spend
    from ``budget_s``; once it is spent, blocks are kept as they are.
    """

    def __init__(self, budget_s: float, threshold: float = 0.25) -> None:
        self.budget_s = budget_s
        self.threshold = threshold
        self.waited_s = 0.0
        self.repeated = 0

    def wait(self) -> None:
        while self.waited_s < self.budget_s:
            before = process_cpu_s()
            time.sleep(0.5)
            self.waited_s += 0.5
            if (process_cpu_s() - before) / 0.5 <= self.threshold:
                return

    def note(self) -> str:
        """What keeping quiet cost, for a table's notes."""
        return (
            f"other processes: {self.waited_s:.0f} s spent waiting for quiet, "
            f"{self.repeated} blocks measured again (budget {self.budget_s:g} s)"
        )

    def retry(self, other_core_share: float, elapsed_s: float) -> bool:
        """Whether to measure again a block of ``elapsed_s`` in which other processes used
        ``other_core_share`` of a core; if so, first wait for quiet."""
        if other_core_share <= self.threshold or self.waited_s >= self.budget_s:
            return False
        self.waited_s += elapsed_s
        self.repeated += 1
        self.wait()
        return True
