"""State files of the CLI: atomic JSON writes and the read-modify-write lock, across processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orch.files import locked, write_json_atomic

REPO = Path(__file__).resolve().parents[2]

_INCREMENT = """
import json, sys
from pathlib import Path
from orch.files import locked, write_json_atomic
path, who = Path(sys.argv[1]), sys.argv[2]
for i in range(100):
    with locked(path):
        state = json.loads(path.read_text())
        state["count"] += 1
        state["seen"].append(f"{who}{i}")
        write_json_atomic(path, state)
"""


def test_racing_read_modify_writes_under_the_lock_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "up.json"
    write_json_atomic(path, {"count": 0, "seen": []})
    runs = [subprocess.Popen([sys.executable, "-c", _INCREMENT, str(path), who], cwd=REPO) for who in "ab"]
    assert [run.wait(timeout=120) for run in runs] == [0, 0]
    state = json.loads(path.read_text())
    assert state["count"] == 200 and sorted(state["seen"]) == sorted(f"{w}{i}" for w in "ab" for i in range(100))


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "taps.json"
    write_json_atomic(path, {"acme": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"acme": object()})
    assert json.loads(path.read_text()) == {"acme": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["taps.json"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_the_lock_nests_in_one_thread_and_excludes_another_process(tmp_path: Path) -> None:
    path = tmp_path / "taps.json"
    probe = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)"
    )
    with locked(path), locked(path):  # nested: no deadlock
        taken = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "taps.json.lock")], capture_output=True)
        assert taken.returncode != 0 and b"BlockingIOError" in taken.stderr
    free = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "taps.json.lock")], capture_output=True)
    assert free.returncode == 0, free.stderr
