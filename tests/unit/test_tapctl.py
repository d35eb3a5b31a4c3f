"""Private-tap control, pure parts: the Serve config a tap becomes, and capacity checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ray.serve.schema import ServeDeploySchema

from apps.private_tap import build, tap_config
from orch.capacity import Capacity, InsufficientGPUs, NodeGPUs
from orch.config import ConfigError
from orch.control.tapctl import check_capacity, desired_config, load_taps, tap_application
from orch.serve_config import load_serve_config
from orch.tapspec import TapSpec

REPO = Path(__file__).resolve().parents[2]


def one_node(total: int, free: int) -> Capacity:
    return Capacity((NodeGPUs("n1", "127.0.0.1", total, free),))


def test_capacity_refuses_in_one_line_and_clamps_max_replicas() -> None:
    spec = TapSpec(client="acme", model="m", gpus=4, min_replicas=1, max_replicas=3)
    with pytest.raises(InsufficientGPUs, match=r"^needs 4 GPUs, 2 free of 8 on 1 node$"):
        check_capacity(spec, one_node(8, 2))
    assert check_capacity(spec, one_node(8, 8)) == (2, "max_replicas 3 -> 2: only 2 groups of 4 GPUs fit now")
    assert check_capacity(spec, one_node(16, 16)) == (3, None)
    # A scale keeps the groups the tap holds: 1 held + 0 free still fits min 1.
    assert check_capacity(spec, one_node(8, 0), held_by_tap=1)[0] == 1
    scale_to_zero = TapSpec(client="z", model="m", gpus=1, min_replicas=0, max_replicas=1)
    assert check_capacity(scale_to_zero, one_node(8, 1)) == (1, None)


def test_a_tap_becomes_one_serve_app_next_to_the_base_config() -> None:
    base = load_serve_config(REPO / "configs" / "local.yaml")
    spec = TapSpec(client="acme", model="org/model", gpus=2, max_replicas=2)
    hidden = TapSpec(client="lab", model="org/model", gpus=1, openai_gateway=False)
    taps = {"acme": {"spec": spec.model_dump(mode="json")}, "lab": {"spec": hidden.model_dump(mode="json")}}
    config = desired_config(base, taps)
    names = [(a["name"], a["route_prefix"]) for a in config["applications"]]
    assert names == [("public", "/"), ("dashboard", "/dashboard"), ("private-acme", "/private/acme"),
                     ("private-lab", None)]  # fmt: skip
    ServeDeploySchema.model_validate(config)  # what `serve deploy` and `tap create` send
    assert desired_config(config, {})["applications"] == base["applications"]  # deleting removes it
    assert TapSpec.model_validate(tap_application(spec)["args"]) == spec


def test_private_tap_config_and_builder() -> None:
    spec = TapSpec(client="acme", model="default", gpus=4, min_replicas=0, max_replicas=2, billing="credits")
    config = tap_config(spec)
    assert config.tap == "private-acme" and config.billing == "credits"
    model = config.models[0]
    assert (model.gpus, model.autoscaling.min_replicas, model.autoscaling.max_replicas) == (4, 0, 2)
    app = build(spec.model_dump(mode="json"))
    assert type(app).__name__ == "Application"
    assert type(build({**spec.model_dump(mode="json"), "openai_gateway": False})).__name__ == "Application"


def test_example_config_validates_and_typos_fail_in_one_line(tmp_path: Path) -> None:
    config = load_serve_config(REPO / "configs" / "private_tap.example.yaml")
    assert [a["name"] for a in config["applications"]] == ["public", "private-acme"]
    bad = (REPO / "configs" / "private_tap.example.yaml").read_text().replace("gpus: 2", "gpus: 3")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(ConfigError, match=r"applications\[1\]\.args\.gpus"):
        load_serve_config(tmp_path / "bad.yaml")


def test_a_private_tap_routes_tenants_to_the_stacks_ledger_shards() -> None:
    base = load_serve_config(REPO / "configs" / "local.yaml")
    base["applications"][0]["args"]["ledger_shards"] = 4
    spec = TapSpec(client="acme", model="org/model", gpus=1, billing="credits")
    apps = desired_config(base, {"acme": {"spec": spec.model_dump(mode="json")}})["applications"]
    private = next(a for a in apps if a["name"] == "private-acme")
    assert private["args"]["ledger_shards"] == 4
    assert tap_config(TapSpec.model_validate(private["args"])).ledger_shards == 4  # what its gateway uses
    other = spec.model_copy(update={"ledger_shards": 2})
    with pytest.raises(ValueError, match="ledger_shards 2; the stack runs 4"):
        desired_config(base, {"acme": {"spec": other.model_dump(mode="json")}})


_ADD_TAPS = """
import sys
from pathlib import Path
from orch.control.tapctl import load_taps, save_taps, taps_lock
root, who = Path(sys.argv[1]), sys.argv[2]
for i in range(40):
    with taps_lock(root):  # what `tap create` holds from load to save
        taps = load_taps(root)
        taps[f"{who}-{i}"] = {"spec": {"client": f"{who}-{i}"}}
        save_taps(root, taps)
"""


def test_two_cli_runs_adding_taps_at_once_lose_none(tmp_path: Path) -> None:
    runs = [
        subprocess.Popen([sys.executable, "-c", _ADD_TAPS, str(tmp_path), who], cwd=REPO) for who in ("a", "b", "c")
    ]
    assert [run.wait(timeout=120) for run in runs] == [0, 0, 0]
    assert sorted(load_taps(tmp_path)) == sorted(f"{who}-{i}" for who in "abc" for i in range(40))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taps.json", "taps.json.lock"]  # no temp file left
