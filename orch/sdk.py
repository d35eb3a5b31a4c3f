"""The Python SDK of a tap: inference is the official ``openai`` client, configured for the tap and
exposed as it is (``client.openai``, and ``client.chat``, ``client.completions``, ``client.embeddings``,
``client.models`` as shortcuts); on top, the tap's own routes: the account, usage (rows, or a pyarrow
table), the tenant's keys, and for admins :class:`AdminClient` (tenants, keys, grants, taps, usage).

Errors are the ``openai`` package's, with two of them typed further: a 402 raises
:class:`InsufficientCredits` (``hold_micro_credits``: what the request had to hold,
``balance_micro_credits``: what was free), a 429 raises :class:`RateLimited` (``retry_after``, seconds).
Both are subclasses of the ``openai`` errors a caller may already catch.

The examples need a running stack: the unit run skips them, ``tests/integration/test_sdk.py`` runs them
against the session's stack (``BASE``: its URL, ``ADMIN_KEY``: its admin key)::

>>> from orch.sdk import AdminClient, Client, InsufficientCredits
>>> admin = AdminClient(BASE, ADMIN_KEY)  # doctest: +SKIP
>>> tenant = admin.create_tenant("docs")["tenant_id"]  # doctest: +SKIP
>>> admin.grant(tenant, 1_000, idempotency_key=f"{tenant}-welcome")["micro_credits"]  # doctest: +SKIP
1000
>>> tap = Client(BASE, admin.create_key(tenant)["key"])  # doctest: +SKIP
>>> reply = tap.chat.completions.create(model="smollm2-135m-instruct", max_tokens=8, temperature=0,
...     messages=[{"role": "user", "content": "What is the capital of France?"}])  # doctest: +SKIP
>>> "Paris" in reply.choices[0].message.content  # doctest: +SKIP
True
>>> tap.account()["balance_micro_credits"] < 1_000  # held or spent: the request's cost  # doctest: +SKIP
True
>>> try:  # a worst case of 31 prompt + 2,000 completion tokens (4,031 µc) does not fit in 1,000 µc
...     tap.chat.completions.create(model="smollm2-135m-instruct", max_tokens=2000,
...                                 messages=[{"role": "user", "content": "Hi"}])
... except InsufficientCredits as exc:
...     print(exc.status_code, exc.hold_micro_credits > exc.balance_micro_credits)  # doctest: +SKIP
402 True
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import openai
import pyarrow as pa

T = TypeVar("T")


class InsufficientCredits(openai.APIStatusError):
    """402: the request's worst case did not fit the tenant's free credit (``insufficient_quota``)."""

    def __init__(self, message: str, *, response: Any, body: object) -> None:
        super().__init__(message, response=response, body=body)
        fields = body if isinstance(body, dict) else {}
        self.hold_micro_credits: int | None = fields.get("hold_micro_credits")
        self.balance_micro_credits: int | None = fields.get("balance_micro_credits")


class RateLimited(openai.RateLimitError):
    """429: a rate limit, or a saturated model's queue; ``retry_after`` in seconds (None if not said)."""

    def __init__(self, message: str, *, response: Any, body: object) -> None:
        super().__init__(message, response=response, body=body)
        raw = response.headers.get("retry-after")
        self.retry_after: float | None = float(raw) if raw and raw.replace(".", "", 1).isdigit() else None


def _typed_error(message: str, body: object, response: Any) -> openai.APIStatusError | None:
    data = body.get("error", body) if isinstance(body, dict) else body
    if response.status_code == 402:
        return InsufficientCredits(message, response=response, body=data)
    if response.status_code == 429:
        return RateLimited(message, response=response, body=data)
    return None


class TapOpenAI(openai.OpenAI):
    """The official client, raising :class:`InsufficientCredits` and :class:`RateLimited`."""

    def _make_status_error(self, err_msg: str, *, body: object, response: Any) -> openai.APIStatusError:
        return _typed_error(err_msg, body, response) or super()._make_status_error(
            err_msg, body=body, response=response
        )


class AsyncTapOpenAI(openai.AsyncOpenAI):
    """The official async client, raising :class:`InsufficientCredits` and :class:`RateLimited`."""

    def _make_status_error(self, err_msg: str, *, body: object, response: Any) -> openai.APIStatusError:
        return _typed_error(err_msg, body, response) or super()._make_status_error(
            err_msg, body=body, response=response
        )


def tap_url(base_url: str, tap: str | None = None) -> str:
    """The root of a tap's routes: the stack's URL, or a private tap's under it.

    >>> tap_url("http://127.0.0.1:8000/"), tap_url("http://127.0.0.1:8000", "acme")
    ('http://127.0.0.1:8000', 'http://127.0.0.1:8000/private/acme')
    """
    root = base_url.rstrip("/").removesuffix("/v1")
    return f"{root}/private/{tap}" if tap else root


def usage_table(report: dict[str, Any]) -> pa.Table:
    """The requests of a usage report (``GET /v1/usage`` ungrouped) as a table in the export's schema.

    >>> row = {"request_id": "r1", "ts": "2026-11-28T10:00:00+00:00", "tenant_id": "t-1", "key_id": None,
    ...        "tap": "public", "model": "m", "prompt_tokens": 3, "completion_tokens": 2, "cost_micro": 7,
    ...        "ttft_ms": 5, "latency_ms": 9, "status": "ok", "finish_reason": "stop"}
    >>> usage_table({"group_by": None, "data": [row]}).column("cost_micro").to_pylist()
    [7]
    """
    from datetime import datetime

    from orch.store_schema import USAGE_EXPORT_ARROW

    if report.get("group_by"):
        raise ValueError("a table holds requests; ask for usage without group_by")
    rows = [
        {**r, "ts": datetime.fromisoformat(r["ts"])} | {f: r.get(f) for f in ("end_user", "http_request_id")}
        for r in report["data"]
    ]
    return pa.Table.from_pylist(rows, schema=USAGE_EXPORT_ARROW)


def _usage_query(since: str | None, until: str | None, group_by: str | None, limit: int | None) -> dict[str, Any]:
    """The query of a usage report: the parameters given."""
    given = {"since": since, "until": until, "group_by": group_by, "limit": limit}
    return {name: value for name, value in given.items() if value}


class _Routes:
    """The tap's own routes, once for both clients: each builds a call and shapes its answer; ``_call``
    runs it (at once in :class:`Client`, as an awaitable in :class:`AsyncClient`)."""

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              params: dict[str, Any] | None = None, shape: Callable[[Any], Any] = lambda x: x) -> Any:  # fmt: skip
        raise NotImplementedError

    def account(self) -> Any:
        """The tenant's balance, open holds, grants (with what is left and expiry) and policy."""
        return self._call("get", "/v1/account")

    def usage(self, since: str | None = None, until: str | None = None, group_by: str | None = None,
              limit: int | None = None, as_table: bool = False) -> Any:  # fmt: skip
        """The usage report (``group_by``: day, model, user, day_model; else the latest ``limit`` requests);
        ``as_table``: the requests as a pyarrow table in the export's schema."""
        params = _usage_query(since, until, group_by, limit)
        return self._call("get", "/v1/usage", params=params, shape=usage_table if as_table else lambda x: x)

    def keys(self) -> Any:
        """The tenant's keys of every tap, revoked ones too (ids, dates, limits; never a secret)."""
        return self._call("get", "/v1/keys", shape=lambda x: x["data"])

    def create_key(self, rpm: int | None = None, tpm: int | None = None) -> Any:
        """A new key of this tap; its raw ``key`` is in this answer only."""
        return self._call("post", "/v1/keys", body={"rpm": rpm, "tpm": tpm})

    def revoke_key(self, key_id: str) -> Any:
        return self._call("delete", f"/v1/keys/{key_id}")


class _AdminRoutes(_Routes):
    def tenants(self) -> Any:
        return self._call("get", "/admin/tenants", shape=lambda x: x["data"])

    def create_tenant(self, name: str, idempotency_key: str | None = None) -> Any:
        """A new tenant (with ``idempotency_key``, a retry returns the same one); its id is ``tenant_id``."""
        return self._call("post", "/admin/tenants", body={"name": name, "idempotency_key": idempotency_key})

    def create_key(  # type: ignore[override]
        self, tenant_id: str, tap: str | None = None, priority: str | None = None, rpm: int | None = None,
        tpm: int | None = None,
    ) -> Any:  # fmt: skip
        body = {"tap": tap, "priority": priority, "rpm": rpm, "tpm": tpm}
        return self._call("post", f"/admin/tenants/{tenant_id}/keys", body=body)

    def keys(self, tenant_id: str) -> Any:  # type: ignore[override]
        return self._call("get", f"/admin/tenants/{tenant_id}/keys", shape=lambda x: x["data"])

    def revoke_key(self, key_id: str) -> Any:
        return self._call("delete", f"/admin/keys/{key_id}")

    def grant(self, tenant_id: str, micro_credits: int, idempotency_key: str) -> Any:
        """Grants credit valid 12 months; a retry with the same ``idempotency_key`` is applied once."""
        body = {"micro_credits": micro_credits, "idempotency_key": idempotency_key}
        return self._call("post", f"/admin/tenants/{tenant_id}/grants", body=body)

    def account(self, tenant_id: str) -> Any:  # type: ignore[override]
        return self._call("get", f"/admin/tenants/{tenant_id}/account")

    def usage(  # type: ignore[override]
        self, tenant_id: str | None = None, since: str | None = None, until: str | None = None,
        group_by: str | None = None, limit: int | None = None, as_table: bool = False,
    ) -> Any:  # fmt: skip
        """One tenant's usage report, or (``tenant_id`` None) the report across every tenant."""
        params = _usage_query(since, until, group_by, limit)
        path = f"/admin/tenants/{tenant_id}/usage" if tenant_id else "/admin/usage"
        return self._call("get", path, params=params, shape=usage_table if as_table else lambda x: x)

    def taps(self) -> Any:
        """Every app of the stack with its replicas and GPU groups (``data``), and each node's GPUs (``nodes``)."""
        return self._call("get", "/admin/taps")


def _send_args(method: str, body: dict[str, Any] | None, params: dict[str, Any] | None) -> dict[str, Any]:
    """What the ``openai`` client's low-level ``get``/``post``/``delete`` take for one call of a route:
    the JSON answered as is, the query of a GET, the body (its None fields left out) of the others."""
    if method == "get":
        return {"cast_to": object, "options": {"params": params} if params else {}}
    return {"cast_to": object, "body": {k: v for k, v in (body or {}).items() if v is not None}}


class _Sync:
    openai: TapOpenAI

    def __init__(self, base_url: str, api_key: str, tap: str | None = None, **openai_options: Any) -> None:
        self.base_url = tap_url(base_url, tap)
        self.openai = TapOpenAI(base_url=self.base_url + "/v1", api_key=api_key, **openai_options)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              params: dict[str, Any] | None = None, shape: Callable[[Any], Any] = lambda x: x) -> Any:  # fmt: skip
        # The URL is absolute: the admin routes sit beside /v1.
        return shape(getattr(self.openai, method)(self.base_url + path, **_send_args(method, body, params)))

    def close(self) -> None:
        self.openai.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Async:
    openai: AsyncTapOpenAI

    def __init__(self, base_url: str, api_key: str, tap: str | None = None, **openai_options: Any) -> None:
        self.base_url = tap_url(base_url, tap)
        self.openai = AsyncTapOpenAI(base_url=self.base_url + "/v1", api_key=api_key, **openai_options)

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        shape: Callable[[Any], Any] = lambda x: x,
    ) -> Awaitable[Any]:
        sent = getattr(self.openai, method)(self.base_url + path, **_send_args(method, body, params))

        async def call() -> Any:
            return shape(await sent)

        return call()

    async def close(self) -> None:
        await self.openai.close()

    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Inference:
    """The official client's inference resources, as attributes of the tap client."""

    openai: Any

    @property
    def chat(self) -> Any:
        return self.openai.chat

    @property
    def completions(self) -> Any:
        return self.openai.completions

    @property
    def embeddings(self) -> Any:
        return self.openai.embeddings

    @property
    def models(self) -> Any:
        return self.openai.models


class Client(_Sync, _Inference, _Routes):
    """A tenant's client of a tap: ``Client(base_url, api_key, tap=None, **openai_options)``; ``tap``: a
    private tap's client name (None: the public tap); ``openai_options`` go to the ``openai`` client
    (``timeout``, ``max_retries``, ...)."""


class AsyncClient(_Async, _Inference, _Routes):
    """:class:`Client` for asyncio: the same methods, awaited."""


class AdminClient(_Sync, _AdminRoutes):
    """The stack's admin API with the admin key: tenants, keys, grants, accounts, usage, taps."""

    def __init__(self, base_url: str, admin_key: str, **openai_options: Any) -> None:
        super().__init__(base_url, admin_key, None, **openai_options)
