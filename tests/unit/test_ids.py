"""headrace.ids: ids unique within a process, across processes, and in a forked child."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from headrace.ids import unique_id

PREFIX = 20  # hex characters of the per-process prefix


def test_ids_are_32_lowercase_hex_characters_and_never_repeat() -> None:
    ids = [unique_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert len({i[:PREFIX] for i in ids}) == 1  # one prefix, the counter moves


def test_another_process_draws_another_prefix() -> None:
    theirs = subprocess.run(
        [sys.executable, "-c", "from headrace.ids import unique_id; print(unique_id())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", theirs)
    assert theirs[:PREFIX] != unique_id()[:PREFIX]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_counts_from_a_prefix_of_its_own() -> None:
    # Without the fork hook, a child would repeat its parent's prefix and next counter values,
    # and the usage records of two workers would share ids (one of each pair lost on insert).
    mine = unique_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send one id and leave at once
        os.close(read)
        os.write(write, unique_id().encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        childs = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert re.fullmatch(r"[0-9a-f]{32}", childs)
    assert childs[:PREFIX] != mine[:PREFIX]
    assert unique_id()[:PREFIX] == mine[:PREFIX]  # the parent keeps its own
