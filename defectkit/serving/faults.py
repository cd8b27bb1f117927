"""Fault injection FOR CANARY TESTS ONLY: make a served model fail, slow down or shift its scores.

Canary analysis has to be shown to catch a bad candidate, and the circuit
breaker to trip on a failing model; these options make a perfectly good
model artifact behave badly on purpose, in a controlled and reproducible
way (seeded). They act on the primary model only, never on the fallback:

- ``error_rate``: the share of requests whose model call raises (answered
  5xx, counted as a model failure by the circuit breaker);
- ``latency_ms``: added to every model call (counts against the
  per-request timeout, so a large value makes calls time out);
- ``score_shift``: added to every defect score (clipped to [0, 1]), as if
  the model had drifted; labels follow the shifted scores;
- ``duration_s``: faults stop this long after the first request that met
  them (0 = never), so a failing model can be seen to recover.

Never set them on a production server.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class InjectedFault(RuntimeError):
    """A model failure made on purpose by --fault-error-rate."""


@dataclass(frozen=True)
class FaultConfig:
    error_rate: float = 0.0
    latency_ms: float = 0.0
    score_shift: float = 0.0
    duration_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"fault error_rate={self.error_rate!r} must be between 0 and 1")
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise ValueError(f"fault latency_ms={self.latency_ms!r} must be a non-negative number")
        if not -1.0 <= self.score_shift <= 1.0:
            raise ValueError(f"fault score_shift={self.score_shift!r} must be between -1 and 1")
        if not (math.isfinite(self.duration_s) and self.duration_s >= 0):
            raise ValueError(f"fault duration_s={self.duration_s!r} must be a non-negative number (0 = no end)")

    @property
    def enabled(self) -> bool:
        return self.error_rate > 0 or self.latency_ms > 0 or self.score_shift != 0

    def describe(self) -> str:
        parts = [f"error_rate={self.error_rate}", f"latency_ms={self.latency_ms}", f"score_shift={self.score_shift}"]
        if self.duration_s:
            parts.append(f"for {self.duration_s} s from the first request")
        return ", ".join(parts)


class FaultInjector:
    def __init__(self, config: FaultConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._random = random.Random(config.seed)
        self._started: float | None = None

    @property
    def active(self) -> bool:
        """Whether faults apply to a model call made now; the first call starts the duration_s clock."""
        if not self.config.enabled:
            return False
        if not self.config.duration_s:
            return True
        now = self._clock()
        if self._started is None:
            self._started = now
        return now - self._started < self.config.duration_s

    @property
    def latency_s(self) -> float:
        return self.config.latency_ms / 1000.0 if self.active else 0.0

    def maybe_fail(self) -> None:
        if self.active and self.config.error_rate and self._random.random() < self.config.error_rate:
            raise InjectedFault(f"injected model failure (fault injection: error_rate={self.config.error_rate})")

    def shift(self, scores: np.ndarray) -> np.ndarray:
        if not self.active or not self.config.score_shift:
            return scores
        return np.clip(scores + np.float32(self.config.score_shift), 0.0, 1.0).astype(np.float32)
