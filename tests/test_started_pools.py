"""The server's thread pools (decoding, each model's inference) start every thread when they are made: under a pids
limit a lazily started pool lost its slots to other pools' idle threads for good, and the model answered 503 to
every request while it reported ready. A thread that cannot start fails the start instead."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serve.workpool import WorkPool, started_pool


def _named(prefix: str) -> int:
    return sum(t.name.startswith(prefix) for t in threading.enumerate())


def test_every_thread_runs_once_the_pool_is_made():
    pool = started_pool(5, "vitc-test-eager")
    try:
        assert _named("vitc-test-eager") == 5
    finally:
        pool.shutdown()


def test_the_decode_pool_and_a_models_inference_pool_start_whole():
    from serve.batching import DynamicBatcher

    work = WorkPool(3, 4, name="vitc-test-decode")
    assert _named("vitc-test-decode") == 3
    work.shutdown()

    async def start() -> None:
        batcher = DynamicBatcher("eager-model", lambda x: x, max_batch=4, max_delay_s=0.001, max_queue=8, parallel=2)
        await batcher.start()
        assert _named("infer-eager-model") == 2
        await batcher.close()

    asyncio.run(start())


def test_a_thread_that_cannot_start_fails_at_the_start(monkeypatch):
    real, started = threading.Thread.start, []

    def start(self: threading.Thread) -> None:
        if self.name.startswith("vitc-test-limited") and len(started) == 2:
            raise RuntimeError("can't start new thread")
        started.append(self)
        real(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        started_pool(4, "vitc-test-limited")
