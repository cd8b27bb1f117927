"""The circuit breaker's state machine and the fault injector, on a clock the test moves by hand."""

from __future__ import annotations

import numpy as np
import pytest

from defectkit.serving.breaker import CLOSED, HALF_OPEN, OPEN, BreakerConfig, CircuitBreaker
from defectkit.serving.faults import FaultConfig, FaultInjector, InjectedFault


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _breaker(**config) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(BreakerConfig(**config), clock=clock), clock


def test_opens_after_failures_within_the_window_only():
    breaker, clock = _breaker(failures=3, window_s=10, cooldown_s=5)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    clock.now += 11  # both failures leave the window
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == CLOSED
    breaker.success()  # successes do not wipe remembered failures
    breaker.failure()
    assert breaker.state == CLOSED
    breaker.failure()
    assert breaker.state == OPEN
    assert not breaker.allow()
    assert breaker.retry_after_s() == pytest.approx(5)


def test_half_open_lets_exactly_one_probe_through_and_its_success_closes():
    breaker, clock = _breaker(failures=1, window_s=10, cooldown_s=5)
    breaker.allow()
    breaker.failure()
    clock.now += 4.9
    assert breaker.state == OPEN and not breaker.allow()
    clock.now += 0.2
    assert breaker.state == HALF_OPEN
    assert breaker.retry_after_s() == 0
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # everyone else waits for its outcome
    breaker.success()
    assert breaker.state == CLOSED
    assert breaker.allow() and breaker.allow()


def test_failed_probe_opens_for_another_cooldown():
    breaker, clock = _breaker(failures=2, window_s=10, cooldown_s=5)
    for _ in range(2):
        breaker.allow()
        breaker.failure()
    clock.now += 5
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == OPEN
    clock.now += 4
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()


def test_abandoned_probe_gives_its_slot_back():
    breaker, clock = _breaker(failures=1, window_s=10, cooldown_s=1)
    breaker.allow()
    breaker.failure()
    clock.now += 1
    assert breaker.allow()
    breaker.abandon()  # cancelled: neither a success nor a failure
    assert breaker.state == HALF_OPEN
    assert breaker.allow()


@pytest.mark.parametrize("config", [{"failures": 0}, {"failures": 1.5}, {"window_s": 0}, {"cooldown_s": -1}])
def test_breaker_config_is_validated(config):
    with pytest.raises(ValueError, match="breaker"):
        BreakerConfig(**config)


def test_fault_error_rate_is_seeded_and_close_to_the_rate():
    def failures(seed: int) -> list[bool]:
        injector = FaultInjector(FaultConfig(error_rate=0.3, seed=seed))
        out = []
        for _ in range(2000):
            try:
                injector.maybe_fail()
                out.append(False)
            except InjectedFault as exc:
                assert "error_rate=0.3" in str(exc)
                out.append(True)
        return out

    first = failures(7)
    assert first == failures(7)
    assert first != failures(8)
    assert 0.25 < np.mean(first) < 0.35


def test_faults_stop_after_their_duration_from_the_first_request():
    clock = Clock()
    injector = FaultInjector(FaultConfig(error_rate=1.0, latency_ms=250, score_shift=0.3, duration_s=2),
                             clock=clock)
    clock.now += 50  # time before the first request does not count
    assert injector.latency_s == 0.25
    with pytest.raises(InjectedFault):
        injector.maybe_fail()
    np.testing.assert_allclose(injector.shift(np.array([0.1, 0.9], np.float32)), [0.4, 1.0], rtol=1e-6)
    clock.now += 2.01
    assert not injector.active
    assert injector.latency_s == 0
    injector.maybe_fail()
    scores = np.array([0.1, 0.9], np.float32)
    assert injector.shift(scores) is scores


def test_no_faults_by_default():
    injector = FaultInjector(FaultConfig())
    assert not injector.active
    injector.maybe_fail()
    shifted = injector.shift(np.array([0.2], np.float32))
    assert shifted.dtype == np.float32 and shifted[0] == np.float32(0.2)


def test_negative_shift_clips_at_zero():
    injector = FaultInjector(FaultConfig(score_shift=-0.5))
    np.testing.assert_allclose(injector.shift(np.array([0.2, 0.8], np.float32)), [0.0, 0.3], rtol=1e-6)


@pytest.mark.parametrize("config", [{"error_rate": 1.5}, {"error_rate": -0.1}, {"latency_ms": -1},
                                    {"score_shift": 2.0}, {"duration_s": float("nan")}])
def test_fault_config_is_validated(config):
    with pytest.raises(ValueError, match="fault"):
        FaultConfig(**config)
