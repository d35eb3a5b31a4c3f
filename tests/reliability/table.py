"""The reliability suite's table (``pytest -m reliability``): each fault test records what it injected and what
it found; ``tests/conftest.py`` prints the rows at the end of the run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    fault: str
    in_flight: int  # requests (or ops) in flight when it struck
    lost_micro_credits: int  # served but not charged (or committed but gone)
    double_charges: int
    invariant_violations: int


FAULTS: list[Fault] = []
FIGURES: dict[str, str] = {}  # other figures: fuzz cases, 5xx, ...


def record(fault: str, in_flight: int, lost: int, doubled: int, violations: int = 0) -> None:
    FAULTS.append(Fault(fault, in_flight, lost, doubled, violations))


def figure(name: str, value: object) -> None:
    FIGURES[name] = str(value)


def lines() -> list[str]:
    out = []
    if FAULTS:
        out.append(f"{'fault':<52} {'in flight':>9} {'µc lost':>8} {'doubled':>8} {'violations':>10}")
        for f in FAULTS:
            out.append(f"{f.fault:<52} {f.in_flight:>9} {f.lost_micro_credits:>8} {f.double_charges:>8} "
                       f"{f.invariant_violations:>10}")  # fmt: skip
    out += [f"{name}: {value}" for name, value in FIGURES.items()]
    return out
