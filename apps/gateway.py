"""The OpenAI-compatible ingress of a tap: routes map HTTP to calls, results and errors back to HTTP.

OpenAI routes (Bearer key of this tap): ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``; the account and admin routes are in
``apps/admin_api.py``. ``GET /health`` is open. Bodies over ``apps.wire.MAX_BODY_BYTES`` are refused
(413) before they are read whole.

A completion is admitted against its worst-case cost: on the replica's credit lease for the tenant
(``orch.lease``: no ledger round trip), else by a hold of its own committed in the tenant's ledger
before the request reaches an engine (402 when the balance can't cover it); it streams from the model's
port (``apps/model_port.py``: the engine in this replica, or a model deployment's streaming handle);
and it is settled with the engine's exact token counts when it finishes, fails or the client goes
away, the usage row in the settle's transaction (a lease's batch, or the request's own settle).
The front waits for the first delta before answering, so a bad request or a failed engine still
gets its own status instead of a broken 200 stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from actors.ledger_client import LedgerClient
from apps.admin_api import AccountAPI
from apps.model_port import HandleModel, ModelPort, ModelStream
from apps.reporting import keep_reporting
from apps.wire import SettlingStream, api_error, error_response, overhead_header, read_body, sse_frames
from orch import openapi
from orch.admission import AdmissionQueue, admission_settings, request_priority
from orch.billing import KeyCache, Principal, PromptLimits, bearer_token, hold_amount, prompt_token_bound
from orch.config import TapConfig, data_dir
from orch.embeddings import EmbeddingJob, EmbeddingRequest, embedding_response
from orch.engine import Delta, GenerationRequest, TokenLogprob
from orch.errors import (
    EngineUnavailable,
    Forbidden,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RateLimited,
)
from orch.hooks import Call, load_hooks
from orch.lease import Leases, LeaseSettings
from orch.ledger import Price, cost
from orch.metering import Admission, Meter, Settler
from orch.protocol import ChatCompletionRequest, CompletionRequest, chat_texts, json_object, parse_request
from orch.ratelimit import Decision, Policy
from orch.responses import Choice, ChunkWriter, chat_completion, new_id, text_completion
from orch.store import UsageRow
from orch.tools import merge_fragments

log = logging.getLogger("ray.serve")

Handler = Callable[..., Awaitable[Response]]

SHUTDOWN_DRAIN_S = 20.0  # pending settles get this long to commit when a replica stops


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    auth: str  # "open" | "tenant" | "admin"


class OpenAIFront:
    """The routes, admission, streaming and settling of a tap, over its models (each a :class:`ModelPort`).
    Serve hosts it as the :class:`Gateway` deployment (models behind handles) or inside each model
    replica (``apps/tap_replica.py``: the engine in the same process)."""

    async def _open(self, models: dict[str, ModelPort], config: dict[str, Any]) -> None:
        tap = TapConfig.model_validate(config)
        root = data_dir(tap.data_dir)
        self._models = models
        self._tap = tap.tap
        self._gateway = tap.gateway
        self._billing = tap.billing
        self._prices = {m.name: Price(m.price.input_per_m, m.price.output_per_m) for m in tap.models}
        self._tasks = {m.name: m.task for m in tap.models}
        self._queues = {m.name: AdmissionQueue(admission_settings(tap, m)) for m in tap.models if m.task == "generate"}
        self._tenant_limits = tap.admission.limits
        self._adjusting: set[asyncio.Task[Any]] = set()  # rate-limit corrections in flight
        self._limits: dict[str, PromptLimits] = {}
        self._created = int(time.time())
        self._ledger = LedgerClient(Path(root), shards=tap.ledger_shards, nodes=tap.ledger_nodes)
        # The ledger replays its file before the first request, not during it; the admin secret comes
        # from the ledger's node (one per cluster: a replica on another node must not make its own).
        *_, admin_key, pepper = await asyncio.gather(
            *(self._ledger.call(s, "has_tenant", "") for s in range(tap.ledger_shards)),
            self._ledger.call(0, "admin_key"),
            self._ledger.call(0, "key_pepper"),
        )
        self._keys = KeyCache(self._ledger.get_key, admin_key, pepper=pepper)
        self._leases = None
        if tap.billing == "credits" and tap.credit_leases:
            self._leases = Leases(
                self._ledger, self._tap, LeaseSettings(ttl_s=tap.lease_ttl_s, durable_end=tap.durable_usage)
            )
        self._hooks = load_hooks(tap.hooks)  # None when the tap names none: the request path checks only that
        observe = self._post_call if self._hooks is not None and self._hooks.has_post else None
        self._settler = Settler(self._ledger, self._tap, leases=self._leases, observe=observe)
        self._admission = Admission(self._ledger, self._settler, self._leases, hold_timeout_s=tap.hold_timeout_s)
        self._settle = self._settler.settle
        tenant = "tenant"
        self._routes = [
            Route("POST", re.compile(r"/v1/chat/completions"), self._chat, tenant),
            Route("POST", re.compile(r"/v1/completions"), self._completions, tenant),
            Route("POST", re.compile(r"/v1/embeddings"), self._embeddings, tenant),
            Route("GET", re.compile(r"/v1/models"), self._list_models, tenant),
            Route("GET", re.compile(r"/v1/models/(.+)"), self._get_model, tenant),
            Route("GET", re.compile(r"/health"), self._health, "open"),
            Route("GET", re.compile(r"/openapi\.json"), self._openapi, "open"),
            *(Route(*r) for r in AccountAPI(self._ledger, self._keys, self._tap, read_body, self._flush).routes()),
        ]
        keep_reporting(self)

    async def _close(self) -> None:
        """When the replica stops, after in-flight requests finished: settles still pending (a slow or
        restarting ledger) and the leases' last batches get :data:`SHUTDOWN_DRAIN_S` to commit; the
        leases are returned to the balances."""
        settler = getattr(self, "_settler", None)  # None: _open never finished
        if settler is not None:
            leases = self._leases.close(SHUTDOWN_DRAIN_S) if self._leases is not None else asyncio.sleep(0)
            await asyncio.gather(leases, settler.drain(SHUTDOWN_DRAIN_S))

    def admission_stats(self) -> dict[str, dict[str, Any]]:
        """Per model: requests running in its engine(s) and waiting, and who waits (``llama-orch status``)."""
        return {
            name: {"running": q.running, "waiting": q.waiting, "queued": q.queued(), "max": q.settings.max_running}
            for name, q in self._queues.items()
        }

    async def _flush(self, tenant_id: str) -> None:
        """Before an account read: the tenant's lease batch waiting on this replica goes to the ledger."""
        if self._leases is not None:
            await self._leases.flush(tenant_id)

    async def __call__(self, request: Request) -> Response:
        request.scope["orch.t0"] = time.monotonic()  # the start of this request's x-orch-overhead-ms
        path = request.url.path.removeprefix(request.scope.get("root_path", "")).rstrip("/") or "/"
        try:
            route, args = self._route(request.method, path)
            if route.auth == "open":
                return await route.handler(request, *args)
            client = request.client.host if request.client else None
            if route.auth == "admin" and not self._gateway.admin_allowed(client):
                raise Forbidden(
                    "The admin API does not answer from this address (the tap's gateway.admin_from).",
                    code="admin_not_from_here",
                )
            token = bearer_token(request.headers.get("authorization"))
            principal = await self._keys.authenticate(token, self._tap, client)
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
        """OpenAI's model object, and the model's prices (micro-credits per 1M tokens: what a client
        needs to bound its spend, as the SDK's batch runner does)."""
        price = self._prices[name]
        pricing = {"input_per_m": price.input_per_m, "output_per_m": price.output_per_m, "unit": "micro_credits"}
        return {"id": name, "object": "model", "created": self._created, "owned_by": "llama-orch", "pricing": pricing}

    async def _list_models(self, request: Request, principal: Principal) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card(name) for name in self._models]})

    async def _get_model(self, request: Request, principal: Principal, name: str) -> Response:
        self._model(name, self._tasks.get(name, "generate"))
        return JSONResponse(self._model_card(name))

    async def _openapi(self, request: Request) -> Response:
        """``GET /openapi.json``: this tap's routes and request schemas (``orch/openapi.py``)."""
        return JSONResponse(openapi.document(self._tap, request.scope.get("root_path", "")))

    async def _health(self, request: Request) -> Response:
        checks = [model.check_health() for model in self._models.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*checks), timeout=10)
        except Exception as exc:
            raise EngineUnavailable(f"unhealthy: {type(exc).__name__}", code="unhealthy") from None
        keys = {"lookups": self._keys.lookups, "refused": self._keys.refused}
        replica = serve.get_replica_context().replica_id.unique_id  # which gateway replica answered
        return JSONResponse({"status": "ok", "models": list(self._models), "replica": replica, "key_cache": keys})

    def _model(self, name: str, task: str = "generate") -> ModelPort:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"The model '{name}' does not exist.", param="model", code="model_not_found")
        if self._tasks[name] != task:
            what = "chat and text completions" if self._tasks[name] == "generate" else "embeddings"
            raise InvalidRequest(
                f"The model '{name}' serves {what} only.", param="model", code="model_not_supported"
            )  # fmt: skip
        return model

    # ---- completions ------------------------------------------------------------------------------

    async def _body(self, request: Request, principal: Principal, route: str) -> bytes | dict[str, Any]:
        """The request's body, through the tap's ``pre_call`` hooks when it has any."""
        body = await read_body(request)
        if self._hooks is None:
            return body
        return await self._hooks.pre_call(
            Call(principal.tenant_id, principal.key_id, self._tap, route), json_object(body)
        )

    def _post_call(self, meter: Meter, row: UsageRow) -> None:
        assert self._hooks is not None
        route = {"chatcmpl": "chat", "cmpl": "completions", "embd": "embeddings"}.get(
            meter.request_id.split("-")[0], ""
        )
        self._hooks.post_call(Call(meter.principal.tenant_id, meter.principal.key_id, self._tap, route), row)

    async def _chat(self, request: Request, principal: Principal) -> Response:
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, await self._body(request, principal, "chat"))
        messages = [m.engine_message() for m in req.messages]
        tools = {
            "tools": req.tool_dicts(),
            "tool_choice": req.tool_spec(),
            "parallel_tool_calls": req.parallel_tool_calls,
        }
        return await self._complete(req, principal, new_id("chatcmpl"), request, chat=True, messages=messages, **tools)

    async def _completions(self, request: Request, principal: Principal) -> Response:
        req: CompletionRequest = parse_request(CompletionRequest, await self._body(request, principal, "completions"))
        return await self._complete(req, principal, new_id("cmpl"), request, chat=False, prompt=req.prompt)

    async def _complete(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        principal: Principal,
        request_id: str,
        http: Request,
        *,
        chat: bool,
        **prompt: Any,
    ) -> Response:
        model = self._model(req.model)
        policy = self._policy(principal)
        priority = request_priority(http.headers.get("x-priority"), policy.priority)
        limits, bound = await self._prompt_bound(req, model, prompt)
        completion = req.max_tokens or max(0, limits.max_model_len - bound)
        rate = await self._take_rate(principal, policy, bound + completion * req.n, request_id)
        queue = self._queues[req.model]
        try:
            await queue.enter(principal.tenant_id, priority, policy.weight)
        except BaseException:
            self._count_tokens(principal, rate, request_id, 0)  # refused or gone while queued: it ran nothing
            raise
        try:
            meter = await self._admit(principal, req, request_id, limits, bound)
        except BaseException:
            queue.leave(principal.tenant_id)
            self._count_tokens(principal, rate, request_id, 0)
            raise
        meter.release = self._leave_and_count(queue, meter, rate)  # at its settle
        meter.headers = rate.headers() if rate is not None else {}
        meter.t0 = http.scope["orch.t0"]
        meter.end_user = req.user
        meter.http_request_id = (http.headers.get("x-request-id") or "")[:200] or None  # Serve sets one if absent
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
            n=req.n,
            logprobs=req.logprobs_wanted(),
            structured=req.structured(),
            **prompt,
        )
        stream: ModelStream | None = None
        try:
            stream = model.stream(gen)
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
            return SettlingStream(meter, stream, self._settle, sse_frames(writer, meter, stream, self._settle))
        return await self._collect(chat, req.n, meter, stream)

    async def _embeddings(self, request: Request, principal: Principal) -> Response:
        """``POST /v1/embeddings``: holds the cost of the inputs' token bound, pays for the counted tokens."""
        req: EmbeddingRequest = parse_request(EmbeddingRequest, await self._body(request, principal, "embeddings"))
        model = self._model(req.model, "embed")
        limits = await self._prompt_limits(req.model, model)
        inputs = req.inputs()
        bound = sum(prompt_token_bound(limits, prompt=x) for x in inputs)
        price, request_id = self._prices[req.model], new_id("embd")
        rate = await self._take_rate(principal, self._policy(principal), bound, request_id)
        if self._billing == "credits":
            why = f"{len(inputs)} input(s) of at most {bound} tokens in all"
            try:
                meter = await self._admission.admit(principal, req.model, price, request_id, cost(price, bound, 0),
                                                    why=why)  # fmt: skip
            except BaseException:
                self._count_tokens(principal, rate, request_id, 0)
                raise
        else:
            meter = Meter(principal, req.model, price, request_id, None)
        meter.t0 = request.scope["orch.t0"]
        meter.headers = rate.headers() if rate is not None else {}
        meter.end_user = req.user
        meter.http_request_id = (request.headers.get("x-request-id") or "")[:200] or None
        try:
            embedded = await model.embed(EmbeddingJob(request_id, inputs, req.dimensions))
        except BaseException as exc:
            self._settle(meter, "aborted" if isinstance(exc, asyncio.CancelledError) else "error")
            self._count_tokens(principal, rate, request_id, 0)
            raise
        self._count_tokens(principal, rate, request_id, embedded.prompt_tokens)
        meter.last = Delta("", embedded.prompt_tokens, 0, "stop", embedded.engine_ms)
        meter.first_token()
        await asyncio.shield(self._settle(meter, "ok"))
        body = embedding_response(req.model, embedded, req.encoding_format)
        return JSONResponse(body, headers=overhead_header(meter))

    # ---- rate limits -------------------------------------------------------------------------------

    def _policy(self, principal: Principal) -> Policy:
        """The key's policy, with the tap config's tenant limits where the admin API set none."""
        policy = principal.policy
        configured = self._tenant_limits.get(principal.tenant_id)
        if configured is not None and policy.tenant_rpm is None and policy.tenant_tpm is None:
            policy = dataclasses.replace(policy, tenant_rpm=configured.rpm, tenant_tpm=configured.tpm)
        return policy

    async def _take_rate(self, principal: Principal, policy: Policy, tokens: int, request_id: str) -> Decision | None:
        """Counts the request in its key's and tenant's windows, in the tenant's ledger shard (exact across
        replicas); 429 with ``Retry-After`` and ``x-ratelimit-*`` past a limit. No call without limits."""
        limits = policy.limits(principal.key_id, principal.tenant_id)
        if not limits:
            return None
        decision: Decision = await self._ledger.tenant_call(principal.tenant_id, "rate_take", limits, tokens,
                                                            request_id)  # fmt: skip
        if not decision.ok:
            raise RateLimited(decision.why, code="rate_limit_exceeded", retry_after_s=decision.retry_after_s,
                              headers=decision.headers())  # fmt: skip
        return decision

    def _leave_and_count(self, queue: AdmissionQueue, meter: Meter, rate: Decision | None) -> Callable[[], None]:
        """At the settle: the engine place goes on, and the windows count the tokens the engine counted."""
        tenant = meter.principal.tenant_id
        if rate is None:
            return lambda: queue.leave(tenant)

        def release() -> None:
            queue.leave(tenant)
            last = meter.last
            used = last.prompt_tokens + last.completion_tokens if last is not None else 0
            self._count_tokens(meter.principal, rate, meter.request_id, used)

        return release

    def _count_tokens(self, principal: Principal, rate: Decision | None, request_id: str, used: int) -> None:
        """The windows count ``used`` tokens for a request counted at its bound (``rate``: what
        :meth:`_take_rate` returned; None: no window counted it). Off the request path. A request refused
        after it was counted (a full queue, no credit) keeps its place in the request count, as OpenAI's
        do, and uses no tokens."""
        if rate is None:
            return
        task = asyncio.ensure_future(self._ledger.tenant_call(principal.tenant_id, "rate_adjust", request_id, used))
        self._adjusting.add(task)
        task.add_done_callback(self._adjusting.discard)

    async def _prompt_limits(self, name: str, model: ModelPort) -> PromptLimits:
        limits = self._limits.get(name)
        if limits is None:
            limits = self._limits[name] = await model.limits()
        return limits

    async def _prompt_bound(self, req: ChatCompletionRequest | CompletionRequest, model: ModelPort,
                            prompt: dict[str, Any]) -> tuple[PromptLimits, int]:  # fmt: skip
        """The model's limits and the prompt's token bound: a prompt that is not Unicode or cannot fit the
        model is refused here, before it queues or holds anything."""
        limits = await self._prompt_limits(req.model, model)
        messages = prompt.get("messages")
        bound = prompt_token_bound(
            limits, messages=chat_texts(messages, prompt.get("tools")) if messages is not None else None,
            prompt=prompt.get("prompt"),
        )  # fmt: skip
        if prompt.get("tools"):
            bound = min(
                bound + limits.tools_tokens + limits.per_tool_tokens * len(prompt["tools"]), limits.max_model_len
            )
        return limits, bound

    async def _admit(
        self,
        principal: Principal,
        req: ChatCompletionRequest | CompletionRequest,
        request_id: str,
        limits: PromptLimits,
        bound: int,
    ) -> Meter:
        """Holds the request's worst-case cost (credits billing); 402 when the balance can't cover it."""
        price = self._prices[req.model]
        if self._billing != "credits":
            return Meter(principal, req.model, price, request_id, None)
        amount = hold_amount(price, limits, bound, req.max_tokens, req.n)
        limit = f"max_tokens {req.max_tokens}" if req.max_tokens else "no max_tokens (the rest of the context)"
        limit += f", {req.n} choices" if req.n > 1 else ""
        why = f"a prompt of at most {bound} tokens and {limit}"
        return await self._admission.admit(principal, req.model, price, request_id, amount, why=why)

    async def _collect(self, chat: bool, n: int, meter: Meter, stream: ModelStream) -> Response:
        assert meter.last is not None
        parts: list[list[str]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        calls: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        logprobs: list[list[TokenLogprob]] | None = [[] for _ in range(n)] if meter.last.logprobs is not None else None

        def add(delta: Delta) -> None:
            parts[delta.index].append(delta.text)
            finish[delta.index] = delta.finish_reason or finish[delta.index]
            if logprobs is not None and delta.logprobs is not None:
                logprobs[delta.index].extend(delta.logprobs)
            if delta.tool_calls:
                calls[delta.index].extend(delta.tool_calls)

        add(meter.last)
        try:
            async for delta in stream:  # to its end: a local engine's generator left open would count an abort
                add(delta)
                meter.last = delta
        except BaseException as exc:
            stream.cancel()
            self._settle(meter, "aborted" if isinstance(exc, asyncio.CancelledError) else "error")
            raise
        await asyncio.shield(self._settle(meter, "ok"))
        last = meter.last
        build = chat_completion if chat else text_completion
        choices = [
            Choice("".join(parts[i]), finish[i], logprobs[i] if logprobs else None, merge_fragments(calls[i]) or None)
            for i in range(n)
        ]
        body = build(meter.request_id, meter.model, choices, last.prompt_tokens, last.completion_tokens)
        return JSONResponse(body, headers=overhead_header(meter))


@serve.deployment(
    logging_config={"enable_access_log": False}, graceful_shutdown_timeout_s=SHUTDOWN_DRAIN_S + 10
)  # fmt: skip
class Gateway(OpenAIFront):
    """The front as a deployment of its own, over model deployments it calls through their handles."""

    async def __init__(self, models: dict[str, DeploymentHandle], config: dict[str, Any]) -> None:  # type: ignore[misc]  # Serve awaits an async constructor
        await self._open({name: HandleModel(handle) for name, handle in models.items()}, config)

    def stats(self) -> dict[str, Any]:
        return {"admission": self.admission_stats()}

    async def __del__(self) -> None:
        await self._close()
