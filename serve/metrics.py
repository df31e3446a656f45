"""Prometheus metrics of one app (its own registry, so several apps in one process never collide)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: from sub-millisecond micro models to multi-second queues under overload.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
UNKNOWN_MODEL = "_unknown"  # label for requests naming no model the server knows (bounded cardinality)
INFO_LABELS = ("version", "weights_sha256", "vitc_version", "git_commit", "exported")


def _release(counts: dict, key: object) -> bool:
    """Count one user of `key` less; True when that was the last one (or it was never counted)."""
    left = counts.pop(key, 0) - 1
    if left > 0:
        counts[key] = left
    return left <= 0


def _info(provenance: dict[str, str] | None) -> list[str]:
    return [str((provenance or {}).get(k, "")) for k in INFO_LABELS]


class Metrics:
    """Request counts by model/endpoint/status, latency split into queue and compute, batch sizes, in-flight."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "vitc_requests", "HTTP requests answered", ["model", "endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "vitc_request_duration_seconds", "End-to-end request time in the server", ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.preprocess = Histogram(
            "vitc_preprocess_duration_seconds", "Image decoding and preprocessing time per image", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue = Histogram(
            "vitc_queue_duration_seconds", "Time a request waited for its batch to start", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.compute = Histogram(
            "vitc_compute_duration_seconds", "Backend inference time per batch", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "vitc_batch_size", "Rows per executed batch", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.in_flight = Gauge("vitc_in_flight_requests", "HTTP requests being processed", registry=r)
        self.disconnects = Counter(
            "vitc_client_disconnects", "Requests whose client left before the answer: during the upload, or "
            "while queued (their work is dropped, never computed)", ["model", "stage"], registry=r,
        )
        self.queue_depth = Gauge("vitc_queue_depth", "Requests waiting for a batch", ["model"], registry=r)
        self.model_info = Gauge(
            "vitc_model_info", "Served models and where they came from (value 1)",
            ["model", "variant", "runtime", "precision", *INFO_LABELS], registry=r,
        )
        self._versions: dict[tuple[str, ...], int] = {}  # served versions per info label set
        self._names: dict[str, int] = {}  # served versions per model name

    def add_model(self, name: str, variant: str, runtime: str, precision: str, depth: Callable[[], float],
                  provenance: dict[str, str] | None = None) -> None:
        """Register a served model (version): info series with its provenance, and a live queue-depth gauge (a new
        version's replaces its predecessor's)."""
        labels = (name, variant, runtime, precision, *_info(provenance))
        self.model_info.labels(*labels).set(1)
        self.queue_depth.labels(name).set_function(depth)
        # Counted: a reload of the same version adds its series before the old one's removal (which must keep it).
        self._versions[labels] = self._versions.get(labels, 0) + 1
        self._names[name] = self._names.get(name, 0) + 1

    def remove_model(self, name: str, variant: str, runtime: str, precision: str,
                     provenance: dict[str, str] | None = None) -> None:
        """Forget a replaced or unloaded model version: its info series unless another served version has the
        same labels, and the queue-depth gauge (which holds the batcher) once no version of the name is left."""
        labels = (name, variant, runtime, precision, *_info(provenance))
        if _release(self._versions, labels):
            with contextlib.suppress(KeyError):
                self.model_info.remove(*labels)
        if _release(self._names, name):
            with contextlib.suppress(KeyError):
                self.queue_depth.remove(name)

    # BatchObserver, called from the batcher (queued: event loop; batch: inference thread).
    def queued(self, model: str, seconds: float) -> None:
        self.queue.labels(model).observe(seconds)

    def batch(self, model: str, rows: int, seconds: float, requests: int = 1) -> None:
        self.batch_size.labels(model).observe(rows)
        self.compute.labels(model).observe(seconds)

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)
