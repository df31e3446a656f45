"""Per-request stage timings (receive, decode, queue, compute, encode), answered in a `Server-Timing` header so a
client can take its latency apart stage by stage without access to the server's metrics."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from starlette.requests import Request

TIMINGS_KEY = "vitc_timings"  # in the ASGI scope's state


def timings(request: Request) -> dict[str, float]:
    """This request's stage timings in seconds (receive, decode, queue, compute, encode), sent back to the client
    in a `Server-Timing` header (AccessLogMiddleware) so latency can be taken apart stage by stage."""
    return request.scope.setdefault("state", {}).setdefault(TIMINGS_KEY, {})


@contextlib.contextmanager
def stage(request: Request, name: str) -> Iterator[None]:
    """Time a block as one stage of the request (see `timings`)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings(request)[name] = time.perf_counter() - start


def server_timing(scope: dict, total_s: float, inference: bool = False) -> bytes | None:
    """The Server-Timing header value for a request's recorded stages (milliseconds); None without any, unless it
    is an `inference` request (refused before its first stage: an unknown model, a bad top_k), which gets `total`."""
    stages = (scope.get("state") or {}).get(TIMINGS_KEY) or {}
    if not stages and not inference:
        return None
    parts = [f"{k};dur={v * 1e3:.3f}" for k, v in stages.items()]
    parts.append(f"total;dur={total_s * 1e3:.3f}")
    return ", ".join(parts).encode()
