"""The chaos suite's vocabulary: a scenario, what one run of it measured, and the table of all of them."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Outcome:
    """What one fault did to one kind of operation.

    ``succeeded`` counts operations that ended as they should under the fault
    (for malformed input that is a clear 4xx, not a 2xx); ``lost`` counts
    items of data that a reader can no longer get, or saw half-written: the
    goal of every scenario is zero. ``recover_s`` is the time from the end of
    the fault to the first success after it (None where nothing had to recover).
    """

    scenario: str
    fault: str
    attempted: int
    succeeded: int
    lost: int
    recover_s: float | None
    goal: str  # in words, e.g. ">= 99.9% answered 2xx, nothing lost"
    met: bool
    details: dict = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        return self.succeeded / self.attempted if self.attempted else 1.0


@dataclass(frozen=True)
class Scenario:
    """``run(work_dir, short)`` injects the faults and returns what it measured; ``short`` is CI's form."""

    name: str
    run: Callable[[Path, bool], list[Outcome]]


def rate_meets(succeeded: int, attempted: int, goal: float, confidence: float = 0.99) -> bool:
    """Whether ``succeeded`` of ``attempted`` is consistent with a success rate of at least ``goal``.

    A rate is a probability, and a few dozen operations cannot resolve 99.9%: one failure in 60 reads as
    98.3% though a process failing one time in a thousand does that 6% of the time. So the goal is missed
    only when the failures seen would be improbable (below ``1 - confidence``) at a failure rate of
    ``1 - goal``: an exact one-sided binomial test. With thousands of operations it is the plain rate.
    """
    if attempted <= 0:
        return False
    failures, p = attempted - succeeded, 1.0 - goal
    # P(at least `failures` failures in `attempted` tries at failure rate p)
    tail = 1.0 - sum(math.comb(attempted, k) * p ** k * (1 - p) ** (attempted - k) for k in range(failures))
    return tail >= 1.0 - confidence


def failed_outcome(scenario: str, error: BaseException) -> Outcome:
    """A scenario that raised has missed its goal; the table says why."""
    return Outcome(scenario, "scenario raised", 0, 0, 0, None, "runs to the end", False,
                   {"error": f"{type(error).__name__}: {error}"})


def run_scenario(scenario: Scenario, work_dir: Path, short: bool) -> tuple[list[Outcome], float]:
    started = time.monotonic()
    try:
        outcomes = scenario.run(work_dir, short)
        if not outcomes:
            raise RuntimeError("measured nothing")
    except Exception as exc:  # noqa: BLE001 - one scenario's failure is reported, the others still run
        outcomes = [failed_outcome(scenario.name, exc)]
    return outcomes, time.monotonic() - started


def _recover(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def table(outcomes: list[Outcome]) -> str:
    """The Markdown table ``make chaos`` prints."""
    lines = ["| scenario | fault | operations | success rate | data lost | time to recover | goal | met |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for o in outcomes:
        lines.append(f"| {o.scenario} | {o.fault} | {o.attempted} | {100 * o.success_rate:.2f}% | {o.lost} | "
                     f"{_recover(o.recover_s)} | {o.goal} | {'yes' if o.met else '**NO**'} |")
    return "\n".join(lines)


def write_json(outcomes: list[Outcome], path: Path) -> None:
    path.write_text(json.dumps([{**asdict(o), "success_rate": o.success_rate} for o in outcomes], indent=2))
