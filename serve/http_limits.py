"""What bounds one server's connections, and where what is refused below the app is reported: the connection
limit and the probe places beyond it, the bytes a lingering close reads, and the refusals' log and count.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serve.linger import LINGER_BODIES, LINGER_MIN_BYTES

_log = logging.getLogger("vitc.access")
# Beyond the connection limit, a few more connections may still ask for health or metrics (Kubernetes probes and
# Prometheus scrapes open a connection each time: idle clients holding every place must not make a healthy pod fail
# its probes). They get PROBE_WAIT_S for their request, which must be a GET or HEAD of one of these paths.
PROBE_PATHS = re.compile(rb"/v2/health/(live|ready)|/metrics|/v2/models/[^/?]{1,256}(/versions/[0-9]{1,19})?/ready")
PROBE_WAIT_S = 2.0
LOGGED_PATH = 256  # characters of a request's path in a log line (the request line may be 64 KiB)


def probe_places(max_connections: int) -> int:
    """Connections beyond the limit that may still be probes."""
    return max(16, max_connections // 10)


def lingering_bytes(max_body_bytes: int) -> int:
    """What a lingering close reads at most: LINGER_BODIES bodies of `max_body_bytes`, and LINGER_MIN_BYTES at least."""
    return max(LINGER_MIN_BYTES, LINGER_BODIES * max_body_bytes)


def host_port(host: str, port: int | None = None) -> str:
    """An address for a log line: `host:port`, an IPv6 address in brackets (`[::1]:8080`, RFC 3986: unbracketed,
    its port would read as part of it), or the bare host when the port is unknown."""
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def logged_path(path: str) -> dict[str, object]:
    """A request's path for a log line: at most LOGGED_PATH characters, and its length when it was cut."""
    if len(path) <= LOGGED_PATH:
        return {"path": path}
    return {"path": path[:LOGGED_PATH], "path_length": len(path)}


def _client(transport: asyncio.BaseTransport) -> str | None:
    """The peer's address (host_port), for the access log."""
    peer = transport.get_extra_info("peername")
    return host_port(str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None


@dataclass(frozen=True)
class ConnectionLimits:
    """What bounds one server's connections: `seconds` for a request's headers (and for a client to accept any of
    an answer), `max_connections` open at once (None: no bound), and `linger_bytes` read and dropped at most by a
    lingering close (serve.linger), and by a kept connection of the bodies answered before they were read."""

    seconds: float
    max_connections: int | None = None
    linger_bytes: int = LINGER_MIN_BYTES

    @property
    def probe_places(self) -> int:
        """Connections beyond `max_connections` that may still be probes."""
        return probe_places(self.max_connections or 0)

    @property
    def busy(self) -> str:
        """The reason given to a connection beyond the limit."""
        return f"the server has {self.max_connections} connections open, its limit; retry shortly"

    @property
    def too_slow(self) -> str:
        """The reason given to a request whose headers missed their deadline."""
        return f"the request headers did not arrive within {self.seconds:g} s"


@dataclass(eq=False)
class OpenConnections:
    """The connections of one server not yet lost, shared by every connection of its protocol class."""

    admitted: int = 0
    probes: int = 0  # probe-only connections, beyond the limit
    # Probe-only connections whose request headers are not complete yet, oldest first: what a newcomer may evict.
    waiting: dict[Any, None] = field(default_factory=dict)
    closing: bool = False  # from a stop's first signal: every answer begun from then on closes its connection

    def count(self, probe: bool, change: int) -> None:
        """Count a connection in (`change` 1) or out (-1) of the admitted ones or the probe-only ones."""
        if probe:
            self.probes += change
        else:
            self.admitted += change


@dataclass(frozen=True)
class Refusals:
    """Where the answers given below the app are reported: its access log and metrics never see them."""

    access_log: bool = True
    on_refusal: Callable[[int], None] | None = None

    def report(self, status: int, reason: str, transport: asyncio.BaseTransport, path: str | None = None) -> None:
        """Count one refusal (`on_refusal`) and log it (with the access log on), with the request's `path` as it was
        sent when its request line was read."""
        if self.on_refusal is not None:
            self.on_refusal(status)
        if self.access_log:
            fields = {"status": status, "reason": reason, "client": _client(transport)}
            _log.info("refused", extra=fields if path is None else {**fields, **logged_path(path)})
