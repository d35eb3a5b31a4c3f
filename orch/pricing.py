"""Prices and costs in integer micro-credits: what a request holds and what it is charged.

Pure functions, re-exported by :mod:`orch.ledger` (where the money rules live).
"""

from __future__ import annotations

from dataclasses import dataclass

TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per 1M tokens


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-credits per 1M input (prompt) tokens and per 1M output (completion) tokens."""

    input_per_m: int
    output_per_m: int

    def __post_init__(self) -> None:
        for v in (self.input_per_m, self.output_per_m):
            if type(v) is not int or v < 0:
                raise ValueError(f"price must be a non-negative int of micro-credits per 1M tokens: {v!r}")


def cost(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """Cost in micro-credits, rounded UP once on the total (never under-charges, over-charges < 1 µc).

    >>> cost(Price(input_per_m=150_000, output_per_m=600_000), 1, 1)  # 0.75 µc exact
    1
    >>> cost(Price(150_000, 600_000), 1_000_000, 0)
    150000
    """
    if (
        type(prompt_tokens) is not int
        or type(completion_tokens) is not int
        or min(prompt_tokens, completion_tokens) < 0
    ):
        raise ValueError(f"token counts are non-negative ints: {prompt_tokens!r}, {completion_tokens!r}")
    exact_times_m = price.input_per_m * prompt_tokens + price.output_per_m * completion_tokens
    return -(-exact_times_m // TOKENS_PER_PRICE_UNIT)


def max_cost(price: Price, prompt_tokens: int, max_tokens: int) -> int:
    """The hold for a request: its cost if it generates all ``max_tokens`` (ceil is monotonic, so
    ``cost(price, p, c) <= max_cost(price, p, m)`` for every ``c <= m``)."""
    return cost(price, prompt_tokens, max_tokens)
