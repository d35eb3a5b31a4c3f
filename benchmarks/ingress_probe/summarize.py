"""Markdown table of /tmp/ingress_probe/result-<mode>-r<round>.json (run_all.sh), plus the caveat fields."""

import json
import sys
from pathlib import Path

TMP = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ingress_probe")
rows = []
print(
    "| mode | endpoint | round | JSON p50 | JSON p99 | SSE TTFC p50 | SSE TTFC p99 | SSE total p50 | SSE total p99 | reads/SSE resp |"
)
print("|---|---|---|---|---|---|---|---|---|---|")
for mode in ("default", "direct", "haproxy", "haproxy_deb"):
    for rnd in (1, 2):
        f = TMP / f"result-{mode}-r{rnd}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        for ep, b in r["bench"].items():
            j, s = b["json"], b["sse"]
            print(
                f"| {mode} | {ep} | {rnd} | {j['p50_ms']} | {j['p99_ms']} | {s['ttfc']['p50_ms']} | {s['ttfc']['p99_ms']} "
                f"| {s['total']['p50_ms']} | {s['total']['p99_ms']} | {s['reads_per_response_median']:.0f} |"
            )
print()
for mode in ("default", "direct", "haproxy", "haproxy_deb"):
    f = TMP / f"result-{mode}-r1.json"
    if f.exists():
        r = json.loads(f.read_text())
        c = r["caveats"]
        keep = {
            k: v
            for k, v in c.items()
            if "client_seen" in k or "spread" in k or "disconnect" in k or "stream_timing" in k
        }
        print(mode, json.dumps({"listening": r.get("listening"), "version": r.get("haproxy_version"), **keep}))
