"""Dynamic batching: requests that arrive within a short window run as one batch, off the event loop.

One collector task per model waits for a free inference slot, then takes the oldest request and whatever
else arrives before that request's deadline (`max_delay` after it was queued) or until `max_batch` rows.
Batches run in a thread pool with `parallel` workers (OpenVINO streams use several). Admission is counted in
images (rows) for a request's whole life and bounded: a full model refuses at once (the caller answers 503)
instead of growing latency without limit, and a request larger than the bound can never fit (TooLarge: 413). A
batch that fails is retried request by request, so one bad request cannot fail its neighbours. A batch that runs
past `timeout_s` fails its requests (504) and stalls the model: it reports not ready and refuses work until the
stuck call has returned and a probe batch has succeeded (probes pause longer and longer between tries). The stall
and the recovery are logged. Closing drains for a timeout, then answers every request still held (BatcherClosed),
computing or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from runtimes.base import check_logits
from serve.workpool import started_pool

log = logging.getLogger("vitc.serve")
FIRST_PAUSE_S, LAST_PAUSE_S = 0.5, 30.0  # between failed probes of a stalled model: doubling from the first


class QueueFull(Exception):
    """The model's queue is at its limit."""


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new work."""


class TooLarge(Exception):
    """A request with more images than the model ever holds in progress: it can never be admitted."""

    def __init__(self, model: str, images: int, limit: int) -> None:
        super().__init__(f"a request of {images} images can never fit model {model!r}'s limit of {limit} images "
                         "in progress")
        self.model, self.images, self.limit = model, images, limit


class NotReady(Exception):
    """The model is stalled (a batch timed out) and takes no work until a probe batch succeeds."""


class InferenceTimeout(Exception):
    """A batch ran longer than the model's inference timeout."""


class BatchObserver(Protocol):
    """Where the batcher reports its timings (the Prometheus metrics; the model's statistics take `batch` alone)."""

    def queued(self, model: str, seconds: float) -> None: ...

    def batch(self, model: str, rows: int, seconds: float, requests: int = 1) -> None: ...

    def timed_out(self, model: str) -> None: ...


@dataclass(slots=True)
class Spent:
    """A request's seconds in the batcher, summed over the items it submitted: waiting for a batch, and in the
    backend calls that computed them (each item the whole call's time, as Triton counts a batch's requests)."""

    queue: float = 0.0
    compute: float = 0.0


@dataclass(slots=True)
class _Item:
    x: np.ndarray
    future: asyncio.Future
    enqueued: float
    timings: dict[str, float] | None = None  # filled with "queue" and "compute" seconds when given
    spent: Spent | None = None  # added to as `timings` is written
    rows: int = field(init=False)
    waiting: bool = False  # counted in the batcher's depth: queued, its client still waiting, not taken by a batch

    def __post_init__(self) -> None:
        self.rows = int(self.x.shape[0])


class DynamicBatcher:
    """Per-model request queue + collector + inference thread pool."""

    def __init__(
        self,
        name: str,
        infer: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        parallel: int = 1,
        observer: BatchObserver | None = None,
        timeout_s: float = 30.0,
        probe: np.ndarray | None = None,
        merge: bool = True,
        classes: int | None = None,
    ) -> None:
        self.name = name
        self.classes = classes  # the model's output width: every batch's output is checked against it (None: rows)
        self.merge = merge  # False: each request is a batch of its own (Triton without dynamic_batching)
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.parallel = parallel
        self.timeout_s = timeout_s
        self._probe = probe  # one input row that must answer before a stalled model is ready again
        self._stalled = False
        self._stalled_at = 0.0  # perf_counter() of the timeout that stalled the model
        self._closed = asyncio.Event()  # set by close(): cuts a pause between probes short
        self._infer = infer
        self._observer = observer
        self._queue: asyncio.Queue[_Item] | None = None
        self._carry: _Item | None = None  # taken from the queue but did not fit the last batch
        self._forming: list[_Item] = []
        self._slots: asyncio.Semaphore | None = None
        self._running: dict[asyncio.Task, list[_Item]] = {}  # the batches being computed, by their task
        self._collector: asyncio.Task | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._closing = False
        self._admitted = 0  # images admitted and not answered (decoding, queued or running)
        self._running_rows = 0  # rows of the batches being computed
        # Requests waiting for a batch. Not the queue's size: a request whose client left (its future cancelled) stays
        # queued until the collector reaches it, and counted, the gauge showed a backlog that would never be computed.
        self._waiting = 0

    @property
    def depth(self) -> int:
        """Requests waiting for a batch (those whose client left, or that were answered, are not)."""
        return self._waiting

    def _unwait(self, item: _Item) -> None:
        """`item` waits no longer: taken by a batch, or its future done (its client left, or the batcher closed)."""
        if item.waiting:
            item.waiting = False
            self._waiting -= 1

    @property
    def ready(self) -> bool:
        return (self._collector is not None and not self._collector.done() and not self._closing
                and not self._stalled)

    @property
    def admitted(self) -> int:
        """Images admitted and not finished (decoding, queued or running)."""
        return self._admitted

    def admit(self, images: int = 1) -> _Admission:
        """Reserve places for a request's images for its whole life; QueueFull when they do not fit now, TooLarge
        when they never can."""
        if self._closing:
            raise BatcherClosed(f"model {self.name!r} is shutting down")
        if self._stalled:
            raise NotReady(f"model {self.name!r} is not ready (a batch exceeded {self.timeout_s:g} s); retry later")
        if images > self.max_queue:
            raise TooLarge(self.name, images, self.max_queue)
        if self._admitted + images > self.max_queue:
            raise QueueFull(f"model {self.name!r} has {self._admitted} of {self.max_queue} images in progress")
        self._admitted += images
        return _Admission(self, images)

    def start_threads(self) -> None:
        """Start the inference threads, if not yet; needs no event loop, so the server starts them before it says
        it listens. ThreadsUnavailable (none left running) names them and the model."""
        if self._pool is None:
            self._pool = started_pool(self.parallel, f"infer-{self.name}",
                                      f"{self.parallel} inference thread{'s' * (self.parallel != 1)} for model "
                                      f"{self.name!r}")

    def discard(self) -> None:
        """Stop the threads of a batcher that was never started (its start was given up: another pool's threads
        could not start)."""
        if self._pool is not None and self._collector is None:
            self._pool.shutdown(wait=True)
            self._pool = None

    async def start(self) -> None:
        """Create the queue, thread pool (unless `start_threads` did) and collector on the running loop."""
        self.start_threads()
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._slots = asyncio.Semaphore(self.parallel)
        self._collector = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{self.name}")

    async def submit(self, x: np.ndarray, timings: dict[str, float] | None = None,
                     spent: Spent | None = None) -> np.ndarray:
        """Queue (k, C, H, W) rows; return their (k, classes) outputs. Raises QueueFull or BatcherClosed."""
        # `timings`, when given, receives this request's seconds spent waiting for its batch ("queue", written when a
        # batch takes the rows: only a request whose rows were taken has it) and in the backend call that computed
        # it ("compute"). `spent` has them added: a request of several items sums them there, and the model's
        # statistics count them once it has succeeded (serve.routes.deps.recorded).
        if self._closing or self._queue is None:
            raise BatcherClosed(f"model {self.name!r} is shutting down")
        if self._stalled:
            raise NotReady(f"model {self.name!r} is not ready (a batch exceeded {self.timeout_s:g} s); retry later")
        if not 1 <= x.shape[0] <= self.max_batch:
            raise ValueError(f"a request must have 1..{self.max_batch} rows, got {x.shape[0]}")
        loop = asyncio.get_running_loop()
        # perf_counter, not loop.time(): uvloop's clock is cached to the millisecond, too coarse for queue times.
        item = _Item(x, loop.create_future(), time.perf_counter(), timings, spent)
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise QueueFull(f"model {self.name!r} has {self.max_queue} requests queued") from None
        item.waiting, self._waiting = True, self._waiting + 1
        item.future.add_done_callback(lambda _: self._unwait(item))
        return await item.future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            self._running_rows += sum(it.rows for it in batch)
            task = loop.create_task(self._run(batch))
            self._running[task] = batch
            task.add_done_callback(lambda t: self._running.pop(t, None))

    async def _next_batch(self) -> list[_Item]:
        if self._carry is None:
            first = await self._queue.get()
        else:
            first, self._carry = self._carry, None
        # Items being gathered stay visible (depth, close) until the batch is handed to a worker.
        batch = self._forming = [first]
        rows = first.rows
        deadline = first.enqueued + self.max_delay_s
        limit = self.max_batch if self.merge else rows
        if self.parallel > 1 and self.merge:
            # Several batches in flight (streams): share the work waiting (queued or still decoding) evenly among
            # them. One slot taking it all would leave that batch computing for as long as all its rows take on
            # one stream while the others idle through small ones: the same throughput, twice the tail latency.
            # (Requests submitted without admission count by what is queued.)
            waiting = max(self._admitted - self._running_rows, rows + self._queue.qsize())
            limit = min(limit, -(-waiting // self.parallel))
        while rows < limit:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                # Wait for companions only when some can come: images admitted (still decoding) beyond those
                # running and in hand. A lone request never pays the batching window.
                if remaining <= 0 or self._admitted <= self._running_rows + rows:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        item = await self._queue.get()
                except TimeoutError:
                    break
            if rows + item.rows > limit:
                self._carry = item
                break
            batch.append(item)
            rows += item.rows
        self._forming = []
        for it in batch:
            self._unwait(it)
        # Requests whose client went away (cancelled futures) are not computed; the others are taken.
        return self._taken([it for it in batch if not it.future.done()])

    def _taken(self, batch: list[_Item]) -> list[_Item]:
        """`batch`, its requests' queue time recorded: they are computed from now on, whether or not their client
        waits for them (their `timings` holding "queue" says so: serve.routes.deps.unless_gone)."""
        start = time.perf_counter()
        for it in batch:
            if self._observer:
                self._observer.queued(self.name, start - it.enqueued)
            if it.timings is not None:
                it.timings["queue"] = start - it.enqueued
            if it.spent is not None:
                it.spent.queue += start - it.enqueued
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        stuck: list[asyncio.Future] = []
        try:
            await self._answer(loop, batch, stuck)
        except Exception as exc:
            for it in batch:
                _fail(it, exc)
        except BaseException:  # cancelled by close() past its drain: the requests are answered, not left waiting
            self._fail_closed(batch, "while this request ran")
            raise
        finally:
            try:
                if stuck:  # the slot is this worker thread's: it is free only once the stuck call has returned
                    await self._recover(loop, stuck[0])
            finally:
                self._running_rows -= sum(it.rows for it in batch)
                self._slots.release()

    async def _answer(self, loop: asyncio.AbstractEventLoop, batch: list[_Item], stuck: list[asyncio.Future]) -> None:
        """Compute `batch` in one call and resolve its requests; when that call fails, each request on its own."""
        try:
            out = await self._call(loop, self._compute, [it.x for it in batch], stuck)
        except InferenceTimeout:
            raise
        except Exception:
            if len(batch) == 1:
                raise
            # Isolate the failure: every request gets its own answer or its own error.
            for it in batch:
                try:
                    self._resolve([it], await self._call(loop, self._compute, [it.x], stuck))
                except InferenceTimeout:
                    raise
                except Exception as exc:
                    _fail(it, exc)
            return
        self._resolve(batch, out)

    async def _call(self, loop: asyncio.AbstractEventLoop, fn: Callable, arg: object,
                    stuck: list[asyncio.Future]) -> tuple[np.ndarray, float]:
        """`fn(arg)` in the pool within `timeout_s`; past it the model stalls and InferenceTimeout is raised."""
        # The call outlives a timeout (the recovery awaits it), so the timeout must not reach it: wrap_future passes
        # a cancellation on to a call that has not started yet (a thread still picking it up), which then never ran,
        # and the recovery, waiting for it, never probed: the model stayed not ready for good. Hence the shield.
        job = asyncio.wrap_future(self._pool.submit(fn, arg), loop=loop)
        job.add_done_callback(_retrieved)  # its error may come after every awaiter left (a close past its drain)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await asyncio.shield(job)
        except TimeoutError:
            stuck.append(job)
            self._stall()
            raise InferenceTimeout(f"model {self.name!r}: inference took longer than {self.timeout_s:g} s") from None

    def _stall(self) -> None:
        """Refuse work until a probe succeeds; what is queued now would only wait for the stuck call: refuse it."""
        if self._observer:
            self._observer.timed_out(self.name)
        if not self._stalled:  # once per stall (several batches may pass the timeout together)
            self._stalled_at = time.perf_counter()
            log.warning("model stalled", extra={"model": self.name, "timeout_s": self.timeout_s})
        self._stalled = True
        # Held aside too: the request that did not fit the last batch, and those a free slot is gathering (a
        # batch forming drops requests already answered), else they would wait for the stuck call all the same.
        held = [*self._forming, *([self._carry] if self._carry else [])]
        self._carry = None
        while self._queue is not None and not self._queue.empty():
            held.append(self._queue.get_nowait())
        for it in held:
            _fail(it, NotReady(f"model {self.name!r} stalled: a batch exceeded {self.timeout_s:g} s"))

    async def _recover(self, loop: asyncio.AbstractEventLoop, stuck: asyncio.Future) -> None:
        """Wait for the stuck call to return, then probe until the model answers in time again. Every probe that
        fails or is too slow is followed by a pause (doubling up to LAST_PAUSE_S): a model merely slower than its
        timeout would otherwise run probes back to back, a core busy for nothing beside the other models."""
        delay, probes = FIRST_PAUSE_S, 0
        while not self._closing:
            with contextlib.suppress(Exception):
                await stuck
            if not self._stalled:  # another slot's probe has already answered in time
                return
            if self._probe is None:
                self._recovered(probes)
                return
            stuck = loop.run_in_executor(self._pool, self._checked_infer, self._probe)
            probes += 1
            try:
                await asyncio.wait_for(asyncio.shield(stuck), self.timeout_s)
                self._recovered(probes)
                return
            except Exception:  # too slow (TimeoutError; the probe runs on) or failed: pause, then try again
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), delay)
            delay = min(LAST_PAUSE_S, delay * 2)

    def _recovered(self, probes: int) -> None:
        """The model answers in time again: take work."""
        if self._stalled:
            self._stalled = False
            log.info("model recovered", extra={"model": self.name, "probes": probes,
                                               "stalled_s": round(time.perf_counter() - self._stalled_at, 3)})

    def _compute(self, xs: list[np.ndarray]) -> tuple[np.ndarray, float]:
        """Runs in the thread pool: one contiguous batch, one backend call; (outputs, seconds)."""
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        t0 = time.perf_counter()
        y = self._infer(x)
        dt = time.perf_counter() - t0
        # The contract, once per call: unchecked, a wrong width reached v2 clients as a 200 contradicting the
        # model's metadata, and v1 as an opaque IndexError; now the batch fails with what came back (500).
        y = check_logits(y, int(x.shape[0]), self.classes)
        if self._observer:
            self._observer.batch(self.name, int(x.shape[0]), dt, len(xs))
        return y, dt

    def _checked_infer(self, x: np.ndarray) -> np.ndarray:
        """A probe's call: the backend's output checked as every batch's is (a model answering garbage is not
        recovered)."""
        return check_logits(self._infer(x), int(x.shape[0]), self.classes)

    @staticmethod
    def _resolve(batch: list[_Item], result: tuple[np.ndarray, float]) -> None:
        out, seconds = result
        row = 0
        for it in batch:
            if it.timings is not None:
                it.timings["compute"] = seconds
            if it.spent is not None:
                it.spent.compute += seconds
            if not it.future.done():
                it.future.set_result(out[row:row + it.rows])
            row += it.rows

    async def close(self, timeout: float = 30.0) -> None:
        """Stop taking work, finish what is queued or running (up to `timeout`), then stop the pool. However it ends
        (past the timeout, or cancelled itself), every request it held is answered: its result or BatcherClosed."""
        self._closing = True
        self._closed.set()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        try:
            while (self.depth or self._computing()) and loop.time() < end:
                await asyncio.sleep(0.01)
        finally:
            self._stop()
        if self._collector:
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector

    def _computing(self) -> bool:
        """Whether a running batch still owes a request its answer: one past the inference timeout answered 504
        already, and its hung call is not worth the drain's wait."""
        return any(not it.future.done() for batch in self._running.values() for it in batch)

    def _stop(self) -> None:
        """Past the drain: cancel what still runs (a hung backend: stop waiting for it), fail every request not
        answered yet, and stop the pool. Synchronous, so that a cancelled close() still does all of it."""
        running = list(self._running.items())
        for task, batch in running:
            task.cancel()
            self._fail_closed(batch, "while this request ran")
        if self._collector:
            self._collector.cancel()
        leftovers = [*self._forming, *([self._carry] if self._carry else [])]
        self._forming, self._carry = [], None
        while self._queue and not self._queue.empty():
            leftovers.append(self._queue.get_nowait())
        self._fail_closed(leftovers, "before this request ran")
        if self._pool:
            # A hung backend call cannot be interrupted: do not wait for its thread when it outlived the timeout.
            self._pool.shutdown(wait=not running and not self._stalled, cancel_futures=True)

    def _fail_closed(self, items: list[_Item], when: str) -> None:
        """Answer the requests of `items` not answered yet: the model shut down (503, retry: a reload's new version
        or another replica serves them)."""
        for it in items:
            _fail(it, BatcherClosed(f"model {self.name!r} shut down {when}"))


class _Admission:
    """Releases an admitted request's place when its `with` block ends."""

    def __init__(self, batcher: DynamicBatcher, images: int) -> None:
        self._batcher, self._images = batcher, images

    def __enter__(self) -> _Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self._batcher._admitted -= self._images


def _retrieved(future: asyncio.Future) -> None:
    """Mark `future`'s exception as seen: a call no one awaits any longer logged asyncio's 'never retrieved' error."""
    if not future.cancelled():
        future.exception()


def _fail(item: _Item, exc: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(exc)
