from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_up_with_a_typo_fails_fast_with_one_line(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    config["applications"][0]["args"]["modles"] = config["applications"][0]["args"].pop("models")
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "orch.cli", "--data-dir", str(tmp_path), "up", "--config", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "applications[0].args.modles" in lines[0]
    assert not (tmp_path / "cluster.json").exists()  # nothing was started


def test_status_without_a_cluster(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "orch.cli", "--data-dir", str(tmp_path), "status"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 1 and "no llama-orch cluster" in proc.stdout


def test_module_entry_point_parses_every_command() -> None:
    import subprocess
    import sys

    for args in (["--help"], ["tap", "create", "--help"], ["credits", "grant", "--help"], ["usage", "--help"]):
        done = subprocess.run([sys.executable, "-m", "orch.cli", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "usage: llama-orch" in done.stdout
