"""`create_app(settings)`: the FastAPI application; its lifespan starts one dynamic batcher per model.

Every thread the server serves with (decoding, each model's inference, the repository's loads) starts before it
serves: `app.state.start_threads()`, which the CLI calls before it says it listens (a thread or pids limit is then its
one line, not a traceback after a "listening" line), or the lifespan.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from fastapi import FastAPI, Request, params
from fastapi.dependencies.utils import get_flat_params
from fastapi.openapi.constants import REF_PREFIX
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

import serve
from models.host import usable_cpus
from serve.fastpath import FastPathMiddleware
from serve.metrics import Metrics, ignored_environment
from serve.middleware import (
    AccessLogMiddleware,
    AuthMiddleware,
    BodyBudget,
    BodyLimitMiddleware,
    EarlyAnswerMiddleware,
    HeadMiddleware,
)
from serve.registry import ServedModel, close_models, load_models
from serve.repository import ModelRepository
from serve.responses import ERROR_REF, Error, error_response, install_handlers
from serve.routes import ops, v1, v2
from serve.routes.deps import OUT_OF_MEMORY, OUT_OF_THREADS, RETRY_AFTER
from serve.settings import Settings
from serve.workpool import PixelBudget, ThreadsUnavailable, WorkPool

log = logging.getLogger("vitc.serve")

DESCRIPTION = """Image classification with ViT_C / ViT_P bundles on onnxruntime, OpenVINO, TensorRT or torch.

* `/v1`: send an image, get softmax top-k labels.
* `/v2`: the Open Inference Protocol (KServe v2, Triton HTTP incl. binary tensors) on preprocessed tensors.
* `/metrics`: Prometheus. Errors are JSON: `{"error": "<reason>"}` (the `Error` schema); a readiness endpoint's 400
  (not ready, as Triton answers) is its own answer, `{"ready": false}`.
"""


# Open without the key, as --help and the README say. Not /docs/oauth2-redirect: Swagger UI opens it only in an
# OAuth2 flow, and the key is a bearer token.
DOC_PATHS = ("/docs", "/redoc", "/openapi.json")


def _declare_bearer(app: FastAPI, open_paths: tuple[str, ...]) -> None:
    """The OpenAPI document says every route but `open_paths` needs `Authorization: Bearer <key>`, and answers 401
    (AuthMiddleware's, with WWW-Authenticate) without it."""
    plain = app.openapi
    unauthorized = {"description": "Missing or invalid bearer token",
                    "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
                    "content": {"application/json": {"schema": {"$ref": ERROR_REF}}}}

    def openapi() -> dict[str, Any]:
        schema = plain()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer", "description": "the server's --api-key"}
        schema["security"] = [{"bearer": []}]
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                if path in open_paths:
                    operation["security"] = []
                else:
                    operation["responses"]["401"] = unauthorized
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


_FASTAPI_422 = {"$ref": REF_PREFIX + "HTTPValidationError"}


def _refusable(route: APIRoute) -> bool:
    """Whether FastAPI's own validation can refuse a request of `route` (a RequestValidationError): it declares a body,
    or a parameter that is not text taken as it comes (a path segment, or an optional query value)."""
    return route.body_field is not None or any(
        f.field_info.annotation not in (str, str | None)
        or (f.field_info.is_required() and not isinstance(f.field_info, params.Path))
        for f in get_flat_params(route.dependant))


def document_validation(app: FastAPI, routes: Iterable[APIRoute]) -> None:
    """FastAPI documents its 422 ({"detail": [...]}) on every route with a parameter. The document says instead the 422
    the server answers for it (serve.responses: Error, with `detail`), and only on the `routes` where FastAPI can
    refuse a request: the routes here read their parameters as text, and check them themselves."""
    routes = list(routes)
    plain = app.openapi
    invalid = {"description": "A parameter FastAPI refused (`detail` lists why)",
               "content": {"application/json": {"schema": {"$ref": ERROR_REF}}}}

    def openapi() -> dict[str, Any]:
        schema = plain()
        for route in routes:
            for method in route.methods if route.include_in_schema else ():
                responses = schema["paths"][route.path_format][method.lower()]["responses"]
                if responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema") \
                        == _FASTAPI_422:
                    if _refusable(route):
                        responses["422"] = invalid
                    else:
                        del responses["422"]
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):  # no longer referenced
            schemas.pop(name, None)
        schemas.setdefault(Error.__name__, Error.model_json_schema())  # the 401 and 422 above refer to it
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _out_of_memory(request: Request, exc: Exception) -> JSONResponse:
    """A request that ran out of memory anywhere in a route (reading its body, parsing it, answering it): the 503
    that the work pool's jobs get (serve.routes.deps.off_loop), not a 500 with a traceback: retried, it may fit."""
    return error_response(503, OUT_OF_MEMORY, RETRY_AFTER)


async def _out_of_threads(request: Request, exc: Exception) -> JSONResponse:
    """A thread that could not start for a request (a load's, under a pids limit): 503 + Retry-After, as a decode
    or inference thread's is (serve.routes.deps), not a 500 with a traceback."""
    return error_response(503, OUT_OF_THREADS, RETRY_AFTER)


def _started(settings: Settings, metrics: Metrics, models: dict[str, ServedModel] | None,
             ) -> tuple[dict[str, ServedModel], WorkPool, ModelRepository]:
    """The models (loaded here unless given), the decode pool and the repository, every thread of theirs running;
    ThreadsUnavailable names what could not start, and nothing started (or loaded here) is left running."""
    loaded = models if models is not None else load_models(settings)
    try:
        threads = settings.decode_threads or usable_cpus()
        pool = WorkPool(threads, settings.decode_queue, name="decode",
                        what=f"{threads} decode thread{'s' * (threads != 1)} (--decode-threads)")
        try:
            repository = ModelRepository(settings, metrics, loaded)
            repository.start_threads()
        except BaseException:
            pool.shutdown()
            raise
    except BaseException:
        if models is None:
            close_models(loaded)
        raise
    return loaded, pool, repository


def create_app(settings: Settings, models: dict[str, ServedModel] | None = None) -> FastAPI:
    """Build the app; `models` already loaded (the CLI loads them before binding the port) or loaded at start."""
    if ignored := ignored_environment():
        log.warning("ignored environment variables: vitc is one process and serves its own /metrics, so it writes "
                    "no multi-process metric files", extra={"names": ignored})
    metrics = Metrics()
    prestarted: list[tuple[dict[str, ServedModel], WorkPool, ModelRepository]] = []

    def start_threads() -> None:
        """Start the server's threads now, not in the lifespan (which takes them over): ThreadsUnavailable here."""
        if not prestarted:
            prestarted.append(_started(settings, metrics, models))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded, pool, repository = prestarted.pop() if prestarted else _started(settings, metrics, models)
        try:
            await repository.start()
            app.state.models, app.state.repository, app.state.work_pool = loaded, repository, pool
            app.state.ready = True
            yield
        finally:
            # Runs after uvicorn has let in-flight requests finish: drain what is left of every model at once,
            # within one timeout, then free the runtimes.
            app.state.ready = False
            names = list(loaded)
            # One drain budget for the whole stop: what uvicorn's drain of the requests left of it.
            since = getattr(app.state, "stop_requested_at", None)
            spent = 0.0 if since is None else time.monotonic() - since
            await repository.close(max(0.0, settings.graceful_timeout_s - spent))
            pool.shutdown()
            close_models(loaded)
            log.info("stopped", extra={"models": names})

    # No trailing-slash redirects: a 307 whose Location echoes the client's Host header, that tritonclient does not
    # follow, is worse than the JSON 404 every other unknown path gets (Triton answers none either).
    app = FastAPI(title="vitc", version=serve.__version__, description=DESCRIPTION, lifespan=lifespan,
                  redirect_slashes=False)
    app.state.settings, app.state.metrics, app.state.models, app.state.ready = settings, metrics, {}, False
    app.state.start_threads = start_threads
    app.state.pixel_budget = PixelBudget(settings.decode_budget_pixels)
    install_handlers(app)
    app.add_exception_handler(MemoryError, _out_of_memory)  # the fast path (serve.fastpath) looks it up here too
    app.add_exception_handler(ThreadsUnavailable, _out_of_threads)
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(ops.router)
    routes = [r for router in (v1.router, v2.router, ops.router) for r in router.routes if isinstance(r, APIRoute)]
    document_validation(app, routes)
    v1.document_max_files(app, settings)
    # Added innermost first: the access log sees every answer, including auth and body-limit refusals.
    app.add_middleware(FastPathMiddleware, path=v1.CLASSIFY_PATH, handler=v1.classify_request,
                       max_top_k=v1.MAX_TOP_K)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       timeout_s=settings.receive_timeout_s, budget=BodyBudget(settings.buffered_bytes_limit))
    if settings.api_key is not None:
        # The API's description is public (it is in the README), so /docs can be opened in a browser and its
        # "Authorize" button used; the models, their metadata and every inference need the key.
        app.add_middleware(AuthMiddleware, api_key=settings.api_key.get_secret_value(),
                           open_paths=(*v2.HEALTH_PATHS, *DOC_PATHS))
        _declare_bearer(app, open_paths=v2.HEALTH_PATHS)
    app.add_middleware(HeadMiddleware)
    # Outside every layer that may answer before reading the body.
    app.add_middleware(EarlyAnswerMiddleware, max_bytes=settings.max_body_bytes)
    # Requests refused before routing (auth, body limit) are still counted under their route's template.
    templates = [(r.path_regex, r.path) for r in routes]
    app.add_middleware(AccessLogMiddleware, metrics=metrics,
                       known_models=lambda: getattr(app.state, "repository", app.state.models),
                       enabled=settings.access_log, templates=templates)
    return app
