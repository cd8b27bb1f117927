"""Micro-batching: concurrent requests share forwards, run in worker threads, with bounded waiting."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from defectkit.serving.batching import BatchConfig, MicroBatcher


class Forward:
    """A stand-in forward pass: score = the image's single value; records each batch and the thread it ran on."""

    def __init__(self, seconds: float = 0.0, fail: bool = False) -> None:
        self.seconds = seconds
        self.fail = fail
        self.batches: list[list[float]] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            self.batches.append(images.reshape(len(images), -1)[:, 0].tolist())
            self.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("forward broke")
        return images.reshape(len(images), -1)[:, 0].astype(np.float32)


def _images(*values: float) -> np.ndarray:
    return np.array(values, np.float32).reshape(-1, 1)


def test_concurrent_requests_share_one_forward_off_the_event_loop():
    forward = Forward()
    batcher = MicroBatcher(forward, BatchConfig(max_batch=8, max_wait_ms=200, workers=1))

    async def scenario():
        return await asyncio.gather(*(batcher.submit(_images(i)) for i in range(8)))

    results = asyncio.run(scenario())
    batcher.close()
    assert [r.tolist() for r in results] == [[float(i)] for i in range(8)]
    assert forward.batches == [[float(i) for i in range(8)]]  # full batch: sent without waiting 200 ms
    assert forward.threads and threading.main_thread().name not in forward.threads


def test_a_lone_request_goes_out_at_once():
    forward = Forward()
    batcher = MicroBatcher(forward, BatchConfig(max_batch=8, max_wait_ms=500, workers=1))

    async def scenario():
        started = time.perf_counter()
        result = await batcher.submit(_images(5))
        return result, time.perf_counter() - started

    result, seconds = asyncio.run(scenario())
    batcher.close()
    assert result.tolist() == [5.0]
    assert seconds < 0.25  # not the 500 ms max_wait: no answered batch says that others are coming


def test_the_clients_of_the_last_batch_are_waited_for_up_to_max_wait():
    forward = Forward()
    batcher = MicroBatcher(forward, BatchConfig(max_batch=8, max_wait_ms=300, workers=1))

    async def client(value: float, delay: float) -> tuple[list[float], float]:
        await asyncio.sleep(delay)
        started = time.perf_counter()
        return (await batcher.submit(_images(value))).tolist(), time.perf_counter() - started

    async def scenario():
        await asyncio.gather(*(batcher.submit(_images(i)) for i in range(4)))  # one batch of 4, answered
        # Its four clients come back 20 ms apart: they go out together, as soon as the fourth is in.
        back = await asyncio.gather(*(client(10 + i, 0.02 * i) for i in range(4)))
        # Only two of them come back: they wait for the other two until the first has waited max_wait.
        fewer = await asyncio.gather(*(client(20 + i, 0.0) for i in range(2)))
        return back, fewer

    back, fewer = asyncio.run(scenario())
    batcher.close()
    assert [scores for scores, _ in back] == [[10.0], [11.0], [12.0], [13.0]]
    assert forward.batches[1] == [10.0, 11.0, 12.0, 13.0]
    assert max(seconds for _, seconds in back) < 0.25  # the last one in did not wait
    assert forward.batches[2] == [20.0, 21.0]
    assert all(0.25 < seconds < 2.0 for _, seconds in fewer)


def test_requests_queue_while_the_worker_is_busy_and_go_out_together():
    forward = Forward(seconds=0.1)
    batched = []
    batcher = MicroBatcher(forward, BatchConfig(max_batch=4, max_wait_ms=0, workers=1), on_batch=batched.append)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(_images(0)))
        await asyncio.sleep(0.02)  # the first forward is running now
        rest = [batcher.submit(_images(v, v)) for v in (1, 2, 3)]
        return await asyncio.gather(first, *rest)

    results = asyncio.run(scenario())
    batcher.close()
    assert [r.tolist() for r in results] == [[0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
    # Two requests of two images fill a batch of 4; the third follows; no request is split.
    assert forward.batches == [[0.0], [1.0, 1.0, 2.0, 2.0], [3.0, 3.0]]
    assert batched == [1, 4, 2]


def test_a_request_larger_than_max_batch_runs_alone():
    forward = Forward()
    batcher = MicroBatcher(forward, BatchConfig(max_batch=2, max_wait_ms=50, workers=1))

    async def scenario():
        return await asyncio.gather(batcher.submit(_images(1, 2, 3)), batcher.submit(_images(4)))

    big, small = asyncio.run(scenario())
    batcher.close()
    assert big.tolist() == [1, 2, 3] and small.tolist() == [4]
    assert forward.batches == [[1.0, 2.0, 3.0], [4.0]]


def test_queued_requests_are_spread_over_free_workers():
    forward = Forward(seconds=0.05)
    batcher = MicroBatcher(forward, BatchConfig(max_batch=8, max_wait_ms=200, workers=2))

    async def scenario():
        return await asyncio.gather(*(batcher.submit(_images(i)) for i in range(8)))

    results = asyncio.run(scenario())
    batcher.close()
    assert [r.tolist() for r in results] == [[float(i)] for i in range(8)]
    assert sorted(map(len, forward.batches)) == [4, 4]
    assert len(forward.threads) == 2


def test_a_failing_forward_fails_every_request_of_its_batch_and_the_next_batch_runs():
    forward = Forward(fail=True)
    batcher = MicroBatcher(forward, BatchConfig(max_batch=4, max_wait_ms=50, workers=1))

    async def scenario():
        outcomes = await asyncio.gather(*(batcher.submit(_images(i)) for i in range(3)), return_exceptions=True)
        forward.fail = False
        return outcomes, await batcher.submit(_images(9))

    outcomes, after = asyncio.run(scenario())
    batcher.close()
    assert all(isinstance(o, RuntimeError) and "forward broke" in str(o) for o in outcomes)
    assert after.tolist() == [9.0]


def test_requests_cancelled_while_queued_are_not_computed():
    forward = Forward(seconds=0.1)
    batcher = MicroBatcher(forward, BatchConfig(max_batch=8, max_wait_ms=0, workers=1))

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(_images(0)))
        await asyncio.sleep(0.02)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher.submit(_images(1)), 0.01)  # times out while the worker is busy
        kept = batcher.submit(_images(2))
        return await asyncio.gather(first, kept)

    results = asyncio.run(scenario())
    batcher.close()
    assert [r.tolist() for r in results] == [[0.0], [2.0]]
    assert forward.batches == [[0.0], [2.0]]


def test_a_new_event_loop_gets_a_working_batcher():
    batcher = MicroBatcher(Forward(), BatchConfig(max_batch=2, max_wait_ms=1, workers=1))
    assert asyncio.run(batcher.submit(_images(1))).tolist() == [1.0]
    assert asyncio.run(batcher.submit(_images(2))).tolist() == [2.0]
    batcher.close()


@pytest.mark.parametrize("config", [{"max_batch": 0}, {"workers": 0}, {"max_wait_ms": -1}, {"max_batch": True}])
def test_batch_config_is_validated(config):
    with pytest.raises(ValueError, match="batching"):
        BatchConfig(**config)
