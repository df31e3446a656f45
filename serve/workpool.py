"""The server's CPU work off the event loop (image decoding, tensor parsing, decompression), bounded twice:
a fixed number of threads with a bounded queue in front of them, and a budget of pixels being decoded at once.

Both refuse instead of waiting (the caller answers 503 + Retry-After): a burst of uploads can neither queue
without limit nor make this process hold more decoded pixels than the budget, however the requests are mixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Busy(Exception):
    """The work pool's queue or the decode budget is full: retry later (HTTP 503)."""


class WorkPool:
    """`threads` workers and at most `queue` jobs waiting for one; `run` refuses beyond that."""

    def __init__(self, threads: int, queue: int, name: str = "work") -> None:
        self.threads, self.queue = threads, queue
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(threads + queue)
        self._inflight = 0  # jobs started from the event loop and not finished (only touched on the loop)

    async def run(self, fn: Callable[..., T], *args: Any, inline_if_idle: bool = False) -> T:
        """`fn(*args)` in a worker; Busy at once when `threads + queue` jobs are already in.

        With `inline_if_idle`, a job that finds the pool idle runs right here instead: a lone request does not pay
        two thread hand-offs for a few milliseconds of work (while anything else is in flight, it goes to a worker).
        """
        if inline_if_idle and self._inflight == 0:
            self._inflight += 1
            try:
                return fn(*args)
            finally:
                self._inflight -= 1
        if not self._slots.acquire(blocking=False):
            raise Busy(f"the server has {self.threads + self.queue} decoding jobs in progress")
        try:
            job = self._pool.submit(fn, *args)
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


class PixelBudget:
    """Pixels being decoded at once in this process; a decode reserves its image's pixels first (thread-safe)."""

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    @contextlib.contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        """Hold `pixels` of the budget for the block; Busy when they are not free now."""
        with self._lock:
            if self._used + pixels > self.pixels:
                raise Busy(f"the server is decoding {self._used:,} of its {self.pixels:,} pixel budget; "
                           f"this image needs {pixels:,}")
            self._used += pixels
        try:
            yield
        finally:
            with self._lock:
                self._used -= pixels
            if pixels >= TRIM_PIXELS:
                _trim()
