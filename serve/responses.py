"""Error responses: the one JSON error shape, and the handlers that give every FastAPI error that shape; and the
response of a large answer, whose memory is held until it is sent."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from serve.errors import APIError


class Error(BaseModel):
    """The one error body shape, as the OpenAPI document gives it (components/schemas/Error)."""

    error: str = Field(description="why the request was refused or failed")
    # Absent, never null: SkipJsonSchema keeps None out of the schema, and the extra drops its `default: null`.
    detail: list[dict[str, Any]] | SkipJsonSchema[None] = Field(
        default=None, description="FastAPI's validation errors, on a 422 for a parameter FastAPI refused",
        json_schema_extra=lambda schema: schema.pop("default", None))


ERROR_REF = f"#/components/schemas/{Error.__name__}"  # where FastAPI's document keeps Error


def error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error body shape (also what tritonclient reads)."""
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def _validation_reason(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "path", "body"))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_handlers(app: FastAPI) -> None:
    """Errors become JSON bodies with a reason (unexpected ones: AccessLogMiddleware answers a JSON 500)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.reason, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        allow = [m.strip() for m in headers.get("Allow", "").split(",") if m.strip()]
        if "GET" in allow and "HEAD" not in allow:  # every GET route answers HEAD too (HeadMiddleware)
            headers["Allow"] = ", ".join([*allow, "HEAD"])
        return error_response(exc.status_code, str(exc.detail), headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        body = {"error": _validation_reason(exc), "detail": jsonable_encoder(exc.errors())}
        return JSONResponse(body, status_code=422)


class HeldResponse(Response):
    """A Response whose memory stays held (`release`, called once) until its body has left the connection's write
    buffer for the kernel: a client that reads slowly, or not at all, keeps it held, not the request. Once the body
    is written, the request is done (its access-log line, its body's budget, a stop's drain) as with any answer; the
    connection (serve.httpproto `when_sent`) releases it once the client has taken it, or is gone."""

    def __init__(self, content: bytes, release: Callable[[], None], media_type: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        # Also when the response is never sent (its task cancelled before it ran): the budget must come back.
        self.release = weakref.finalize(self, release)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except BaseException:
            self.release()
            raise
        if (when_sent := scope.get("vitc.when_sent")) is None:  # no connection of serve.httpproto's: written
            self.release()
        elif (detached := self.release.detach()) is not None:  # the connection holds it now, not this object
            when_sent(detached[1])
