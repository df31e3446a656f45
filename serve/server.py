"""Run the service: load and verify every model, bind the port, then hand both to uvicorn.

Models load before the port is bound, so a bad bundle or a missing runtime fails fast with one line and a
load balancer never sees a half-started server. SIGTERM stops accepting, lets in-flight requests finish
(up to `graceful_timeout_s`), drains the batchers, and exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

from serve.errors import ServeError
from serve.logs import configure_logging
from serve.registry import close_models, load_models
from serve.settings import Settings

log = logging.getLogger("vitc.serve")


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
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def process_age() -> float | None:
    """Seconds since this process started (Linux: from /proc), for the cold-start breakdown."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return None


def run(settings: Settings) -> None:
    """Load, bind, serve until SIGTERM/SIGINT."""
    configure_logging(settings.log_level)
    models = load_models(settings)
    try:
        sock = bind_socket(settings.host, settings.port)
    except ServeError:
        close_models(models)
        raise
    import uvicorn  # only now: a refused start never pays for importing the web stack

    from serve.app import create_app
    from serve.httpproto import header_timeout_protocol
    config = uvicorn.Config(
        create_app(settings, models), http=header_timeout_protocol(settings.receive_timeout_s, settings.access_log),
        log_config=None, access_log=False, lifespan="on", server_header=False, ws="none",  # no WebSocket routes
        timeout_graceful_shutdown=settings.graceful_timeout_s, timeout_keep_alive=15,
    )
    host, port = sock.getsockname()[:2]
    served = {m.name: {"runtime": m.backend.runtime, "precision": m.backend.precision, "bundle": str(m.bundle),
                       "startup_s": m.startup} for m in models.values()}
    log.info("listening", extra={"url": f"http://{host}:{port}", "host": host, "port": port, "models": served,
                                 "device": settings.device, "process_age_s": process_age()})
    # uvicorn re-raises a captured SIGTERM or SIGINT once it has shut down gracefully; ignoring that second
    # delivery makes a clean shutdown exit 0 (Ctrl-C is the server's normal stop) instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
