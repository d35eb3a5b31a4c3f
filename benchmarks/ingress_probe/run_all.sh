#!/usr/bin/env bash
# Two rounds (the second in reverse order) of probe.py over the four modes, one fresh process (and Ray)
# per run; results in /tmp/ingress_probe/result-<mode>-r<round>.json, summarized by summarize.py.
set -u
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
modes=(default direct haproxy haproxy_deb)
for r in 1 2; do
  if [ "$r" = 2 ]; then modes=(haproxy_deb haproxy direct default); fi
  for m in "${modes[@]}"; do
    echo "=== round $r $m $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    PROBE_TAG="-r$r" timeout 170 $PY benchmarks/ingress_probe/probe.py "$m" 2>&1 | grep -E "^($m|wrote)|Error|error" | cut -c1-400
  done
done
