"""Where the probes put Serve's ingress ports and HAProxy files: off every Serve default, so a probe never
collides with a stack running on the same machine (shared by probe.py and probe_caveats.py)."""

from __future__ import annotations

from pathlib import Path


def probe_env(hap_dir: Path) -> dict[str, str]:
    return {
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "32100",
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "32200",
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": "42100",
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": "42200",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": "18500",
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": "19500",
        "RAY_SERVE_HAPROXY_METRICS_PORT": "19101",
        "RAY_SERVE_HAPROXY_STATS_PORT": "18404",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(hap_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(hap_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(hap_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(hap_dir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(hap_dir / "metrics.sock"),
    }
