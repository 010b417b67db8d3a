"""Decoding slots for the server: N workers, each a MedusaRuntime (its own backend and KV cache) driven by
its own thread, and a bounded first-come-first-served queue in front of them.

All Pool methods run on the event loop's thread; a worker thread talks to the loop only through
`loop.call_soon_threadsafe` (events of its job, then the release of its slot).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..api import IncrementalText
from ..errors import BackendError, MedusaError

log = logging.getLogger("medusa_runtime.serve")


class QueueFull(Exception):
    """Every worker is busy and the queue holds max_queue requests already."""


class ShuttingDown(Exception):
    """The server is draining: no new work is started."""


class ClientGone(Exception):
    """The client disconnected while its request waited in the queue."""


@dataclass
class Job:
    """One completion request as a worker sees it. Events go to `events` on the loop:
    ("delta", text, token_ids), then ("end", finish_reason, stats) or ("error", http_status, message)."""

    id: str
    prompt_ids: list[int]
    max_tokens: int
    stop: tuple[str, ...]
    acceptance: object
    loop: asyncio.AbstractEventLoop
    seed: int | None = None  # typical acceptance's draws (None: fresh ones)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""  # "disconnect" | "shutdown"
    waiter: asyncio.Future | None = None  # while queued
    worker: Worker | None = None

    def post(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def halt(self, reason: str) -> None:
        """Ask the worker to stop after its current step (and a queued job never to start)."""
        if not self.cancel.is_set():
            self.cancel_reason = reason
            self.cancel.set()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ShuttingDown() if reason == "shutdown" else ClientGone())


@dataclass
class Stats:
    prompt_tokens: int
    completion_tokens: int
    steps: int  # forwards: the prefill and every verify step
    verify_tokens: int  # tokens emitted by the verify steps (the prefill's token excluded)
    seconds: float  # from the first forward to the last

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens per verify step, as Result.mean_accepted counts them."""
        return self.verify_tokens / (self.steps - 1) if self.steps > 1 else 0.0


class Worker:
    """A MedusaRuntime and the thread that runs its jobs, one at a time."""

    def __init__(self, index: int, runtime, metrics, on_free):
        self.index, self.runtime, self.metrics, self.on_free = index, runtime, metrics, on_free
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=f"medusa-worker-{index}", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        job.worker = self
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                self._run(job)
            finally:
                self.on_free(self, job)

    def _run(self, job: Job) -> None:
        rt = self.runtime
        text = IncrementalText(rt.tokenizer, job.stop)
        n = steps = verify_tokens = 0
        finish, stopped = "length", False
        start = time.perf_counter()
        try:
            if job.cancel.is_set():
                finish = "abort" if job.cancel_reason == "shutdown" else "cancelled"
            else:
                gen = rt.steps(job.prompt_ids, job.max_tokens, acceptance=job.acceptance, seed=job.seed)
                try:
                    for step in gen:
                        steps += 1
                        n += len(step.tokens)
                        if steps > 1:
                            verify_tokens += len(step.tokens)
                        self.metrics.step(len(step.tokens), verify=steps > 1)
                        piece, stopped = text.add(step.tokens)
                        job.post("delta", piece, list(step.tokens))
                        if stopped:
                            finish = "stop"
                            break
                        if step.tokens and step.tokens[-1] in rt.eos:
                            finish = "stop"
                        if job.cancel.is_set():  # the client left, or the drain timed out
                            finish = "abort" if job.cancel_reason == "shutdown" else "cancelled"
                            break
                finally:
                    gen.close()  # stops decoding; the next prefill resets the cache
                tail = "" if stopped else text.flush()  # text after a stop string is never sent
                if tail:
                    job.post("delta", tail, [])
        except BackendError as exc:  # the engine failed: the request fails, the server goes on
            log.error("%s: decoding failed: %s", job.id, exc)
            job.post("error", 500, f"decoding failed: {exc}")
            return
        except MedusaError as exc:
            job.post("error", 400, str(exc))
            return
        except (
            Exception
        ) as exc:  # a bug or an engine error not wrapped: the request fails, the server goes on
            log.exception("%s: decoding failed", job.id)
            job.post("error", 500, f"decoding failed: {type(exc).__name__}: {exc}")
            return
        seconds = time.perf_counter() - start
        job.post("end", finish, Stats(len(job.prompt_ids), n, steps, verify_tokens, seconds))


class Pool:
    """Workers and the bounded FIFO queue of requests waiting for one."""

    def __init__(self, runtimes, max_queue: int, metrics, loop: asyncio.AbstractEventLoop | None = None):
        self.max_queue, self.metrics, self.loop = max_queue, metrics, loop
        self.workers = [Worker(i, rt, metrics, self._freed) for i, rt in enumerate(runtimes)]
        self.idle: deque[Worker] = deque(self.workers)
        self.waiters: deque[tuple[asyncio.Future, Job]] = deque()
        self.running: dict[Worker, Job] = {}
        self.closing = False

    @property
    def queued(self) -> int:
        return len(self.waiters)

    @property
    def active(self) -> int:
        return len(self.running)

    async def acquire(self, job: Job) -> Worker:
        """A free worker for this job, waiting in line if needed. Raises QueueFull at once when the line is
        full, ShuttingDown when the server drains, ClientGone when the client leaves while waiting."""
        if self.closing:
            raise ShuttingDown()
        if self.idle and not self.waiters:
            return self._assign(self.idle.popleft(), job)
        if len(self.waiters) >= self.max_queue:
            raise QueueFull()
        fut = asyncio.get_running_loop().create_future()
        entry = (fut, job)
        self.waiters.append(entry)
        job.waiter = fut
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())  # handed a worker just as we were cancelled: give it back
            raise
        finally:
            job.waiter = None
            try:
                self.waiters.remove(entry)
            except ValueError:
                pass

    def _assign(self, worker: Worker, job: Job) -> Worker:
        self.running[worker] = job
        return worker

    def release(self, worker: Worker) -> None:
        """The worker is free: hand it to the first request still waiting, else mark it idle."""
        self.running.pop(worker, None)
        while self.waiters and not self.closing:
            fut, job = self.waiters.popleft()
            if not fut.done():
                fut.set_result(self._assign(worker, job))
                return
        if worker not in self.idle:
            self.idle.append(worker)

    def _freed(self, worker: Worker, job: Job) -> None:  # on the worker's thread
        try:
            self.loop.call_soon_threadsafe(self.release, worker)
        except RuntimeError:  # the loop is closed
            pass

    def begin_shutdown(self) -> None:
        """No new work: queued requests are answered 503; running ones go on."""
        self.closing = True
        while self.waiters:
            fut, job = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(ShuttingDown())

    def abort_running(self) -> None:
        for job in list(self.running.values()):
            job.halt("shutdown")

    def close(self, timeout: float = 5.0) -> None:
        for w in self.workers:
            w.close()
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.thread.join(max(0.0, deadline - time.monotonic()))
