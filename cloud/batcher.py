"""Dynamic batching per (model, cut), with Triton's semantics.

``Batcher`` is the interface the service is given: ``submit(job)`` returns once the job
has run (its ``response`` or ``error`` is set), ``close()`` stops it. ``DynamicBatcher``
is the standalone implementation; Ray Serve's queue is another (cloud/ray_serve.py).

Requests for the same model and cut wait in one queue. A batch starts when the
queued samples reach ``max_batch_size``, or when the oldest request has waited
``max_queue_delay_us``; with a delay of 0 a batch takes whatever is queued the
moment the previous batch finishes (no added latency, natural batching under load).
One batch per key runs at a time; batches of different keys run in parallel on the
executor. A request that finds its key idle (nothing queued, nothing running, no delay)
runs at once from the caller, with no worker task or future in between. Keys for which
``inline(key)`` is true (tails measured at a few tens of microseconds) run on the event
loop itself: the thread hop would cost more than the work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Protocol

import grpc

from cloud.job import Job, RequestError
from splitnet.errors import ConfigError

__all__ = ["Batcher", "DynamicBatcher", "RunBatch"]

logger = logging.getLogger(__name__)

Key = tuple[str, str]
RunBatch = Callable[[Sequence[Job]], None]  # fills each job's response or error; raises if
# the tail itself failed


class Batcher(Protocol):
    """What the service needs from a batcher."""

    async def submit(self, job: Job) -> None:
        """Run ``job`` in some batch; on return its ``response`` or ``error`` is set."""

    def idle(self, key: Key) -> bool:
        """True if a job for ``key`` submitted now would run at once on the event loop."""

    async def close(self) -> None:
        """Stop; queued jobs are cancelled."""


def fail_batch(jobs: Sequence[Job], key: Key, error: BaseException) -> None:
    """The tail itself failed: every job of its batch gets INTERNAL (the log has why)."""
    logger.error(
        "tail of %s@%s failed on a batch of %d request(s)", *key, len(jobs), exc_info=error
    )
    for job in jobs:
        if job.error is None:
            job.error = RequestError(
                grpc.StatusCode.INTERNAL,
                f"the tail failed on request {job.request.id}; the server log has the details",
            )


class _Queue:
    __slots__ = ("busy", "items", "task", "wake")

    def __init__(self) -> None:
        self.items: deque[tuple[Job, asyncio.Future[None]]] = deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.busy = False  # a batch of this key is running


class DynamicBatcher:
    """Groups concurrent jobs per (model, cut) and runs ``run(jobs)`` on ``executor``."""

    def __init__(
        self,
        run: RunBatch,
        executor: Executor,
        *,
        max_batch_size: int = 8,
        max_queue_delay_us: int = 0,
        inline: Callable[[Key], bool] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if max_batch_size < 1 or max_queue_delay_us < 0:
            raise ConfigError("max_batch_size must be >= 1 and max_queue_delay_us >= 0")
        self._run = run
        self._inline = inline or (lambda key: False)
        self._executor = executor
        self._clock = clock
        self.max_batch_size = max_batch_size
        self.delay_s = max_queue_delay_us / 1e6
        self._queues: dict[Key, _Queue] = {}
        self._closed = False

    def idle(self, key: Key) -> bool:
        """True if a job for ``key`` would run right now on the loop (see the module doc)."""
        q = self._queues.get(key)
        return (q is None or not (q.items or q.busy)) and self.delay_s == 0 and self._inline(key)

    async def submit(self, job: Job) -> None:
        """Queue ``job`` and wait until its batch has run."""
        if self._closed:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        key = job.key
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _Queue()
        job.enqueued = self._clock()
        if not q.items and not q.busy and self.delay_s == 0:
            await self._execute(q, key, [job])  # idle: no batch to wait for
            self._kick(q, key)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        q.items.append((job, future))
        q.wake.set()
        self._kick(q, key)
        await future

    def _kick(self, q: _Queue, key: Key) -> None:
        """Make sure a worker drains what is queued."""
        if q.items and (q.task is None or q.task.done()):
            q.task = asyncio.get_running_loop().create_task(self._worker(q, key))

    async def _execute(self, q: _Queue, key: Key, jobs: list[Job]) -> None:
        started = self._clock()
        samples = sum(j.samples for j in jobs)
        q.busy = True
        try:
            if self._inline(key):  # cheaper than the two thread hops it saves
                self._run(jobs)
            else:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._run, jobs)
        except Exception as e:
            fail_batch(jobs, key, e)
        finally:
            q.busy = False
            q.wake.set()  # a worker waiting for the key may go
        for j in jobs:  # the runtime sets compute_s: the tail's own time
            j.queue_s, j.batch_size = started - j.enqueued, samples

    async def _worker(self, q: _Queue, key: Key) -> None:
        while q.items and not self._closed:
            while q.busy:  # a job run directly by submit() holds the key
                q.wake.clear()
                await q.wake.wait()
            # Wait for a fuller batch until the oldest request's delay runs out.
            deadline = q.items[0][0].enqueued + self.delay_s
            while sum(j.samples for j, _ in q.items) < self.max_batch_size:
                left = deadline - self._clock()
                if left <= 0:
                    break
                q.wake.clear()
                try:
                    async with asyncio.timeout(left):
                        await q.wake.wait()
                except TimeoutError:
                    break
            batch: list[tuple[Job, asyncio.Future[None]]] = []
            samples = 0
            while q.items and (not batch or samples + q.items[0][0].samples <= self.max_batch_size):
                job, future = q.items.popleft()
                if future.cancelled():  # its caller gave up (deadline, client gone)
                    continue
                batch.append((job, future))
                samples += job.samples
            if not batch:
                continue
            await self._execute(q, key, [job for job, _ in batch])
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def close(self) -> None:
        """Stop the workers; queued jobs are cancelled."""
        self._closed = True
        for q in self._queues.values():
            for _, future in q.items:
                future.cancel()
            q.items.clear()
            if q.task is not None:
                q.task.cancel()
        await asyncio.gather(
            *(q.task for q in self._queues.values() if q.task is not None), return_exceptions=True
        )
