"""Where the CPU went during a benchmark phase, and how many compute threads the vLLM engine ran.

A comparison of two servers on 2 cores is only fair if both engines run the same number of compute
threads on the same cores. :func:`snapshot` samples every process on the machine (CPU seconds) and,
for vLLM's own processes (titles ``VLLM::...``), every thread with its CPU affinity and the
``OMP_NUM_THREADS``/``VLLM_CPU_OMP_THREADS_BIND`` they were started with. Two snapshots around the
measured phase give busy threads per engine process and CPU seconds per process, ours and everyone
else's (other sessions' test clusters share this machine).

    >>> before = snapshot(root_pid=1234)  # doctest: +SKIP
    >>> after = snapshot(root_pid=1234)  # doctest: +SKIP
    >>> phase_cpu(before, after, wall_s=30.0)["ours_cpu_s"]  # doctest: +SKIP
    57.1
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "ProcSample",
    "Snapshot",
    "binding_log_lines",
    "engine_threads",
    "phase_cpu",
    "session_log_files",
    "snapshot",
]

_ENV_KEYS = ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND", "OMP_PLACES", "OMP_PROC_BIND")
_BUSY = 0.10  # a thread busy >10% of the phase's wall time counts as a compute thread


@dataclass(frozen=True)
class ThreadSample:
    tid: int
    cpu_s: float
    cpus_allowed: str


@dataclass(frozen=True)
class ProcSample:
    pid: int
    title: str
    cpu_s: float
    create_time: float
    ours: bool
    num_threads: int = 0
    affinity: tuple[int, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    threads: tuple[ThreadSample, ...] = ()

    @property
    def is_vllm(self) -> bool:
        return self.title.startswith("VLLM::")


@dataclass(frozen=True)
class Snapshot:
    procs: dict[int, ProcSample]


def _title(proc: psutil.Process) -> str:
    try:
        cmdline = proc.cmdline()
    except (psutil.Error, OSError):
        cmdline = []
    text = " ".join(cmdline) if cmdline else proc.name()
    # Shorten interpreter paths so titles group: ".../bin/python -m x" -> "python -m x".
    return re.sub(r"^\S*/(python[\d.]*)", r"\1", text)[:100]


def _thread_affinity(pid: int, tid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    except OSError:
        return "?"
    match = re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.MULTILINE)
    return match.group(1) if match else "?"


def _tree_pids(root_pid: int) -> set[int]:
    try:
        root = psutil.Process(root_pid)
        return {root_pid, *(p.pid for p in root.children(recursive=True))}
    except psutil.Error:
        return set()


def snapshot(root_pid: int | None) -> Snapshot:
    """Samples all processes; those under ``root_pid`` are ours and vLLM's get per-thread detail."""
    ours = _tree_pids(root_pid) if root_pid is not None else set()
    procs: dict[int, ProcSample] = {}
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            times = proc.cpu_times()
            sample = ProcSample(
                pid=proc.pid,
                title=_title(proc),
                cpu_s=times.user + times.system,
                create_time=proc.create_time(),
                ours=proc.pid in ours,
            )
            if sample.ours and sample.is_vllm:
                environ = proc.environ()
                sample = replace(
                    sample,
                    num_threads=proc.num_threads(),
                    affinity=tuple(proc.cpu_affinity() or ()),
                    env=tuple((k, environ[k]) for k in _ENV_KEYS if k in environ),
                    threads=tuple(
                        ThreadSample(t.id, t.user_time + t.system_time, _thread_affinity(proc.pid, t.id))
                        for t in proc.threads()
                    ),
                )
            procs[proc.pid] = sample
    return Snapshot(procs)


def _delta(before: Snapshot, after: ProcSample) -> float:
    prior = before.procs.get(after.pid)
    same = prior is not None and prior.create_time == after.create_time
    return after.cpu_s - (prior.cpu_s if same and prior else 0.0)


def phase_cpu(before: Snapshot, after: Snapshot, wall_s: float, top: int = 8) -> dict[str, Any]:
    """CPU seconds spent between the snapshots: ours by process title, and the busiest other processes."""
    ours: dict[str, float] = defaultdict(float)
    others: dict[str, float] = defaultdict(float)
    for sample in after.procs.values():
        (ours if sample.ours else others)[sample.title] += _delta(before, sample)

    def ranked(by_title: dict[str, float]) -> list[dict[str, Any]]:
        rows = sorted(by_title.items(), key=lambda kv: -kv[1])[:top]
        return [{"title": t, "cpu_s": round(s, 2), "cores": round(s / wall_s, 2)} for t, s in rows if s > 0.05]

    return {
        "wall_s": round(wall_s, 2),
        "ours_cpu_s": round(sum(ours.values()), 2),
        "others_cpu_s": round(sum(others.values()), 2),
        "ours_by_process": ranked(ours),
        "busiest_others": ranked(others),
    }


def engine_threads(before: Snapshot, after: Snapshot, wall_s: float) -> list[dict[str, Any]]:
    """Per vLLM process of ours: thread count, affinity, OMP env, and threads busy during the phase."""
    rows = []
    for sample in after.procs.values():
        if not (sample.ours and sample.is_vllm):
            continue
        prior = before.procs.get(sample.pid)
        prior_threads = {t.tid: t.cpu_s for t in prior.threads} if prior else {}
        spent = sorted(((t.cpu_s - prior_threads.get(t.tid, 0.0), t) for t in sample.threads), key=lambda st: -st[0])
        busy = [
            {"tid": t.tid, "cpu_s": round(cpu_s, 2), "cpus_allowed": t.cpus_allowed}
            for cpu_s, t in spent
            if cpu_s > _BUSY * wall_s
        ]
        rows.append(
            {
                "pid": sample.pid,
                "title": sample.title,
                "threads": sample.num_threads,
                "process_affinity": list(sample.affinity),
                "env": dict(sample.env),
                "cpu_s": round(_delta(before, sample), 2),
                "busy_threads": busy,
            }
        )
    return sorted(rows, key=lambda r: str(r["title"]))


def binding_log_lines(paths: list[Path], limit: int = 20) -> list[str]:
    """vLLM's "OpenMP thread binding info" block and related lines, from the given log files."""
    keys = ("OpenMP thread binding", "VLLM_CPU_OMP_THREADS_BIND=", "local_rank=", "reserved_cpus=", "OMP_NUM_THREADS")
    found: list[str] = []
    for path in paths:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if any(k in line for k in keys):
                    found.append(f"{path.name}: {line.strip()[:200]}")
    return found[:limit]


def session_log_files(root_pid: int) -> list[Path]:
    """Log files of the Ray session started under ``root_pid`` (found from its raylet's command line)."""
    for pid in sorted(_tree_pids(root_pid)):
        with contextlib.suppress(psutil.Error, OSError):
            for arg in psutil.Process(pid).cmdline():
                match = re.match(r"--(?:session_dir|session-dir)=(.+)", arg)
                if match:
                    logs = Path(match.group(1)) / "logs"
                    return sorted(p for p in logs.rglob("*") if p.is_file() and p.suffix in (".out", ".err", ".log"))
    return []
