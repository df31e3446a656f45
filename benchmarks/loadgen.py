"""HTTP load generation against one endpoint: a closed loop at a fixed concurrency and an open (Poisson) loop.

Stdlib only (http.client, threads) so the generator itself stays light: on a 2-core machine it shares the CPU
with the server it measures, and its own CPU seconds are reported so that cost is visible.
- Closed loop: `concurrency` workers, each with a keep-alive connection, send the next request as soon as the
  previous answer arrives (MLPerf SingleStream at concurrency 1, Offline-like saturation at high concurrency).
- Open loop: arrivals at exponential intervals at `rate` per second, independent of the answers (MLPerf
  Server). Latency counts from the scheduled arrival, not the actual send, so a backed-up client cannot hide
  server queueing (no coordinated omission).
Nothing sent is lost from the counts: a success counts when it was sent in the measurement window (its latency
and the throughput are the window's); a failure when it was sent in the window or surfaced in or after it (a
warm-up request that times out during the window is an error, not nothing); failures that surfaced during the
warm-up are reported apart; a request still unanswered when the generator stops waiting is an error ("no
answer"). A level in which nothing succeeded says so in its summary's "problem". An endpoint may check each HTTP 200
answer's body (`Endpoint.check`): one that fails it is an error, "bad answer: <why>", not a success.
Throughput: the closed loop's is its successes sent in the window divided by the window (a client sends only after
its answer, so the requests of the window answered after it, one per client at most, stand for the warm-up's answered
in it). The open loop's is the successes of the requests scheduled in the window divided by the time from the
window's start until the last of them was answered (at least the window): arrivals do not wait for answers, so a
server that falls behind answers the window's requests long after it, and dividing by the window alone would report
the offered rate whatever it served. The open loop also reports the offered rate (the arrivals scheduled in the
window, per second) and whether what it achieved fell short of it by more than BEHIND_MARGIN.
"""

from __future__ import annotations

import http.client
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.stats import raw_samples, summarize

# Clients of one closed-loop level (each a thread) and the open loop's connection pool: one bound for every
# benchmark that loads a server (load, latency --http, overhead), so no CLI takes a level another refuses.
MAX_CONCURRENCY = 256
TIMEOUT_S = 30.0
# After the last request is sent, how much longer than TIMEOUT_S the generator waits for the answers still due.
JOIN_GRACE_S = 5.0
# A closed-loop worker whose request got no HTTP answer at all (connection refused or reset) waits before it tries
# again, doubling from the first to the last: against a dead server it would otherwise spin thousands of failed
# connects a second on the cores the server shares.
BACKOFF_S = (0.01, 1.0)
UNANSWERED = "no answer"  # error label of a request still outstanding when the generator stopped waiting
# An open loop whose achieved rate is below the offered one by more than this fraction fell behind. Not zero: the
# window's last answer comes a latency after it (longer when arrivals bunch near its end), so a server that keeps up
# still shows a little less, about latency / window.
BEHIND_MARGIN = 0.1


@dataclass(frozen=True)
class Endpoint:
    """Where to POST and with which headers."""

    url: str  # full URL of the POST target
    content_type: str = "image/png"
    api_key: str | None = None
    # Why a 200 answer's body is not the answer expected, or None; called once per answer, so keep it cheap.
    check: Callable[[bytes], str | None] | None = None

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
    warmup_errors: dict[str, int] = field(default_factory=dict)  # failures that surfaced during the warm-up
    scheduled: int = 0  # open loop: the arrivals scheduled in the window (the offered load)
    last_answer_s: float = 0.0  # when the last counted success was answered, in seconds from the window's start

    def served_s(self) -> float:
        """The time the level's successes took: the open loop's runs until the last of them was answered (at least
        the window); the closed loop's is the window."""
        return max(self.seconds, self.last_answer_s) if self.mode == "open" else self.seconds

    def rates(self) -> dict[str, Any]:
        """Throughput (achieved req/s) and, for the open loop, the offered rate and whether it fell behind."""
        ok, served = len(self.latencies_s), self.served_s()
        achieved = ok / served if served > 0 else 0.0
        if self.mode != "open":
            return {"throughput_rps": achieved, "offered_rps": None, "served_s": round(served, 3),
                    "fell_behind": None}
        offered = self.scheduled / self.seconds if self.seconds > 0 else 0.0
        return {"throughput_rps": achieved, "offered_rps": offered, "served_s": round(served, 3),
                "fell_behind": achieved < (1 - BEHIND_MARGIN) * offered, "behind_margin": BEHIND_MARGIN,
                "scheduled": self.scheduled}

    def summary(self) -> dict[str, Any]:
        """JSON-ready: latency percentiles (ms), throughput, error counts, and the problem when nothing succeeded."""
        ok = len(self.latencies_s)
        failed = sum(self.errors.values())
        out: dict[str, Any] = {
            "mode": self.mode, "concurrency": self.concurrency, "target_rate": self.target_rate,
            "seconds": round(self.seconds, 3), "requests": ok + failed, "ok": ok, "errors": dict(self.errors),
            "error_rate": failed / (ok + failed) if ok + failed else 0.0, **self.rates(),
            "client_cpu_s": round(self.client_cpu_s, 3), "workers": self.workers,
            "warmup_errors": dict(self.warmup_errors), "problem": self.problem(),
        }
        ms = [x * 1e3 for x in self.latencies_s]
        out["latency_ms"] = summarize(ms) if ok else None
        out["latency_samples_ms"] = raw_samples(ms) if ok else None  # to recompute the percentiles
        stages = dict.fromkeys(k for t in self.server_timing for k in t)
        out["server_timing_ms"] = {k: summarize([t[k] for t in self.server_timing if k in t]) for k in stages}
        return out

    def problem(self) -> str | None:
        """One line when no request succeeded ("no request succeeded: 1 x no answer"), else None."""
        if self.latencies_s:
            return None
        errors = self.errors or self.warmup_errors
        if not errors:
            return "no request was answered" if self.sent else "no request was sent"
        where = "" if self.errors else " (all during the warm-up)"
        return "no request succeeded: " + ", ".join(f"{n} x {label}" for label, n in
                                                     sorted(errors.items(), key=lambda kv: -kv[1])) + where


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
        self.answered = True  # whether the last request got an HTTP answer (any status)

    def post(self, body: bytes) -> str | None:
        """Send one request and read the whole answer; None on an HTTP 200 that passes the endpoint's check, else an
        error label ("HTTP 503", "ConnectionRefusedError", "bad answer: not JSON")."""
        self.answered = False
        try:
            if self.conn is None:
                self.conn = self.endpoint.connection()
            self.conn.request("POST", self.endpoint.path, body=body, headers=self.endpoint.headers())
            resp = self.conn.getresponse()
            answer = resp.read()
            self.answered = True
            self.timing = parse_server_timing(resp.getheader("Server-Timing"))
            if resp.will_close:
                self.close()
            if resp.status != 200:
                return f"HTTP {resp.status}"
            problem = self.endpoint.check(answer) if self.endpoint.check is not None else None
            return None if problem is None else f"bad answer: {problem}"
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return type(exc).__name__

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class _Tally:
    """The outcomes of one load level, shared by its workers; frozen once the generator stops waiting (a worker
    still stuck in a request then adds nothing: its request is counted as unanswered instead)."""

    def __init__(self, result: LoadResult) -> None:
        self.result = result
        self.lock = threading.Lock()
        self.stopped = False
        self.outstanding: set[object] = set()  # keys of the requests sent (or queued) and not yet finished

    def start(self, key: object) -> None:
        with self.lock:
            self.result.sent += 1
            self.outstanding.add(key)

    def finish(self, key: object, err: str | None, latency_s: float, timing: dict[str, float],
               sent_in_window: bool, since_start: float) -> None:
        """Record one outcome, finished `since_start` seconds after the window's start (negative: in the warm-up):
        a success sent in the window, or a failure sent in it or surfacing in or after it."""
        with self.lock:
            if self.stopped:
                return
            self.outstanding.discard(key)
            r = self.result
            if err is None:
                if sent_in_window:
                    r.latencies_s.append(latency_s)
                    r.last_answer_s = max(r.last_answer_s, since_start)
                    if timing:
                        r.server_timing.append(timing)
            elif sent_in_window or since_start >= 0:
                r.errors[err] = r.errors.get(err, 0) + 1
            else:
                r.warmup_errors[err] = r.warmup_errors.get(err, 0) + 1

    def stop(self) -> None:
        """Stop counting: every request still outstanding (in flight, or queued and never sent) is an error,
        UNANSWERED: its outcome would have come after the window."""
        with self.lock:
            self.stopped = True
            if self.outstanding:
                self.result.errors[UNANSWERED] = self.result.errors.get(UNANSWERED, 0) + len(self.outstanding)


def _join(threads: list[threading.Thread], deadline: float) -> None:
    """Join every thread by one shared deadline (a per-thread timeout would add up)."""
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.perf_counter()))


def closed_loop(endpoint: Endpoint, bodies: Sequence[bytes], concurrency: int, seconds: float,
                warmup_s: float = 1.0) -> LoadResult:
    """`concurrency` workers back to back for `seconds` (after `warmup_s` not counted)."""
    if not 1 <= concurrency <= MAX_CONCURRENCY or not bodies:
        raise ValueError(f"closed loop needs concurrency in 1..{MAX_CONCURRENCY} and at least one request body")
    result = LoadResult("closed", concurrency, None, seconds)
    tally = _Tally(result)
    t_start = time.perf_counter() + warmup_s
    t_end = t_start + seconds

    def worker(k: int) -> None:
        client, i, backoff = Client(endpoint), k, 0.0
        try:
            while (now := time.perf_counter()) < t_end and not tally.stopped:
                key = (k, i)
                tally.start(key)
                err = client.post(bodies[i % len(bodies)])
                done = time.perf_counter()
                i += concurrency
                tally.finish(key, err, done - now, client.timing, now >= t_start, done - t_start)
                if client.answered:
                    backoff = 0.0
                else:  # refused, reset, timed out: no server to load; try again later, not at once
                    backoff = min(BACKOFF_S[1], max(BACKOFF_S[0], 2 * backoff))
                    time.sleep(max(0.0, min(backoff, t_end - time.perf_counter())))
        finally:
            client.close()

    cpu0 = time.process_time()
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    _join(threads, t_end + TIMEOUT_S + JOIN_GRACE_S)
    tally.stop()
    result.client_cpu_s = time.process_time() - cpu0
    return result


def open_loop(endpoint: Endpoint, bodies: Sequence[bytes], rate: float, seconds: float, seed: int = 0,
              warmup_s: float = 1.0) -> LoadResult:
    """Poisson arrivals at `rate`/s for `seconds`; latency from each request's scheduled arrival time, throughput
    over the time until the window's last success was answered."""
    if rate <= 0 or not bodies:
        raise ValueError("open loop needs a positive rate and at least one request body")
    rng = np.random.default_rng(seed)
    n = max(1, int(rate * (seconds + warmup_s) * 1.2) + 10)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n))
    arrivals = arrivals[arrivals < seconds + warmup_s]
    result = LoadResult("open", None, rate, seconds, scheduled=int(np.count_nonzero(arrivals >= warmup_s)))
    tally = _Tally(result)
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    done = [0]  # requests finished, to know when every worker is busy

    def worker() -> None:
        client = Client(endpoint)
        try:
            while (job := jobs.get()) is not None and not tally.stopped:
                k, scheduled, body, counted = job
                err = client.post(body)
                finished = time.perf_counter()
                with tally.lock:
                    done[0] += 1
                tally.finish(k, err, finished - scheduled, client.timing, counted, finished - t_start)
        finally:
            client.close()

    workers: list[threading.Thread] = []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    t_start = t0 + warmup_s  # the workers read it: they start below
    for k, offset in enumerate(arrivals):
        scheduled = t0 + float(offset)
        delay = scheduled - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        with tally.lock:
            in_flight = k - done[0]
        # One connection per outstanding request: add a worker only when all are busy (bounded).
        if in_flight >= len(workers) and len(workers) < MAX_CONCURRENCY:
            workers.append(threading.Thread(target=worker, daemon=True))
            workers[-1].start()
        tally.start(k)  # outstanding from its arrival: queued behind busy workers counts
        jobs.put((k, scheduled, bodies[k % len(bodies)], offset >= warmup_s))
    for _ in workers:
        jobs.put(None)
    _join(workers, time.perf_counter() + TIMEOUT_S + JOIN_GRACE_S)
    tally.stop()
    result.client_cpu_s = time.process_time() - cpu0
    result.workers = len(workers)
    return result
