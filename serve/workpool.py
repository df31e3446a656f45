"""The server's CPU work off the event loop (image decoding, tensor parsing, decompression), bounded twice:
a fixed number of threads with a bounded queue in front of them, and a budget of pixels being decoded at once.

Both refuse rather than queue without limit (the caller answers 503 + Retry-After): a burst of uploads can neither
queue without limit nor make this process hold more decoded pixels than the budget, however the requests are mixed.
A decode thread whose image does not fit the budget waits a short, fixed time for other decodes to end first.
A job whose caller has given up (its client gone) is not run: cancelled while it waits, or skipped when it would start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ThreadsUnavailable(RuntimeError):
    """A pool's threads could not all start (a thread, pids or memory limit); `what` names them, as in
    "4 inference threads for model 'x'". None of them is left running."""

    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(f"cannot start {what}: {cause}")
        self.what = what


# How a thread that cannot start (EAGAIN under a pids or ulimit -u limit, or no memory for its stack) is worded:
# Python's RuntimeError, and a runtime's own thread pool (onnxruntime: "pthread_create failed, error code: 11 error
# msg: Resource temporarily unavailable", which runtimes.loader raises as a MemoryError from it).
_NO_THREAD = ("can't start new thread", "pthread_create failed", "resource temporarily unavailable")


def thread_start_failed(exc: BaseException | None) -> bool:
    """Whether `exc`, or an error it was raised from, is a thread that could not start."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if not isinstance(exc, OSError) and any(m in str(exc).lower() for m in _NO_THREAD):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def started_pool(threads: int, name: str, what: str | None = None) -> ThreadPoolExecutor:
    """A pool whose `threads` threads all run now, not at its first jobs; ThreadsUnavailable if one cannot start."""
    # Under a pids or thread limit (a Kubernetes pids limit, ulimit -u) another pool's idle threads could take the
    # last slots for good, and every later job would fail while the server reports ready. A thread that cannot
    # start fails here, at the start: ThreadsUnavailable, naming `what` (by default "N threads of pool NAME"), and
    # no thread of the pool is left.
    pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
    ready = threading.Barrier(threads + 1)
    try:
        for _ in range(threads):  # each waits, so each submit starts a new thread
            pool.submit(ready.wait, 30)
        ready.wait(30)
    except BaseException as exc:
        ready.abort()
        # The job whose thread failed to start is queued all the same: cancelled, not run by a thread that started.
        pool.shutdown(wait=False, cancel_futures=True)
        if thread_start_failed(exc):
            raise ThreadsUnavailable(what or f"{threads} threads of pool {name!r}", exc) from exc
        raise
    return pool


class Busy(Exception):
    """The work pool's queue or the decode budget is full: retry later (HTTP 503)."""


class Abandoned(Exception):
    """A job not run: its caller had given up on it (`WorkPool.run`'s `unless`) by the time it would start."""


def _unless(unless: Callable[[], bool] | None, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, or Abandoned without running it when `unless()` is true."""
    # The caller cancels the jobs it stops waiting for, which frees their places at once; but a worker may take one
    # in the moment before the event loop has seen the client go and cancelled it: the job looks for itself.
    if unless is not None and unless():
        raise Abandoned
    return fn(*args)


class WorkPool:
    """`threads` workers and at most `queue` jobs waiting for one; `run` refuses beyond that."""

    def __init__(self, threads: int, queue: int, name: str = "work", what: str | None = None) -> None:
        """`what` names the threads when they cannot start (ThreadsUnavailable); by default "N NAME threads"."""
        self.threads, self.queue = threads, queue
        self._pool = started_pool(threads, name, what or f"{threads} {name} thread{'s' * (threads != 1)}")
        self._slots = threading.BoundedSemaphore(threads + queue)
        self._inflight = 0  # jobs started from the event loop and not finished (only touched on the loop)

    @property
    def in_flight(self) -> int:
        """Jobs started from the event loop and not finished: running, queued, or run inline."""
        return self._inflight

    async def run(self, fn: Callable[..., T], *args: Any, inline_if_idle: bool = False,
                  unless: Callable[[], bool] | None = None) -> T:
        """`fn(*args)` in a worker; Busy at once when `threads + queue` jobs are already in. A job whose `unless()`
        (called from the worker: thread-safe) is true when it would start is not run: Abandoned. Cancelling the
        awaiting task cancels a job not yet started, and its place is free at once."""
        # With `inline_if_idle`, a job that finds the pool idle runs right here instead: a lone request does not pay
        # two thread hand-offs for a few milliseconds of work (while anything else is in flight, it goes to a worker).
        if inline_if_idle and self._inflight == 0:
            self._inflight += 1
            try:
                return _unless(unless, fn, *args)
            finally:
                self._inflight -= 1
        if not self._slots.acquire(blocking=False):
            raise Busy(f"the server has {self.threads + self.queue} decoding jobs in progress")
        try:
            job = self._pool.submit(_unless, unless, fn, *args)
        except BaseException:
            self._slots.release()
            raise
        self._inflight += 1
        # Released when the job really ends (or is cancelled before it started), not when its caller gives up.
        job.add_done_callback(lambda _job: self._slots.release())
        try:
            return await asyncio.wrap_future(job)
        finally:
            self._inflight -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


TRIM_PIXELS = 8 << 20  # after a decode this big, freed memory goes back to the system


def _malloc_trim() -> Callable[[], object]:
    """glibc's malloc_trim(0), or a no-op elsewhere. Without it, the arenas of the decode threads keep the peak of
    one big image (hundreds of MB) long after it was answered."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return functools.partial(trim, 0)


_trim = _malloc_trim()


def trim() -> None:
    """Give freed heap memory back to the system (glibc); a no-op elsewhere."""
    _trim()


# How long a decode thread waits for budget that other decodes hold before its request gets 503 + Retry-After: 1.
# The dearest image the defaults allow takes about a second to decode on a small machine, so 2 s sees at least one
# decode in progress end (two large photos arriving together both succeed); much longer would keep a decode
# thread, and the client, waiting for what the Retry-After says as well.
BUDGET_WAIT_S = 2.0


class Deferred(Exception):
    """An image that does not fit the budget beside its own request's other decodes: decode it after them."""


class Holder:
    """The budget held by one request's decodes running at once (changed under the budget's lock)."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = 0


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Kept:
    """Pixels of a budget that a job reserved and handed on past its block (a large answer's, until it is sent),
    given back once by `release`, from any thread; a job that finds it released already gives its own back."""

    def __init__(self, budget: PixelBudget) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._pixels = 0
        self._released = False

    def adopt(self, pixels: int) -> bool:
        """Take over `pixels` that the budget holds; False (nothing taken) once released."""
        with self._lock:
            if self._released:
                return False
            self._pixels += pixels
            return True

    def shrink(self, pixels: int) -> None:
        """Keep at most `pixels`, giving the rest back (never waits: safe on the event loop)."""
        with self._lock:
            extra = self._pixels - max(pixels, 0)
            if extra <= 0:
                return
            self._pixels -= extra
        self.budget.give(extra)

    def release(self) -> None:
        """Give everything back, now and for good (idempotent)."""
        with self._lock:
            self._released = True
            pixels, self._pixels = self._pixels, 0
        if pixels:
            self.budget.give(pixels)


class PixelBudget:
    """Pixels being decoded at once in this process; a decode reserves its image's pixels first (thread-safe)."""

    def __init__(self, pixels: int, wait_s: float = BUDGET_WAIT_S) -> None:
        self.pixels = pixels
        self.wait_s = wait_s
        self._used = 0
        self._freed = threading.Condition(threading.Lock())
        self._mine = threading.local()  # what the calling thread holds itself

    @property
    def used(self) -> int:
        return self._used

    @contextlib.contextmanager
    def reserve(self, pixels: int, holder: Holder | None = None, kept: Kept | None = None) -> Iterator[None]:
        """Hold `pixels` of the budget for the block, waiting up to `wait_s` for others to free them; Busy after.
        With `kept`, a block that ends without an error hands them to it instead of giving them back."""
        # Never waits for budget the caller holds itself: not on the event loop (an inline job), not in a thread that
        # already holds a reservation, and not while `holder` (the request's other decodes) holds any: Deferred then.
        mine = getattr(self._mine, "held", 0)
        with self._freed:
            if self._used + pixels > self.pixels:
                self._wait(pixels, holder, may_wait=not mine and not _on_event_loop())
            self._used += pixels
            if holder is not None:
                holder.held += pixels
                self._freed.notify_all()  # the holder's other waiters stop waiting on it (Deferred)
        self._mine.held = mine + pixels
        handed = False
        try:
            yield
            handed = kept is not None and kept.adopt(pixels)
        finally:
            self._mine.held -= pixels  # handed on, they are no longer this thread's to wait beside
            if not handed:
                self.give(pixels, holder)
            if pixels >= TRIM_PIXELS:  # here, in the job's thread: what the block built and dropped is freed now
                _trim()

    def give(self, pixels: int, holder: Holder | None = None) -> None:
        """Give back `pixels` reserved earlier (by `holder`), waking the decodes waiting for them."""
        with self._freed:
            self._used -= pixels
            if holder is not None:
                holder.held -= pixels
            self._freed.notify_all()

    def _wait(self, pixels: int, holder: Holder | None, *, may_wait: bool) -> None:
        """Until `pixels` fit (the lock held); Busy once `wait_s` has passed, Deferred while `holder` holds any."""
        deadline = time.monotonic() + self.wait_s
        while self._used + pixels > self.pixels:
            if holder is not None and holder.held:
                raise Deferred(f"{pixels:,} pixels do not fit beside the {holder.held:,} this request holds")
            left = deadline - time.monotonic()
            if not may_wait or left <= 0:
                # Held by decodes, or by large answers being built or waiting for clients to read them.
                raise Busy(f"the server's decode budget is in use ({self._used:,} of its {self.pixels:,} pixels: "
                           f"images being decoded, large answers not yet taken by their clients); this image needs "
                           f"{pixels:,}")
            self._freed.wait(left)
