"""The inference hot path without FastAPI's router and parameter machinery (a good part of a millisecond a request
on a small CPU): a plain `POST /v1/models/{name}/classify` goes straight to the route's own handler.

Only the common, unambiguous case is taken: the exact path, no query or a well-formed `top_k` of at most
`max_top_k` (the most classes any bundle has; the handler checks the model's own count). Everything else (bad
parameters, other methods, a mounted root path) falls through to the FastAPI route, which runs the same handler and
answers the same errors, so both ways give identical answers, metrics and logs.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request, str, int | None], Awaitable[Response]]


@dataclass(frozen=True)
class RouteInfo:
    """What the router would have put in `scope["route"]` for the access log and metrics: the path template."""

    path: str
    name: str
    methods: frozenset[str] = frozenset({"POST"})


class FastPathMiddleware:
    """Dispatch `POST {prefix}/models/{name}/{verb}` to `handler(request, name, top_k)` when the request is plain."""

    def __init__(self, app: ASGIApp, path: str, handler: Handler, max_top_k: int) -> None:
        prefix, _, verb = path.partition("/{name}/")
        self.app, self.handler, self.max_top_k = app, handler, max_top_k
        self.route = RouteInfo(path, getattr(handler, "__name__", verb))
        self._pattern = re.compile(f"^{re.escape(prefix)}/([^/]+)/{re.escape(verb)}$")
        # No more digits than max_top_k has: a longer number is never converted here (FastAPI's route refuses it).
        self._top_k_query = re.compile(rb"top_k=([1-9][0-9]{0,%d})" % (len(str(max_top_k)) - 1))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = (self._pattern.match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST"
                 and not scope.get("root_path") else None)
        top_k = self._top_k(scope.get("query_string", b"")) if match else False
        if top_k is False:
            await self.app(scope, receive, send)
            return
        name = match.group(1)
        # What the router would have set: the access log and metrics read the route and the model name from here.
        scope["route"], scope["path_params"] = self.route, {"name": name}
        request = Request(scope, receive)
        try:
            response = await self.handler(request, name, top_k)
        except Exception as exc:
            # The app's own exception handlers answer, as they would behind the router (APIError, Starlette's
            # HTTPException from form parsing, ...); anything else goes on to the access log's 500.
            handler = _exception_handler(scope, exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _top_k(self, query: bytes) -> int | None | bool:
        """The query's top_k (None when absent), or False when the query is anything else (FastAPI answers it)."""
        if not query:
            return None
        m = self._top_k_query.fullmatch(query)
        if m is None or int(m.group(1)) > self.max_top_k:
            return False
        return int(m.group(1))


def _exception_handler(scope: Scope, exc: Exception) -> Callable[..., Awaitable[Response]] | None:
    """The app's handler for `exc`'s class or nearest base (as Starlette's ExceptionMiddleware looks it up); the
    catch-all `Exception` handler belongs to the server-error layer and is not used here."""
    handlers = getattr(scope.get("app"), "exception_handlers", {}) or {}
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            return handlers[cls]
    return None

