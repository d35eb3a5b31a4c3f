"""The OpenAI-compatible ingress of a tap: routes map HTTP to calls, results and errors back to HTTP.

OpenAI routes (Bearer key of this tap): ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/chat/completions``, ``POST /v1/completions``; the tenant's own ``GET /v1/account`` and
``GET /v1/usage``. Admin routes (Bearer admin key): ``/admin/tenants``, keys, grants, accounts, usage.
``GET /health`` is open.

A completion is admitted by a hold of its worst-case cost, committed in the tenant's ledger before
the request reaches an engine (402 when the balance can't cover it); it streams from the model
deployment through a streaming ``DeploymentHandle``; and it is settled with the engine's exact token
counts when it finishes, fails or the client goes away, the usage row in the settle's transaction.
The gateway waits for the first delta before answering, so a bad request or a failed engine still
gets its own status instead of a broken 200 stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from actors.ledger import LedgerClient, LedgerUnavailable
from orch.billing import KeyCache, Principal, PromptLimits, bearer_token, hold_amount, prompt_token_bound
from orch.config import TapConfig, data_dir
from orch.engine import Delta, GenerationRequest
from orch.errors import (
    APIError,
    Conflict,
    EngineUnavailable,
    Forbidden,
    InsufficientCredits,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
)
from orch.keys import load_or_create_admin_key
from orch.ledger import Code, GrantCredits, Hold, Price, Release, Result, Settle, cost
from orch.protocol import (
    ChatCompletionRequest,
    ChunkWriter,
    CompletionRequest,
    CreateKeyBody,
    CreateTenantBody,
    GrantBody,
    chat_completion,
    new_id,
    parse_body,
    parse_request,
    parse_usage_query,
    text_completion,
)
from orch.store import UsageReport, UsageRow

log = logging.getLogger("ray.serve")

Handler = Callable[..., Awaitable[Response]]


def api_error(exc: BaseException) -> APIError:
    """The OpenAI-shaped error for any exception: API errors as raised, engine/Ray failures as 503."""
    if isinstance(exc, RayTaskError):
        exc = exc.cause if exc.cause is not None else exc
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, LedgerUnavailable):
        return EngineUnavailable("Billing is unavailable right now; retry later.", code="ledger_unavailable")
    if isinstance(exc, RayError):
        return EngineUnavailable("The model is unavailable right now; retry later.", code="engine_unavailable")
    return InternalError("The server had an error while processing your request.", code="internal_error")


def error_response(err: APIError) -> Response:
    return Response(err.to_json(), status_code=err.status, media_type="application/json")


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    auth: str  # "open" | "tenant" | "admin"


@dataclass
class Meter:
    """One admitted request: its hold, timings and the last counts the engine reported."""

    principal: Principal
    model: str
    price: Price
    request_id: str
    hold_id: str | None  # None: contract billing, nothing held
    held: int = 0  # micro-credits the hold reserved
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    t0: float = field(default_factory=time.monotonic)
    ttft_ms: int | None = None
    last: Delta | None = None
    settled: asyncio.Task[None] | None = None

    def first_token(self) -> None:
        self.ttft_ms = round((time.monotonic() - self.t0) * 1000)


class SettlingStream(StreamingResponse):
    """An SSE response that settles its request however the response ends: Starlette never closes a
    body generator it did not start (a client gone before the first byte), so this does."""

    def __init__(
        self, meter: Meter, stream: Any, settle: Callable[[Meter, str], Any], body: AsyncIterator[bytes]
    ) -> None:
        super().__init__(body, media_type="text/event-stream")
        self._meter, self._stream, self._settle_fn = meter, stream, settle

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._meter.settled is None:
                self._stream.cancel()
                self._settle_fn(self._meter, "aborted")


@serve.deployment(logging_config={"enable_access_log": False})
class Gateway:
    async def __init__(self, models: dict[str, DeploymentHandle], config: dict[str, Any]) -> None:
        tap = TapConfig.model_validate(config)
        root = data_dir(tap.data_dir)
        self._models = models
        self._tap = tap.tap
        self._billing = tap.billing
        self._hold_timeout_s = tap.hold_timeout_s
        self._prices = {m.name: Price(m.price.input_per_m, m.price.output_per_m) for m in tap.models}
        self._limits: dict[str, PromptLimits] = {}
        self._created = int(time.time())
        self._ledger = LedgerClient(Path(root), shards=tap.ledger_shards)
        self._keys = KeyCache(self._ledger.get_key, load_or_create_admin_key(root))
        self._background: set[asyncio.Task[None]] = set()
        # The ledger replays its file before the first request, not during it.
        await asyncio.gather(*(self._ledger.call(s, "has_tenant", "") for s in range(tap.ledger_shards)))
        tenant, admin, tid, kid = "tenant", "admin", r"(t-[0-9a-f]{12})", r"([a-z2-7]{16})"
        self._routes = [
            Route("POST", re.compile(r"/v1/chat/completions"), self._chat, tenant),
            Route("POST", re.compile(r"/v1/completions"), self._completions, tenant),
            Route("GET", re.compile(r"/v1/models"), self._list_models, tenant),
            Route("GET", re.compile(r"/v1/models/(.+)"), self._get_model, tenant),
            Route("GET", re.compile(r"/v1/account"), self._account, tenant),
            Route("GET", re.compile(r"/v1/usage"), self._usage, tenant),
            Route("GET", re.compile(r"/health"), self._health, "open"),
            Route("POST", re.compile(r"/admin/tenants"), self._create_tenant, admin),
            Route("GET", re.compile(r"/admin/tenants"), self._list_tenants, admin),
            Route("POST", re.compile(rf"/admin/tenants/{tid}/keys"), self._create_key, admin),
            Route("DELETE", re.compile(rf"/admin/keys/{kid}"), self._revoke_key, admin),
            Route("POST", re.compile(rf"/admin/tenants/{tid}/grants"), self._grant, admin),
            Route("GET", re.compile(rf"/admin/tenants/{tid}/account"), self._admin_account, admin),
            Route("GET", re.compile(rf"/admin/tenants/{tid}/usage"), self._admin_usage, admin),
        ]

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.removeprefix(request.scope.get("root_path", "")).rstrip("/") or "/"
        try:
            route, args = self._route(request.method, path)
            if route.auth == "open":
                return await route.handler(request, *args)
            principal = await self._keys.authenticate(bearer_token(request.headers.get("authorization")), self._tap)
            if (route.auth == "admin") != principal.is_admin:
                raise Forbidden(
                    "This route needs the admin key." if route.auth == "admin" else "Use a tenant key for this route.",
                    code="wrong_key_kind",
                )
            return await route.handler(request, principal, *args)
        except Exception as exc:
            err = api_error(exc)
            if err.status >= 500:
                log.warning("%s %s failed: %s", request.method, path, type(exc).__name__)
            return error_response(err)

    def _route(self, method: str, path: str) -> tuple[Route, tuple[str, ...]]:
        allowed = []
        for route in self._routes:
            match = route.pattern.fullmatch(path)
            if match is None:
                continue
            if route.method == method:
                return route, match.groups()
            allowed.append(route.method)
        if allowed:
            raise MethodNotAllowed(f"Method {method} is not allowed on {path}.", code="method_not_allowed")
        raise NotFound(f"Unknown path {path}.", code="unknown_url")

    # ---- models and health ------------------------------------------------------------------------

    def _model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self._created, "owned_by": "llama-orch"}

    async def _list_models(self, request: Request, principal: Principal) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card(name) for name in self._models]})

    async def _get_model(self, request: Request, principal: Principal, name: str) -> Response:
        self._handle(name)
        return JSONResponse(self._model_card(name))

    async def _health(self, request: Request) -> Response:
        checks = [handle.check_health.remote() for handle in self._models.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*checks), timeout=10)
        except Exception as exc:
            raise EngineUnavailable(f"unhealthy: {type(exc).__name__}", code="unhealthy") from None
        return JSONResponse({"status": "ok", "models": list(self._models)})

    def _handle(self, model: str) -> DeploymentHandle:
        handle = self._models.get(model)
        if handle is None:
            raise NotFound(f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return handle

    # ---- completions ------------------------------------------------------------------------------

    async def _chat(self, request: Request, principal: Principal) -> Response:
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, await request.body())
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return await self._complete(req, principal, new_id("chatcmpl"), chat=True, messages=messages)

    async def _completions(self, request: Request, principal: Principal) -> Response:
        req: CompletionRequest = parse_request(CompletionRequest, await request.body())
        return await self._complete(req, principal, new_id("cmpl"), chat=False, prompt=req.prompt)

    async def _complete(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        principal: Principal,
        request_id: str,
        *,
        chat: bool,
        **prompt: Any,
    ) -> Response:
        handle = self._handle(req.model)
        meter = await self._admit(principal, req, request_id, handle, prompt)
        gen = GenerationRequest(
            request_id=request_id,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop_list(),
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            **prompt,
        )
        stream: Any = None  # a DeploymentResponseGenerator once remote() returned
        try:
            stream = handle.options(stream=True).generate.remote(gen)
            first: Delta = await stream.__anext__()
        except BaseException as exc:
            if stream is not None:
                stream.cancel()
            status = "aborted" if isinstance(exc, asyncio.CancelledError) else "error"
            self._settle(meter, status)
            raise
        meter.first_token()
        meter.last = first
        if req.stream:
            writer = ChunkWriter(chat=chat, request_id=request_id, model=req.model, include_usage=req.include_usage)
            return SettlingStream(meter, stream, self._settle, _sse(writer, meter, stream, self._settle))
        return await self._collect(chat, meter, stream)

    async def _prompt_limits(self, model: str, handle: DeploymentHandle) -> PromptLimits:
        limits = self._limits.get(model)
        if limits is None:
            limits = self._limits[model] = await handle.limits.remote()
        return limits

    async def _admit(
        self,
        principal: Principal,
        req: ChatCompletionRequest | CompletionRequest,
        request_id: str,
        handle: DeploymentHandle,
        prompt: dict[str, Any],
    ) -> Meter:
        """Holds the request's worst-case cost (credits billing); 402 when the balance can't cover it."""
        price = self._prices[req.model]
        if self._billing != "credits":
            return Meter(principal, req.model, price, request_id, None)
        limits = await self._prompt_limits(req.model, handle)
        messages = prompt.get("messages")
        bound = prompt_token_bound(
            limits,
            messages=[m["content"] for m in messages] if messages is not None else None,
            prompt=prompt.get("prompt"),
        )
        amount = hold_amount(price, limits, bound, req.max_tokens)
        hold_id = "hold-" + request_id
        tenant = principal.tenant_id
        pending = asyncio.ensure_future(self._ledger.apply(tenant, Hold(hold_id, tenant, amount, self._hold_timeout_s)))
        try:
            result: Result = await asyncio.shield(pending)
        except asyncio.CancelledError:  # the client left; the hold may still commit: release it then
            pending.add_done_callback(lambda done: self._release_if_held(done, tenant, hold_id))
            raise
        if result.code is Code.INSUFFICIENT_CREDITS:
            limit = f"max_tokens {req.max_tokens}" if req.max_tokens else "no max_tokens (the rest of the context)"
            raise InsufficientCredits(
                f"Insufficient credits: this request may cost up to {amount} micro-credits (a prompt of at most "
                f"{bound} tokens and {limit}); the balance is {result.available}. Add credits, or lower max_tokens.",
                code="insufficient_credits",
            )
        if not result.ok:
            raise Forbidden(f"This key's tenant cannot be billed ({result.code.value}).", code=result.code.value)
        return Meter(principal, req.model, price, request_id, hold_id, amount)

    def _release_if_held(self, done: asyncio.Future[Result], tenant: str, hold_id: str) -> None:
        if done.cancelled() or done.exception() is not None or done.result().code is not Code.OK:
            return
        task = asyncio.ensure_future(self._ledger.apply(tenant, Release("release-" + hold_id, hold_id)))
        self._background.add(task)  # type: ignore[arg-type]
        task.add_done_callback(self._background.discard)  # type: ignore[arg-type]

    def _settle(self, meter: Meter, status: str) -> asyncio.Task[None]:
        """Charges the tokens the engine reported and writes the usage row, in a task of its own:
        a client that goes away cancels the response, never the settle. Idempotent per request."""
        if meter.settled is None:
            meter.settled = asyncio.create_task(self._settle_now(meter, status))
            self._background.add(meter.settled)
            meter.settled.add_done_callback(self._background.discard)
        return meter.settled

    async def _settle_now(self, meter: Meter, status: str) -> None:
        last = meter.last
        prompt_tokens = last.prompt_tokens if last else 0
        completion_tokens = last.completion_tokens if last else 0
        charge = cost(meter.price, prompt_tokens, completion_tokens) if meter.hold_id else 0
        if charge > meter.held and meter.hold_id:  # the bound failed: charge what was held, and say so
            log.error("request %s cost %d over its hold of %d; charging the hold", meter.request_id, charge, meter.held)
            charge = meter.held
        row = UsageRow(
            meter.request_id,
            meter.started_at,
            meter.principal.tenant_id,
            meter.principal.key_id,
            self._tap,
            meter.model,
            prompt_tokens,
            completion_tokens,
            charge,
            meter.ttft_ms,
            round((time.monotonic() - meter.t0) * 1000),
            status,  # type: ignore[arg-type]
            last.finish_reason if last else None,
        )
        tenant = meter.principal.tenant_id
        try:
            if meter.hold_id is None:
                await self._ledger.tenant_call(tenant, "record", row)
                return
            result = await self._ledger.apply(tenant, Settle("settle-" + meter.request_id, meter.hold_id, charge), row)
            if not result.ok:
                log.error("settle of %s refused: %s", meter.request_id, result.code.value)
        except Exception as exc:  # the hold times out and is released: never a double or lost charge
            log.error("settle of %s failed (%s); its hold will expire unused", meter.request_id, type(exc).__name__)

    async def _collect(self, chat: bool, meter: Meter, stream: DeploymentResponseGenerator) -> Response:
        assert meter.last is not None
        parts = [meter.last.text]
        try:
            async for delta in stream:
                parts.append(delta.text)
                meter.last = delta
        except BaseException as exc:
            stream.cancel()
            self._settle(meter, "aborted" if isinstance(exc, asyncio.CancelledError) else "error")
            raise
        await asyncio.shield(self._settle(meter, "ok"))
        last = meter.last
        build = chat_completion if chat else text_completion
        body = build(
            meter.request_id, meter.model, "".join(parts), last.finish_reason, last.prompt_tokens,
            last.completion_tokens,
        )  # fmt: skip
        return JSONResponse(body)

    # ---- account and usage ------------------------------------------------------------------------

    async def _account_of(self, tenant_id: str) -> dict[str, Any]:
        account: dict[str, Any] | None = await self._ledger.tenant_call(tenant_id, "account", tenant_id)
        if account is None:
            raise NotFound(f"No tenant '{tenant_id}'.", code="tenant_not_found")
        return account

    async def _usage_of(self, request: Request, tenant_id: str) -> Response:
        since, until, group_by = parse_usage_query(dict(request.query_params))
        report: UsageReport = await self._ledger.tenant_call(tenant_id, "usage", tenant_id, since, until, group_by)
        return JSONResponse(usage_json(report, tenant_id, since, until))

    async def _account(self, request: Request, principal: Principal) -> Response:
        return JSONResponse(await self._account_of(principal.tenant_id))

    async def _usage(self, request: Request, principal: Principal) -> Response:
        return await self._usage_of(request, principal.tenant_id)

    # ---- admin ------------------------------------------------------------------------------------

    async def _create_tenant(self, request: Request, principal: Principal) -> Response:
        body: CreateTenantBody = parse_body(CreateTenantBody, await request.body())
        op_id = f"tenant-{body.idempotency_key}" if body.idempotency_key else None
        result = await self._ledger.create_tenant(body.name, op_id)
        if result.code is Code.EXISTS_DIFFERENT:
            raise Conflict("This idempotency_key created another tenant.", param="idempotency_key", code="conflict")
        if not result.ok:
            raise Conflict(f"Tenant not created: {result.code.value}.", code=result.code.value)
        return JSONResponse({"object": "tenant", "tenant_id": result.tenant_id, "name": body.name})

    async def _list_tenants(self, request: Request, principal: Principal) -> Response:
        shards = await asyncio.gather(*(self._ledger.call(s, "tenant_list") for s in range(self._ledger.shards)))
        return JSONResponse({"object": "list", "data": [t for shard in shards for t in shard]})

    async def _create_key(self, request: Request, principal: Principal, tenant_id: str) -> Response:
        body: CreateKeyBody = parse_body(CreateKeyBody, await request.body())
        tap = body.tap or self._tap
        created = await self._ledger.tenant_call(tenant_id, "create_key", tenant_id, tap)
        if created is None:
            raise NotFound(f"No tenant '{tenant_id}'.", code="tenant_not_found")
        key_id, raw = created
        return JSONResponse({"object": "api_key", "key_id": key_id, "key": raw, "tenant_id": tenant_id, "tap": tap})

    async def _revoke_key(self, request: Request, principal: Principal, key_id: str) -> Response:
        record = await self._ledger.get_key(key_id)
        if record is None:
            raise NotFound(f"No key '{key_id}'.", code="key_not_found")
        await self._ledger.tenant_call(record.tenant_id, "revoke_key", key_id)
        self._keys.forget(key_id)
        return JSONResponse({"object": "api_key", "key_id": key_id, "revoked": True})

    async def _grant(self, request: Request, principal: Principal, tenant_id: str) -> Response:
        body: GrantBody = parse_body(GrantBody, await request.body())
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

    async def _admin_account(self, request: Request, principal: Principal, tenant_id: str) -> Response:
        return JSONResponse(await self._account_of(tenant_id))

    async def _admin_usage(self, request: Request, principal: Principal, tenant_id: str) -> Response:
        await self._account_of(tenant_id)
        return await self._usage_of(request, tenant_id)


def usage_json(report: UsageReport, tenant_id: str, since: datetime | None, until: datetime | None) -> dict[str, Any]:
    t = report.totals
    rows: list[dict[str, Any]] = []
    for r in report.rows:
        d = r._asdict() if isinstance(r, UsageRow) else dataclasses.asdict(r)
        if isinstance(r, UsageRow):
            d["ts"] = r.ts.isoformat()
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


async def _sse(
    writer: ChunkWriter, meter: Meter, stream: DeploymentResponseGenerator, settle: Callable[[Meter, str], Any]
) -> AsyncIterator[bytes]:
    """SSE frames of one completion from its first delta on. A disconnect closes this generator, which
    cancels the engine request and settles the tokens produced so far ("aborted"); an engine failure
    is reported in-band and settled as "error"; a finished stream is settled before ``[DONE]``."""
    assert meter.last is not None
    first = meter.last
    finished = False
    try:
        yield writer.first() + writer.delta(first.text, first.finish_reason)
        if first.finish_reason is None:
            async for delta in stream:
                meter.last = delta
                yield writer.delta(delta.text, delta.finish_reason)
        finished = True
    except Exception as exc:
        finished = True  # the stream is over; only the report is left
        stream.cancel()
        settle(meter, "error")
        # Headers are gone: report in-band, as vLLM's server does.
        yield writer.error(api_error(exc).body()) + writer.DONE
        return
    finally:
        if not finished:
            stream.cancel()
            settle(meter, "aborted")
    await asyncio.shield(settle(meter, "ok"))
    if writer.include_usage:
        yield writer.usage(meter.last.prompt_tokens, meter.last.completion_tokens)
    yield writer.DONE
