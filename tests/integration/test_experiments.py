"""``benchmarks/experiments.ipynb`` executed as a user would run it (nbclient, an IPython kernel of this
environment), on the session's stack: a Ray Tune sweep of two trials, each a private tap of the tiny Llama
with its own engine batch, driven by streamed load; the results file and the plot must exist."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, Stack
from tests.integration.test_private_tap import ENGINE, tiny  # noqa: F401  (tiny: a fixture)

pytestmark = pytest.mark.integration


def test_the_notebook_runs_a_two_trial_sweep_and_plots_the_trade_off(
    stack: Stack,
    tiny: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nbformat
    from nbclient import NotebookClient

    plot, out = tmp_path / "tradeoff.png", tmp_path / "tune_serving.json"
    engine = dict(setting.split("=", 1) for setting in ENGINE[1::2])  # --engine KEY=VALUE pairs
    for name, value in {"LLAMA_ORCH_DATA_DIR": str(stack.data_dir), "TUNE_MODEL": str(tiny),
                        "TUNE_ENGINE": json.dumps(engine), "TUNE_GRID": json.dumps({"max_num_seqs": [2, 8]}),
                        "TUNE_PLOT": str(plot), "TUNE_OUT": str(out), **stack.client_env}.items():  # fmt: skip
        monkeypatch.setenv(name, value)  # the kernel inherits this process's environment
    notebook = nbformat.read(REPO / "benchmarks" / "experiments.ipynb", as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    trials = json.loads(out.read_text())["trials"]
    assert sorted(t["max_num_seqs"] for t in trials) == [2, 8], trials
    for t in trials:
        assert t["errors"] == 0 and t["throughput_tok_s"] > 0 and 0 < t["ttft_p50_ms"] <= t["ttft_p99_ms"], t
        assert t["micro_credits_per_m_tokens"] > 0 and t["gpu_s_per_m_tokens"] > 0, t
    header = plot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (1000, 400)
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "throughput_tok_s" in printed and f"wrote {plot}" in printed  # the table and the plot, as a user sees
