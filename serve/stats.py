"""Per-model inference statistics in the shape of Triton's statistics extension (GET /v2/models/{name}/stats)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any


def _pair() -> list[int]:
    return [0, 0]  # count, nanoseconds


class ModelStats:
    """Counts and cumulative times of one loaded model version; updated from the event loop and worker threads."""

    # Triton's rule (its InferenceStatsAggregator): a request that succeeds counts its inferences, its time and its
    # queue and compute times (UpdateSuccess); one that fails only its count and time (UpdateFailure), even when its
    # batch ran; every executed batch counts in execution_count and batch_stats (UpdateInferBatchStats). So
    # queue.count == compute_infer.count == success.count, and batch_size x count sums to inference_count as long as
    # no request of an executed batch failed after it ran (non-finite outputs, its client gone, its answer refused).

    def __init__(self, unbatched: bool = False) -> None:
        """`unbatched`: a model without Triton batching (max_batch_size 0), whose requests carry their own batch
        dimension: each counts as one inference of batch size 1, as Triton's backends count them."""
        self.unbatched = unbatched
        self._lock = threading.Lock()
        self.last_inference_ms = 0
        self.inference_count = 0  # inferences of successful requests (Triton: each inference of a batch counts)
        self.execution_count = 0  # backend calls
        self._success, self._fail, self._queue, self._infer = _pair(), _pair(), _pair(), _pair()
        self._batches: defaultdict[int, list[int]] = defaultdict(_pair)

    def request(self, ok: bool, seconds: float, rows: int = 1, requests: int = 1, queue_s: float = 0.0,
                compute_s: float = 0.0) -> None:
        """A request of `rows` inferences answered (ok) or failed, with its time in the server (which requests
        count, and as what: serve.routes.deps.recorded). It counts as `requests` inference requests: the items it
        queued (a multipart request's files each), so that success + fail, queue and compute_infer count alike.
        `queue_s` and `compute_s`, its items' seconds waiting for and in their batches summed, count only when ok."""
        with self._lock:
            pair = self._success if ok else self._fail
            pair[0] += requests
            pair[1] += int(seconds * 1e9) * requests
            if ok:
                self.inference_count += rows
                self._queue[0] += requests
                self._queue[1] += int(queue_s * 1e9)
                self._infer[0] += requests
                self._infer[1] += int(compute_s * 1e9)

    # BatchObserver
    def queued(self, model: str, seconds: float) -> None:
        """Nothing yet: a request's queue time counts once it has succeeded (`request`), as Triton counts it; only
        the metrics observe every request a batch took."""

    def batch(self, model: str, rows: int, seconds: float, requests: int = 1) -> None:
        ns = int(seconds * 1e9)
        # Triton's batch size is the number of inferences: the rows of a batched model's requests, but 1 a request
        # without batching (its first dimension is the model's own), so that batch_size x count sums to
        # inference_count either way while every request of the executed batches succeeds.
        size = requests if self.unbatched else rows
        with self._lock:
            self.last_inference_ms = int(time.time() * 1000)
            self.execution_count += 1
            self._batches[size][0] += 1
            self._batches[size][1] += ns

    def to_triton(self, name: str, version: str) -> dict[str, Any]:
        """One `model_stats` entry of Triton's statistics response."""
        def d(pair: list[int]) -> dict[str, int]:
            return {"count": pair[0], "ns": pair[1]}

        zero = {"count": 0, "ns": 0}
        with self._lock:
            return {
                "name": name, "version": version, "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {"success": d(self._success), "fail": d(self._fail), "queue": d(self._queue),
                                    "compute_input": zero, "compute_infer": d(self._infer),
                                    "compute_output": zero, "cache_hit": zero, "cache_miss": zero},
                "batch_stats": [{"batch_size": b, "compute_input": zero, "compute_infer": d(p),
                                 "compute_output": zero} for b, p in sorted(self._batches.items())],
                # Triton 23.x+ fields, present so clients that index them work: response statistics are for
                # decoupled (streaming) models, which vitc does not serve; memory usage is reported by GPU backends.
                "response_stats": {}, "memory_usage": [],
            }


class Observers:
    """Several batch observers as one (the app's Prometheus metrics and the model's own statistics)."""

    def __init__(self, *observers: Any) -> None:
        self.observers = observers

    def queued(self, model: str, seconds: float) -> None:
        for o in self.observers:
            o.queued(model, seconds)

    def batch(self, model: str, rows: int, seconds: float, requests: int = 1) -> None:
        for o in self.observers:
            o.batch(model, rows, seconds, requests)

    def timed_out(self, model: str) -> None:
        # Only the metrics count timeouts: Triton's statistics have no field for them (the requests count as fail).
        for o in self.observers:
            if hasattr(o, "timed_out"):
                o.timed_out(model)
