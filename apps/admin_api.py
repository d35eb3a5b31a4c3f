"""Account routes of a tap's gateway: the tenant's own ``GET /v1/account`` and ``GET /v1/usage``, and
the admin API (Bearer admin key): tenants and their policies, keys, grants, accounts, usage, and a tap's keys.

Routes map HTTP to ledger calls and results to HTTP; the money rules live in the ledger.
``apps/gateway.py`` mounts these handlers next to the OpenAI routes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from actors.ledger_client import LedgerClient
from actors.metrics_hub import metrics_hub
from orch.billing import KeyCache, Principal
from orch.control.tapctl import stack_overview
from orch.errors import Conflict, InvalidRequest, NotFound
from orch.ledger import Code, GrantCredits
from orch.metrics import ReplicaReport, UsageMetrics, render
from orch.protocol import (
    CreateKeyBody,
    CreateOwnKeyBody,
    CreateTenantBody,
    GrantBody,
    TenantPolicyBody,
    parse_body,
    parse_usage_query,
)
from orch.store import UsageReport, UsageRow, merge_reports
from orch.store_schema import USAGE_EXPORT_ARROW

Handler = Callable[..., Awaitable[Response]]
BodyReader = Callable[[Request], Awaitable[bytes]]

log = logging.getLogger("ray.serve")

HUB_TIMEOUT_S = 5.0  # a scrape waits this long for the replicas' gauges

TENANT_ID, KEY_ID, TAP = r"(t-[0-9a-f]{12})", r"([a-z2-7]{16})", r"([a-z0-9][a-z0-9-]{0,63})"


class AccountAPI:
    """Handlers of the account and admin routes of the tap ``tap``; ``read_body`` reads a request body
    within the gateway's size limit."""

    def __init__(
        self,
        ledger: LedgerClient,
        keys: KeyCache,
        tap: str,
        read_body: BodyReader,
        flush: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._ledger = ledger
        self._flush = flush  # settles what a tenant's lease has waiting on this replica, before a read
        self._keys = keys
        self._tap = tap
        self._read_body = read_body
        self._hub: Any = None  # the metrics hub's handle, once looked up

    def routes(self) -> list[tuple[str, re.Pattern[str], Handler, str]]:
        """``(method, path pattern, handler, auth)`` of every route here; auth is "tenant" or "admin"."""
        tenant, admin = "tenant", "admin"
        return [
            ("GET", re.compile(r"/v1/account"), self.account, tenant),
            ("GET", re.compile(r"/v1/usage"), self.usage, tenant),
            ("GET", re.compile(r"/v1/keys"), self.own_keys, tenant),
            ("POST", re.compile(r"/v1/keys"), self.create_own_key, tenant),
            ("DELETE", re.compile(rf"/v1/keys/{KEY_ID}"), self.revoke_own_key, tenant),
            ("POST", re.compile(r"/admin/tenants"), self.create_tenant, admin),
            ("GET", re.compile(r"/admin/tenants"), self.list_tenants, admin),
            ("PATCH", re.compile(rf"/admin/tenants/{TENANT_ID}"), self.patch_tenant, admin),
            ("POST", re.compile(rf"/admin/tenants/{TENANT_ID}/keys"), self.create_key, admin),
            ("GET", re.compile(rf"/admin/tenants/{TENANT_ID}/keys"), self.tenant_keys, admin),
            ("GET", re.compile(r"/admin/taps"), self.taps, admin),
            ("DELETE", re.compile(rf"/admin/keys/{KEY_ID}"), self.revoke_key, admin),
            ("DELETE", re.compile(rf"/admin/taps/{TAP}/keys"), self.revoke_tap_keys, admin),
            ("POST", re.compile(rf"/admin/tenants/{TENANT_ID}/grants"), self.grant, admin),
            ("GET", re.compile(rf"/admin/tenants/{TENANT_ID}/account"), self.admin_account, admin),
            ("GET", re.compile(rf"/admin/tenants/{TENANT_ID}/usage"), self.admin_usage, admin),
            ("GET", re.compile(r"/admin/metrics"), self.metrics, admin),
            ("GET", re.compile(r"/admin/usage"), self.all_usage, admin),
            ("GET", re.compile(r"/admin/usage/export"), self.export_usage, admin),
        ]

    async def _settled(self, tenant_id: str) -> None:
        if self._flush is not None:
            try:
                await self._flush(tenant_id)
            except Exception as exc:  # noqa: BLE001  # the read goes on; the batch is retried by its lease
                log.warning("flushing the lease of %s before a read failed: %s", tenant_id, type(exc).__name__)

    async def _account_of(self, tenant_id: str) -> dict[str, Any]:
        await self._settled(tenant_id)
        account: dict[str, Any] | None = await self._ledger.tenant_call(tenant_id, "account", tenant_id)
        if account is None:
            raise NotFound(f"No tenant '{tenant_id}'.", code="tenant_not_found")
        return account

    async def _usage_of(self, request: Request, tenant_id: str) -> Response:
        q = parse_usage_query(dict(request.query_params))
        await self._settled(tenant_id)
        report: UsageReport = await self._ledger.tenant_call(tenant_id, "usage", tenant_id, *q)
        return JSONResponse(usage_json(report, tenant_id, q.since, q.until))

    async def account(self, request: Request, principal: Principal) -> Response:
        return JSONResponse(await self._account_of(principal.tenant_id))

    async def usage(self, request: Request, principal: Principal) -> Response:
        return await self._usage_of(request, principal.tenant_id)

    async def own_keys(self, request: Request, principal: Principal) -> Response:
        """``GET /v1/keys``: the tenant's keys of every tap, revoked ones too (never a secret)."""
        keys = await self._ledger.tenant_call(principal.tenant_id, "list_keys", principal.tenant_id)
        return JSONResponse({"object": "list", "data": keys})

    async def create_own_key(self, request: Request, principal: Principal) -> Response:
        """``POST /v1/keys``: a new key of this tap for the tenant, with the key's own rate limits if asked
        (``rpm``, ``tpm``; the tenant's limits still apply). The raw key is in this answer only."""
        body: CreateOwnKeyBody = parse_body(CreateOwnKeyBody, await self._read_body(request))
        created = await self._ledger.tenant_call(principal.tenant_id, "create_key", principal.tenant_id, self._tap,
                                                 None, body.rpm, body.tpm, self._keys.pepper)  # fmt: skip
        if created is None:
            raise NotFound(f"No tenant '{principal.tenant_id}'.", code="tenant_not_found")
        key_id, raw = created
        return JSONResponse({
            "object": "api_key", "key_id": key_id, "key": raw, "tenant_id": principal.tenant_id, "tap": self._tap,
            "priority": None, "rpm": body.rpm, "tpm": body.tpm,
        })  # fmt: skip

    async def revoke_own_key(self, request: Request, principal: Principal, key_id: str) -> Response:
        """``DELETE /v1/keys/{key_id}``: revokes one of the tenant's own keys (another tenant's is a 404, as
        if it did not exist)."""
        return await self._revoke(key_id, owner=principal.tenant_id)

    async def _revoke(self, key_id: str, owner: str | None = None) -> Response:
        """Revokes the key (of ``owner`` only, when given: another tenant's key is a 404 like a missing one)
        and forgets it on this replica at once; other replicas refuse it within their key cache's ttl."""
        record = await self._ledger.get_key(key_id)
        if record is None or owner not in (None, record.tenant_id):
            raise NotFound(f"No key '{key_id}'.", code="key_not_found")
        await self._ledger.tenant_call(record.tenant_id, "revoke_key", key_id)
        self._keys.forget(key_id)
        return JSONResponse({"object": "api_key", "key_id": key_id, "revoked": True})

    # ---- admin ----

    async def create_tenant(self, request: Request, principal: Principal) -> Response:
        body: CreateTenantBody = parse_body(CreateTenantBody, await self._read_body(request))
        op_id = f"tenant-{body.idempotency_key}" if body.idempotency_key else None
        result = await self._ledger.create_tenant(body.name, op_id)
        if result.code is Code.EXISTS_DIFFERENT:
            raise Conflict("This idempotency_key created another tenant.", param="idempotency_key", code="conflict")
        if not result.ok:
            raise Conflict(f"Tenant not created: {result.code.value}.", code=result.code.value)
        return JSONResponse({"object": "tenant", "tenant_id": result.tenant_id, "name": body.name})

    async def metrics(self, request: Request, principal: Principal) -> Response:
        """``GET /admin/metrics``: the whole stack in Prometheus's text format (``orch/metrics.py``): the
        counters of every ledger shard's committed usage rows, its holds, and every replica's last report
        to the metrics hub. A hub that does not answer leaves the replica gauges out, not the scrape."""
        shards = await asyncio.gather(*(self._ledger.call(s, "metrics", s) for s in range(self._ledger.shards)))
        usage = UsageMetrics()
        for counted, _ in shards:
            usage.merge(counted)
        replicas: list[ReplicaReport] = []
        try:
            self._hub = self._hub or await asyncio.to_thread(metrics_hub)  # a GCS lookup, off the loop
            replicas = await asyncio.wait_for(self._hub.reports.remote(), HUB_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001
            log.warning("the metrics hub did not answer: %s", type(exc).__name__)
            self._hub = None
        text = render(usage, [gauges for _, gauges in shards], replicas)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def all_usage(self, request: Request, principal: Principal) -> Response:
        """``GET /admin/usage``: the report across every tenant (``group_by`` day, model, user or tenant)."""
        q = parse_usage_query(dict(request.query_params))
        reports = await asyncio.gather(*(self._ledger.call(s, "usage", None, *q) for s in range(self._ledger.shards)))
        return JSONResponse(usage_json(merge_reports(reports, q.limit), None, q.since, q.until))

    async def export_usage(self, request: Request, principal: Principal) -> Response:
        """``GET /admin/usage/export?since&until&tenant``: every usage row as one Parquet file (zstd), in
        :data:`~orch.store_schema.USAGE_EXPORT_ARROW`; ``x-row-count`` says how many rows it holds."""
        params = dict(request.query_params)
        tenant = params.pop("tenant", None) or None
        since, until, group_by, _ = parse_usage_query(params)
        if group_by is not None:
            raise InvalidRequest("The export holds every row; group_by is for reports.", param="group_by")
        if tenant is not None:
            if not re.fullmatch(TENANT_ID, tenant):
                raise NotFound(f"No tenant '{tenant[:40]}'.", code="tenant_not_found")
            await self._settled(tenant)
            tables = [await self._ledger.tenant_call(tenant, "usage_table", tenant, since, until)]
        else:
            tables = await asyncio.gather(
                *(self._ledger.call(s, "usage_table", None, since, until) for s in range(self._ledger.shards))
            )
        data, rows = await asyncio.to_thread(parquet_bytes, tables)
        headers = {"content-disposition": 'attachment; filename="usage.parquet"', "x-row-count": str(rows)}
        return Response(data, media_type="application/vnd.apache.parquet", headers=headers)

    async def list_tenants(self, request: Request, principal: Principal) -> Response:
        shards = await asyncio.gather(*(self._ledger.call(s, "tenant_list") for s in range(self._ledger.shards)))
        return JSONResponse({"object": "list", "data": [t for shard in shards for t in shard]})

    async def create_key(self, request: Request, principal: Principal, tenant_id: str) -> Response:
        body: CreateKeyBody = parse_body(CreateKeyBody, await self._read_body(request))
        tap = body.tap or self._tap
        created = await self._ledger.tenant_call(tenant_id, "create_key", tenant_id, tap, body.priority, body.rpm,
                                                 body.tpm, self._keys.pepper)  # fmt: skip
        if created is None:
            raise NotFound(f"No tenant '{tenant_id}'.", code="tenant_not_found")
        key_id, raw = created
        return JSONResponse({
            "object": "api_key", "key_id": key_id, "key": raw, "tenant_id": tenant_id, "tap": tap,
            "priority": body.priority, "rpm": body.rpm, "tpm": body.tpm,
        })  # fmt: skip

    async def tenant_keys(self, request: Request, principal: Principal, tenant_id: str) -> Response:
        await self._account_of(tenant_id)  # a 404 for an unknown tenant
        keys = await self._ledger.tenant_call(tenant_id, "list_keys", tenant_id)
        return JSONResponse({"object": "list", "data": keys})

    async def taps(self, request: Request, principal: Principal) -> Response:
        """``GET /admin/taps``: every Serve app of the stack, its deployments' replicas, and the GPU groups
        its replicas hold (``orch/control/tapctl.py``: what ``llama-orch tap list`` shows)."""
        return JSONResponse(await asyncio.to_thread(stack_overview))

    async def patch_tenant(self, request: Request, principal: Principal, tenant_id: str) -> Response:
        """Sets the tenant's priority class, fair-share weight and rate limits; gateways see the change
        within their key cache's ttl."""
        body: TenantPolicyBody = parse_body(TenantPolicyBody, await self._read_body(request))
        policy = await self._ledger.tenant_call(tenant_id, "patch_tenant", tenant_id, body.changes())
        if policy is None:
            raise NotFound(f"No tenant '{tenant_id}'.", code="tenant_not_found")
        self._keys.forget_tenant(tenant_id)  # this replica at once
        return JSONResponse({"object": "tenant_policy", "tenant_id": tenant_id, **policy})

    async def revoke_key(self, request: Request, principal: Principal, key_id: str) -> Response:
        return await self._revoke(key_id)

    async def revoke_tap_keys(self, request: Request, principal: Principal, tap: str) -> Response:
        """Revokes every key of ``tap`` on every shard (``tap delete``: a reused name gets no old keys)."""
        counts = await asyncio.gather(
            *(self._ledger.call(s, "revoke_tap_keys", tap) for s in range(self._ledger.shards))
        )
        self._keys.forget_tap(tap)  # this replica at once; others within the key cache's ttl
        return JSONResponse({"object": "tap_keys", "tap": tap, "revoked": sum(counts)})

    async def grant(self, request: Request, principal: Principal, tenant_id: str) -> Response:
        body: GrantBody = parse_body(GrantBody, await self._read_body(request))
        op = GrantCredits(f"grant-{body.idempotency_key}", tenant_id, body.micro_credits)
        result = await self._ledger.apply(tenant_id, op)
        if result.code is Code.TENANT_NOT_FOUND:
            raise NotFound(f"No tenant '{tenant_id}'.", code="tenant_not_found")
        if result.code is Code.EXISTS_DIFFERENT:
            raise Conflict("This idempotency_key was used for another grant.", param="idempotency_key", code="conflict")
        if not result.ok:
            raise InvalidRequest(f"Grant refused: {result.code.value}.", code=result.code.value)
        expires = result.expires_at.isoformat() if result.expires_at else None
        return JSONResponse({
            "object": "grant", "grant_id": op.op_id, "tenant_id": tenant_id, "micro_credits": result.micro_credits,
            "granted_at": result.at.isoformat(), "expires_at": expires, "replayed": result.code is Code.EXISTS,
        })  # fmt: skip

    async def admin_account(self, request: Request, principal: Principal, tenant_id: str) -> Response:
        return JSONResponse(await self._account_of(tenant_id))

    async def admin_usage(self, request: Request, principal: Principal, tenant_id: str) -> Response:
        await self._account_of(tenant_id)
        return await self._usage_of(request, tenant_id)


def parquet_bytes(tables: list[pa.Table]) -> tuple[bytes, int]:
    """One Parquet file (zstd) of the shards' tables, in time order, and its row count."""
    table = pa.concat_tables(tables) if tables else USAGE_EXPORT_ARROW.empty_table()
    if len(tables) > 1:
        table = table.sort_by([("ts", "ascending"), ("request_id", "ascending")])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes(), table.num_rows


def usage_json(
    report: UsageReport, tenant_id: str | None, since: datetime | None, until: datetime | None
) -> dict[str, Any]:
    t = report.totals
    rows: list[dict[str, Any]] = []
    for r in report.rows:
        d = r._asdict() if isinstance(r, UsageRow) else dataclasses.asdict(r)
        if isinstance(r, UsageRow):
            d["ts"] = r.ts.isoformat()
        elif report.group_by == "day_model":
            d["day"], d["model"] = r.key.split(" ", 1)
        rows.append(d)
    return {
        "object": "usage",
        "tenant_id": tenant_id,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "group_by": report.group_by,
        "totals": {
            "requests": t.requests,
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
            "cost_micro_credits": t.cost_micro,
        },
        "data": rows,
    }
