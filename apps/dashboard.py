"""The dashboard: one web page for tenants (balance, holds, grants, usage per day and model, recent
requests, keys) and admins (tenants, apps and their GPUs, spend across tenants, grants).

An app of its own (``/dashboard`` in ``configs/local.yaml``) that serves only the files under
``apps/dashboard_static/``: the page calls the taps' own API from the browser (``/v1/account``,
``/v1/usage``, ``/v1/keys``, ``/admin/...``) with the key it keeps in memory, so the request path of
the taps gains nothing and the dashboard holds no key, no state and no credentials. Every script and
style is served from here; the Content-Security-Policy forbids any other origin, so the page works with
no internet and cannot leak a key to one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.deployment import Application
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from orch.config import DashboardConfig, load_args

STATIC = Path(__file__).with_name("dashboard_static")
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def static_files(config: DashboardConfig) -> dict[str, tuple[bytes, str]]:
    """``{path: (body, content type)}`` of the page: the static files, and ``config.json`` (where the API is)."""
    files = {f"/{f.name}": (f.read_bytes(), TYPES[f.suffix]) for f in sorted(STATIC.iterdir()) if f.suffix in TYPES}
    files["/"] = files["/index.html"]
    files["/config.json"] = (json.dumps({"api_base": config.api_base.rstrip("/")}).encode(), "application/json")
    return files


@serve.deployment(max_ongoing_requests=64)
class Dashboard:
    def __init__(self, args: dict[str, Any]) -> None:
        self._files = static_files(DashboardConfig.model_validate(args))
        self._etags = {
            path: '"' + hashlib.sha256(body).hexdigest()[:16] + '"' for path, (body, _) in self._files.items()
        }

    async def __call__(self, request: Request) -> Response:
        root = request.scope.get("root_path", "")
        path = request.url.path.removeprefix(root)
        if path == "":  # /dashboard: relative links need the trailing slash
            return RedirectResponse(f"{root}/", status_code=308)
        found = self._files.get(path)
        if request.method not in ("GET", "HEAD") or found is None:
            return Response("Not found.", status_code=404, media_type="text/plain", headers=HEADERS)
        body, media_type = found
        etag = self._etags[path]
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={**HEADERS, "etag": etag})
        return Response(body, media_type=media_type, headers={**HEADERS, "etag": etag})


def build(args: dict[str, Any]) -> Application:
    """The dashboard app from validated args (``orch.config.DashboardConfig``)."""
    config: DashboardConfig = load_args(DashboardConfig, args)
    return Dashboard.options(  # type: ignore[attr-defined]
        num_replicas=1, ray_actor_options={"num_cpus": config.num_cpus}
    ).bind(config.model_dump())
