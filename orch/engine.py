"""The engine seam: one interface, one real implementation on vLLM's ``AsyncLLM``.

The gateway never touches vLLM; it sees :class:`GenerationRequest` in and :class:`Delta` out.
Token counts come from the engine (prompt ids we tokenised and fed it, ids it generated), never
re-estimated. Unit tests drive it over a fake tokenizer and AsyncLLM (``tests/unit/test_engine.py``);
integration tests use it whole.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from orch.billing import PromptLimits
from orch.config import EngineConfig
from orch.errors import APIError, EngineUnavailable, InvalidRequest
from orch.models import default_engine_dtype
from orch.tools import CallStream, forced_schema, render_inputs, template_knows_tools
from orch.vllm_parts import SchedulerCounts, call_streams, client_error, feed_calls, find_tool_parser, max_token_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What one completion asks of an engine; exactly one of ``messages`` and ``prompt`` is set."""

    request_id: str
    messages: list[dict[str, Any]] | None = None  # role, content; tool_calls, tool_call_id in a tool-calling history
    prompt: str | list[int] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1  # choices, each of up to ``max_tokens``
    logprobs: int | None = None  # per sampled token its logprob and this many of the most likely (0..20)
    structured: dict[str, Any] | None = None  # {"json": schema} or {"json_object": True}: vLLM's structured outputs
    tools: list[dict[str, Any]] | None = None  # OpenAI tool definitions
    tool_choice: str | dict[str, Any] = "none"  # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool = True


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One sampled token: its text, its logprob, and the ``top`` most likely tokens there, most likely first."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of a completion: new text, cumulative token counts, and the finish reason on the last."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    # Since the engine took the request (tokenising included): the tap's overhead is the rest. A timing, not content.
    engine_ms: float = field(default=0.0, compare=False)
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token of this delta, when asked for
    index: int = 0  # which of the request's ``n`` choices (``completion_tokens`` counts them all)
    tool_calls: tuple[dict[str, Any], ...] | None = None  # call fragments in OpenAI's streaming shape (orch.tools)


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int  # scheduler: sequences in the running batch (vLLM's last step)
    waiting: int  # scheduler: queued sequences
    unfinished: int  # requests the engine front end still tracks
    aborted: int  # requests cancelled mid-generation (client gone) and aborted in the engine, since start
    prefix_queries: int = 0  # prompt tokens looked up in vLLM's prefix cache, since start
    prefix_hits: int = 0  # of those, tokens found cached (their prefill skipped)
    kv_cache_usage: float = 0.0  # fraction of the KV cache's blocks in use (vLLM's last step)


class Engine(Protocol):
    """What a model replica needs from an engine."""

    async def start(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]: ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None: ...

    def stats(self) -> EngineStats: ...

    def limits(self) -> PromptLimits: ...

    async def embed(self, job: Any) -> Any: ...  # orch.embeddings.EmbeddingJob -> Embedded

    def shutdown(self) -> None: ...


class VLLMEngine:
    """vLLM ``AsyncLLM`` behind the :class:`Engine` interface.

    >>> engine = VLLMEngine("/path/to/model", EngineConfig(kv_cache_memory_bytes=1 << 30))  # doctest: +SKIP
    >>> await engine.start()  # doctest: +SKIP
    """

    def __init__(self, model_path: str, config: EngineConfig, *, stream_interval: int | None = None) -> None:
        self.model_path = model_path
        self.config = config
        self.stream_interval = stream_interval
        self._llm: Any = None
        self._tokenizer: Any = None
        self._max_model_len = 0
        self._limits = PromptLimits(0, 0, 0)
        self._native_tools = False  # the chat template renders tools itself (set at start)
        self._tool_parser: Any = None  # vLLM tool parser class for tool_choice auto (set at start)
        self._scheduler = SchedulerCounts()
        self._aborted = 0
        # Tokenising a long prompt takes seconds: off the replica's loop, which serves every stream. One
        # thread, as vLLM's own front end does: a fast tokenizer is not safe to call from several at once.
        self._tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    async def start(self) -> None:
        for key, value in self.config.env.items():
            os.environ[key] = value
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = self.config.engine_kwargs()
        if kwargs["dtype"] == "auto":
            # vLLM's "auto" picks bf16 on CPUs, which is wrong without AVX512-BF16 (see default_engine_dtype).
            kwargs["dtype"] = default_engine_dtype()
        args = AsyncEngineArgs(model=self.model_path, **kwargs)
        counts = self._scheduler
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[counts.factory])
        self._tokenizer = self._llm.get_tokenizer()
        self._native_tools = template_knows_tools(getattr(self._tokenizer, "chat_template", None))
        self._tool_parser = find_tool_parser(self.config.tool_parser, self._native_tools)
        self._max_model_len = self._llm.model_config.max_model_len
        self._limits = self._measure_limits()
        log.info(
            "vLLM engine up: %s, dtype=%s, max_model_len=%d", self.model_path, kwargs["dtype"], self._max_model_len
        )

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def limits(self) -> PromptLimits:
        return self._limits

    def _measure_limits(self) -> PromptLimits:
        """Template tokens around one message, whatever its role (the largest, default system prompt
        included), and around a plain prompt; +4 covers a tokenizer's leading-space marker and merges."""
        per_message = 0
        for role in ("system", "user", "assistant", "tool"):
            try:
                ids = self.prompt_ids(GenerationRequest("limits", messages=[{"role": role, "content": ""}]))
            except Exception:  # some templates refuse a role, or a lone message of it
                continue
            per_message = max(per_message, len(ids))
        per_prompt = len(self._tokenizer.encode(""))
        tools, per_tool = self._measure_tools()
        return PromptLimits(
            self._max_model_len,
            per_message + 4,
            per_prompt + 4,
            max_token_bytes(self._tokenizer),
            tools + 4,
            per_tool + 4,
        )

    def _measure_tools(self) -> tuple[int, int]:
        """Tokens a template adds for a tool list with one small tool, and for each further one."""
        user = [{"role": "user", "content": ""}]

        def size(n: int) -> int:
            tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}}
                     for i in range(n)]  # fmt: skip
            request = GenerationRequest("limits", messages=user, tools=tools or None, tool_choice="auto")
            return len(self.prompt_ids(request))

        try:
            none, one, two = size(0), size(1), size(2)
        except Exception:  # a template that refuses tools: they are refused at request time too
            return 0, 0
        return max(one - none, 0), max(two - one, 0)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Token ids the engine will see: the chat template applied by the model's own tokenizer."""
        if request.messages is not None:
            # "none" leaves the tools out, as vLLM's exclude_tools_when_tool_choice_none does.
            tools = request.tools if request.tool_choice != "none" else None
            messages, native_tools = render_inputs(request.messages, tools, native=self._native_tools)
            extra = {"tools": native_tools} if native_tools else {}
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
            return list(self._tokenizer.encode(text, add_special_tokens=False))
        if isinstance(request.prompt, list):
            return list(request.prompt)
        return list(self._tokenizer.encode(request.prompt or ""))

    def _sampling_params(self, request: GenerationRequest, prompt_len: int) -> Any:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        param = _prompt_param(request)
        room = self._max_model_len - prompt_len
        if room < 1:
            raise InvalidRequest(
                f"This model's maximum context length is {self._max_model_len} tokens; your prompt has {prompt_len}.",
                param=param,
                code="context_length_exceeded",
            )
        max_tokens = request.max_tokens if request.max_tokens is not None else room
        if max_tokens > room:
            raise InvalidRequest(
                f"This model's maximum context length is {self._max_model_len} tokens; your prompt has "
                f"{prompt_len} and max_tokens is {max_tokens}. Lower max_tokens to at most {room}.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        optional: dict[str, Any] = {
            "n": request.n if request.n > 1 else None,
            "logprobs": request.logprobs,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
        }
        structured = request.structured
        if request.tools and request.tool_choice != "none":
            schema = forced_schema(request.tools, request.tool_choice, request.parallel_tool_calls)
            if schema is not None:  # a forced call: no room for whitespace a small model may loop on
                structured = {"json": schema, "disable_any_whitespace": True}
        if structured is not None:
            from vllm.sampling_params import StructuredOutputsParams

            optional["structured_outputs"] = StructuredOutputsParams(**structured)
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                stop=request.stop or None,
                ignore_eos=request.ignore_eos,
                min_tokens=min(request.min_tokens, max_tokens),
                output_kind=RequestOutputKind.DELTA,
                stream_interval=self.stream_interval,
                **{k: v for k, v in optional.items() if v is not None},
            )
        except (VLLMClientError, ValueError, TypeError, OverflowError) as exc:  # vLLM's checks of client values
            raise client_error(exc) from None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Streams deltas; cancelling the iteration aborts the engine request (vLLM does it on cancel)."""
        from vllm.exceptions import VLLMClientError

        loop = asyncio.get_running_loop()
        taken = time.monotonic()
        try:
            ids = await loop.run_in_executor(self._tokenize, self.prompt_ids, request)
        except UnicodeError:
            raise InvalidRequest(
                "The prompt is not valid Unicode (it contains a lone surrogate escape such as \\ud800).",
                param=_prompt_param(request),
                code="invalid_unicode",
            ) from None
        except Exception as exc:
            if type(exc).__module__.startswith("jinja2"):  # the chat template refused these messages
                raise InvalidRequest(
                    f"This model's chat template refused the messages: {exc}", param="messages", code="invalid_value"
                ) from None
            raise
        params = self._sampling_params(request, len(ids))
        new_calls = call_streams(request, params, self._tool_parser, self._tokenizer)
        calls: dict[int, CallStream] = {}  # per choice, when tools may be called
        produced = 0  # over every choice
        try:
            async for out in self._llm.generate({"prompt_token_ids": ids}, params, request.request_id):
                for completion in out.outputs:  # one per choice with new tokens (n > 1: several may have)
                    produced += len(completion.token_ids)
                    spent = (time.monotonic() - taken) * 1000
                    logprobs = None
                    if request.logprobs is not None and completion.logprobs is not None:
                        logprobs = self._token_logprobs(completion.token_ids, completion.logprobs, request.logprobs)
                    text, finish, fragments = completion.text, completion.finish_reason, None
                    if new_calls is not None:
                        stream = calls.get(completion.index) or calls.setdefault(completion.index, new_calls())
                        text, fragments = feed_calls(stream, completion.text, completion.token_ids, finish)
                        finish = "tool_calls" if finish == "stop" and stream.called else finish
                    yield Delta(
                        text,
                        len(ids),
                        produced,
                        finish,
                        spent,
                        logprobs,
                        completion.index,
                        tuple(fragments or ()) or None,
                    )
        except APIError:
            raise
        except VLLMClientError as exc:
            raise client_error(exc) from None
        except (asyncio.CancelledError, GeneratorExit):
            self._aborted += 1  # vLLM's generate() aborted the request on its way out
            raise
        except Exception as exc:
            log.warning("engine failed on %s: %s", request.request_id, type(exc).__name__)
            raise EngineUnavailable("The model engine failed; retry later.", code="engine_error") from None

    def _token_logprobs(self, token_ids: Any, per_token: Any, top: int) -> tuple[TokenLogprob, ...]:
        """vLLM's logprobs of new tokens (a dict per token: id -> Logprob with rank and decoded text, the
        sampled one always in it), each as a TokenLogprob with the ``top`` best by rank."""
        out = []
        for token_id, entries in zip(token_ids, per_token, strict=False):
            chosen = entries[token_id]
            best = sorted((e for e in entries.items() if e[1].rank is not None and e[1].rank <= top),
                          key=lambda e: e[1].rank)[:top]  # fmt: skip
            out.append(
                TokenLogprob(
                    self._token_text(token_id, chosen),
                    max(chosen.logprob, -9999.0),
                    tuple((self._token_text(i, lp), max(lp.logprob, -9999.0)) for i, lp in best),
                )
            )
        return tuple(out)

    def _token_text(self, token_id: int, logprob: Any) -> str:
        text = logprob.decoded_token
        return text if text is not None else str(self._tokenizer.decode([token_id]))

    async def embed(self, job: Any) -> Any:
        raise InvalidRequest(
            "This model does not serve embeddings: send them to an embedding model.", param="model",
            code="model_not_supported",
        )  # fmt: skip

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
        s = self._scheduler
        return EngineStats(
            s.running, s.waiting, unfinished, self._aborted, s.prefix_queries, s.prefix_hits, s.kv_cache_usage
        )

    def shutdown(self) -> None:
        self._tokenize.shutdown(wait=False, cancel_futures=True)
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None


def _prompt_param(request: GenerationRequest) -> str:
    return "messages" if request.messages is not None else "prompt"
