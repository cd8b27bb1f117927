"""Dynamic micro-batching: concurrent requests share one model forward, run off the event loop.

A forward of 8 images costs far less than 8 forwards of one (on 2 CPU cores
about 1.5x the images/s), so requests that arrive close together are
gathered into one batch, as Triton's dynamic batcher does:

- a batch is sent as soon as it holds ``max_batch`` images, or as many as
  the last answered batch held (its clients are likely on their way back,
  and share a forward instead of the first to arrive going alone), or when
  its oldest request has waited ``max_wait_ms``; so a lone client never
  waits for company;
- while every worker is busy, requests keep queueing and go out together
  when one frees up, so batches grow with load and latency stays bounded;
- with several workers (CPU forwards of one thread each), queued requests
  are split evenly over the free ones;
- the forward runs in a worker thread (torch releases the GIL), so the
  event loop keeps accepting and decoding requests meanwhile.

A request larger than ``max_batch`` is run on its own. A failing forward
fails every request of its batch. Requests cancelled while queued (timed
out) are dropped before the forward.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 8  # images per forward
    max_wait_ms: float = 5.0  # the longest the oldest queued request waits for the clients of the last batch
    workers: int = 1  # forwards running at the same time

    def __post_init__(self) -> None:
        for name in ("max_batch", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"batching {name}={value!r} must be a positive integer")
        if not (isinstance(self.max_wait_ms, (int, float)) and math.isfinite(self.max_wait_ms)
                and self.max_wait_ms >= 0):
            raise ValueError(f"batching max_wait_ms={self.max_wait_ms!r} must be a non-negative number")


@dataclass
class _Request:
    images: np.ndarray
    future: asyncio.Future
    arrived: float


class MicroBatcher:
    """Runs ``forward(images) -> scores`` (one float per image) on batches gathered from concurrent submits."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], config: BatchConfig, *, name: str = "model",
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.config = config
        self._forward = forward
        self._on_batch = on_batch
        self._executor = ThreadPoolExecutor(config.workers, thread_name_prefix=f"forward-{name}")
        self._queue: deque[_Request] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._collector: asyncio.Task | None = None
        self._busy = 0
        self._answered = 0  # images of the last answered batch: as many requests are likely to come back

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """Scores for ``images`` (N, ...), computed in some batch; raises what the forward raised."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        future = loop.create_future()
        self._queue.append(_Request(images, future, loop.time()))
        self._wakeup.set()
        return await future

    def close(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        # A new event loop (a restarted server, or tests running several) starts from a clean queue.
        if self._collector is not None:
            self._collector.cancel()
        self._loop = loop
        self._queue.clear()
        self._busy = 0
        self._answered = 0
        self._wakeup = asyncio.Event()
        self._collector = loop.create_task(self._collect(), name="micro-batcher")

    async def _sleep_until_woken(self, timeout: float | None) -> None:
        self._wakeup.clear()
        timer = None if timeout is None else self._loop.call_later(timeout, self._wakeup.set)
        try:
            await self._wakeup.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def _drop_cancelled(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    def _queued_images(self) -> int:
        return sum(len(r.images) for r in self._queue if not r.future.done())

    async def _collect(self) -> None:
        loop = self._loop
        max_wait = self.config.max_wait_ms / 1000.0
        while True:
            self._drop_cancelled()
            if not self._queue or self._busy >= self.config.workers:
                await self._sleep_until_woken(None)
                continue
            deadline = self._queue[0].arrived + max_wait
            expected = min(self.config.max_batch, max(1, self._answered))
            while self._queued_images() < expected and loop.time() < deadline:
                await self._sleep_until_woken(deadline - loop.time())
                self._drop_cancelled()
                if not self._queue:
                    break
            # Queued work is spread over every free worker: on a CPU, a second forward uses a core that would
            # otherwise idle, so two half-size batches finish sooner than one full one.
            free = self.config.workers - self._busy
            size = min(self.config.max_batch, max(1, math.ceil(self._queued_images() / free)))
            while free and self._queue:
                batch = self._take(size)
                if batch:
                    self._dispatch(batch)
                    free -= 1

    def _take(self, limit: int) -> list[_Request]:
        batch: list[_Request] = []
        size = 0
        while self._queue:
            request = self._queue[0]
            if request.future.done():
                self._queue.popleft()
                continue
            if batch and size + len(request.images) > limit:
                break
            batch.append(self._queue.popleft())
            size += len(request.images)
        return batch

    def _dispatch(self, batch: list[_Request]) -> None:
        self._busy += 1
        images = batch[0].images if len(batch) == 1 else np.concatenate([r.images for r in batch])
        if self._on_batch is not None:
            self._on_batch(len(images))
        done = self._loop.run_in_executor(self._executor, self._forward, images)
        done.add_done_callback(lambda result: self._deliver(batch, result))

    def _deliver(self, batch: list[_Request], result: asyncio.Future) -> None:
        self._busy -= 1
        self._answered = sum(len(r.images) for r in batch)
        self._wakeup.set()
        if result.cancelled():
            error: BaseException | None = RuntimeError("the model server is shutting down")
        else:
            error = result.exception()
        if error is not None:
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        scores = result.result()
        start = 0
        for request in batch:
            end = start + len(request.images)
            if not request.future.done():
                request.future.set_result(scores[start:end])
            start = end
