"""OpenAI response shapes: whole completions, SSE chunks (``ChunkWriter``), logprobs and usage, as plain
dicts in exactly OpenAI's shapes; ``tests/unit/test_protocol.py`` validates them against the ``openai``
package's types."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class TokenLogprobLike(Protocol):
    """``orch.engine.TokenLogprob``: a sampled token, its logprob and the most likely tokens there."""

    @property
    def token(self) -> str: ...
    @property
    def logprob(self) -> float: ...
    @property
    def top(self) -> tuple[tuple[str, float], ...]: ...


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", "replace"))


def chat_logprobs(tokens: Sequence[TokenLogprobLike]) -> dict[str, Any]:
    """A chat choice's ``logprobs``: per token its logprob, bytes and ``top_logprobs``, most likely first.

    >>> from orch.engine import TokenLogprob
    >>> chat_logprobs([TokenLogprob("Hi", -0.5, (("Hi", -0.5), ("Hey", -1.2)))])["content"][0]["top_logprobs"][1]
    {'token': 'Hey', 'logprob': -1.2, 'bytes': [72, 101, 121]}
    """
    content = [
        {
            "token": t.token,
            "logprob": t.logprob,
            "bytes": _bytes(t.token),
            "top_logprobs": [{"token": tok, "logprob": lp, "bytes": _bytes(tok)} for tok, lp in t.top],
        }
        for t in tokens
    ]
    return {"content": content, "refusal": None}


def text_logprobs(tokens: Sequence[TokenLogprobLike], offset: int = 0) -> dict[str, Any]:
    """A text completion choice's ``logprobs`` (the legacy shape); ``offset``: characters before these tokens."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
    }


class Choice(NamedTuple):
    """One finished choice of a completion: its text, why it ended, its tokens' logprobs if asked for."""

    text: str
    finish_reason: str | None
    logprobs: Sequence[TokenLogprobLike] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # whole calls (``orch.tools.merge_fragments``)


def chat_completion(
    request_id: str, model: str, choices: Sequence[Choice], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A whole chat completion; ``completion_tokens`` counts every choice's."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": _message(c),
                "logprobs": chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage_dict(prompt_tokens, completion_tokens),
    }


def _message(choice: Choice) -> dict[str, Any]:
    if choice.tool_calls:  # OpenAI's content is null when the answer is only calls
        return {"role": "assistant", "content": choice.text or None, "refusal": None, "tool_calls": choice.tool_calls}
    return {"role": "assistant", "content": choice.text, "refusal": None}


def text_completion(
    request_id: str, model: str, choices: Sequence[Choice], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A whole text completion; ``completion_tokens`` counts every choice's."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "text": c.text,
                "logprobs": text_logprobs(c.logprobs) if c.logprobs is not None else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage_dict(prompt_tokens, completion_tokens),
    }


class ChunkWriter:
    """Builds the SSE byte frames of one streamed completion, chat or text.

    The first chat chunk of each choice carries ``role``; a choice's last chunk carries its
    ``finish_reason``; choices (``n``) interleave, each chunk naming its ``index``; with
    ``include_usage`` every chunk has ``"usage": null`` and a final chunk has ``choices: []`` and the
    usage; then ``data: [DONE]``.
    """

    def __init__(self, *, chat: bool, request_id: str, model: str, include_usage: bool) -> None:
        self.chat = chat
        self.include_usage = include_usage
        self._offsets: dict[int, int] = {}  # text completions' logprobs: characters streamed so far, per choice
        self._opened = {0} if chat else set()  # chat choices whose first chunk (with the role) went out
        self._base: dict[str, Any] = {
            "id": request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

    def _frame(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        chunk = {**self._base, "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    def first(self) -> bytes:
        """The opening chat chunk (role, empty content); text completions have none."""
        if not self.chat:
            return b""
        delta = {"role": "assistant", "content": ""}
        return self._frame([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def delta(
        self,
        text: str,
        finish_reason: str | None,
        logprobs: Sequence[TokenLogprobLike] | None = None,
        index: int = 0,
        tool_calls: Sequence[dict[str, Any]] | None = None,
    ) -> bytes:
        """One chunk of choice ``index``; ``logprobs``: the chunk's tokens', when the request asked for them;
        ``tool_calls``: call fragments (``orch.tools``). A chat choice's first chunk carries the role."""
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text or (finish_reason is None and not tool_calls) else {}
            if index not in self._opened:
                self._opened.add(index)
                delta = {"role": "assistant", "content": text}
            if tool_calls:
                delta["tool_calls"] = tool_calls
            lp = chat_logprobs(logprobs) if logprobs is not None else None
            return self._frame([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}])
        lp = None
        if logprobs is not None:
            offset = self._offsets.get(index, 0)
            lp = text_logprobs(logprobs, offset)
            self._offsets[index] = offset + sum(len(t.token) for t in logprobs)
        return self._frame([{"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self._frame([], usage_dict(prompt_tokens, completion_tokens))

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    DONE = b"data: [DONE]\n\n"
