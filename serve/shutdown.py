"""The server's stop: not ready at the first signal, a shutdown delay still answering, then uvicorn's drain (which
also waits for connections that close gently after an early answer: serve.httpproto bounds them, LINGER_S).

Kubernetes and docker stop count one grace period for the whole stop, not one for the requests and another for the
models (the delay comes on top: terminationGracePeriodSeconds must cover both); the moment the drain was asked for
is noted on the app's state for the models' drain (serve.app's lifespan). A forced stop (one more Ctrl-C during the
drain) answers what is still in progress 503 and closes the models without draining them, saying so in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("vitc.serve")
CONNECTION_CLOSE = (b"connection", b"close")
FORCED_WAIT_S = 1.0  # a forced stop: how long the requests it cancels get to send their 503
# What stops the server gracefully: uvicorn's SIGINT and SIGTERM, and a hang-up (the terminal or ssh session closed),
# whose default would end the process at once, without the drain or a line saying why.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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
    """uvicorn's server, with `shutdown_delay` seconds between the first signal and its drain."""

    # It notes on the app's `state` when the drain was asked for. `close_connections`, called from the first
    # signal's handler, makes every answer from then on close its connection
    # (HeaderBoundsProtocol.close_after_answers); without it a default `Connection: close` header does, for the
    # requests whose headers come after the signal.

    def __init__(self, config: uvicorn.Config, state: Any, shutdown_delay: float,
                 close_connections: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.app_state, self.shutdown_delay = state, shutdown_delay
        self.close_connections = close_connections
        self.delay_ends: float | None = None  # monotonic end of the shutdown delay, from the first signal
        self.signalled: int | None = None  # the signal that began it, named in the log by the event loop

    def stop(self, *_: object) -> None:
        """Stop once started: the handler of a signal that comes before uvicorn takes the signals over."""
        stopping(self.app_state)
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, with a hang-up taken as SIGTERM (uvicorn captures SIGINT and SIGTERM alone); ignored stays
        ignored (nohup)."""
        with super().capture_signals():
            hangup = threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN
            previous = signal.signal(signal.SIGHUP, self.handle_exit) if hangup else None
            try:
                yield
            finally:  # before uvicorn re-raises the captured signals: a hang-up then goes to `stop`, a no-op
                if hangup:
                    signal.signal(signal.SIGHUP, signal.SIG_DFL if previous is None else previous)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.shutdown_delay and self.started and self.delay_ends is None and not self.should_exit:
            # Endpoints are removed from a Service asynchronously to SIGTERM: report not ready now, and keep the
            # port open and answering until the delay is over (on_tick then starts uvicorn's drain). Plain
            # assignments only: a signal handler may run in the middle of anything on this thread. Not ready and
            # `Connection: close` take effect here, not at the event loop's next tick (0.1 s): an answer in between
            # would keep its connection open until the drain closes it under the client.
            self.delay_ends, self.signalled = time.monotonic() + self.shutdown_delay, sig
            not_ready(self.app_state)
            self._answers_close()
            return
        # No delay, the server not started yet (never ready: nothing routes here), or a second signal during the
        # delay, which cuts it short (a SIGINT after that forces uvicorn's exit, as without a delay).
        stopping(self.app_state)
        super().handle_exit(sig, frame)

    def _answers_close(self) -> None:
        """Every answer from now on closes its connection (plain assignments: called from a signal handler)."""
        if self.close_connections is not None:
            self.close_connections()  # answers in progress too, and never a second `connection` header
        elif CONNECTION_CLOSE not in self.server_state.default_headers:
            self.server_state.default_headers = [*self.server_state.default_headers, CONNECTION_CLOSE]

    async def on_tick(self, counter: int) -> bool:
        if self.signalled is not None:
            log.info("shutting down: not ready, still answering", extra={
                "signal": signal.Signals(self.signalled).name, "shutdown_delay_s": self.shutdown_delay})
            self.signalled = None
        if self.delay_ends is not None and not self.should_exit and time.monotonic() >= self.delay_ends:
            stopping(self.app_state)
            self.should_exit = True
        done = await super().on_tick(counter)  # which renews the default headers once a second
        if self.delay_ends is not None:
            # Every answer during the delay closes its connection: a keep-alive client reconnects, and is routed to
            # another pod, rather than sending its next request on a connection the drain then closes.
            self._answers_close()
        return done

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        ended = getattr(self.lifespan, "shutdown_event", None)
        if self.force_exit and ended is not None and not ended.is_set():
            # uvicorn's forced exit leaves the requests in progress and the app's lifespan to asyncio.run's final
            # cancellation, after its last line: a traceback from the lifespan, and access lines and the models'
            # drain after "Finished server process". Here they end before it, the models without a drain.
            await self._forced_stop()

    async def _forced_stop(self) -> None:
        """Cancel the requests in progress (each answers 503, serve.middleware), then close the models at once."""
        tasks = list(self.server_state.tasks)
        log.warning("forced exit: requests in progress answered 503, the models closed without a drain",
                    extra={"requests": len(tasks)})
        for task in tasks:
            task.cancel()
        if tasks and (await asyncio.wait(tasks, timeout=FORCED_WAIT_S))[1]:
            for connection in list(self.server_state.connections):
                connection.transport.abort()  # a client that reads nothing: its answer cannot go out
            await asyncio.wait(tasks, timeout=FORCED_WAIT_S)
        # The drain was asked for "infinitely long ago": nothing is left of its budget (serve.app's lifespan).
        self.app_state.stop_requested_at = float("-inf")
        await self.lifespan.shutdown()
