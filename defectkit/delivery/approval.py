"""An optional manual approval gate in a delivery, with Flagger's confirm-promotion semantics.

Before the final promotion (or, by choice, before the first traffic) the
controller POSTs the delivery's state to a URL and waits: an answer of 200
means go; anything else (another status, no answer) means not yet, and it asks
again every ``poll_interval_s`` until ``timeout_s`` has passed since the first
request, when the candidate is rolled back. Flagger's ``confirm-promotion``
webhook (flagger.app, "Webhooks": "the canary analysis is paused until the
webhook returns HTTP 200") works so, without the timeout. Every request and
the outcome are in the delivery's timeline and decision record.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

from defectkit.notify import origin

PROMOTION, TRAFFIC = "promotion", "traffic"
STAGES = (PROMOTION, TRAFFIC)


@dataclass(frozen=True)
class ApprovalGate:
    """``url`` is asked before ``before`` (the final promotion, or the first traffic)."""

    url: str
    before: str = PROMOTION
    timeout_s: float = 3600.0
    poll_interval_s: float = 30.0
    request_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"approval URL {self.url!r} must start with http:// or https://")
        if self.before not in STAGES:
            raise ValueError(f"approval before={self.before!r} must be one of {', '.join(STAGES)}")
        for name in ("timeout_s", "poll_interval_s", "request_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"approval {name}={value!r} must be a positive number of seconds")

    @property
    def where(self) -> str:
        """The URL without its path and query, which may carry a token, for records and logs."""
        return origin(self.url)

    def to_json(self) -> dict:
        return {**asdict(self), "url": self.where}

    def ask(self, payload: dict) -> tuple[bool, str]:
        """(approved, the answer in words): only HTTP 200 approves."""
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode(), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "defectkit-approval"})
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout_s) as answer:
                answer.read()
                return answer.status == 200, f"HTTP {answer.status}"
        except urllib.error.HTTPError as exc:
            return False, f"HTTP {exc.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            return False, f"no answer ({getattr(exc, 'reason', exc)})"
