"""What the routers share: the model lookup dependency, settings, off-loop work and batcher errors -> HTTP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import Depends, Request

from serve.batching import BatcherClosed, QueueFull
from serve.errors import APIError
from serve.registry import ServedModel
from serve.settings import Settings

log = logging.getLogger("vitc.serve")
T = TypeVar("T")
RETRY_AFTER = {"Retry-After": "1"}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"example": {"error": "reason"}}}}
    for code, text in {
        400: "Undecodable or malformed input", 401: "Missing or invalid bearer token", 404: "Unknown model",
        413: "Body or image too large", 415: "Unsupported content type", 422: "Invalid parameter",
        503: "Queue full or shutting down (see Retry-After)",
    }.items()
}


# Dependencies are `async def` so FastAPI calls them inline instead of hopping to a worker thread per request.
async def get_model(name: str, request: Request) -> ServedModel:
    """The served model named in the path, or 404 listing the served names."""
    models: dict[str, ServedModel] = request.app.state.models
    model = models.get(name)
    if model is None:
        raise APIError(404, f"unknown model {name!r}; served: {', '.join(models) or 'none'}")
    return model


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


ModelDep = Annotated[ServedModel, Depends(get_model)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def off_loop(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """Run CPU work (decoding, JSON tensor parsing) in the decode pool, never on the event loop."""
    return await asyncio.get_running_loop().run_in_executor(request.app.state.decode_pool, fn, *args)


async def infer(model: ServedModel, x: np.ndarray) -> np.ndarray:
    """Submit rows to the model's dynamic batcher; 503 when full or closing, 500 if the backend fails."""
    try:
        return await model.batcher.submit(x)
    except QueueFull as exc:
        raise APIError(503, f"{exc}; retry later", RETRY_AFTER) from None
    except BatcherClosed as exc:
        raise APIError(503, str(exc), RETRY_AFTER) from None
    except Exception as exc:
        log.exception("inference failed", extra={"model": model.name})
        raise APIError(500, f"inference failed: {type(exc).__name__}: {exc}") from None


def admission(model: ServedModel):
    """Count this request against the model's queue bound for its whole life (decode + queue + compute)."""
    try:
        return model.batcher.admit()
    except QueueFull as exc:
        raise APIError(503, f"{exc}; retry later", RETRY_AFTER) from None
    except BatcherClosed as exc:
        raise APIError(503, str(exc), RETRY_AFTER) from None
