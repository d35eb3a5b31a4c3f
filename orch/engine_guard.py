"""A guard that ends an engine's processes when the process hosting the engine dies hard.

vLLM runs its engine core (and, with several workers, the workers) as child processes of the replica that
started it, and the engine core has no way to notice that the replica is gone: it waits on its input socket.
A replica that ends without shutting its engine down (``ray.kill``, the kernel's OOM killer, Ray's memory
monitor, a crash) leaves them running, each holding its memory (on a GPU, the GPU's) until the node
restarts; Serve's replacement replica then finds the memory missing.

:func:`start_guard` starts ``python -m orch.engine_guard PID`` in its own session (so no signal to the
replica's process group takes it too). The guard watches the replica through a pidfd (no pid reuse) and
keeps a list of its descendants, refreshed every ``poll_s``; once the replica is gone it sends each one still
alive (the same process: pid and start time) SIGTERM, then SIGKILL after ``grace_s``, and exits. A replica
that shuts its engine down first leaves nothing to end. Linux only (pidfd, /proc); elsewhere it is not
started.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time

log = logging.getLogger(__name__)

POLL_S = 1.0
GRACE_S = 5.0


def start_guard(pid: int | None = None, grace_s: float = GRACE_S) -> subprocess.Popen[bytes] | None:
    """Starts the guard of ``pid`` (default: this process); None where pidfds don't exist."""
    if not hasattr(os, "pidfd_open"):
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "orch.engine_guard", str(pid or os.getpid()), str(grace_s)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def stop_guard(guard: subprocess.Popen[bytes] | None) -> None:
    """Ends a guard whose replica shuts its engine down itself."""
    if guard is not None and guard.poll() is None:
        guard.terminate()
        try:
            guard.wait(2)
        except subprocess.TimeoutExpired:
            guard.kill()


def _descendants(pid: int) -> dict[int, float]:
    """pid → start time of every live descendant of ``pid`` (but this guard)."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    found = {}
    for child in children:
        try:
            if child.pid != os.getpid():
                found[child.pid] = child.create_time()
        except psutil.Error:
            pass
    return found


def end(processes: dict[int, float], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM, then after ``grace_s`` SIGKILL, to each of ``processes`` (pid → start time) still running
    as the same process. Returns the pids signalled."""
    import psutil

    alive = []
    for pid, started in processes.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started:
                p.terminate()
                alive.append(p)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=grace_s)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    return [p.pid for p in alive]


def watch(pid: int, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> list[int]:
    """Waits for ``pid`` to end, then ends the descendants it had; returns their pids."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return []
    known: dict[int, float] = {}
    try:
        while True:
            known = _descendants(pid) or known  # an empty list may be a parent already gone
            ready, _, _ = select.select([pidfd], [], [], poll_s)
            if ready:
                break
    finally:
        os.close(pidfd)
    return end(known, grace_s)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C to the terminal that started the stack is the replica's
    pid, grace_s = int(argv[0]), float(argv[1]) if len(argv) > 1 else GRACE_S
    started = time.monotonic()
    ended = watch(pid, grace_s=grace_s)
    if ended:
        print(f"engine guard: process {pid} ended; ended its processes {ended} "
              f"(watched {time.monotonic() - started:.0f} s)", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
