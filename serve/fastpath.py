"""The inference hot path without FastAPI's router and parameter machinery (a good part of a millisecond a request
on a small CPU): a plain `POST /v1/models/{name}/classify` goes straight to the route's own handler.

Only the common, unambiguous case is taken: the exact path, no query or a well-formed `top_k` in range. Everything
else (bad parameters, other methods, a mounted root path) falls through to the FastAPI route, which runs the same
handler and answers the same errors, so both ways give identical answers, metrics and logs.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.errors import APIError
from serve.responses import error_response

Handler = Callable[[Request, str, int | None], Awaitable[Response]]
_TOP_K = re.compile(rb"^top_k=([1-9][0-9]{0,3})$")


class FastPathMiddleware:
    """Dispatch `POST {prefix}/models/{name}/{verb}` to `handler(request, name, top_k)` when the request is plain."""

    def __init__(self, app: ASGIApp, path: str, handler: Handler, max_top_k: int) -> None:
        prefix, _, verb = path.partition("/{name}/")
        self.app, self.handler, self.max_top_k = app, handler, max_top_k
        self.route_path = path
        self._pattern = re.compile(f"^{re.escape(prefix)}/([^/]+)/{re.escape(verb)}$")
        self._route: BaseRoute | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = (self._pattern.match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST"
                 and not scope.get("root_path") else None)
        top_k = self._top_k(scope.get("query_string", b"")) if match else False
        route = self._find_route(scope) if top_k is not False else None
        if route is None:
            await self.app(scope, receive, send)
            return
        name = match.group(1)
        # What the router would have set: the access log and metrics read the route and the model name from here.
        scope["route"], scope["path_params"] = route, {"name": name}
        scope["endpoint"] = getattr(route, "endpoint", None)
        request = Request(scope, receive)
        try:
            response = await self.handler(request, name, top_k)
        except APIError as exc:
            response = error_response(exc.status, exc.reason, exc.headers)
        await response(scope, receive, send)

    def _top_k(self, query: bytes) -> int | None | bool:
        """The query's top_k (None when absent), or False when the query is anything else (FastAPI answers it)."""
        if not query:
            return None
        m = _TOP_K.match(query)
        if m is None or int(m.group(1)) > self.max_top_k:
            return False
        return int(m.group(1))

    def _find_route(self, scope: Scope) -> BaseRoute | None:
        """The FastAPI route this middleware stands in for (looked up once: routes exist before the first request)."""
        if self._route is None:
            app = scope.get("app")
            for route in getattr(getattr(app, "router", None), "routes", ()):
                methods = getattr(route, "methods", None) or ()
                if getattr(route, "path", None) == self.route_path and "POST" in methods:
                    self._route = route
                    break
        return self._route
