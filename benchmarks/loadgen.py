"""HTTP load generation against one endpoint: a closed loop at a fixed concurrency and an open (Poisson) loop.

Stdlib only (http.client, threads) so the generator itself stays light: on a 2-core machine it shares the CPU
with the server it measures, and its own CPU seconds are reported so that cost is visible.
- Closed loop: `concurrency` workers, each with a keep-alive connection, send the next request as soon as the
  previous answer arrives (MLPerf SingleStream at concurrency 1, Offline-like saturation at high concurrency).
- Open loop: arrivals at exponential intervals at `rate` per second, independent of the answers (MLPerf
  Server). Latency counts from the scheduled arrival, not the actual send, so a backed-up client cannot hide
  server queueing (no coordinated omission).
"""

from __future__ import annotations

import http.client
import queue
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.stats import summarize

MAX_WORKERS = 256  # open-loop connection pool bound
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Endpoint:
    """Where to POST and with which headers."""

    url: str  # full URL of the POST target
    content_type: str = "image/png"
    api_key: str | None = None

    def connection(self) -> http.client.HTTPConnection:
        """A new keep-alive connection to the endpoint's host."""
        parts = urllib.parse.urlsplit(self.url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        return cls(parts.hostname, parts.port, timeout=TIMEOUT_S)

    @property
    def path(self) -> str:
        parts = urllib.parse.urlsplit(self.url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": self.content_type}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h


@dataclass
class LoadResult:
    """What one load level produced."""

    mode: str  # "closed" | "open"
    concurrency: int | None
    target_rate: float | None
    seconds: float
    latencies_s: list[float] = field(default_factory=list)  # successful requests only
    errors: dict[str, int] = field(default_factory=dict)  # "HTTP 503" / "ConnectionResetError" -> count
    client_cpu_s: float = 0.0
    workers: int | None = None  # open loop: connections it needed
    server_timing: list[dict[str, float]] = field(default_factory=list)  # successful requests' stages (ms)
    sent: int = 0  # every request made, warm-up included (to share out the server's CPU seconds)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: latency percentiles (ms), throughput, error counts."""
        ok = len(self.latencies_s)
        failed = sum(self.errors.values())
        out: dict[str, Any] = {
            "mode": self.mode, "concurrency": self.concurrency, "target_rate": self.target_rate,
            "seconds": round(self.seconds, 3), "requests": ok + failed, "ok": ok, "errors": dict(self.errors),
            "error_rate": failed / (ok + failed) if ok + failed else 0.0,
            "throughput_rps": ok / self.seconds if self.seconds > 0 else 0.0,
            "client_cpu_s": round(self.client_cpu_s, 3), "workers": self.workers,
        }
        out["latency_ms"] = summarize([x * 1e3 for x in self.latencies_s]) if ok else None
        stages = dict.fromkeys(k for t in self.server_timing for k in t)
        out["server_timing_ms"] = {k: summarize([t[k] for t in self.server_timing if k in t]) for k in stages}
        return out


def parse_server_timing(value: str | None) -> dict[str, float]:
    """`decode;dur=1.2, compute;dur=3.4` -> {"decode": 1.2, "compute": 3.4} (malformed entries are skipped)."""
    out: dict[str, float] = {}
    for entry in (value or "").split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, number = param.strip().partition("=")
            if name and key == "dur":
                try:
                    out[name] = float(number)
                except ValueError:
                    pass
    return out


class Client:
    """One keep-alive connection; reconnects after an error."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.conn: http.client.HTTPConnection | None = None
        self.timing: dict[str, float] = {}  # the last answer's Server-Timing stages

    def post(self, body: bytes) -> str | None:
        """Send one request and read the whole answer; None on HTTP 200, else an error label."""
        try:
            if self.conn is None:
                self.conn = self.endpoint.connection()
            self.conn.request("POST", self.endpoint.path, body=body, headers=self.endpoint.headers())
            resp = self.conn.getresponse()
            resp.read()
            self.timing = parse_server_timing(resp.getheader("Server-Timing"))
            if resp.will_close:
                self.close()
            return None if resp.status == 200 else f"HTTP {resp.status}"
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return type(exc).__name__

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _count(errors: dict[str, int], lock: threading.Lock, label: str) -> None:
    with lock:
        errors[label] = errors.get(label, 0) + 1


def closed_loop(endpoint: Endpoint, bodies: Sequence[bytes], concurrency: int, seconds: float,
                warmup_s: float = 1.0) -> LoadResult:
    """`concurrency` workers back to back for `seconds` (after `warmup_s` not counted)."""
    if concurrency < 1 or not bodies:
        raise ValueError("closed loop needs concurrency >= 1 and at least one request body")
    result = LoadResult("closed", concurrency, None, seconds)
    lock = threading.Lock()
    t_start = time.perf_counter() + warmup_s
    t_end = t_start + seconds

    def worker(k: int) -> None:
        client, i, sent = Client(endpoint), k, 0
        local: list[float] = []
        stages: list[dict[str, float]] = []
        while (now := time.perf_counter()) < t_end:
            err = client.post(bodies[i % len(bodies)])
            done = time.perf_counter()
            i += concurrency
            sent += 1
            if now < t_start:  # warm-up: connections, caches, the server's first batches
                continue
            if err is None:
                local.append(done - now)
                if client.timing:
                    stages.append(client.timing)
            else:
                _count(result.errors, lock, err)
        client.close()
        with lock:
            result.latencies_s.extend(local)
            result.server_timing.extend(stages)
            result.sent += sent

    cpu0 = time.process_time()
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + warmup_s + TIMEOUT_S + 5)
    result.client_cpu_s = time.process_time() - cpu0
    return result


def open_loop(endpoint: Endpoint, bodies: Sequence[bytes], rate: float, seconds: float, seed: int = 0,
              warmup_s: float = 1.0) -> LoadResult:
    """Poisson arrivals at `rate`/s for `seconds`; latency from each request's scheduled arrival time."""
    if rate <= 0 or not bodies:
        raise ValueError("open loop needs a positive rate and at least one request body")
    rng = np.random.default_rng(seed)
    n = max(1, int(rate * (seconds + warmup_s) * 1.2) + 10)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n))
    arrivals = arrivals[arrivals < seconds + warmup_s]
    result = LoadResult("open", None, rate, seconds)
    lock = threading.Lock()
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    done = [0]  # requests finished, to know when every worker is busy

    def worker() -> None:
        client = Client(endpoint)
        while (job := jobs.get()) is not None:
            scheduled, body, counted = job
            err = client.post(body)
            finished = time.perf_counter()
            with lock:
                done[0] += 1
                if counted and err is None:
                    result.latencies_s.append(finished - scheduled)
                    if client.timing:
                        result.server_timing.append(client.timing)
                elif counted:
                    result.errors[err] = result.errors.get(err, 0) + 1
        client.close()

    workers: list[threading.Thread] = []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for k, offset in enumerate(arrivals):
        scheduled = t0 + float(offset)
        delay = scheduled - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        with lock:
            in_flight = k - done[0]
        # One connection per outstanding request: add a worker only when all are busy (bounded).
        if in_flight >= len(workers) and len(workers) < MAX_WORKERS:
            workers.append(threading.Thread(target=worker, daemon=True))
            workers[-1].start()
        jobs.put((scheduled, bodies[k % len(bodies)], offset >= warmup_s))
    for _ in workers:
        jobs.put(None)
    for t in workers:
        t.join(timeout=TIMEOUT_S + 5)
    result.client_cpu_s = time.process_time() - cpu0
    result.workers = len(workers)
    return result
