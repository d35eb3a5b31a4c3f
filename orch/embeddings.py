"""Embeddings: ``POST /v1/embeddings``'s request and answer, and the engine that serves them, a vLLM
pooling model (``task: embed`` in the model's config) on ``AsyncLLM.encode``.

Billed by input tokens at the model's own ``price.input_per_m``: the request holds the cost of its
inputs' token bound, then pays for the tokens the engine counted.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from orch.billing import PromptLimits
from orch.config import EngineConfig
from orch.engine import EngineStats, GenerationRequest
from orch.errors import EngineUnavailable, InvalidRequest
from orch.models import default_engine_dtype
from orch.protocol import RequestModel
from orch.responses import usage_dict
from orch.vllm_parts import client_error, max_token_bytes

log = logging.getLogger(__name__)

MAX_INPUTS = 2048  # OpenAI's limit of inputs per request


class EmbeddingRequest(RequestModel):
    """``POST /v1/embeddings`` body: one input or a list (strings, or token ids)."""

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        if isinstance(value, list) and len(value) > MAX_INPUTS and not isinstance(value[0], int):
            raise ValueError(f"at most {MAX_INPUTS} inputs per request")
        if value == "" or (isinstance(value, list) and any(v == "" or v == [] for v in value)):
            raise ValueError("an input must not be empty")
        return value

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list: each a string or a list of token ids.

        >>> EmbeddingRequest(model="m", input=[1, 2]).inputs()
        [[1, 2]]
        """
        value = self.input
        if isinstance(value, str):
            return [value]
        if isinstance(value[0], int):
            return [value]  # type: ignore[list-item]
        return value  # type: ignore[return-value]

    def check_supported(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class EmbeddingJob:
    """What one embeddings request asks of a pooling engine."""

    request_id: str
    inputs: list[str] | list[list[int]]
    dimensions: int | None = None


@dataclass(frozen=True, slots=True)
class Embedded:
    vectors: list[list[float]]
    prompt_tokens: int
    engine_ms: float = 0.0


def encode_base64(vector: list[float]) -> str:
    """OpenAI's base64 form: the little-endian float32 bytes.

    >>> encode_base64([1.0])
    'AACAPw=='
    """
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def embedding_response(model: str, embedded: Embedded, encoding: str) -> dict[str, Any]:
    as_wire = encode_base64 if encoding == "base64" else (lambda v: v)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": as_wire(v)} for i, v in enumerate(embedded.vectors)],
        "model": model,
        "usage": {k: v for k, v in usage_dict(embedded.prompt_tokens, 0).items() if k != "completion_tokens"},
    }


class VLLMEmbedder:
    """A vLLM pooling model behind the engine interface: :meth:`embed` serves, :meth:`generate` refuses.
    Several inputs of one request run as one batch of engine requests."""

    def __init__(self, model_path: str, config: EngineConfig) -> None:
        self.model_path = model_path
        self.config = config
        self._llm: Any = None
        self._tokenizer: Any = None
        self._limits = PromptLimits(0, 0, 0)
        self._tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    async def start(self) -> None:
        for key, value in self.config.env.items():
            os.environ[key] = value
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = self.config.engine_kwargs()
        if kwargs["dtype"] == "auto":
            kwargs["dtype"] = default_engine_dtype()
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=self.model_path, runner="pooling", **kwargs))
        self._tokenizer = self._llm.get_tokenizer()
        length = self._llm.model_config.max_model_len
        self._limits = PromptLimits(length, 0, len(self._tokenizer.encode("")) + 4, max_token_bytes(self._tokenizer))
        log.info("vLLM pooling engine up: %s, max_model_len=%d", self.model_path, length)

    def limits(self) -> PromptLimits:
        return self._limits

    def _ids(self, inputs: list[str] | list[list[int]]) -> list[list[int]]:
        return [list(x) if isinstance(x, list) else list(self._tokenizer.encode(x)) for x in inputs]

    async def embed(self, job: EmbeddingJob) -> Embedded:
        from vllm import PoolingParams
        from vllm.exceptions import VLLMClientError

        taken = time.monotonic()
        try:
            ids = await asyncio.get_running_loop().run_in_executor(self._tokenize, self._ids, job.inputs)
        except UnicodeError:
            raise InvalidRequest("The input is not valid Unicode.", param="input", code="invalid_unicode") from None
        longest = max(len(x) for x in ids)
        if longest > self._limits.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self._limits.max_model_len} tokens; an input has {longest}.",
                param="input",
                code="context_length_exceeded",
            )
        try:
            params = PoolingParams(task="embed", dimensions=job.dimensions)
            tasks = [asyncio.ensure_future(self._one(x, params, f"{job.request_id}-{i}")) for i, x in enumerate(ids)]
            try:
                vectors = await asyncio.gather(*tasks)
            except BaseException:  # one failed or the client left: the others' engine requests are aborted
                for task in tasks:
                    task.cancel()
                raise
        except VLLMClientError as exc:  # e.g. dimensions on a model without Matryoshka embeddings
            raise client_error(exc, "dimensions" if job.dimensions is not None else "input") from None
        except InvalidRequest:
            raise
        except Exception as exc:
            log.warning("embedding engine failed on %s: %s", job.request_id, type(exc).__name__)
            raise EngineUnavailable("The embedding engine failed; retry later.", code="engine_error") from None
        return Embedded(list(vectors), sum(len(x) for x in ids), (time.monotonic() - taken) * 1000)

    async def _one(self, ids: list[int], params: Any, request_id: str) -> list[float]:
        final = None
        async for out in self._llm.encode({"prompt_token_ids": ids}, params, request_id=request_id):
            final = out
        assert final is not None
        return [float(x) for x in final.outputs.data.tolist()]

    async def generate(self, request: GenerationRequest) -> Any:
        raise InvalidRequest(
            "This model serves embeddings only: use /v1/embeddings.", param="model", code="model_not_supported"
        )
        yield  # an async generator, as the interface wants

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def check_health(self) -> None:
        if self._llm is None:
            raise EngineUnavailable("engine not started", code="engine_starting")
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineUnavailable(f"engine unhealthy: {type(exc).__name__}", code="engine_dead") from None

    def stats(self) -> EngineStats:
        unfinished = self._llm.get_num_unfinished_requests() if self._llm is not None else 0
        return EngineStats(0, 0, unfinished, 0)

    def shutdown(self) -> None:
        self._tokenize.shutdown(wait=False, cancel_futures=True)
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
