"""Operations: Prometheus metrics and a root index."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serve.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


# Prometheus's text exposition format, by its media type (the answer's Content-Type adds its version and charset).
_EXPOSITION = {200: {"description": "Every series, in Prometheus's text exposition format", "content": {
    CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}}}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, responses=_EXPOSITION)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/", summary="Index", include_in_schema=False)
async def index(request: Request) -> dict[str, Any]:
    return {"name": "vitc", "models": list(request.app.state.models), "docs": "/docs",
            "endpoints": ["/v1/models", "/v2/health/ready", "/metrics"]}
