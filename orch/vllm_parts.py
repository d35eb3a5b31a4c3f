"""The engine's parts that speak vLLM's own types: its stat logger, its refusals as 400s, the
vocabulary's longest token, and tool calling's streams (``orch/tools.py``) wired to vLLM's parsers."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from orch.errors import InvalidRequest
from orch.tools import CallStream, ForcedCalls, ParsedCalls

if TYPE_CHECKING:
    from orch.engine import GenerationRequest


def max_token_bytes(tokenizer: Any) -> int:
    """The most UTF-8 bytes of text one token can stand for, over the whole vocabulary (added and
    special tokens included): bounds a prompt's tokens from below by its bytes, without tokenising.

    A byte-level BPE entry spells each byte as one character; a SentencePiece piece decodes to its
    text (+1 for the space its '▁' stands for). A normaliser may shrink text (NFC composes up to
    3 jamo into one syllable), so with one the bound is widened 4×."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    longest = max((len(token) for token in vocab), default=1)
    try:
        texts = tokenizer.batch_decode([[i] for i in sorted(vocab.values())])
        longest = max([longest, *(len(t.encode("utf-8", "replace")) + 1 for t in texts)])
        normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", "unknown")
    except Exception:  # not an HF tokenizer: the entries' UTF-8 bytes, widened
        longest, normalizer = max(len(t.encode("utf-8", "replace")) for t in vocab), "unknown"
    return longest * (1 if normalizer is None else 4)


_SAMPLING_FIELDS = re.compile(
    r"\b(stop|seed|temperature|top_p|max_tokens|min_tokens|presence_penalty|frequency_penalty)\b"
)


def client_error(exc: Exception, default_param: str | None = None) -> InvalidRequest:
    """A 400 for vLLM's refusal of a request, naming the field (its ``parameter``, else the field its
    message names, as in "stop cannot contain an empty string", else ``default_param``)."""
    message = str(exc)
    param = getattr(exc, "parameter", None)
    if param is None:
        match = _SAMPLING_FIELDS.search(message)
        param = match.group(1) if match else default_param
    return InvalidRequest(f"Invalid request: {message}", param=param, code="invalid_value")


def find_tool_parser(configured: str | None, native_tools: bool) -> Any:
    """The vLLM tool parser class for ``tool_choice: auto``: the configured one, else ``hermes`` when the
    template knows no tools (they are then rendered in Hermes' format); None: ``auto`` is refused."""
    name = configured or (None if native_tools else "hermes")
    if name is None:
        return None
    from vllm.tool_parsers import ToolParserManager

    try:
        return ToolParserManager.get_tool_parser(name)
    except KeyError:
        known = ", ".join(sorted({*ToolParserManager.tool_parsers, *ToolParserManager.lazy_parsers}))
        raise ValueError(f"engine.tool_parser: unknown vLLM tool parser '{name}'; known: {known}") from None


def call_streams(request: GenerationRequest, params: Any, tool_parser: Any, tokenizer: Any) -> Any:
    """A factory of per-choice :class:`orch.tools.CallStream` (None: no tool can be called); ``auto``
    needs the model's tool parser, and may make the engine keep special tokens in the text."""
    if not request.tools or request.tool_choice == "none":
        return None
    if isinstance(request.tool_choice, dict):
        name = request.tool_choice["function"]["name"]
        return lambda: ForcedCalls(name)
    if request.tool_choice == "required":
        return lambda: ForcedCalls(None)
    if tool_parser is None:
        raise InvalidRequest(
            "This model has no tool parser configured (engine.tool_parser), so it can't choose tools itself; "
            "use 'tool_choice' 'required' or a named function.",
            param="tool_choice",
            code="unsupported_value",
        )
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    try:
        vllm_request = ChatCompletionRequest(
            model="-", messages=[{"role": "user", "content": ""}], tools=request.tools, tool_choice="auto"
        )
    except ValueError as exc:  # pydantic's ValidationError: tools vLLM's own server would refuse too
        raise InvalidRequest(f"Invalid 'tools': {exc}", param="tools", code="invalid_value") from None
    parser_cls = tool_parser
    vllm_request = parser_cls(tokenizer, vllm_request.tools).adjust_request(vllm_request)
    params.skip_special_tokens = vllm_request.skip_special_tokens  # tags that are special tokens stay in
    return lambda: ParsedCalls(parser_cls(tokenizer, vllm_request.tools), vllm_request)


def feed_calls(stream: CallStream, text: str, token_ids: Any, finish: str | None) -> tuple[str, list[dict[str, Any]]]:
    content, fragments = stream.feed(text, token_ids)
    if finish is not None:
        more, last = stream.finish()
        content, fragments = content + more, fragments + last
    return content, fragments


class SchedulerCounts:
    """Receives vLLM's per-step scheduler stats (a stat logger) and keeps the latest counts."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache, summed over steps
        self.prefix_hits = 0
        self.kv_cache_usage = 0.0  # fraction of KV cache blocks in use

    def factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        counts = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:  # fmt: skip
                if scheduler_stats is not None:
                    counts.running = scheduler_stats.num_running_reqs
                    counts.waiting = scheduler_stats.num_waiting_reqs
                    counts.kv_cache_usage = float(getattr(scheduler_stats, "kv_cache_usage", 0.0))
                    cache = scheduler_stats.prefix_cache_stats
                    if cache is not None:
                        counts.prefix_queries += cache.queries
                        counts.prefix_hits += cache.hits

            def log_engine_initialized(self) -> None:
                pass

        return _Logger(vllm_config, engine_index)
