"""Retrying idempotent calls with exponential backoff and jitter: the one home of that rule.

Storage, the Kubernetes API, Prometheus and the canary probe all retry the same
way; each says only which failures are transient. Only idempotent calls are
retried: a write retried here carries a precondition, or replaces the whole object.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Throttled or briefly unavailable: worth another try. Anything else is a real answer.
TRANSIENT_HTTP_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``attempts`` tries in all, waits doubling from ``initial_delay_s`` to ``max_delay_s``."""

    attempts: int = 5
    initial_delay_s: float = 0.2
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"attempts={self.attempts!r} must be an integer of at least 1")
        if not 0 <= self.initial_delay_s <= self.max_delay_s:
            raise ValueError(f"delays must satisfy 0 <= initial_delay_s ({self.initial_delay_s}) <= "
                             f"max_delay_s ({self.max_delay_s})")

    def waits(self) -> Iterator[float]:
        """The waits before the second and later attempts, without jitter."""
        delay = self.initial_delay_s
        for _ in range(self.attempts - 1):
            yield delay
            delay = min(delay * 2, self.max_delay_s)


def retry_after_s(headers: Mapping[str, str]) -> float:
    """The wait a server names in ``Retry-After`` (its seconds form), else 0; :func:`retry` waits at least that."""
    value = headers.get("Retry-After", "")
    return float(value) if value.isdigit() else 0.0


class RetryableResponse(Exception):
    """An HTTP answer worth another try; it carries the answer, so that the last one can be reported."""

    def __init__(self, response: Any, status: int, headers: Mapping[str, str]) -> None:
        super().__init__(f"HTTP {status}")
        self.response = response
        self.retry_after_s = retry_after_s(headers)


def retry(call: Callable[[], T], what: str, policy: RetryPolicy, *,
          transient: Callable[[BaseException], bool]) -> T:
    """Run ``call``; on an exception that ``transient`` accepts, wait and try again, up to ``policy.attempts``.

    The last exception is raised as it is, so callers report the real failure.
    """
    waits = policy.waits()
    attempt = 1
    while True:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - filtered by ``transient``
            wait = next(waits, None)
            if wait is None or not transient(exc):
                raise
            # A server that names its own wait (429, 503) knows better than our backoff.
            wait = max(wait, getattr(exc, "retry_after_s", 0.0))
            log.warning("%s failed (%s), retry %d/%d in %.1fs", what, exc, attempt, policy.attempts - 1, wait)
            time.sleep(wait * (0.5 + random.random()))
            attempt += 1
