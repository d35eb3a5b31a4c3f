"""What a private tap is: one client's model on its own GPU groups.

A :class:`TapSpec` names the client, the model and the size of one replica's GPU group (1, 2, 4 or
8 GPUs, always on one node); the private tap app serves it at ``/private/<client>`` as Serve
application ``private-<client>``. On a node without CUDA the engine still runs (on the CPU, one
way), while the group keeps its GPUs reserved: :func:`effective_tensor_parallel` says so in one line.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from orch.config import EngineConfig, StrictModel


class TapSpec(StrictModel):
    """One client's private tap.

    >>> spec = TapSpec(client="acme", model="HuggingFaceTB/SmolLM2-135M-Instruct", gpus=2)
    >>> spec.app_name(), spec.route_prefix(), spec.max_replicas
    ('private-acme', '/private/acme', 1)
    """

    client: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]{0,39}$",
        description="Client name: lowercase letters, digits and '-', at most 40; names the app and its route.",
    )
    model: str = Field(min_length=1, description="Hugging Face model id or a local folder with the weights.")
    gpus: Literal[1, 2, 4, 8] = Field(description="GPUs in one replica's group, all on one node (STRICT_PACK).")
    min_replicas: int = Field(1, ge=0, description="Fewest replicas (GPU groups); 0 frees the GPUs when idle.")
    max_replicas: int = Field(1, ge=1, description="Most replicas (GPU groups) the tap may hold at once.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine settings.")
    openai_gateway: bool = Field(True, description="Serve the OpenAI-compatible routes in front of the model.")
    billing: Literal["contract", "credits"] = Field(
        "contract", description="'contract': usage is recorded, not charged; 'credits': requests hold and debit."
    )
    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs one replica reserves, in its group's first bundle.")
    target_ongoing_requests: float = Field(16, gt=0, description="Ongoing requests per replica autoscaling aims for.")
    upscale_delay_s: float = Field(5.0, ge=0, description="Seconds of sustained load before adding a replica.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Seconds of low load before removing a replica.")
    metrics_interval_s: float = Field(10.0, gt=0, description="How often replicas report their load.")
    look_back_period_s: float = Field(30.0, gt=0, description="Seconds of load averaged per scaling decision.")
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

    @model_validator(mode="after")
    def _ordered(self) -> TapSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self

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
