"""VLLMEngine's request path over a fake tokenizer and a fake AsyncLLM (named as such): prompts are
tokenised off the event loop, and vLLM's refusals of a request's values are 400s naming the field."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from orch.config import EngineConfig
from orch.engine import Delta, GenerationRequest, VLLMEngine
from orch.errors import InvalidRequest


class FakeTokenizer:
    """One id per character; records the thread that tokenised; refuses lone surrogates as Rust would."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.get_ident())
        text.encode("utf-8")  # raises UnicodeEncodeError on a lone surrogate
        return [ord(c) % 1000 for c in text]


class FakeAsyncLLM:
    """Yields one finished output per request."""

    async def generate(self, prompt: dict[str, Any], params: Any, request_id: str) -> AsyncIterator[Any]:
        out = SimpleNamespace(text="ok", token_ids=[1], finish_reason="stop", logprobs=None, index=0)
        yield SimpleNamespace(outputs=[out])

    def shutdown(self) -> None:
        pass


def _engine() -> tuple[VLLMEngine, FakeTokenizer]:
    engine = VLLMEngine("/nowhere", EngineConfig())
    tokenizer = FakeTokenizer()
    engine._tokenizer, engine._llm, engine._max_model_len = tokenizer, FakeAsyncLLM(), 64
    return engine, tokenizer


async def _run(engine: VLLMEngine, request: GenerationRequest) -> list[Delta]:
    return [delta async for delta in engine.generate(request)]


def test_prompts_are_tokenised_off_the_event_loop() -> None:
    engine, tokenizer = _engine()

    async def scenario() -> list[Delta]:
        loop_thread = threading.get_ident()
        deltas = await _run(engine, GenerationRequest("r1", prompt="hello", max_tokens=2))
        assert tokenizer.threads and loop_thread not in tokenizer.threads
        return deltas

    deltas = asyncio.run(scenario())
    assert deltas == [Delta("ok", 5, 1, "stop")]
    assert deltas[0].engine_ms > 0  # the engine's own time, tokenising included
    engine.shutdown()


def test_a_lone_surrogate_reaching_the_engine_is_a_400_naming_the_prompt() -> None:
    engine, _ = _engine()
    with pytest.raises(InvalidRequest) as err:
        asyncio.run(_run(engine, GenerationRequest("r2", prompt="bad \ud800", max_tokens=2)))
    assert (err.value.param, err.value.code) == ("prompt", "invalid_unicode")
    engine.shutdown()


def test_a_value_vllm_refuses_is_a_400_naming_the_field() -> None:
    engine, _ = _engine()
    with pytest.raises(InvalidRequest) as err:  # vLLM: "stop cannot contain an empty string."
        asyncio.run(_run(engine, GenerationRequest("r3", prompt="hi", max_tokens=2, stop=[""])))
    assert (err.value.status, err.value.param) == (400, "stop")
    engine.shutdown()
