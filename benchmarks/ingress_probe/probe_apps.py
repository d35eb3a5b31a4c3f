"""Trivial Serve ingress deployments for the ingress probe (see probe.py, FINDINGS.md).

Both take a plain starlette ``Request`` in ``__call__`` (no FastAPI ingress), like apps/gateway.py.
Imported by the replicas through PYTHONPATH (probe.py puts this folder on it before ray.init).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

EVENTS = os.environ.get("PROBE_EVENTS", "/tmp/ingress_probe/events.jsonl")


def _replica() -> str:
    return serve.get_replica_context().replica_id.unique_id


def _record(**kw: object) -> None:
    with open(EVENTS, "a") as f:
        f.write(json.dumps({"t": time.time(), **kw}) + "\n")


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class JsonIngress:
    async def __call__(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "ok": True,
                "replica": _replica(),
                "path": request.url.path,
                "root_path": request.scope.get("root_path", ""),
                "client": request.client.host if request.client else None,
                "xff": request.headers.get("x-forwarded-for"),
            }
        )


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class SseIngress:
    async def __call__(self, request: Request) -> StreamingResponse:
        n = int(request.query_params.get("n", "64"))
        delay = float(request.query_params.get("delay", "0"))
        tag = request.query_params.get("tag")

        async def gen():
            i = 0
            outcome = "completed"
            try:
                for i in range(n):
                    if delay:
                        await asyncio.sleep(delay)
                    yield f'data: {{"i": {i}}}\n\n'
            except (asyncio.CancelledError, GeneratorExit) as e:
                outcome = type(e).__name__
                raise
            finally:
                if tag:
                    _record(tag=tag, outcome=outcome, last_i=i, n=n)

        return StreamingResponse(gen(), media_type="text/event-stream")


json_app = JsonIngress.bind()
sse_app = SseIngress.bind()
