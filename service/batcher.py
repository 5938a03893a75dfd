"""Micro-batching, in one place: concurrent /reward requests share forward passes.

Requests (already validated and decoded) wait in a queue; one task takes the first, then keeps taking
more for up to `max_wait_s` or until `max_batch_images` images are collected, and scores them together
with `Mixture.score_checked` on the single model thread. Every model call (scoring and gradients) runs on
that one thread, so the event loop never blocks and the GPU sees one batch at a time.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rewarders import Mixture, RewardResult

from .metrics import Metrics


class QueueFullError(RuntimeError):
    """More images are waiting than `max_queue_images`; the caller should retry later (429)."""


@dataclass
class _Item:
    prompt: str
    images: list
    weights: dict
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    def __init__(self, rewarder: Mixture, max_batch_images: int, max_wait_s: float, max_queue_images: int, metrics: Metrics):
        self.rewarder = rewarder
        self.max_batch_images = max_batch_images
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t2i-model")
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._waiting_images = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="t2i-micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def run_on_model_thread(self, fn, *args):
        """Run any model call (e.g. a gradient) on the model thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def score(self, prompt: str, images: list, weights: dict) -> RewardResult:
        n = len(images)
        if self._waiting_images + n > self.max_queue_images:
            self.metrics.rejected.inc()
            raise QueueFullError(f"{self._waiting_images} images are already waiting (limit {self.max_queue_images}); retry later")
        future = asyncio.get_running_loop().create_future()
        self._waiting_images += n
        self.metrics.queue_images.set(self._waiting_images)
        await self._queue.put(_Item(prompt, images, weights, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            count = len(batch[0].images)
            deadline = loop.time() + self.max_wait_s
            while count < self.max_batch_images:
                timeout = deadline - loop.time()
                try:
                    item = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                batch.append(item)
                count += len(item.images)
            self._waiting_images -= count
            self.metrics.queue_images.set(self._waiting_images)
            self.metrics.batch_images.observe(count)
            self.metrics.batch_requests.observe(len(batch))
            requests = [(i.prompt, i.images, i.weights) for i in batch]
            try:
                results = await loop.run_in_executor(self.executor, self.rewarder.score_checked, requests)
            except Exception as e:  # a failure of the whole batch reaches every request in it
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            for item, result in zip(batch, results):
                if not item.future.done():  # the client may have gone away
                    item.future.set_result(result)
