"""The server's stop: not ready at the first signal, a shutdown delay still answering, then uvicorn's drain.

Kubernetes and docker stop count one grace period for the whole stop, not one for the requests and another for the
models (the delay comes on top: terminationGracePeriodSeconds must cover both); the moment the drain was asked for
is noted on the app's state for the models' drain (serve.app's lifespan).
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("vitc.serve")
CONNECTION_CLOSE = (b"connection", b"close")


def not_ready(state: Any) -> None:
    """From a stop's first signal: readiness and vitc_model_ready say so (plain assignments)."""
    state.ready = False
    state.metrics.serving = False


def stopping(state: Any) -> None:
    """The drain begins: the models' drain gets what is left of the one budget (serve.app's lifespan)."""
    not_ready(state)
    if getattr(state, "stop_requested_at", None) is None:
        state.stop_requested_at = time.monotonic()


class DelayedShutdownServer(uvicorn.Server):
    """uvicorn's server, with `shutdown_delay` seconds between the first signal and its drain, noting on the app's
    `state` when the drain was asked for."""

    def __init__(self, config: uvicorn.Config, state: Any, shutdown_delay: float) -> None:
        super().__init__(config)
        self.app_state, self.shutdown_delay = state, shutdown_delay
        self.delay_ends: float | None = None  # monotonic end of the shutdown delay, from the first signal
        self.signalled: int | None = None  # the signal that began it, named in the log by the event loop

    def stop(self, *_: object) -> None:
        """Stop once started: the handler of a signal that comes before uvicorn takes the signals over."""
        stopping(self.app_state)
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.shutdown_delay and self.started and self.delay_ends is None and not self.should_exit:
            # Endpoints are removed from a Service asynchronously to SIGTERM: report not ready now, and keep the
            # port open and answering until the delay is over (on_tick then starts uvicorn's drain). Plain
            # assignments only: a signal handler may run in the middle of anything on this thread.
            self.delay_ends, self.signalled = time.monotonic() + self.shutdown_delay, sig
            not_ready(self.app_state)
            return
        # No delay, the server not started yet (never ready: nothing routes here), or a second signal during the
        # delay, which cuts it short (a SIGINT after that forces uvicorn's exit, as without a delay).
        stopping(self.app_state)
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.signalled is not None:
            log.info("shutting down: not ready, still answering", extra={
                "signal": signal.Signals(self.signalled).name, "shutdown_delay_s": self.shutdown_delay})
            self.signalled = None
        if self.delay_ends is not None and not self.should_exit and time.monotonic() >= self.delay_ends:
            stopping(self.app_state)
            self.should_exit = True
        done = await super().on_tick(counter)  # which renews the default headers once a second
        if self.delay_ends is not None and CONNECTION_CLOSE not in self.server_state.default_headers:
            # Every answer during the delay closes its connection: a keep-alive client reconnects, and is routed to
            # another pod, rather than sending its next request on a connection the drain then closes.
            self.server_state.default_headers = [*self.server_state.default_headers, CONNECTION_CLOSE]
        return done
