"""LocalModel, the front's port to an engine in its own replica, over a fake actor (named as such)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from apps.model_port import LocalModel
from orch.billing import PromptLimits
from orch.engine import Delta, GenerationRequest


class FakeActor:
    """Stands in for ModelActor: a generate() that yields ``n`` deltas and records how it ended."""

    def __init__(self, n: int = 5) -> None:
        self.n = n
        self.ended: dict[str, str] = {}
        self.aborted: list[str] = []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        try:
            for i in range(1, self.n + 1):
                await asyncio.sleep(0)
                yield Delta("t", 3, i, "length" if i == self.n else None, 0.0)
            self.ended[request.request_id] = "finished"
        except GeneratorExit:
            self.ended[request.request_id] = "closed"
            raise

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def limits(self) -> PromptLimits:
        return PromptLimits(max_model_len=64, per_message_tokens=4, per_prompt_tokens=1)

    async def check_health(self) -> None:
        return None


def _request(rid: str) -> GenerationRequest:
    return GenerationRequest(rid, prompt="hi", max_tokens=5)


def test_a_local_stream_yields_the_engines_deltas_in_order() -> None:
    async def scenario() -> None:
        actor = FakeActor(n=4)
        port = LocalModel(actor)  # type: ignore[arg-type]
        stream = port.stream(_request("r1"))
        first = await stream.__anext__()
        rest = [d async for d in stream]
        assert [d.completion_tokens for d in [first, *rest]] == [1, 2, 3, 4]
        assert rest[-1].finish_reason == "length" and actor.ended == {"r1": "finished"}
        assert await port.limits() == actor.limits()

    asyncio.run(scenario())


def test_cancel_closes_the_engine_generator_and_aborts_the_request_once() -> None:
    async def scenario() -> None:
        actor = FakeActor(n=100)
        port = LocalModel(actor)  # type: ignore[arg-type]
        stream = port.stream(_request("r2"))
        await stream.__anext__()
        stream.cancel()
        stream.cancel()  # a second cancel (the SSE generator's and the response's) does nothing more
        for _ in range(10):
            await asyncio.sleep(0)
        assert actor.ended == {"r2": "closed"}  # the engine's generator saw GeneratorExit: vLLM aborts there
        assert actor.aborted == ["r2"]

    asyncio.run(scenario())


def test_cancel_of_a_finished_stream_only_aborts_a_request_the_engine_no_longer_has() -> None:
    async def scenario() -> None:
        actor = FakeActor(n=2)
        port = LocalModel(actor)  # type: ignore[arg-type]
        stream = port.stream(_request("r3"))
        assert len([d async for d in stream]) == 2
        stream.cancel()
        for _ in range(10):
            await asyncio.sleep(0)
        assert actor.ended == {"r3": "finished"} and actor.aborted == ["r3"]

    asyncio.run(scenario())
