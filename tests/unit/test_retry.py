"""Backoff: transient failures are retried up to the policy, others and the last one are raised as they are."""

from __future__ import annotations

import pytest

from defectkit import retry as retry_module
from defectkit.retry import RetryableResponse, RetryPolicy, retry


def test_waits_double_up_to_the_cap():
    assert list(RetryPolicy(attempts=5, initial_delay_s=1, max_delay_s=3).waits()) == [1, 2, 3, 3]
    assert list(RetryPolicy(attempts=1).waits()) == []


@pytest.mark.parametrize("bad", [{"attempts": 0}, {"attempts": True}, {"initial_delay_s": 2, "max_delay_s": 1}])
def test_a_policy_that_cannot_work_is_refused(bad):
    with pytest.raises(ValueError):
        RetryPolicy(**bad)


def test_a_servers_retry_after_outlasts_the_backoff(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(retry_module.time, "sleep", slept.append)
    monkeypatch.setattr(retry_module.random, "random", lambda: 0.5)  # no jitter
    answers = iter([RetryableResponse("busy", 503, {"Retry-After": "7"}), None])

    def call() -> str:
        answer = next(answers)
        if answer is not None:
            raise answer
        return "ok"

    assert retry(call, "call", RetryPolicy(initial_delay_s=0.1), transient=lambda e: True) == "ok"
    assert slept == [7.0]


def test_the_last_failure_and_a_permanent_one_are_raised_as_they_are(monkeypatch):
    monkeypatch.setattr(retry_module.time, "sleep", lambda s: None)
    calls = []

    def failing() -> None:
        calls.append(1)
        raise ConnectionError(f"attempt {len(calls)}")

    with pytest.raises(ConnectionError, match="attempt 3"):
        retry(failing, "down", RetryPolicy(attempts=3), transient=lambda e: isinstance(e, ConnectionError))
    calls.clear()
    with pytest.raises(ConnectionError, match="attempt 1"):
        retry(failing, "refused", RetryPolicy(attempts=3), transient=lambda e: False)
