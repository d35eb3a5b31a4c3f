"""Ingress caveats that probe.py doesn't cover (one case per process, see FINDINGS.md):

ctrlopt_haproxy   RAY_SERVE_ENABLE_HA_PROXY=1 given only to the controller
                  (serve_start(controller_options={"runtime_env": {"env_vars": ...}})), not to the
                  process that starts Ray: which processes see it, and what serves :18000?
ctrlopt_direct    same with RAY_SERVE_ENABLE_DIRECT_INGRESS=1
portclash         HAProxy mode while the HAProxy metrics port (here 19101) is already taken
                  (as it would be by a 2nd HAProxy-mode stack on the same machine: 9101/8404/8500
                  are fixed per machine, not per stack)
noshutdown        HAProxy mode, then ray.shutdown() of the head WITHOUT serve.shutdown() (what a SIGTERM'd or
                  crashed head does): is the haproxy child process left behind holding the port?
drain_default     direct ingress with the default RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S
                  (30 s): time of serve.delete of a 1-replica app, and of serve.shutdown()

.venv/bin/python benchmarks/ingress_probe/probe_caveats.py <case>
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from probe_ports import probe_env  # this folder: run as a script (see above)

HERE = Path(__file__).resolve().parent

CASE = sys.argv[1]
PORT = 18000
TMP = Path("/tmp/ingress_probe")
HAP_DIR = TMP / "hap"
env = {
    **probe_env(HAP_DIR),
    "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
}
controller_env: dict[str, str] = {}
if CASE == "ctrlopt_haproxy":
    controller_env = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
elif CASE == "ctrlopt_direct":
    controller_env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
elif CASE == "portclash":
    env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "2"
elif CASE == "drain_default":
    env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
elif CASE == "noshutdown":
    env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "2"
else:
    sys.exit(f"unknown case {CASE}")
os.environ.update(env)

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve._private import api as serve_api  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

CONFIG = {
    "proxy_location": "HeadOnly",
    "http_options": {"host": "127.0.0.1", "port": PORT},
    "applications": [
        {"name": "json", "route_prefix": "/json", "import_path": "probe_apps:json_app"},
        {
            "name": "multi",
            "route_prefix": "/private/x/v1",
            "import_path": "probe_apps:json_app",
            "deployments": [{"name": "JsonIngress", "num_replicas": 2}],
        },  # fmt: skip
    ],
}


@ray.remote(num_cpus=0)
def flags_in_a_worker() -> dict:
    from ray.serve._private import constants as c

    return {"DIRECT": c.RAY_SERVE_ENABLE_DIRECT_INGRESS, "HA": c.RAY_SERVE_ENABLE_HA_PROXY}


def listening(ports: set[int]) -> list[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    keep = []
    for ln in out:
        f = ln.split()
        if len(f) > 3 and f[3].rsplit(":", 1)[-1].isdigit() and int(f[3].rsplit(":", 1)[-1]) in ports:
            keep.append(f[3] + " " + (f[5].split('"')[1] if len(f) > 5 and '"' in f[5] else ""))
    return sorted(keep)


def main() -> None:
    res: dict = {"case": CASE, "process_env": {k: v for k, v in env.items() if "ENABLE" in k or "DRAIN" in k},
                 "controller_env": controller_env}  # fmt: skip
    blocker = None
    if CASE == "portclash":
        blocker = socket.socket()
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("0.0.0.0", 19101))
        blocker.listen()
    t0 = time.monotonic()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        schema = ServeDeploySchema.model_validate(CONFIG)
        client = serve_api.serve_start(
            http_options=schema.http_options.model_dump(),
            proxy_location=schema.proxy_location,
            controller_options={"runtime_env": {"env_vars": controller_env}} if controller_env else None,
        )
        client.deploy_apps(schema, _blocking=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = serve.status()
            if all(a in st.applications and st.applications[a].status == "RUNNING" for a in ("json", "multi")):
                break
            time.sleep(0.5)
        st = serve.status()
        res["app_status"] = {k: str(v.status) for k, v in st.applications.items()}
        res["apps_after_s"] = round(time.monotonic() - t0, 1)
        ctrl = client._controller
        res["flags_in_plain_worker"] = ray.get(flags_in_a_worker.remote())
        details = ray.get(ctrl.get_serve_instance_details.remote())
        res["proxies"] = [
            v.get("actor_name", "")[:40] + " " + str(v.get("status")) for v in details.get("proxies", {}).values()
        ]
        tgs = ray.get(ctrl.get_target_groups.remote(from_proxy_manager=True))
        res["target_groups"] = [
            (tg.app_name, tg.route_prefix, [(t.ip, t.port, t.name[-8:]) for t in tg.targets]) for tg in tgs
        ]
        time.sleep(3)
        res["listening"] = listening({PORT, 18500, 19101, 18404} | set(range(32100, 32200)))
        out = {}
        for path in ("/json", "/private/x/v1/a"):
            try:
                r = httpx.get(f"http://127.0.0.1:{PORT}{path}", timeout=5)
                out[path] = [r.status_code, r.text[:120]]
            except httpx.HTTPError as e:
                out[path] = repr(e)
        res["front"] = out
        hp = subprocess.run(["pgrep", "-a", "haproxy"], capture_output=True, text=True).stdout.splitlines()
        res["haproxy_procs"] = [h for h in hp if str(HAP_DIR) in h]
        logs = (
            sorted(HAP_DIR.glob("*/admin.sock.*.stderr.log"), key=lambda p: p.stat().st_mtime)[-3:]
            if CASE == "portclash"
            else []
        )
        res["haproxy_stderr_tail"] = [ln for p in logs for ln in p.read_text().splitlines() if "ALERT" in ln][-6:]
        if CASE == "drain_default":
            t = time.monotonic()
            serve.delete("json")
            res["serve_delete_1_replica_app_s"] = round(time.monotonic() - t, 1)
    finally:
        t = time.monotonic()
        if CASE == "noshutdown":
            ray.shutdown()
            time.sleep(3)
            hp = subprocess.run(["pgrep", "-a", "haproxy"], capture_output=True, text=True).stdout.splitlines()
            left = [h for h in hp if str(HAP_DIR) in h]
            res["haproxy_left_after_ray_shutdown"] = left
            res["port_18000_after_ray_shutdown"] = listening({PORT, 19101, 18404})
            for h in left:  # ours: end them by pid
                os.kill(int(h.split()[0]), 15)
        else:  # (never serve.shutdown() after ray.shutdown(): it would auto-connect to the newest cluster here)
            serve.shutdown()
        res["serve_shutdown_s"] = round(time.monotonic() - t, 1)
        if ray.is_initialized():
            ray.shutdown()
        if blocker:
            blocker.close()
        res["total_s"] = round(time.monotonic() - t0, 1)
        (TMP / f"caveat-{CASE}.json").write_text(json.dumps(res, indent=1, default=str))
        print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
