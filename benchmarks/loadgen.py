"""HTTP load generation against one endpoint: a closed loop at a fixed concurrency and an open (Poisson) loop.

Stdlib only (http.client, threads) so the generator itself stays light: on a 2-core machine it shares the CPU
with the server it measures, and its own CPU seconds are reported so that cost is visible.
- Closed loop: `concurrency` workers, each with a keep-alive connection, send the next request as soon as the
  previous answer arrives (MLPerf SingleStream at concurrency 1, Offline-like saturation at high concurrency).
- Open loop: arrivals at exponential intervals at `rate` per second, independent of the answers (MLPerf
  Server), as the constant-arrival-rate load tools do it (k6, wrk2): the arrivals are drawn as they come, each is
  handed to a free connection (up to MAX_CONCURRENCY) or waits among at most BACKLOG others; one that finds all of
  those taken is not sent at all ("dropped": the client, not the server, was the limit), so the client's memory
  stays bounded whatever the rate and duration. Latency counts from the scheduled arrival, not the actual send, so
  a backed-up client cannot hide server queueing (no coordinated omission).
Every request is answered or given up by a whole-request deadline (TIMEOUT_S; a per-read timeout never fires on a
server that trickles its answer a byte at a time), and so is every GET of `get` (GET_TIMEOUT_S). Answers are read up
to a size bound (MAX_ANSWER_BYTES, a GET's MAX_GET_BYTES), so a broken or hostile server cannot fill the client's
memory: a larger answer is an error, TOO_LARGE, never read whole.
Nothing sent is lost from the counts: a success counts when it was sent in the measurement window (its latency
and the throughput are the window's); a failure when it was sent in the window or surfaced in or after it (a
warm-up request that times out during the window is an error, not nothing); failures that surfaced during the
warm-up are reported apart; a request still unanswered when the generator stops waiting is an error ("no
answer"). The open loop counts the arrivals scheduled in the window and nothing else: each is a success, an error
or dropped (never sent), so those add up to what was scheduled; the warm-up's requests, whenever they end, are
never counted in the window (their failures are reported apart). A level in which nothing succeeded says so in its
summary's "problem". An endpoint may check each HTTP 200 answer's body (`Endpoint.check`): one that fails it is an
error, "bad answer: <why>", not a success.
Throughput: the closed loop's is its successes sent in the window divided by the window (a client sends only after
its answer, so the requests of the window answered after it, one per client at most, stand for the warm-up's answered
in it). The open loop's is the successes of the requests scheduled in the window divided by the time from the
window's start until the last of them was answered (at least the window): arrivals do not wait for answers, so a
server that falls behind answers the window's requests long after it, and dividing by the window alone would report
the offered rate whatever it served. The open loop also reports the offered rate (the arrivals scheduled in the
window, per second) and whether what it achieved fell short of it by more than BEHIND_MARGIN through answers that came
late or never ("fell behind"); requests that failed at once (refused, an error status) count as failures instead.
"""

from __future__ import annotations

import http.client
import io
import math
import queue
import socket
import threading
import time
import urllib.parse
import urllib.request
from array import array
from collections.abc import Callable, Iterable, Iterator, MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.stats import raw_samples, summarize

# Clients of one closed-loop level (each a thread) and the open loop's connection pool: one bound for every
# benchmark that loads a server (load, latency --http, overhead), so no CLI takes a level another refuses.
MAX_CONCURRENCY = 256
# Seconds one request may take, sent and answered whole (a deadline, not a per-read timeout).
TIMEOUT_S = 30.0
# Seconds one GET of `get` (a model list, /metrics) may take, whole.
GET_TIMEOUT_S = 10.0
# After the last request is sent, how much longer than TIMEOUT_S the generator waits for the answers still due.
JOIN_GRACE_S = 5.0
# Open loop: arrivals that may wait for a free connection when all MAX_CONCURRENCY are busy; the next one is not sent
# (NOT_SENT). As many as the connections: one more service time of waiting at most, and a bounded client memory.
BACKLOG = MAX_CONCURRENCY
ARRIVAL_CHUNK = 1024  # open-loop intervals drawn at a time (the arrivals are never all held)
# A closed-loop worker whose request got no HTTP answer at all (connection refused or reset) waits before it tries
# again, doubling from the first to the last: against a dead server it would otherwise spin thousands of failed
# connects a second on the cores the server shares.
BACKOFF_S = (0.01, 1.0)
UNANSWERED = "no answer"  # error label of a request still outstanding when the generator stopped waiting
NOT_SENT = "not sent: client saturated"  # an open-loop arrival that found every connection busy and the backlog full
LATE = (UNANSWERED, "TimeoutError")  # the errors of answers that came too late (or never): a server behind its load
# An open loop whose achieved rate is below the offered one by more than this fraction fell behind. Not zero: the
# window's last answer comes a latency after it (longer when arrivals bunch near its end), so a server that keeps up
# still shows a little less, about latency / window.
BEHIND_MARGIN = 0.1
# The most bytes read of one classification's answer: vitc's (top 5, labels of at most 1024 characters) is tens of
# kilobytes at most; with up to MAX_CONCURRENCY connections reading at once, the client's memory stays bounded.
MAX_ANSWER_BYTES = 4 << 20
# The most bytes read of one GET (the model list, /metrics): every served model's labels, up to 100,000 each.
MAX_GET_BYTES = 64 << 20
TOO_LARGE = f"bad answer: too large (over {MAX_ANSWER_BYTES >> 20} MiB)"  # the error of a larger classification
# A Server-Timing duration (ms) beyond this, like a negative or non-finite one, is no timing: skipped (its mean would
# overflow).
MAX_STAGE_MS = 1e9


class _Deadline:
    """An http.client connection whose every request must be sent and answered whole by its deadline (`begin`)."""

    limit_s = math.inf
    deadline = math.inf

    def begin(self, seconds: float) -> None:
        """The next request has `seconds` from now, connecting included."""
        self.limit_s, self.deadline = seconds, time.monotonic() + seconds
        self.timeout = seconds  # connect's own timeout

    def time_left(self) -> float | None:
        """Seconds left to the deadline (None: no deadline was set); TimeoutError once it has passed."""
        if self.deadline == math.inf:
            return self.timeout if isinstance(self.timeout, float | int) else None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.expired()
        return left

    def expired(self) -> TimeoutError:
        """The error of a request whose deadline passed (one message, whichever read it caught)."""
        return TimeoutError(f"the answer did not complete within {self.limit_s:g} s")

    def connect(self) -> None:
        self.timeout = self.time_left()
        super().connect()  # type: ignore[misc]
        self.sock = _DeadlineSocket(self.sock, self)  # type: ignore[has-type]


class _DeadlineIO(socket.SocketIO):
    """A socket's reads, each given only the time left to the request's deadline: a server that trickles its
    answer a byte at a time never lets a per-read timeout fire."""

    def __init__(self, sock: socket.socket, conn: _Deadline) -> None:
        super().__init__(sock, "rb")
        self._conn = conn

    def readinto(self, b: Any) -> int | None:
        self._sock.settimeout(self._conn.time_left())
        try:
            return super().readinto(b)
        except TimeoutError:
            raise self._conn.expired() from None


class _DeadlineSocket:
    """A connected socket (plain or TLS) whose answers are read by `_DeadlineIO` and whose sends end by the deadline;
    everything else is the socket's own."""

    def __init__(self, sock: socket.socket, conn: _Deadline) -> None:
        self._sock, self._conn = sock, conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def makefile(self, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode != "rb":
            return self._sock.makefile(mode, *args, **kwargs)
        raw = _DeadlineIO(self._sock, self._conn)
        # As socket.makefile counts its readers: closing the connection leaves the socket open until the answer's
        # reader is closed too (urllib closes the connection before the body is read).
        self._sock._io_refs += 1  # type: ignore[attr-defined]
        return io.BufferedReader(raw)

    def sendall(self, data: Any, *flags: int) -> None:
        self._sock.settimeout(self._conn.time_left())  # sendall's timeout bounds the whole call
        self._sock.sendall(data, *flags)


class DeadlineHTTPConnection(_Deadline, http.client.HTTPConnection):
    """HTTP, each request by its deadline."""


class DeadlineHTTPSConnection(_Deadline, http.client.HTTPSConnection):
    """HTTPS, each request by its deadline."""


def _within(cls: type[_Deadline], seconds: float) -> Callable[..., _Deadline]:
    """A connection factory for urllib: each connection it makes has `seconds` for its request."""
    def make(*args: Any, **kwargs: Any) -> _Deadline:
        conn = cls(*args, **kwargs)  # type: ignore[call-arg]
        conn.begin(seconds)
        return conn
    return make


class _HTTPWithin(urllib.request.HTTPHandler):
    """urllib's http:// handler, each request on a connection with its deadline."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        return super().do_open(_within(DeadlineHTTPConnection, self.seconds), req, **kwargs)


class _HTTPSWithin(urllib.request.HTTPSHandler):
    """urllib's https:// handler, each request on a connection with its deadline."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        return super().do_open(_within(DeadlineHTTPSConnection, self.seconds), req, **kwargs)


def read_bounded(resp: Any, limit: int) -> bytes | None:
    """An answer's whole body, or None when it is larger than `limit` bytes (said by its Content-Length, else found
    reading one byte past the limit): the rest is never read, so the caller closes the connection."""
    length = (resp.getheader("Content-Length") or "").strip()
    if length.isdigit() and int(length) > limit:
        return None
    body = resp.read(limit + 1)
    return None if len(body) > limit else body


class AnswerTooLarge(ValueError):
    """An answer over its bound (a GET's MAX_GET_BYTES, a classification's MAX_ANSWER_BYTES): no vitc server's
    model list, metrics or classification is that large."""


def read_capped(resp: Any, limit: int, request: str) -> bytes:
    """`read_bounded`'s body; AnswerTooLarge naming `request` ("GET <url>") and the bound when it is over `limit`
    bytes (the answer is left unread: the caller closes its connection)."""
    if (body := read_bounded(resp, limit)) is None:
        raise AnswerTooLarge(f"{request} answered more than {limit >> 20} MiB: not a vitc server's answer")
    return body


def get(url: str, api_key: str | None = None, seconds: float | None = None) -> bytes:
    """GET `url` and its whole answer within `seconds` (default GET_TIMEOUT_S), as urllib does it otherwise: HTTPError
    for an error status, URLError for a connection that failed, TimeoutError once the deadline has passed;
    AnswerTooLarge beyond MAX_GET_BYTES."""
    seconds = GET_TIMEOUT_S if seconds is None else seconds
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    opener = urllib.request.build_opener(_HTTPWithin(seconds), _HTTPSWithin(seconds))
    with opener.open(req, timeout=seconds) as resp:
        return read_capped(resp, MAX_GET_BYTES, f"GET {url}")


@dataclass(frozen=True)
class Endpoint:
    """Where to POST and with which headers."""

    url: str  # full URL of the POST target
    content_type: str = "image/png"
    api_key: str | None = None
    # Why a 200 answer's body is not the answer expected, or None; called once per answer, so keep it cheap.
    check: Callable[[bytes], str | None] | None = None

    def connection(self) -> DeadlineHTTPConnection:
        """A new keep-alive connection to the endpoint's host, each request on it by its deadline."""
        parts = urllib.parse.urlsplit(self.url)
        cls = DeadlineHTTPSConnection if parts.scheme == "https" else DeadlineHTTPConnection
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


def _samples() -> MutableSequence[float]:
    return array("d")  # 8 bytes a sample: a long level's successes are many


@dataclass
class LoadResult:
    """What one load level produced."""

    mode: str  # "closed" | "open"
    concurrency: int | None
    target_rate: float | None
    seconds: float
    latencies_s: MutableSequence[float] = field(default_factory=_samples)  # successful requests only
    errors: dict[str, int] = field(default_factory=dict)  # "HTTP 503" / "ConnectionResetError" -> count
    client_cpu_s: float = 0.0
    workers: int | None = None  # open loop: connections it needed
    # The successful requests' Server-Timing, stage -> its durations (ms), in order
    server_timing: dict[str, MutableSequence[float]] = field(default_factory=dict)
    sent: int = 0  # every request made, warm-up included (to share out the server's CPU seconds)
    warmup_errors: dict[str, int] = field(default_factory=dict)  # failures that surfaced during the warm-up
    scheduled: int = 0  # open loop: the arrivals scheduled in the window (the offered load)
    last_answer_s: float = 0.0  # when the last counted success was answered, in seconds from the window's start
    dropped: int = 0  # open loop: arrivals of the window never sent (every connection busy, the backlog full)

    def served_s(self) -> float:
        """The time the level's successes took: the open loop's runs until the last of them was answered (at least
        the window); the closed loop's is the window."""
        return max(self.seconds, self.last_answer_s) if self.mode == "open" else self.seconds

    def rates(self) -> dict[str, Any]:
        """Throughput (achieved req/s) and, for the open loop, the offered rate, whether it fell behind, and the
        arrivals the client could not send (it, not the server, was the limit then)."""
        ok, served = len(self.latencies_s), self.served_s()
        achieved = ok / served if served > 0 else 0.0
        if self.mode != "open":
            return {"throughput_rps": achieved, "offered_rps": None, "served_s": round(served, 3),
                    "fell_behind": None}
        offered = self.scheduled / self.seconds if self.seconds > 0 else 0.0
        # Requests that failed without being late (refused, reset, an error status, a bad answer) are no lag: a server
        # that is down or answers 500 at once did not fall behind. It did where, those counted as served, the rate
        # still falls short: answers that came late, or never (timed out, unanswered).
        failed = sum(n for err, n in self.errors.items() if err not in LATE)
        short = (ok + failed) / served if served > 0 else 0.0
        return {"throughput_rps": achieved, "offered_rps": offered, "served_s": round(served, 3),
                "fell_behind": short < (1 - BEHIND_MARGIN) * offered, "behind_margin": BEHIND_MARGIN,
                "failed": failed, "scheduled": self.scheduled, "dropped": self.dropped,
                "client_saturated": self.dropped > 0, "backlog": BACKLOG}

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
        ms = np.asarray(self.latencies_s, dtype=np.float64) * 1e3
        out["latency_ms"] = summarize(ms) if ok else None
        out["latency_samples_ms"] = raw_samples(ms) if ok else None  # to recompute the percentiles
        out["server_timing_ms"] = {k: summarize(v) for k, v in self.server_timing.items() if len(v)}
        return out

    def problem(self) -> str | None:
        """One line when no request succeeded ("no request succeeded: 1 x no answer"), else None."""
        if self.latencies_s:
            return None
        errors = self.errors or self.warmup_errors
        if not errors and not self.dropped:
            return "no request was answered" if self.sent else "no request was sent"
        counts = ", ".join(f"{n} x {label}" for label, n in sorted(errors.items(), key=lambda kv: -kv[1]))
        where = " (all during the warm-up)" if errors and not self.errors else ""
        unsent = f"{self.dropped} x {NOT_SENT}" if self.dropped else ""
        return "no request succeeded: " + "; ".join(filter(None, (counts + where, unsent)))


def parse_server_timing(value: str | None) -> dict[str, float]:
    """`decode;dur=1.2, compute;dur=3.4` -> {"decode": 1.2, "compute": 3.4} (malformed entries are skipped: a dur that
    is no number, or not finite (nan, inf, 1e999), negative (no stage takes less than no time: it would also shrink
    the overhead computed from the compute stage), or beyond MAX_STAGE_MS)."""
    out: dict[str, float] = {}
    for entry in (value or "").split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, number = param.strip().partition("=")
            if name and key == "dur":
                try:
                    ms = float(number)
                except ValueError:
                    continue
                if math.isfinite(ms) and 0 <= ms <= MAX_STAGE_MS:
                    out[name] = ms
    return out


class Client:
    """One keep-alive connection; reconnects after an error."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.conn: DeadlineHTTPConnection | None = None
        self.timing: dict[str, float] = {}  # the last answer's Server-Timing stages
        self.answered = True  # whether the last request got an HTTP answer (any status)

    def post(self, body: bytes) -> str | None:
        """Send one request and read the whole answer (at most MAX_ANSWER_BYTES) by TIMEOUT_S; None on an HTTP 200
        that passes the endpoint's check, else an error label ("HTTP 503", "ConnectionRefusedError", "TimeoutError",
        "bad answer: not JSON", TOO_LARGE)."""
        self.answered = False
        try:
            if self.conn is None:
                self.conn = self.endpoint.connection()
            self.conn.begin(TIMEOUT_S)
            self.conn.request("POST", self.endpoint.path, body=body, headers=self.endpoint.headers())
            resp = self.conn.getresponse()
            answer = read_bounded(resp, MAX_ANSWER_BYTES)
            self.answered = True
            self.timing = parse_server_timing(resp.getheader("Server-Timing"))
            if resp.will_close or answer is None:  # the rest of a too large answer is left unread on it
                self.close()
            if resp.status != 200:
                return f"HTTP {resp.status}"
            if answer is None:
                return TOO_LARGE
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
    still stuck in a request then adds nothing: its request is counted as unanswered instead). `scheduled_only`
    (the open loop): a request counts in the window only when it was scheduled in it, whenever it ends."""

    def __init__(self, result: LoadResult, scheduled_only: bool = False) -> None:
        self.result = result
        self.scheduled_only = scheduled_only
        self.lock = threading.Lock()
        self.stopped = False
        # keys of the requests sent (or queued) and not yet finished -> whether they count in the window
        self.outstanding: dict[object, bool] = {}
        self.queued = 0  # open loop: requests waiting for a connection

    def start(self, key: object, counted: bool = True) -> None:
        with self.lock:
            self.result.sent += 1
            self.outstanding[key] = counted

    def admit(self, key: object, counted: bool) -> bool:
        """An open-loop arrival: queued for a connection, or (every connection busy and BACKLOG already waiting) not
        sent at all, counted as dropped when it is the window's; whether it was queued."""
        with self.lock:
            self.result.scheduled += counted
            if self.queued >= BACKLOG:
                self.result.dropped += counted
                return False
            self.queued += 1
            self.outstanding[key] = counted
            return True

    def sending(self) -> bool:
        """A queued request is being sent; False once the generator stopped waiting (it is then counted already)."""
        with self.lock:
            self.queued -= 1
            if not self.stopped:
                self.result.sent += 1
            return not self.stopped

    def finish(self, key: object, err: str | None, latency_s: float, timing: dict[str, float],
               sent_in_window: bool, since_start: float) -> None:
        """Record one outcome, finished `since_start` seconds after the window's start (negative: in the warm-up):
        a success sent in the window, or a failure sent in it or (not `scheduled_only`) surfacing in or after it."""
        with self.lock:
            if self.stopped:
                return
            self.outstanding.pop(key, None)
            r = self.result
            if err is None:
                if sent_in_window:
                    r.latencies_s.append(latency_s)
                    r.last_answer_s = max(r.last_answer_s, since_start)
                    for stage, ms in timing.items():
                        r.server_timing.setdefault(stage, _samples()).append(ms)
            elif sent_in_window or (since_start >= 0 and not self.scheduled_only):
                r.errors[err] = r.errors.get(err, 0) + 1
            else:
                r.warmup_errors[err] = r.warmup_errors.get(err, 0) + 1

    def stop(self, unsent: Iterable[object] = ()) -> None:
        """Stop counting: the `unsent` requests (still queued, never sent) are dropped; every other one still
        outstanding is an error, UNANSWERED: its outcome would have come after the window (the open loop's warm-up
        requests: a warm-up error)."""
        with self.lock:
            self.stopped = True
            r = self.result
            for key in unsent:
                r.dropped += bool(self.outstanding.pop(key, False))
            late = sum(self.outstanding.values()) if self.scheduled_only else len(self.outstanding)
            if late:
                r.errors[UNANSWERED] = r.errors.get(UNANSWERED, 0) + late
            if early := len(self.outstanding) - late:
                r.warmup_errors[UNANSWERED] = r.warmup_errors.get(UNANSWERED, 0) + early
            self.outstanding.clear()


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
    try:
        for t in threads:
            t.start()
        _join(threads, t_end + TIMEOUT_S + JOIN_GRACE_S)
    except BaseException:  # Ctrl-C, SIGTERM, SIGHUP: the workers stop after their request, not at the window's end
        tally.stop()
        raise
    tally.stop()
    result.client_cpu_s = time.process_time() - cpu0
    return result


def arrivals(rate: float, end_s: float, seed: int = 0) -> Iterator[float]:
    """Poisson arrival times (seconds from the start) below `end_s`, drawn ARRIVAL_CHUNK at a time as they are
    needed: memory does not grow with rate x duration."""
    rng, t = np.random.default_rng(seed), 0.0
    while True:
        for gap in rng.exponential(1.0 / rate, size=ARRIVAL_CHUNK).tolist():
            t += gap
            if t >= end_s:
                return
            yield t


def open_loop(endpoint: Endpoint, bodies: Sequence[bytes], rate: float, seconds: float, seed: int = 0,
              warmup_s: float = 1.0) -> LoadResult:
    """Poisson arrivals at `rate`/s for `seconds`; latency from each request's scheduled arrival time, throughput
    over the time until the window's last success was answered; an arrival that finds every connection busy and
    BACKLOG others waiting is dropped (not sent: the client was the limit)."""
    if rate <= 0 or not bodies:
        raise ValueError("open loop needs a positive rate and at least one request body")
    result = LoadResult("open", None, rate, seconds)
    tally = _Tally(result, scheduled_only=True)
    jobs: queue.SimpleQueue = queue.SimpleQueue()  # holds BACKLOG requests at most (and the workers' stops)

    def worker() -> None:
        client = Client(endpoint)
        try:
            while (job := jobs.get()) is not None and tally.sending():
                k, scheduled, body, counted = job
                err = client.post(body)
                finished = time.perf_counter()
                tally.finish(k, err, finished - scheduled, client.timing, counted, finished - t_start)
        finally:
            client.close()

    workers: list[threading.Thread] = []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    t_start = t0 + warmup_s  # the workers read it: they start below
    try:
        _schedule(rate, seconds, seed, warmup_s, t0, bodies, tally, jobs, workers, worker)
    except BaseException:  # Ctrl-C, SIGTERM, SIGHUP: nothing more is sent, and each worker ends after its request
        tally.stop(unsent=_drain(jobs))
        for _ in workers:
            jobs.put(None)
        raise
    result.client_cpu_s = time.process_time() - cpu0
    result.workers = len(workers)
    return result


def _schedule(rate: float, seconds: float, seed: int, warmup_s: float, t0: float, bodies: Sequence[bytes],
              tally: _Tally, jobs: queue.SimpleQueue, workers: list[threading.Thread],
              worker: Callable[[], None]) -> None:
    """The open loop's arrivals, each admitted to a worker (started as needed) or dropped; then the workers joined
    and the tally stopped."""
    for k, offset in enumerate(arrivals(rate, seconds + warmup_s, seed)):
        scheduled = t0 + offset
        delay = scheduled - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        # One connection per outstanding request: add a worker only when all are busy (bounded).
        if len(tally.outstanding) >= len(workers) and len(workers) < MAX_CONCURRENCY:
            workers.append(threading.Thread(target=worker, daemon=True))
            workers[-1].start()
        counted = offset >= warmup_s
        if tally.admit(k, counted):
            jobs.put((k, scheduled, bodies[k % len(bodies)], counted))
    for _ in workers:
        jobs.put(None)
    _join(workers, time.perf_counter() + TIMEOUT_S + JOIN_GRACE_S)
    tally.stop(unsent=_drain(jobs))
    for _ in workers:  # a worker still stuck in a request ends when it comes back
        jobs.put(None)


def _drain(jobs: queue.SimpleQueue) -> list[object]:
    """The keys of the requests still queued (never sent), taken out of `jobs`."""
    keys = []
    while True:
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            return keys
        if job is not None:
            keys.append(job[0])


if __name__ == "__main__":
    from benchmarks.library import library_module

    library_module(__spec__)
