"""``/v1/embeddings`` on the session's stack: the default embedding model (all-MiniLM-L6-v2, a deployment
of its own beside the colocated chat replicas), through the official ``openai`` client unmodified."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import openai
import pytest

from tests.integration.conftest import MODEL, Stack

pytestmark = pytest.mark.integration

EMBEDDER = "all-minilm-l6-v2"
TEXTS = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_are_the_models_vectors_and_billed_by_input_tokens(stack: Stack) -> None:
    from orch.ledger import Price, cost
    from tests.integration.test_tap_billing import account, new_tenant, usage

    tenant, key = new_tenant(stack, 1_000_000)
    client = openai.OpenAI(base_url=stack.v1, api_key=key, max_retries=0, timeout=300)
    reply = client.embeddings.create(model=EMBEDDER, input=TEXTS, encoding_format="float")
    vectors = [d.embedding for d in sorted(reply.data, key=lambda d: d.index)]
    assert [len(v) for v in vectors] == [384] * 3 and reply.model == EMBEDDER
    paraphrase, unrelated = _cosine(vectors[0], vectors[1]), _cosine(vectors[0], vectors[2])
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)

    # The client's default asks for base64 and decodes it: the same float32 values.
    decoded = client.embeddings.create(model=EMBEDDER, input=TEXTS[0]).data[0].embedding
    assert decoded == [struct.unpack("<f", struct.pack("<f", x))[0] for x in vectors[0]]
    raw = httpx.post(stack.v1 + "/embeddings", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                     json={"model": EMBEDDER, "input": TEXTS[0], "encoding_format": "base64"}).json()  # fmt: skip
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == decoded

    a = account(stack, tenant)
    rows = usage(stack, tenant)["data"]
    assert [r["model"] for r in rows] == [EMBEDDER] * 3 and all(r["completion_tokens"] == 0 for r in rows)
    assert rows[0]["prompt_tokens"] == reply.usage.prompt_tokens == reply.usage.total_tokens > 3 * 5
    price = Price(100_000, 0)  # configs/local.yaml's price for the embedding model
    assert [r["cost_micro"] for r in rows] == [cost(price, r["prompt_tokens"], 0) for r in rows]
    assert a["spent_micro_credits"] == sum(r["cost_micro"] for r in rows) > 0


def test_embedding_requests_the_model_cannot_serve_are_400s(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.v1, api_key=stack.key, max_retries=0, timeout=300)
    cases = [
        (lambda: client.embeddings.create(model=EMBEDDER, input="x", dimensions=128), "dimensions"),  # not Matryoshka
        (lambda: client.embeddings.create(model=MODEL, input="x"), "model"),  # a chat model
        (lambda: client.chat.completions.create(model=EMBEDDER, messages=[{"role": "user", "content": "x"}]), "model"),
        (lambda: client.embeddings.create(model=EMBEDDER, input=[]), "input"),
        (lambda: client.embeddings.create(model=EMBEDDER, input="word " * 600), "input"),  # past 256 tokens
    ]
    for call, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            call()
        assert err.value.body["param"] == param, err.value.body  # type: ignore[index]
    models = {m.id for m in client.models.list()}
    assert {MODEL, EMBEDDER} <= models
