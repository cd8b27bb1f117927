"""Replayed production traffic: images sent through the serving endpoint at a steady rate.

Canary analysis needs requests to judge; the demo and the delivery tests use
this to play production while a candidate is shipped.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import httpx

from defectkit.delivery.backend import infer_request
from defectkit.delivery.local.router import VARIANT_HEADER


class LoadGenerator:
    """Open-loop load through the router: one request every 1/rate s, at most ``max_inflight`` at once.

    Each request carries an image drawn at random: cycling through the images in order would
    line up with the router's deterministic rotation and give each variant different images.
    Records (sent, answered, status, variant header, model_version) per request.
    """

    def __init__(self, url: str, images: list[bytes], rate: float, max_inflight: int = 48) -> None:
        self.url, self.rate, self.max_inflight = url, rate, max_inflight
        self.bodies = [json.dumps(infer_request([image])).encode() for image in images]
        self.results: list[tuple[float, float, int, str | None, str | None]] = []
        self._draw = random.Random(0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="load", daemon=True)

    def __enter__(self) -> LoadGenerator:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

    async def _one(self, client: httpx.AsyncClient, body: bytes) -> None:
        sent = time.time()
        try:
            response = await client.post(self.url, content=body,
                                         headers={"content-type": "application/json"})
            version = response.json().get("model_version") if response.status_code == 200 else None
            self.results.append((sent, time.time(), response.status_code, response.headers.get(VARIANT_HEADER),
                                 version))
        except httpx.HTTPError as exc:
            self.results.append((sent, time.time(), 0, None, repr(exc)))

    async def _main(self) -> None:
        limit = asyncio.Semaphore(self.max_inflight)
        tasks: set[asyncio.Task] = set()
        async with httpx.AsyncClient(timeout=30) as client:
            start, n = time.monotonic(), 0
            while not self._stop.is_set():
                await limit.acquire()
                task = asyncio.create_task(self._one(client, self._draw.choice(self.bodies)))
                tasks.add(task)
                task.add_done_callback(lambda t: (tasks.discard(t), limit.release()))
                n += 1
                delay = start + n / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await asyncio.gather(*tasks, return_exceptions=True)
