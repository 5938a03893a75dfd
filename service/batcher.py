"""Admission control and micro-batching, in one place: every model call of the service goes through here.

Requests (already validated and decoded by the library) wait in one queue:
- admission: more than `max_queue_images` images being prepared or waiting for the model, or admitted
  requests holding more than `max_queue_bytes` (bodies, tensors, prepared pixels: `admit` gives each a
  `Ticket`) -> `QueueFullError` (429); a request still waiting after `max_queue_wait_s`, or still being
  prepared after `max_prepare_s` -> `QueueTimeoutError` (504), and it never runs; a request whose client
  went (`Ticket.client_gone`) stops between images and leaves the queue;
- requests are batched: the loop takes the first, then keeps taking requests of the same kind for up to
  `max_wait_s` or until `max_batch_images` images are collected. `/reward` requests are scored together
  with `Mixture.score_checked`; `/reward/gradient` requests whose tensors have the same size share one
  forward and backward pass (`Mixture.reward_and_gradient_many`, at most the config's `max_batch_size`
  images). If a batch fails, each of its requests runs alone, so a bad request fails alone and its
  neighbours get their results.
The steps of a request: decode (the router, with `rewarders.wire`, in the preprocessing pool), check and prepare (`reward`, through
`prepare_request`: checked in the preprocessing pool, sized to the cores, then its images split into one
part per pool thread for decoding, resizing, cropping and normalising one image at a time, within the
pool's `PixelBudget` of decoded pixels; the pool's threads run torch
without OpenMP teams, the model thread keeps the only one), batch (here), predict (the single model
thread, which only concatenates prepared tensors, copies them to the device and runs the models), unbatch
(each request's own result). So the event loop never blocks, the GPU sees one batch at a time and the
model thread does no image work. The metrics are the batcher's: queue depth, batch sizes, refusals,
per-expert time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from t2i_reward.rewarders import Limits, Mixture, RewardResult
from t2i_reward.rewarders.inputs import Checked
from t2i_reward.rewarders.wire import RewardBody

from .metrics import Metrics


def single_threaded_torch() -> None:
    """Thread initializer: torch ops in this thread run on it alone, without an OpenMP team of its own.

    Why: the OpenMP runtime torch uses (libgomp) counts the threads of every team in the process; once they
    outnumber the cores it stops letting idle team threads spin between parallel regions, and every region
    of the model thread must wake its threads again. On the 2-core VM that made the tiny mix about 10 ms
    slower per 16 images in the service than alone in a process (docs/benchmarks.md). The preprocessing
    pool gets its parallelism from its many threads (a request's images are split among them), so its
    threads need no teams, and the model thread keeps the only one. `torch.set_num_threads` would change
    every thread; OpenMP's own limit, set through threadpoolctl, is per thread.
    """
    from threadpoolctl import threadpool_limits

    # torch sets a thread's team size on its first parallel loop; run one too small to start a team first,
    # or that would overwrite the limit below
    F.interpolate(torch.zeros(1, 1, 2, 2), size=(3, 3), mode="bilinear")
    threadpool_limits(1, user_api="openmp")


class QueueFullError(RuntimeError):
    """More images are waiting than `max_queue_images`; the caller should retry later (429)."""


class QueueTimeoutError(RuntimeError):
    """The request waited longer than `max_queue_wait_s` for the model, or its images took longer than
    `max_prepare_s` to prepare (504)."""


class ClientGone(RuntimeError):
    """The request's client closed its connection: its work stopped (between images) and nobody reads the answer."""


class PixelBudget:
    """Decoded pixels held by the preprocessing pool's threads at once, across requests: a thread waits for
    room before it decodes an image (`Ticket.check` between waits, so a gone client or a passed deadline
    stops the wait). An image larger than the whole budget runs alone."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int, ticket: "Ticket"):
        with self._cond:
            while self.used and self.used + pixels > self.limit:
                ticket.check()
                self._cond.wait(0.05)
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


class Ticket:
    """One request from its admission to its answer: the bytes it holds (its body, then its tensors) counted
    against `max_queue_bytes`, its preparation deadline, and whether its client is still there. Pool threads
    call `check` between images; the route's disconnect watcher calls `client_gone`."""

    def __init__(self, batcher: "MicroBatcher", n_bytes: int):
        self.batcher = batcher
        self.n_bytes = n_bytes
        self.deadline = time.monotonic() + batcher.max_prepare_s
        self.gone = False
        self.item: Optional["_Item"] = None  # while it waits for the model

    def check(self) -> None:
        if self.gone:
            raise ClientGone("the client closed the connection")
        if time.monotonic() > self.deadline:
            raise QueueTimeoutError(f"preparing the images took over {self.batcher.max_prepare_s:g} s; send fewer or smaller images")

    def client_gone(self) -> None:
        self.gone = True
        if self.item is not None:
            self.batcher._abandon(self.item, ClientGone("the client closed the connection"))

    def release(self) -> None:
        """Give the ticket's bytes back (once answered, or refused)."""
        self.batcher._release_bytes(self.n_bytes)
        self.n_bytes = 0

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


MIN_IMAGES_PER_PART = 2  # a request's images are prepared in parts of at least this many (one part per pool thread)


def model_thread_executor(threads: int = 1) -> ThreadPoolExecutor:
    """The single model thread. The service loads the models on it too, so that its OpenMP team is the only one.
    (The Ray ingress, whose models run in the pools, has `threads` of them: one per micro-batch out at once.)"""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="t2i-model")


def side_executor() -> ThreadPoolExecutor:
    """The event loop's default executor (`asyncio.to_thread`): prompt search and generation, the in-process
    MLLM judge, job preparation, loading the prompt index. Its threads run torch without OpenMP teams.

    Why: on a CPU host one such team is enough to get the model thread's team throttled (see
    `single_threaded_torch`): three `/prompts` searches made every later 16-image model call 40% slower
    (45 -> 64 ms on the 2-core VM, for the rest of the process's life). The price is that these side jobs
    run on one core each; on a GPU host their models run on the GPU anyway."""
    return ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="t2i-side",
                              initializer=single_threaded_torch)


def _count(images) -> int:
    """How many images a decoded body holds, for admission (the library checks the shape and the list)."""
    if isinstance(images, torch.Tensor):
        return int(images.shape[0]) if images.ndim > 0 else 1
    return len(images) if isinstance(images, (list, tuple)) else 1


@dataclass
class _Item:
    n_images: int
    future: asyncio.Future = field(repr=False)
    enqueued: float
    request: Optional[Checked] = None  # a checked /reward request
    gradient: Optional[tuple] = None  # a /reward/gradient request: (images, prompts, weights, metadata)
    key: Any = None  # items batch together when their keys are equal: the kind, and a gradient's tensor size
    started: bool = False
    abandoned: bool = False
    timing: Optional[dict] = None  # filled with 'queue' and 'model' seconds when given


class MicroBatcher:
    def __init__(self, rewarder: Mixture, limits: Limits, max_batch_images: int, max_wait_s: float,
                 max_queue_images: int, max_queue_wait_s: float, metrics: Metrics, prepare_workers: int | None = None,
                 model_thread: ThreadPoolExecutor | None = None, *, max_prepare_s: float = 30.0,
                 max_prepare_pixels: int = 80_000_000, max_queue_bytes: int = 1 << 30, max_inflight_batches: int = 1):
        prepare_workers = prepare_workers or os.cpu_count() or 1
        if max_batch_images < 1 or max_queue_images < 1 or max_wait_s < 0 or max_queue_wait_s <= 0 or prepare_workers < 1 \
                or max_inflight_batches < 1:
            raise ValueError("batcher limits must be positive")
        self.rewarder = rewarder
        self.limits = limits
        self.max_batch_images = max_batch_images
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images
        self.max_queue_wait_s = max_queue_wait_s
        self.metrics = metrics
        self.max_prepare_s = max_prepare_s
        self.max_queue_bytes = max_queue_bytes
        # micro-batches being scored at once: one on the one model thread; more where the models run elsewhere (the
        # Ray ingress, whose `executor` has that many threads waiting on the pools), so pools work while others wait
        self.max_inflight_batches = max_inflight_batches
        self._inflight: set[asyncio.Task] = set()
        self.pixel_budget = PixelBudget(max_prepare_pixels)
        # the one thread that runs the models (pass the one that loaded them: it already holds their OpenMP team)
        self.executor = model_thread or model_thread_executor()
        # decoding and preprocessing, in parallel with the model thread (PIL and torch release the GIL)
        self.prepare_workers = prepare_workers
        self.prepare_executor = ThreadPoolExecutor(max_workers=prepare_workers, thread_name_prefix="t2i-prepare",
                                                   initializer=single_threaded_torch)
        self._queue: collections.deque[_Item] = collections.deque()
        self._ready = asyncio.Event()
        self._waiting_images = 0  # images waiting for the model
        self._preparing_images = 0  # images admitted and being prepared: the same admission limit counts both
        self._held_bytes = 0  # bytes of the admitted requests' bodies and tensors
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="t2i-micro-batcher")

    async def stop(self) -> None:
        for task in list(self._inflight):
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.prepare_executor.shutdown(wait=False, cancel_futures=True)

    @property
    def waiting_images(self) -> int:
        return self._waiting_images

    def _on_timing(self, name: str, seconds: float) -> None:
        self.metrics.expert_seconds.labels(name).observe(seconds)

    # ---- the requests' side
    async def prepare(self, fn: Callable, *args, **kwargs):
        """Run a decoding / checking / preprocessing step (`Mixture.check_request`...) in the preprocessing pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.prepare_executor, lambda: fn(*args, **kwargs))

    async def prepare_request(self, check: Callable, *args, ticket: Ticket | None = None, **kwargs) -> Checked:
        """Check a request (`Mixture.check_request` or `check_tensor_request`) in the preprocessing pool, then
        decode and prepare its images in parts, one per pool thread, in parallel, each into its own rows,
        one image at a time within the pool's pixel budget and the ticket's deadline."""
        checked = await self.prepare(check, *args, prepare=False, **kwargs)
        if checked.pending is None:  # a tensor for a GPU: prepared on the device by the model thread
            return checked
        ticket = ticket or Ticket(self, 0)

        @contextlib.contextmanager
        def gate(pixels: int):
            ticket.check()
            with self.pixel_budget.hold(pixels, ticket):
                yield

        n = len(checked)
        k = max(1, min(self.prepare_workers, n // MIN_IMAGES_PER_PART))
        bounds = [(n * i // k, n * (i + 1) // k) for i in range(k)]
        parts = [asyncio.ensure_future(self.prepare(self.rewarder.prepare_part, checked, a, b, gate)) for a, b in bounds]
        try:
            await asyncio.gather(*parts)
        except BaseException:
            ticket.gone = True  # one part failed (or the request was cancelled): the others stop at their next image
            await asyncio.gather(*parts, return_exceptions=True)
            raise
        checked.pending = None  # every row is filled
        return checked

    async def reward(self, body: RewardBody, timing: dict | None = None, ticket: Ticket | None = None) -> RewardResult:
        """A decoded /reward body, whole: admitted (its images count against `max_queue_images` from now),
        checked and prepared against the service's limits in the preprocessing pool (`prepare_request`),
        then scored with its neighbours (`score`). `timing`, when given, receives the seconds of 'prepare',
        then those of `score`. `ticket`: the request's (`admit`), which stops the work when its client goes."""
        start = time.monotonic()
        # a request over max_images is the library's 422, not a full queue: it counts as the most it may hold
        n = min(_count(body.tensor if body.tensor is not None else body.images), self.limits.max_images)
        self._refuse_if_full(n)
        self._preparing_images += n
        opts = dict(limits=self.limits, group_ids=body.group_ids, explain=body.explain, metadata=body.metadata, ticket=ticket)
        try:
            if body.tensor is not None:
                checked = await self.prepare_request(self.rewarder.check_tensor_request, body.prompts, body.tensor, body.weights, **opts)
            else:
                checked = await self.prepare_request(self.rewarder.check_request, body.prompts, body.images, body.weights, **opts)
        finally:
            self._preparing_images -= n
        body.images = body.tensor = None  # prepared: the encoded images and the tensor can go
        if ticket is not None:  # the prepared pixels replace what the body held
            self._resize(ticket, sum(t.nbytes for t in (checked.pixels or {}).values()) + (checked.raw.nbytes if checked.raw is not None else 0))
        if timing is not None:
            timing["prepare"] = time.monotonic() - start
        result = await self.score(checked, timing=timing, ticket=ticket)
        for im in result.images:
            for name in im.errors or ():
                self.metrics.expert_failures.labels(name).inc()
        return result

    async def score(self, request: Checked, timing: dict | None = None, ticket: Ticket | None = None) -> RewardResult:
        """Score one checked request, batched with its neighbours. `timing`, when given, receives the
        seconds the request waited for the model ('queue') and its micro-batch's model call took ('model')."""
        item = _Item(len(request), self._future(), time.monotonic(), request=request, key="score", timing=timing)
        return await self._submit(item, ticket)

    async def reward_and_gradient(self, images, prompts, weights, ticket: Ticket | None = None, metadata=None) -> dict:
        """Rewards and pixel gradients of an image tensor (`Mixture.reward_and_gradient`, the service's limits),
        batched with other gradient requests of the same tensor size."""
        n = int(images.shape[0]) if getattr(images, "ndim", 0) > 0 else 1  # the library refuses a bad shape
        key = ("gradient", tuple(images.shape[1:])) if getattr(images, "ndim", 0) == 4 else ("gradient", id(images))
        item = _Item(max(n, 1), self._future(), time.monotonic(), gradient=(images, prompts, weights, metadata), key=key)
        return await self._submit(item, ticket)

    def check_admission(self) -> None:
        """Refuse at once (QueueFullError) when the queue is full, in images or in bytes: called before a
        body is read or decoded, so clients that retry immediately cost the server almost nothing."""
        self._refuse_if_full(1)
        if self._held_bytes >= self.max_queue_bytes:
            self._refuse_bytes()

    def admit(self, n_bytes: int) -> Ticket:
        """A request whose body (`n_bytes`, to be decoded) was just read: its ticket, holding those bytes until
        it is answered (`with batcher.admit(n) as ticket`), or QueueFullError when the admitted requests
        already hold `max_queue_bytes` (a request alone may always run: the body limit bounds it)."""
        if self._held_bytes and self._held_bytes + n_bytes > self.max_queue_bytes:
            self._refuse_bytes()
        self._held_bytes += n_bytes
        self.metrics.queue_bytes.set(self._held_bytes)
        return Ticket(self, n_bytes)

    def held(self, ticket: Ticket, n_bytes: int) -> None:
        """The ticket's request now holds `n_bytes` (its body decoded into tensors, or prepared into pixels)."""
        self._resize(ticket, n_bytes)

    def _resize(self, ticket: Ticket, n_bytes: int) -> None:
        self._held_bytes += n_bytes - ticket.n_bytes
        ticket.n_bytes = n_bytes
        self.metrics.queue_bytes.set(self._held_bytes)

    def _release_bytes(self, n_bytes: int) -> None:
        self._held_bytes -= n_bytes
        self.metrics.queue_bytes.set(self._held_bytes)

    def _refuse_bytes(self) -> None:
        self.metrics.rejected.inc()
        raise QueueFullError(f"the requests being served hold {self._held_bytes >> 20} MiB (limit {self.max_queue_bytes >> 20} MiB); retry later")

    def _refuse_if_full(self, n_images: int) -> None:
        waiting = self._waiting_images + self._preparing_images
        if waiting + n_images > self.max_queue_images:
            self.metrics.rejected.inc()
            raise QueueFullError(f"{waiting} images are already waiting (limit {self.max_queue_images}); retry later")

    def _future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, item: _Item, ticket: Ticket | None = None):
        self._refuse_if_full(item.n_images)
        self._waiting_images += item.n_images
        self.metrics.queue_images.set(self._waiting_images)
        self._queue.append(item)
        self._ready.set()
        if ticket is not None:
            ticket.item = item
            if ticket.gone:
                self._abandon(item, ClientGone("the client closed the connection"))
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), self.max_queue_wait_s)
        except asyncio.TimeoutError:
            if item.started:  # it reached the model in time: wait for its answer
                return await item.future
            item.abandoned = True
            self._dequeued(item)
            raise QueueTimeoutError(f"waited {self.max_queue_wait_s:g} s in the queue for the model; retry later") from None
        finally:
            if ticket is not None:
                ticket.item = None

    def _abandon(self, item: _Item, error: Exception) -> None:
        """A queued request whose client went: out of the queue, its wait ended with `error` (once it reached
        the model, its batch runs on and the answer is dropped)."""
        if item.started or item.future.done():
            return
        item.abandoned = True
        self._dequeued(item)
        item.future.set_exception(error)

    def _dequeued(self, item: _Item) -> None:
        try:
            self._queue.remove(item)
        except ValueError:
            return
        self._waiting_images -= item.n_images
        self.metrics.queue_images.set(self._waiting_images)

    # ---- the model's side
    def _take(self) -> Optional[_Item]:
        while self._queue:
            item = self._queue.popleft()
            self._waiting_images -= item.n_images
            self.metrics.queue_images.set(self._waiting_images)
            if not item.abandoned and not item.future.done():
                item.started = True
                return item
        return None

    async def _next(self) -> _Item:
        while True:
            item = self._take()
            if item is not None:
                return item
            self._ready.clear()
            await self._ready.wait()

    def _cap(self, item: _Item) -> int:
        # a gradient pass keeps every activation for the backward: no more than one forward batch of images
        return min(self.max_batch_images, self.rewarder.config.max_batch_size) if item.gradient else self.max_batch_images

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.max_inflight_batches)
        while True:
            await slots.acquire()
            first = await self._next()
            batch, count, cap = [first], first.n_images, self._cap(first)
            deadline = loop.time() + self.max_wait_s
            while count < cap:
                if self._queue:
                    head = self._queue[0]
                    if head.key != first.key or (first.gradient and count + head.n_images > cap):
                        break  # another kind (or size) takes the next turn: the queue stays in order
                    item = self._take()
                    if item is not None:
                        batch.append(item)
                        count += item.n_images
                    continue
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                self._ready.clear()
                try:
                    await asyncio.wait_for(self._ready.wait(), timeout)
                except asyncio.TimeoutError:
                    break
            self.metrics.batch_images.observe(count)
            self.metrics.batch_requests.observe(len(batch))
            if self.max_inflight_batches == 1:
                try:
                    await self._run_batch(batch)
                finally:
                    slots.release()
                continue
            task = loop.create_task(self._run_batch(batch))
            self._inflight.add(task)  # held until done: the loop keeps only weak references to tasks
            task.add_done_callback(lambda t: (self._inflight.discard(t), slots.release()))

    def _model_call(self, batch: list[_Item]) -> Callable[[], list]:
        if batch[0].gradient is not None:
            requests = [i.gradient for i in batch]
            return lambda: self.rewarder.reward_and_gradient_many(requests, limits=self.limits, on_timing=self._on_timing)
        requests = [i.request for i in batch]
        return lambda: self.rewarder.score_checked(requests, on_timing=self._on_timing)

    async def _run_batch(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        try:
            results = await loop.run_in_executor(self.executor, self._model_call(batch))
        except Exception as e:
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(e)
                return
            # one request's failure must not fail its neighbours: each one alone, with its own fate
            for item in batch:
                await self._run_batch([item])
            return
        end = time.monotonic()
        for item, result in zip(batch, results):
            if item.timing is not None:
                item.timing.update(queue=start - item.enqueued, model=end - start)
            if not item.future.done():  # the client may have gone away
                item.future.set_result(result)
