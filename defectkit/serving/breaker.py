"""A circuit breaker: stop calling a model that keeps failing, probe it again after a cool-down.

States follow the usual pattern (Nygard, *Release It!*):

- ``closed``: calls go through; each failure is remembered for ``window_s``.
  ``failures`` of them inside the window open the circuit.
- ``open``: calls are refused (the caller answers from its fallback, or
  with 503) until ``cooldown_s`` has passed.
- ``half_open``: exactly one call, the probe, goes through. Its success
  closes the circuit and forgets past failures; its failure opens it again
  for another cool-down.

Not thread-safe by design: the model server calls it from its event loop only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
STATES = (CLOSED, OPEN, HALF_OPEN)


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 5  # failures inside window_s that open the circuit
    window_s: float = 30.0
    cooldown_s: float = 10.0  # time open before one probe call is let through

    def __post_init__(self) -> None:
        if not isinstance(self.failures, int) or isinstance(self.failures, bool) or self.failures < 1:
            raise ValueError(f"breaker failures={self.failures!r} must be a positive integer")
        for name in ("window_s", "cooldown_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"breaker {name}={value!r} must be a positive number of seconds")


class CircuitBreaker:
    def __init__(self, config: BreakerConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._failures: deque[float] = deque()
        self._state = CLOSED
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> str:
        """The state a call made now would see: an open circuit past its cool-down reads half-open."""
        if self._state == OPEN and self._clock() - self._opened_at >= self.config.cooldown_s:
            return HALF_OPEN
        return self._state

    def retry_after_s(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when it would now)."""
        if self._state != OPEN:
            return 0.0
        return max(0.0, self.config.cooldown_s - (self._clock() - self._opened_at))

    def allow(self) -> bool:
        """Whether this call may go to the protected model; a True in half-open state makes it the probe.

        Every allowed call must be followed by exactly one of success(), failure() or abandon().
        """
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self._probing:
            self._state = HALF_OPEN
            self._probing = True
            return True
        return False

    def success(self) -> None:
        if self._state == HALF_OPEN:
            self._state = CLOSED
            self._probing = False
            self._failures.clear()

    def failure(self) -> None:
        now = self._clock()
        if self._state == HALF_OPEN:
            self._open(now)
            return
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.config.window_s:
            self._failures.popleft()
        if self._state == CLOSED and len(self._failures) >= self.config.failures:
            self._open(now)

    def abandon(self) -> None:
        """An allowed call ended without an outcome (cancelled); a probe slot is given back."""
        if self._state == HALF_OPEN:
            self._probing = False

    def _open(self, now: float) -> None:
        self._state = OPEN
        self._opened_at = now
        self._probing = False
        self._failures.clear()
