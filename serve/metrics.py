"""Prometheus metrics of one app (its own registry, so several apps in one process never collide)."""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Callable, Iterator

# prometheus_client chooses where metric values live when it is first imported: with PROMETHEUS_MULTIPROC_DIR set
# (base images, Helm charts and platforms made for gunicorn's worker processes set it), in memory-mapped files in
# that directory, one set per process, for a collector that adds the processes up. vitc is one process that serves
# its own /metrics: the files would only be written there unasked, and a missing or read-only directory stops the
# start, once every model has loaded, with a traceback. So this process drops the variable before that import (the
# server warns; serve.app), unless the module was imported already: then the choice was someone else's to make.
MULTIPROCESS_VARIABLES = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
_IGNORED = [] if "prometheus_client" in sys.modules else [
    name for name in MULTIPROCESS_VARIABLES if os.environ.pop(name, None) is not None]

# isort: split
from prometheus_client import (  # noqa: E402
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Metric,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST  # noqa: E402

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: from sub-millisecond micro models to multi-second queues under overload, up to the default timeouts
# (inference 30 s, receiving a body 60 s): a request that ends in one is measured, not lost in +Inf.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # rows; --max-batch-size is at most 1024
UNKNOWN_MODEL = "_unknown"  # label for requests naming no model the server knows (bounded cardinality)
# What serve.httpproto answers below the app (bad request line, header timeout, URI or headers too long, unknown
# method or transfer coding, unknown HTTP version, too many connections); anything else is counted as "other".
PROTOCOL_STATUSES = ("400", "408", "414", "431", "501", "503", "505")
INFO_LABELS = ("version", "weights_sha256", "vitc_version", "git_commit", "exported")
# Paths left out of vitc_in_flight_requests: the scrape reading the gauge, and the probes polling the server, would
# otherwise keep an idle server at 1 (Triton's pending-request gauges count inference requests only).
NOT_IN_FLIGHT = frozenset({"/metrics", "/v2/health/live", "/v2/health/ready"})


def ignored_environment() -> list[str]:
    """The multi-process variables this process dropped (MULTIPROCESS_VARIABLES), once: empty from then on."""
    names, _IGNORED[:] = list(_IGNORED), []
    return names


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
        self.in_flight = Gauge(
            "vitc_in_flight_requests", "HTTP requests being processed (not /metrics or the /v2/health probes: 0 "
            "when idle)", registry=r,
        )
        self.disconnects = Counter(
            "vitc_client_disconnects", "Requests whose client left before the answer, by stage: upload (during "
            "it), decoding (while its images or body waited for the work pool or were decoded: those not started "
            "never decoded, one running finished and dropped), queued (rows dropped before a batch took them, "
            "never computed), computing (a batch had taken the rows: computed, the answer dropped), answering "
            "(while a large answer waited or was built: its build skipped or dropped)", ["model", "stage"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "vitc_queue_depth", "Requests waiting for a batch (0 once unloaded, or never served)", ["model"],
            registry=r)
        self.model_info = Gauge(
            "vitc_model_info", "Served models and where they came from (value 1)",
            ["model", "variant", "runtime", "precision", *INFO_LABELS], registry=r,
        )
        self.model_ready = Gauge(
            "vitc_model_ready", "Whether a model takes requests (0: stalled after an inference timeout, shutting "
            "down, or unloaded, also while a later load fails; a repository model whose load failed, never served)",
            ["model"], registry=r,
        )
        self.inference_timeouts = Counter(
            "vitc_inference_timeouts", "Backend calls of requests that passed --inference-timeout-s (each stalls "
            "the model until a probe answers in time)", ["model"], registry=r,
        )
        self.protocol_refusals = Counter(
            "vitc_protocol_refusals", "Answers given below the app, before a request reached it (malformed or "
            "slow request line and headers, connection limit): not in vitc_requests_total", ["status"], registry=r,
        )
        for status in (*PROTOCOL_STATUSES, "other"):
            self.protocol_refusals.labels(status)  # every series from the start: rate() sees the first refusal
        # The process's memory, descriptors and CPU (the bounds this server keeps), and the interpreter's GC.
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        PlatformCollector(registry=r)
        self.serving = True  # False once a shutdown began (serve.server): every vitc_model_ready reads 0
        self._versions: dict[tuple[str, ...], int] = {}  # served versions per info label set
        self._names: dict[str, int] = {}  # served versions per model name

    def add_model(self, name: str, variant: str, runtime: str, precision: str, depth: Callable[[], float],
                  ready: Callable[[], float], provenance: dict[str, str] | None = None) -> None:
        """Register a served model (version): info series with its provenance, and live queue-depth and readiness
        gauges (a new version's replace its predecessor's)."""
        labels = (name, variant, runtime, precision, *_info(provenance))
        self.model_info.labels(*labels).set(1)
        self.queue_depth.labels(name).set_function(depth)
        self.model_ready.labels(name).set_function(lambda: ready() if self.serving else 0.0)
        self.inference_timeouts.labels(name)  # at 0 from the start; kept after an unload, as every counter
        # Counted: a reload of the same version adds its series before the old one's removal (which must keep it).
        self._versions[labels] = self._versions.get(labels, 0) + 1
        self._names[name] = self._names.get(name, 0) + 1

    def remove_model(self, name: str, variant: str, runtime: str, precision: str,
                     provenance: dict[str, str] | None = None) -> None:
        """Forget a replaced or unloaded model version: its info series unless another served version has them."""
        # The info series go unless another served version has the same labels. Once no version of the name is
        # left, its queue-depth and readiness gauges read 0 from then on (an alert on `vitc_model_ready == 0` sees
        # an unloaded model; the repository knows a name it has served for good, serve.repository) and let go of
        # the batcher their functions held.
        labels = (name, variant, runtime, precision, *_info(provenance))
        if _release(self._versions, labels):
            with contextlib.suppress(KeyError):
                self.model_info.remove(*labels)
        if _release(self._names, name):
            for gauge in (self.queue_depth, self.model_ready):
                with contextlib.suppress(KeyError):
                    gauge.remove(name)  # a plain series in its place: set_function's cannot be set
                gauge.labels(name).set(0)

    def not_served(self, name: str) -> None:
        """A model the server knows but has never served, or does not serve now (its load failed: at start, or
        later): its queue-depth and readiness gauges read 0, as an unloaded model's do, so an alert on
        `vitc_model_ready == 0` sees it. A name with a version served keeps its live gauges."""
        if self._names.get(name, 0) == 0:
            for gauge in (self.queue_depth, self.model_ready):
                gauge.labels(name).set(0)

    # BatchObserver, called from the batcher (queued: event loop; batch: inference thread). Unlike the statistics,
    # which count a request's queue and compute times only once it has succeeded (Triton's rule, serve.stats), these
    # observe every request a batch took and every batch that ran, however their requests end.
    def queued(self, model: str, seconds: float) -> None:
        self.queue.labels(model).observe(seconds)

    def batch(self, model: str, rows: int, seconds: float, requests: int = 1) -> None:
        self.batch_size.labels(model).observe(rows)
        self.compute.labels(model).observe(seconds)

    def timed_out(self, model: str) -> None:
        self.inference_timeouts.labels(model).inc()

    def protocol_refused(self, status: int) -> None:
        """Count one answer given below the app (serve.httpproto calls it; `status` outside PROTOCOL_STATUSES is
        counted as "other", so the label stays bounded)."""
        label = str(status)
        self.protocol_refusals.labels(label if label in PROTOCOL_STATUSES else "other").inc()

    def render(self) -> bytes:
        """Prometheus text exposition, without the `_created` series of counters and histograms."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """A registry's metrics without their `*_created` samples (the time each series began). The text format shows
    them as gauge families of their own: a time series each for Prometheus to store, that no vitc dashboard reads
    (Triton exposes none). prometheus_client's own switch, disable_created_metrics(), holds for the whole process,
    other libraries' metrics included."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            created = family.name + "_created"
            kept = copy.copy(family)  # a collector may hand out the same family again: it is left as it is
            kept.samples = [s for s in family.samples if s.name != created]
            yield kept
