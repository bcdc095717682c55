"""Dynamic batching per (model, cut), with Triton's semantics.

Requests for the same model and cut wait in one queue. A batch starts when the
queued samples reach ``max_batch_size``, or when the oldest request has waited
``max_queue_delay_us``; with a delay of 0 a batch takes whatever is queued the
moment the previous batch finishes (no added latency, natural batching under load).
One batch per key runs at a time; batches of different keys run in parallel on the
executor. Keys for which ``inline(key)`` is true (tails measured at a few tens of
microseconds) run on the event loop itself: the thread hop would cost more than the work.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchResult", "DynamicBatcher"]


@dataclass(frozen=True)
class BatchResult:
    """What one request gets back from its batch."""

    value: Any  # this request's share of the batch's result
    queue_s: float  # waiting before its batch started
    compute_s: float  # the batch's run time
    batch_size: int  # samples in the batch


@dataclass
class _Pending:
    item: Any
    samples: int
    future: asyncio.Future[BatchResult]
    enqueued: float = field(default_factory=time.perf_counter)


class _Queue:
    def __init__(self) -> None:
        self.items: deque[_Pending] = deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.busy = False  # a batch of this key is running


class DynamicBatcher:
    """Groups concurrent requests per key and runs ``run(key, items)`` on ``executor``.

    ``run`` gets the items of one batch and returns one result per item, in order.
    """

    def __init__(
        self,
        run: Callable[[Hashable, Sequence[Any]], Sequence[Any]],
        executor: Executor,
        *,
        max_batch_size: int = 8,
        max_queue_delay_us: int = 0,
        inline: Callable[[Hashable], bool] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_delay_us < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue_delay_us >= 0")
        self._run = run
        self._inline = inline or (lambda key: False)
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.delay_s = max_queue_delay_us / 1e6
        self._queues: dict[Hashable, _Queue] = {}
        self._closed = False

    async def submit(self, key: Hashable, item: Any, samples: int = 1) -> BatchResult:
        """Queue ``item`` (holding ``samples`` samples) and wait for its result."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _Queue()
        if not q.items and not q.busy and self.delay_s == 0 and self._inline(key):
            # Fast path: nothing to batch with and the work is tiny: run it right here.
            started = time.perf_counter()
            q.busy = True
            try:
                (value,) = self._run(key, [item])
            finally:
                q.busy = False
            return BatchResult(value, 0.0, time.perf_counter() - started, samples)
        if q.task is None or q.task.done():
            q.task = asyncio.get_running_loop().create_task(self._worker(key, q))
        pending = _Pending(item, samples, asyncio.get_running_loop().create_future())
        q.items.append(pending)
        q.wake.set()
        return await pending.future

    async def _worker(self, key: Hashable, q: _Queue) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            while not q.items:
                q.wake.clear()
                await q.wake.wait()
            # Wait for a fuller batch until the oldest request's delay runs out.
            deadline = q.items[0].enqueued + self.delay_s
            while sum(p.samples for p in q.items) < self.max_batch_size:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                q.wake.clear()
                try:
                    await asyncio.wait_for(q.wake.wait(), left)
                except TimeoutError:
                    break
            batch: list[_Pending] = []
            samples = 0
            while q.items and (not batch or samples + q.items[0].samples <= self.max_batch_size):
                p = q.items.popleft()
                if p.future.cancelled():
                    continue
                batch.append(p)
                samples += p.samples
            if not batch:
                continue
            started = time.perf_counter()
            q.busy = True
            try:
                if self._inline(key):  # cheaper than the two thread hops it saves
                    results = self._run(key, [p.item for p in batch])
                else:
                    results = await loop.run_in_executor(
                        self._executor, self._run, key, [p.item for p in batch]
                    )
            except Exception as e:  # every request of the batch gets the error
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            finally:
                q.busy = False
            compute = time.perf_counter() - started
            for p, value in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(BatchResult(value, started - p.enqueued, compute, samples))

    async def close(self) -> None:
        """Stop the workers; queued requests get ``CancelledError``."""
        self._closed = True
        for q in self._queues.values():
            for p in q.items:
                p.future.cancel()
            if q.task is not None:
                q.task.cancel()
        await asyncio.gather(
            *(q.task for q in self._queues.values() if q.task is not None), return_exceptions=True
        )
