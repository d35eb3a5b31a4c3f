"""orch.engine_guard with real processes: a parent killed with SIGKILL (as ray.kill kills a replica) has
its descendants ended by the guard, one that ignores SIGTERM too; a guard stopped first ends nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from orch.engine_guard import end

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="pidfds are Linux's")
ROOT = Path(__file__).resolve().parents[2]

PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from orch.engine_guard import start_guard, stop_guard
    sleep = "import time; time.sleep(600)"
    stubborn = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + sleep
    grandchild = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {sleep!r}]); " + sleep
    kids = [subprocess.Popen([sys.executable, "-c", code]) for code in (sleep, stubborn)]
    kids.append(subprocess.Popen([sys.executable, "-c", grandchild]))
    guard = start_guard(grace_s=0.5)
    time.sleep(1.5)  # the guard has listed them
    if sys.argv[1] == "stop":
        stop_guard(guard)  # and reaped
    print(guard.pid if guard.poll() is None else 0, *[k.pid for k in kids], flush=True)
    time.sleep(600)
""")


def _start(mode: str) -> tuple[subprocess.Popen[str], int, list[psutil.Process]]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    guard_pid, *_ = map(int, parent.stdout.readline().split())
    descendants = psutil.Process(parent.pid).children(recursive=True)
    kids = [p for p in descendants if p.pid != guard_pid]
    assert len(kids) == 4, kids  # two children, one more with its own child
    return parent, guard_pid, kids


def test_a_parent_killed_hard_has_its_descendants_ended_by_its_guard() -> None:
    parent, guard, kids = _start("keep")
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        gone, alive = psutil.wait_procs(kids, timeout=10)  # a poll, the grace, SIGKILL for the stubborn one
        assert alive == [], alive
        deadline = time.monotonic() + 5
        while psutil.pid_exists(guard) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not psutil.pid_exists(guard)  # and the guard is done
    finally:
        parent.kill()
        end({p.pid: p.create_time() for p in kids if p.is_running()}, 0)


def test_a_guard_stopped_first_ends_nothing() -> None:
    parent, guard, kids = _start("stop")
    try:
        assert guard == 0  # it ended when stopped
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        time.sleep(1.5)
        assert all(p.is_running() for p in kids)
    finally:
        parent.kill()
        end({p.pid: p.create_time() for p in kids if p.is_running()}, 0)
