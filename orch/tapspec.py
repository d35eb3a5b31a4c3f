"""What a private tap is: one client's model on its own GPU groups.

A :class:`TapSpec` names the client, the model and the size of one replica's GPU group (1, 2, 4 or
8 GPUs, always on one node); the private tap app serves it at ``/private/<client>`` as Serve
application ``private-<client>``. On a node without CUDA the engine still runs (on the CPU, one
way), while the group keeps its GPUs reserved: :func:`effective_tensor_parallel` says so in one line.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from orch.config import AdmissionConfig, AutoscalingConfig, EngineConfig, HookSpec, PriceConfig, StrictModel


class TapSpec(StrictModel):
    """One client's private tap.

    >>> spec = TapSpec(client="acme", model="HuggingFaceTB/SmolLM2-135M-Instruct", gpus=2)
    >>> spec.app_name(), spec.route_prefix(), spec.autoscaling.max_replicas
    ('private-acme', '/private/acme', 1)

    Serve's autoscaling fields may also be given flat (``min_replicas=0``, ``--set downscale_delay_s=30``,
    and taps.json files written before they were nested): they go into ``autoscaling``.

    >>> TapSpec(client="a", model="m", gpus=1, min_replicas=0).autoscaling.min_replicas
    0
    """

    FLAT_FIELDS: ClassVar[tuple[str, ...]] = tuple(AutoscalingConfig.model_fields)  # taken flat too

    client: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]{0,39}$",
        description="Client name: lowercase letters, digits and '-', at most 40; names the app and its route.",
    )
    model: str = Field(min_length=1, description="Hugging Face model id or a local folder with the weights.")
    gpus: Literal[1, 2, 4, 8] = Field(description="GPUs in one replica's group, all on one node (STRICT_PACK).")
    autoscaling: AutoscalingConfig = Field(
        default_factory=AutoscalingConfig,
        description="Serve autoscaling of the tap's replicas (GPU groups); min_replicas 0 frees the GPUs when idle.",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine settings.")
    openai_gateway: bool = Field(True, description="Serve the OpenAI-compatible routes in front of the model.")
    colocate: bool = Field(
        True,
        description="Serve the OpenAI routes inside each model replica (no Ray hop per token); false: a gateway "
        "deployment of its own in front of the model.",
    )
    routing: Literal["default", "least_loaded", "prefix"] = Field(
        "default", description="Replica choice (orch/routing.py); prefix runs the front as a deployment of its own."
    )
    gateway_replicas: int = Field(
        1, ge=1, le=64, description="Replicas of the front when it runs apart (colocate false or routing prefix)."
    )
    billing: Literal["contract", "credits"] = Field(
        "contract", description="'contract': usage is recorded, not charged; 'credits': requests hold and debit."
    )
    price: PriceConfig = Field(default_factory=PriceConfig, description="Price per 1M tokens (credits billing).")
    admission: AdmissionConfig = Field(
        default_factory=AdmissionConfig, description="Queueing when saturated: bound, fair share, weights."
    )
    stream_interval: int | None = Field(
        None, ge=1, description="Tokens per streamed chunk after the first (vLLM's stream_interval); None = 1."
    )
    max_ongoing_requests: int = Field(
        256,
        ge=1,
        description="Serve's max_ongoing_requests of a model replica (a colocated tap raises it to "
        "hold its admission queue).",
    )
    hooks: list[str | HookSpec] = Field(
        default_factory=list, description="Gateway hooks (llama_orch.hooks entry points), run in this order."
    )
    admin_from: list[str] | None = Field(
        None, description="Networks (CIDR) the tap's admin routes answer from (gateway.admin_from); None: any."
    )
    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs one replica reserves, in its group's first bundle.")
    served_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        description="Name clients put in `model`; default: the HF id, the default model's name, or the folder name.",
    )
    data_dir: str | None = Field(None, description="Where weights and the ledger live; `tap create` pins it.")
    ledger_shards: int | None = Field(
        None,
        ge=1,
        le=64,
        description="The stack's tenant ledger shards (every gateway must use the same count); `tap create` "
        "fills it from the stack's config; unset means 1.",
    )
    ledger_nodes: dict[int, str] = Field(
        default_factory=dict,
        description="The stack's shard -> node resource map (TapConfig.ledger_nodes); `tap create` fills it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _nest_autoscaling(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        flat = {k: data[k] for k in cls.FLAT_FIELDS if k in data}
        if not flat:
            return data
        nested = data.get("autoscaling") or {}
        if isinstance(nested, AutoscalingConfig):
            nested = nested.model_dump(exclude_unset=True)
        return {k: v for k, v in data.items() if k not in flat} | {"autoscaling": {**nested, **flat}}

    def app_name(self) -> str:
        """The Serve application name, ``private-<client>``."""
        return f"private-{self.client}"

    def route_prefix(self) -> str:
        """The HTTP route prefix, ``/private/<client>``."""
        return f"/private/{self.client}"

    def model_name(self) -> str:
        """What clients put in ``model``.

        >>> TapSpec(client="a", model="/srv/weights/my-llama", gpus=1).model_name()
        'my-llama'
        """
        if self.served_name:
            return self.served_name
        if self.model == "default":
            from orch.models import DEFAULT_MODEL_NAME

            return DEFAULT_MODEL_NAME
        if self.model.startswith(("/", ".", "~")):
            return self.model.rstrip("/").rsplit("/", 1)[-1]
        return self.model


def effective_tensor_parallel(gpus: int, cuda_available: bool) -> tuple[int, str | None]:
    """The engine's ``tensor_parallel_size`` for a group of ``gpus``, and a one-line note when it is not ``gpus``.

    >>> effective_tensor_parallel(4, cuda_available=True)
    (4, None)
    >>> effective_tensor_parallel(1, cuda_available=False)[1]
    'no CUDA on this node: the engine runs on the CPU with tensor_parallel_size=1; the group still reserves 1 GPU'
    """
    if cuda_available:
        return gpus, None
    unit = "GPU" if gpus == 1 else "GPUs"
    return 1, (
        "no CUDA on this node: the engine runs on the CPU with tensor_parallel_size=1; "
        f"the group still reserves {gpus} {unit}"
    )
