"""Run the service: load and verify every model, bind the port, then hand both to uvicorn.

Models load before the port is bound, so a bad bundle or a missing runtime fails fast with one line and a
load balancer never sees a half-started server; every thread it serves with starts before the "listening" line
(a thread or pids limit is one line, exit 1). SIGTERM reports not ready at once and goes on answering for
`shutdown_delay` seconds (a second signal cuts that short), then stops accepting, lets in-flight requests finish
(up to `graceful_timeout_s`), drains the batchers, and exits 0, without waiting for work that cannot be stopped
(a hung backend call, a load in progress): that is named in a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from runtimes.registry import load_failures
from serve.errors import ServeError
from serve.http_limits import host_port, probe_places
from serve.imaging import BUDGET_PIXEL_BYTES
from serve.logs import configure_logging
from serve.protocol import JSON_MEMORY_PER_BYTE
from serve.registry import ServedModels, close_models, load_models
from serve.settings import Settings, repository_tuning, service_links, unknown_environment

log = logging.getLogger("vitc.serve")
DEFAULT_CONNECTIONS = 1000
# Open files beside the connections and their probes (serve.http_limits.probe_places): model files, logs, clients
# being turned away. The soft limit is raised to give FILES_SPARE; a lower hard limit leaves at least FILES_SPARE_MIN
# (a server holds about 16 once its models are loaded).
FILES_SPARE = 156
FILES_SPARE_MIN = 32
STUCK_WAIT_S = 1.0  # once stopped: how long the threads still working get to end before the process exits past them


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket (port 0 picks a free one); ServeError if the address is taken or invalid."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host_port(host, port)}: {exc.strerror or exc}") from None
    sock.listen(2048)  # clients that connect from now on wait in the backlog until uvicorn accepts them
    sock.set_inheritable(True)
    return sock


def files_needed(connections: int, spare: int = FILES_SPARE_MIN) -> int:
    """The open files `connections` served at once take: theirs, the probes beyond them, and `spare` more."""
    return connections + probe_places(connections) + spare


def connections_fitting(limit: int) -> int:
    """The most connections served at once whose files_needed fit within the open-file limit `limit`."""
    fits = limit - probe_places(0) - FILES_SPARE_MIN  # exact while the probes stay at their minimum
    while fits > 0 and files_needed(fits) > limit:
        fits -= max(1, (files_needed(fits) - limit) * 10 // 11)
    return fits


def connection_limit(wanted: int | None, named: str = "") -> int:
    """The connections served at once: `wanted`, or DEFAULT_CONNECTIONS, within the open-file limit (each takes a
    descriptor, as do the probes beyond them and the files_needed spare). The soft limit is raised up to the hard one
    as needed; ServeError if a `wanted` number, or a single connection, cannot fit (naming `wanted` as `named` says,
    Settings.named: VITC_MAX_CONNECTIONS=N where the environment gave it)."""
    try:
        import resource
    except ImportError:  # not on this platform: no descriptor limit to fit
        return wanted or DEFAULT_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    connections = wanted or DEFAULT_CONNECTIONS
    infinite, want = resource.RLIM_INFINITY, files_needed(connections, FILES_SPARE)
    raised = want if hard == infinite else min(want, hard)
    if soft != infinite and soft < raised:
        soft = raised
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft == resource.RLIM_INFINITY:
        return connections
    fits = connections_fitting(soft)
    if fits < 1:
        raise ServeError(f"the open-file limit is {soft} (hard limit {hard}), too few to serve a connection beside "
                         f"the model files and logs: raise it to at least {files_needed(1)} (ulimit -n)")
    if wanted is None:
        return min(DEFAULT_CONNECTIONS, fits)
    if fits < wanted:
        raise ServeError(f"{named or f'--max-connections {wanted}'} needs {files_needed(wanted)} open files, but "
                         f"the limit is {soft} (hard limit {hard}): give {fits} or less, or raise the limit "
                         "(ulimit -n)")
    return wanted


def process_age() -> float | None:
    """Seconds since this process started (Linux: from /proc), for the cold-start breakdown."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return None


MAX_DECODE_WEIGHT = 3  # the dearest decode_weight (WebP, progressive CMYK JPEG, grey with alpha)


def memory_headroom(settings: Settings, resident: int | None, limit: int | None) -> dict[str, int] | None:
    """The worst case the limits allow (resident memory with the models loaded, the decode budget, the buffered
    request bodies) when it exceeds the container's memory limit, else None: that pod would be OOM-killed under
    load instead of answering 503."""
    if limit is None or resident is None:
        return None
    # One image or v2 body may exceed the budget (it decodes or parses alone): its own cost bounds it too.
    decode = max(settings.decode_budget_pixels, settings.max_image_pixels * MAX_DECODE_WEIGHT,
                 settings.max_body_bytes * JSON_MEMORY_PER_BYTE // BUDGET_PIXEL_BYTES)
    # The decode budget also holds the large answers (built in the decode pool) until their clients have taken them
    # (serve.routes.deps.held_response): what slow readers leave unread is inside it, not beside it.
    need = resident + decode * BUDGET_PIXEL_BYTES + settings.buffered_bytes_limit
    return {"worst_case_bytes": need, "memory_limit_bytes": limit} if need > limit else None


def _resident_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def run(settings: Settings) -> None:
    """Load, bind, serve until SIGTERM/SIGINT."""
    connections = _preflight(settings)  # before loading: a refusal costs no model load
    models, sock = _load_and_bind(settings)
    _serve(settings, models, sock, connections)
    if stuck := stuck_threads(STUCK_WAIT_S):
        exit_past(stuck, 0)  # the code a stop without them gives


def _preflight(settings: Settings) -> int:
    """Configure the logs, say which environment variables are ignored, and fit the connections served at once
    (returned) within the open-file limit."""
    configure_logging(settings.log_level)
    if failures := load_failures():  # served without them: said at start, not only when a refusal names one
        log.warning("runtime modules that could not be registered", extra={"reason": failures.removeprefix("; ")})
    if ignored := unknown_environment(dict(os.environ))[1]:
        log.warning("ignored environment variables: not settings", extra={"names": ignored[:20]})
    if settings.api_key is None and "VITC_API_KEY" in os.environ:  # set, but empty: a Secret that was not filled
        log.warning("VITC_API_KEY is empty: serving without authentication")
    if links := service_links(dict(os.environ)):
        log.info("ignored Kubernetes service links (Services named vitc or vitc-*; enableServiceLinks: false turns "
                 "them off)",
                 extra={"names": links[:20]})
    connections = connection_limit(settings.max_connections,
                                   settings.named("max_connections", f" {settings.max_connections}"))
    if settings.max_connections is None and connections < DEFAULT_CONNECTIONS:
        log.warning("the open-file limit cuts the connections served at once", extra={
            "max_connections": connections, "default": DEFAULT_CONNECTIONS,
            "advice": f"raise the limit (ulimit -n {files_needed(DEFAULT_CONNECTIONS, FILES_SPARE)}) or give "
                      "--max-connections"})
    return connections


def _load_and_bind(settings: Settings) -> tuple[ServedModels, socket.socket]:
    """Every model loaded and checked against the repository's tuning, and the bound socket; nothing is left loaded
    if the start is refused."""
    models = load_models(settings)
    if refusal := repository_tuning(settings, (m.runtime for m in models.values())):
        close_models(models)
        raise ServeError(refusal)
    from models.host import memory_limit

    if over := memory_headroom(settings, _resident_bytes(), memory_limit()):
        log.warning("the memory limit is below what the serving limits allow", extra={
            **over, "advice": "lower --decode-budget-pixels (5 bytes each) or --max-buffered-bytes, or raise the "
                              "container's memory limit: under load the process would be OOM-killed, not answer 503"})
    try:
        sock = bind_socket(settings.host, settings.port)
    except ServeError:
        close_models(models)
        raise
    return models, sock


def _serve(settings: Settings, models: ServedModels, sock: socket.socket, connections: int) -> None:
    """Hand the app and the bound socket to uvicorn, and serve until stopped."""
    import uvicorn  # only now: a refused start never pays for importing the web stack

    from serve.app import create_app
    from serve.http_limits import ConnectionLimits, lingering_bytes
    from serve.httpproto import HeaderBoundsProtocol
    from serve.shutdown import STOP_SIGNALS, DelayedShutdownServer

    app = create_app(settings, models)
    try:
        start_threads(app)
    except BaseException:  # nothing is served: what was loaded and bound is let go
        close_models(models)
        sock.close()
        raise
    limits = ConnectionLimits(settings.receive_timeout_s, connections, lingering_bytes(settings.max_body_bytes))
    http = HeaderBoundsProtocol.configured(limits, access_log=settings.access_log,
                                           on_refusal=app.state.metrics.protocol_refused)
    config = uvicorn.Config(
        app, http=http,
        log_config=None, access_log=False, lifespan="on", server_header=False, ws="none",  # no WebSocket routes
        timeout_graceful_shutdown=settings.graceful_timeout_s, timeout_keep_alive=settings.keep_alive_s,
    )
    server = DelayedShutdownServer(config, app.state, settings.shutdown_delay, http.close_after_answers)
    # A SIGTERM, SIGINT or hang-up before uvicorn takes the signals over (the "listening" line is out) stops the
    # server once started; uvicorn re-raises the one it captured after its graceful shutdown, and this handler makes
    # that second delivery a no-op, so a clean shutdown exits 0 (Ctrl-C is the server's normal stop), not by the
    # signal. A hang-up ignored (nohup) stays ignored.
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, server.stop)
    log.info("listening", extra=_listening(settings, models, sock, connections))
    server.run(sockets=[sock])


def start_threads(app: Any) -> None:
    """Start every thread of the app (serve.app) before the server says it listens: a thread or pids limit that
    leaves one unstarted is the command's one line and exit 1 (the machine's limit), naming what could not start,
    not uvicorn's traceback and exit 3 after a "listening" line that a readiness check would believe."""
    from models.cli import WorkFailed
    from models.failures import out_of_memory
    from serve.workpool import ThreadsUnavailable

    try:
        app.state.start_threads()
    except ThreadsUnavailable as exc:
        raise WorkFailed(f"cannot start {exc.what}: {out_of_memory(exc) or exc}") from None


def _listening(settings: Settings, models: ServedModels, sock: socket.socket, connections: int) -> dict[str, Any]:
    """What the "listening" line says: where, which models, how many connections."""
    host, port = sock.getsockname()[:2]
    served = {m.name: {"runtime": m.runtime, "precision": m.backend.precision, "bundle": str(m.bundle),
                       "startup_s": m.startup} for m in models.values()}
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"  # an IPv6 address in brackets
    return {"url": url, "host": host, "port": port, "models": served, "device": settings.device,
            "max_connections": connections, "process_age_s": process_age()}


def stuck_threads(wait_s: float) -> list[threading.Thread]:
    """The threads that would keep the process from exiting, still alive `wait_s` seconds from now."""
    # Python joins every thread that is not a daemon at exit, a thread pool's even after shutdown(wait=False), so a
    # backend call that never returns (the inference timeout answered 504 long ago) or a load in progress would
    # hold the process past SIGTERM until it is killed.
    end = time.monotonic() + wait_s
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    for t in others:
        t.join(max(0.0, end - time.monotonic()))
    return [t for t in others if t.is_alive()]


def abandoned(thread: threading.Thread) -> str:
    """What a thread still running is doing, by the name its pool gave it."""
    from serve.repository import LOAD_THREADS

    pool = thread.name.rsplit("_", 1)[0]  # ThreadPoolExecutor names its threads PREFIX_N
    if pool.startswith("infer-"):
        return f"a backend call of model {pool.removeprefix('infer-')!r} still running"
    if pool == LOAD_THREADS:
        return "a load still running"
    return f"thread {thread.name!r} still running"


def exit_past(threads: list[threading.Thread], code: int) -> NoReturn:
    """Log what is abandoned, flush the logs, and end the process now with `code`, without joining `threads`."""
    what = sorted({abandoned(t) for t in threads})
    log.warning("exiting without waiting for work still running",
                extra={"abandoned": what, "threads": [t.name for t in threads][:20]})
    logging.shutdown()  # flushes the handlers, as the interpreter's exit would
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
