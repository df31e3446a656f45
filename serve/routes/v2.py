"""/v2: the Open Inference Protocol (KServe v2 / Triton HTTP) - health, metadata, config and inference.

Inputs are the model's preprocessed FP32 tensors (as with Triton); the batch dimension goes through the
same dynamic batcher as /v1 requests.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

import serve
from models.bundle import TRITON_LABELS_FILE
from models.tritonconfig import VersionPolicy
from serve.errors import APIError
from serve.imaging import BUDGET_PIXEL_BYTES
from serve.protocol import (
    EXTENSIONS,
    HEADER_LENGTH,
    INT64_MAX,
    MAX_DIM,
    MAX_DIMS,
    MAX_ID_CHARS,
    InferRequest,
    OutputTensor,
    ProtocolError,
    answer_coding,
    check_parameters,
    classification_order,
    classification_strings,
    compress,
    datatype_name,
    encode_response,
    header_length_digits,
    loads,
    parameters_schema,
    parse_memory,
    parse_request,
    request_parameters_schema,
    short_reason,
    wrong_datatype,
)
from serve.registry import ServedModel
from serve.repository import LoadError, RepositoryView
from serve.routes import deps
from serve.routes.deps import ModelDep, SettingsDep, error_doc, retry_doc
from serve.settings import Settings
from serve.timing import stage, timings
from serve.workpool import Kept, PixelBudget

router = APIRouter(prefix="/v2", tags=["v2: Open Inference Protocol"])
HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")
# "A 200 status code indicates true and a 4xx status code indicates false" (KServe v2); Triton answers 400.
NOT_READY = 400
DATATYPE = "FP32"  # what every model's input takes (metadata, config and raw binary requests say so)


def _check_version(model: ServedModel, version: str | None) -> None:
    # Triton reads the path's version as an integer (std::stol): "01" is version 1. Only the path says a version: the
    # unversioned routes take none (a `?version=` query is ignored, as Triton ignores query strings there).
    if version is not None and not (version.isascii() and version.isdigit() and version.lstrip("0") == model.version):
        raise APIError(404, f"model {model.name!r} has no version {version[:40]!r} loaded; "
                            f"serving version {model.version}")


def _unbatched(model: ServedModel) -> bool:
    """Whether the model's config.pbtxt is Triton's layout without batching (max_batch_size 0: the dims carry the
    batch dimension)."""
    return model.config is not None and model.config.max_batch_size == 0


def _label_filename(model: ServedModel) -> str:
    """The output's label_filename as the config shows it: a repository model's own ("" without one: answers are
    "value:index"), and for a bundle the labels.txt that export.triton writes of the class names it answers with."""
    return model.label_filename if model.source is not None and model.source.repository else TRITON_LABELS_FILE


def _metadata(model: ServedModel) -> dict[str, Any]:
    m = model.manifest
    c, h, w = m.input.sample_shape
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": model.platform,
        "inputs": [{"name": m.input_name, "datatype": DATATYPE, "shape": [-1, c, h, w]}],
        "outputs": [{"name": m.output_name, "datatype": "FP32", "shape": [-1, len(model.labels)]}],
        # Where the served version came from (the bundle's provenance), as string parameters.
        "parameters": {k: v for k, v in model.provenance_labels().items() if v},
    }


def _readiness(schema: dict[str, Any], why_not: str) -> dict[int | str, dict[str, Any]]:
    """A readiness route's answers: 200 with `schema` when ready, NOT_READY with it when not (`why_not` says when)."""
    def answer(ready: bool) -> dict[str, Any]:
        return {"type": "object", **schema, "properties": {**schema["properties"], "ready": {"const": ready}}}

    return {200: {"description": "Ready", "content": {"application/json": {"schema": answer(True)}}},
            NOT_READY: {"description": f"Not ready ({why_not}): Triton's 400, with the same body", "content": {
                "application/json": {"schema": answer(False)}}}}


_READY = {"required": ["ready"], "properties": {}}
_MODEL_READY = {"required": ["name", "ready"], "properties": {"name": {"type": "string"}}}
_MODEL_NOT_READY = "the server starting or shutting down, or the model stalled"
# A model route's 404 on a versioned path (_check_version), besides the unversioned one's (deps.served).
_VERSION_NOT_SERVED = error_doc("Unknown model, one not loaded, or a version of it not served (the reason says which)")


@router.get("/health/live", summary="Liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Readiness: started and not shutting down; with strict readiness (the default), "
                                    "a model served, every loaded model accepting requests, and no model's last load "
                                    "failed",
            responses=_readiness(_READY, "starting or shutting down; with strict readiness, the default: no model "
                                         "served (every one unloaded), a loaded model stalled, or a model whose last "
                                         "load failed and that was not unloaded since"))
async def ready(request: Request, settings: SettingsDep) -> JSONResponse:
    # With strict readiness (the default) a server is not ready while a model is stalled, a model it knows serves
    # nothing for another reason than an unload (its load failed: serve.registry.unavailable_remedy, logged, says
    # the way back), or it serves no model at all: every one unloaded, it could only answer 404, and a probe that
    # kept it in its Service sent it traffic for nothing (Triton stays ready there; a pod can still be loaded into
    # at its own address).
    state = request.app.state
    ok = bool(state.ready) and (not settings.strict_readiness or (
        bool(state.models) and all(m.batcher and m.batcher.ready for m in state.models.values())
        and not state.repository.unavailable()))
    return JSONResponse({"ready": ok}, status_code=200 if ok else NOT_READY)


@router.get("", summary="Server metadata")
@router.get("/", include_in_schema=False)  # the path the protocol's OpenAPI document gives it
async def server_metadata() -> dict[str, Any]:
    return {"name": "vitc", "version": serve.__version__, "extensions": EXTENSIONS}


# Triton endpoints of extensions vitc does not serve (not in the metadata's extensions): a reason, not a bare 404.
_UNSERVED = {"systemsharedmemory": "system shared memory", "cudasharedmemory": "CUDA shared memory",
             "trace": "trace", "logging": "logging", "generate": "generate"}


@router.api_route("/systemsharedmemory/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
@router.api_route("/cudasharedmemory/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
@router.api_route("/trace/setting", methods=["GET", "POST"], include_in_schema=False)
@router.api_route("/models/{name}/trace/setting", methods=["GET", "POST"], include_in_schema=False)
@router.api_route("/logging", methods=["GET", "POST"], include_in_schema=False)
async def unserved_extension(request: Request) -> None:
    path = request.url.path  # by the route's own words, never a model name that happens to be one of them
    part = "trace" if path.endswith("/trace/setting") else path.split("/")[2]
    raise _unserved(part, "; send tensors in the request body" if "memory" in part else "")


# Triton's generate extension, on any model name as trace's per-model route: no lookup, the same 400 for every name.
@router.api_route("/models/{name}/generate", methods=["GET", "POST"], include_in_schema=False)
@router.api_route("/models/{name}/generate_stream", methods=["GET", "POST"], include_in_schema=False)
@router.api_route("/models/{name}/versions/{version}/generate", methods=["GET", "POST"], include_in_schema=False)
@router.api_route("/models/{name}/versions/{version}/generate_stream", methods=["GET", "POST"],
                  include_in_schema=False)
async def unserved_generate() -> None:
    raise _unserved("generate", "; send tensors to POST /v2/models/{name}/infer")


def _unserved(part: str, hint: str) -> APIError:
    """The 400 for an endpoint of the unserved extension `part` (a key of _UNSERVED), with a `hint` after it."""
    return APIError(400, f"vitc does not serve Triton's {_UNSERVED[part]} extension (GET /v2 lists the extensions it "
                         f"serves){hint}")


@router.get("/models/stats", summary="Statistics of every served model (statistics extension)")
async def all_stats(request: Request) -> dict[str, Any]:
    return {"model_stats": [m.stats.to_triton(m.name, m.version) for m in request.app.state.models.values()]}


# Each model route has a versioned twin (KServe v2's /v2/models/{name}[/versions/{version}]) that checks the path's
# version first: a handler apiece, so that the unversioned route takes no `version` parameter at all.
@router.get("/models/{name}", summary="Model metadata", responses={404: deps.NOT_SERVED})
async def model_metadata(model: ModelDep) -> dict[str, Any]:
    return _metadata(model)


@router.get("/models/{name}/versions/{version}", summary="Model metadata of one version",
            responses={404: _VERSION_NOT_SERVED})
async def version_metadata(model: ModelDep, version: str) -> dict[str, Any]:
    _check_version(model, version)
    return await model_metadata(model)


@router.get("/models/{name}/ready", summary="Model readiness",
            responses={**_readiness(_MODEL_READY, _MODEL_NOT_READY), 404: deps.NOT_SERVED})
async def model_ready(request: Request, model: ModelDep) -> JSONResponse:
    ok = deps.is_ready(request, model)
    return JSONResponse({"name": model.name, "ready": ok}, status_code=200 if ok else NOT_READY)


@router.get("/models/{name}/versions/{version}/ready", summary="Readiness of one version",
            responses={**_readiness(_MODEL_READY, _MODEL_NOT_READY), 404: _VERSION_NOT_SERVED})
async def version_ready(request: Request, model: ModelDep, version: str) -> JSONResponse:
    _check_version(model, version)
    return await model_ready(request, model)


@router.get("/models/{name}/stats", summary="Statistics of one model (statistics extension)",
            responses={404: deps.NOT_SERVED})
async def model_stats(model: ModelDep) -> dict[str, Any]:
    return {"model_stats": [model.stats.to_triton(model.name, model.version)]}


@router.get("/models/{name}/versions/{version}/stats", summary="Statistics of one version (statistics extension)",
            responses={404: _VERSION_NOT_SERVED})
async def version_stats(model: ModelDep, version: str) -> dict[str, Any]:
    _check_version(model, version)
    return await model_stats(model)


MAX_REPOSITORY_BODY = 64 * 1024  # {"ready": true} or {"parameters": {...}}: parsed on the event loop


async def _small_body(request: Request) -> bytes:
    """A repository request's body with its Content-Encoding undone as infer's is (gzip or deflate; another is a
    415); 413 past MAX_REPOSITORY_BODY, as sent or once inflated (parsing megabytes of JSON would stall the loop)."""
    encoding = deps.body_coding(request)  # before the body is read, as infer's
    body = await request.body()
    if len(body) > MAX_REPOSITORY_BODY:
        raise APIError(413, f"a repository request body is at most {MAX_REPOSITORY_BODY} bytes, got {len(body)}")
    return await deps.inflated(request, body, encoding, MAX_REPOSITORY_BODY)


def _repository_json(body: bytes, like: str) -> Any:
    """A repository request's JSON, read as infer reads it (serve.protocol.loads); 400 for what that refuses (NaN or
    Infinity; a repeated key, which Triton reads the first of and Python the last), and for a body that is not JSON:
    `like` says what to send."""
    try:
        return loads(body)
    except ProtocolError as exc:
        raise APIError(400, str(exc)) from None
    except RecursionError:
        raise APIError(400, f"{like}; it is nested too deeply") from None
    except ValueError as exc:  # invalid JSON, or an integer of more than 4300 digits
        raise APIError(400, f"{like}; it is not valid JSON: {short_reason(exc)}") from None


_INDEX_LIKE = 'the index request body must be a JSON object like {"ready": true}'


def _json_kind(value: Any) -> str:
    """What a JSON value is, for a reason that names what came instead of what was expected: a scalar with its value
    (a string's first 64 characters), a container by its kind alone (it may be 64 KiB)."""
    if isinstance(value, dict | list):
        return "an object" if isinstance(value, dict) else "an array"
    if isinstance(value, str):
        return f"the string {json.dumps(value[:64])}{'...' * (len(value) > 64)}"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return f"the number {str(value)[:64]}"


_PARAMETERS_LIKE = 'the request body must be a JSON object like {"parameters": {...}}'
_TOO_LARGE = error_doc(f"A body of more than {MAX_REPOSITORY_BODY} bytes, also once decompressed")
_UNSUPPORTED_CODING = error_doc("Unsupported Content-Encoding (gzip, deflate or identity are taken)")  # deps.inflated
_CORRUPT = "; a corrupt gzip or deflate body"


def _optional_body(description: str, properties: dict[str, Any]) -> dict[str, Any]:
    """A repository route's optional JSON body (openapi_extra): the server reads it whatever its Content-Type."""
    return {"requestBody": {"required": False, "description": description, "content": {"application/json": {
        "schema": {"type": "object", "properties": properties}}}}}


def _parameters(**own: dict[str, Any]) -> dict[str, Any]:
    """A load or unload body's `parameters`: the protocol's (string, number or boolean values), `own` the keys read."""
    return {"parameters": parameters_schema(own)}


_INDEX_ENTRY = {"type": "object", "required": ["name", "version", "state"], "properties": {
    "name": {"type": "string"}, "version": {"type": "string"}, "state": {"enum": ["READY", "UNAVAILABLE"]},
    "reason": {"type": "string", "description": "why it is not served (UNAVAILABLE only)"}}}
_DONE = {200: {"description": "Done", "content": {"application/json": {"schema": {"type": "object"}}}}}


@router.post("/repository/index", summary="Every model and version the server knows, with its state",
             responses={200: {"description": "The models and versions", "content": {"application/json": {
                 "schema": {"type": "array", "items": _INDEX_ENTRY}}}},
                 400: error_doc(f"A body that is not a JSON object with a boolean `ready`{_CORRUPT}"),
                 413: _TOO_LARGE, 415: _UNSUPPORTED_CODING, 503: deps.POOL_UNAVAILABLE},
             openapi_extra=_optional_body("Without one, every model the server knows", {"ready": {
                 "type": "boolean", "description": "true: only the versions ready to serve (default false)"}}))
async def repository_index(request: Request) -> JSONResponse:
    ready_only = False
    body = await _small_body(request)
    if body.strip():
        req = _repository_json(body, _INDEX_LIKE)
        if not isinstance(req, dict):
            raise APIError(400, f"{_INDEX_LIKE}, not {_json_kind(req)}")
        ready_only = req.get("ready", False)
        if not isinstance(ready_only, bool):
            raise APIError(400, f'the index request\'s "ready" must be a boolean (true or false), not '
                                f"{_json_kind(ready_only)}")
    # In the work pool: the walk lists up to MAX_LISTED model directories and looks into every version of each (a
    # second on a local disk for thousands, more on a network file system), and its answer may be megabytes of JSON;
    # on the event loop, every other request, liveness included, would wait for both.
    return await deps.off_loop(request, _index_answer, request.app.state.repository.snapshot(),
                               not request.app.state.ready, ready_only)


def _index_answer(repository: RepositoryView, shutting_down: bool, ready_only: bool) -> JSONResponse:
    """The repository index's answer: every entry, or the READY ones."""
    entries = repository.index()
    if shutting_down:  # the delay after SIGTERM: as the readiness endpoints say
        entries = [{**e, "state": "UNAVAILABLE", "reason": "the server is shutting down"} if e["state"] == "READY"
                   else e for e in entries]
    return JSONResponse([e for e in entries if e["state"] == "READY" or not ready_only])


async def _load_parameters(request: Request) -> dict[str, Any]:
    """The `parameters` of a repository load/unload body (empty or a JSON object of string, number or boolean
    values, as the protocol defines them); 400 when malformed."""
    body = await _small_body(request)
    if not body.strip():
        return {}
    req = _repository_json(body, _PARAMETERS_LIKE)
    if not isinstance(req, dict):
        raise APIError(400, f"{_PARAMETERS_LIKE}, not {_json_kind(req)}")
    params = req.get("parameters", {})
    if not isinstance(params, dict):
        raise APIError(400, f'the request\'s "parameters" must be a JSON object, not {_json_kind(params)}')
    try:
        check_parameters(params, "repository request")
    except ProtocolError as exc:
        raise APIError(400, str(exc)) from None
    return params


# Triton's status (UNAVAILABLE: 503) for a load or unload outside its explicit model control mode, and the start of
# its words (Triton's go on "if polling is enabled", which would mislead here: vitc never polls).
CONTROL_REFUSED = ("explicit model load / unload is not allowed if the model control mode is none: start the server "
                   "with --model-control-mode explicit (VITC_MODEL_CONTROL_MODE=explicit) to allow it")
_CONTROL_OFF = retry_doc("The model control mode is none (the default: load and unload are not allowed, no "
                         "Retry-After), or the work pool is full inflating a compressed body: retry after Retry-After")


def _model_control(request: Request) -> None:
    """APIError 503 unless the server lets clients load and unload models (--model-control-mode explicit); before
    the body is read."""
    if request.app.state.settings.model_control_mode != "explicit":
        raise APIError(503, CONTROL_REFUSED)


@router.post("/repository/models/{name}/load", summary="Load, or load again, a model (the version its config selects)",
             responses={**_DONE, 413: _TOO_LARGE, 415: _UNSUPPORTED_CODING, 400: error_doc(
                 "A malformed body or parameter, a \"config\" or \"file:\" parameter (not supported), or a model "
                 f"that could not be loaded (the reason says why){_CORRUPT}"),
                 # serve.app's ThreadsUnavailable and MemoryError handlers: the machine's limit, not the model's fault;
                 # and deps.off_loop's, where a compressed body is inflated.
                 503: retry_doc("The model control mode is none (the default: load and unload are not allowed, "
                                "no Retry-After), or the server could not start a thread the load needs (its thread "
                                "or pids limit), ran out of memory for the request, or found the work pool full "
                                "inflating a compressed body: retry after Retry-After")},
             openapi_extra=_optional_body("Triton's load request: no parameter changes what is loaded", _parameters(
                 config={"type": "string", "description": "Triton's configuration override: not supported (400); "
                                                          "edit the model's config.pbtxt and load it again"})))
async def repository_load(name: str, request: Request) -> JSONResponse:
    _model_control(request)
    params = await _load_parameters(request)
    if "config" in params or any(str(k).startswith("file:") for k in params):
        # Triton's override of the configuration (or files) in the request: vitc reads the repository's own
        # config.pbtxt instead, so say so rather than load something other than what was asked for.
        raise APIError(400, "a load with a \"config\" or \"file:\" parameter is not supported: edit the model's "
                            "config.pbtxt in the repository and load it again")
    try:
        await request.app.state.repository.load(name)
    except LoadError as exc:
        raise APIError(400, str(exc)) from None
    return JSONResponse({})


@router.post("/repository/models/{name}/unload",
             summary="Stop serving a model (requests in progress finish; one that is not loaded, or a name the "
                     "server does not know, stays so: success)",
             responses={**_DONE, 413: _TOO_LARGE, 415: _UNSUPPORTED_CODING, 400: error_doc(
                 "A malformed body or parameter (unload_dependents not a boolean), or a name no model can have"
                 f"{_CORRUPT}"), 503: _CONTROL_OFF},  # also deps.off_loop's, inflating a compressed body
             openapi_extra=_optional_body("Triton's unload request", _parameters(unload_dependents={
                 "type": "boolean", "description": "vitc models have no dependents: checked, nothing more"})))
async def repository_unload(name: str, request: Request) -> JSONResponse:
    _model_control(request)
    # unload_dependents: vitc models have no dependents, but a value Triton cannot read is refused as Triton does.
    if not isinstance((await _load_parameters(request)).get("unload_dependents", False), bool):
        raise APIError(400, "parameters.unload_dependents must be true or false")
    try:
        await request.app.state.repository.unload(name)
    except LoadError as exc:
        raise APIError(400, str(exc)) from None
    return JSONResponse({})


@router.get("/models/{name}/config", summary="Triton-style model configuration",
            responses={404: deps.NOT_SERVED})
async def model_config(model: ModelDep, settings: SettingsDep) -> dict[str, Any]:
    m = model.manifest
    c, h, w = m.input.sample_shape
    # Triton's layout without batching (max_batch_size 0): the dims carry the batch dimension, and no format
    # (Triton allows FORMAT_NCHW on three dims only).
    unbatched = _unbatched(model)
    tensor = {"dims": [-1, c, h, w]} if unbatched else {"format": "FORMAT_NCHW", "dims": [c, h, w]}
    return {
        "name": model.name,
        "platform": model.platform,
        # As Triton's config carries it, and as a config.pbtxt needs it to load (a platform without its backend is
        # refused for OpenVINO); "" for a runtime Triton has no backend for.
        "backend": model.triton_backend,
        # The largest batch a request may carry: more images than --max-queue-size can never be admitted (413).
        "max_batch_size": 0 if unbatched else model.largest_request,
        "input": [{"name": m.input_name, "data_type": "TYPE_FP32", **tensor}],
        "output": [{"name": m.output_name, "data_type": "TYPE_FP32",
                    "dims": [-1, len(model.labels)] if unbatched else [len(model.labels)],
                    "label_filename": _label_filename(model)}],
        # What is applied: a config.pbtxt without dynamic_batching batches nothing (each request runs alone).
        **({"dynamic_batching": {"max_queue_delay_microseconds": round(1000 * (
            settings.max_queue_delay_ms if model.queue_delay_ms is None else model.queue_delay_ms))}}
           if model.batcher is None or model.batcher.merge else {}),
        # vitc serves one version per model: the one the policy selects (see models.tritonconfig.VersionPolicy).
        "version_policy": (model.config.version_policy if model.config else VersionPolicy()).applied(model.version),
        "instance_group": [{"kind": "KIND_CPU" if model.backend.device == "cpu" else "KIND_GPU",
                            "count": model.batcher.parallel if model.batcher else 1}],
        "parameters": {"precision": {"string_value": model.backend.precision},
                       **{k: {"string_value": v} for k, v in model.backend_parameters.items()}},
    }


@router.get("/models/{name}/versions/{version}/config", summary="Triton-style configuration of one version",
            responses={404: _VERSION_NOT_SERVED})
async def version_config(model: ModelDep, settings: SettingsDep, version: str) -> dict[str, Any]:
    _check_version(model, version)
    return await model_config(model, settings)


def _model_input(model: ServedModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The one FP32 (B, C, H, W) input the model takes, checked against its metadata."""
    name, want = model.manifest.input_name, model.manifest.input.sample_shape
    if set(inputs) != {name}:
        raise APIError(400, f"model {model.name!r} takes one input {name!r}, got {sorted(inputs)}")
    x = inputs[name]
    if x.dtype != np.float32:  # the parser refuses it first when it is told the model's datatypes: the same words
        raise APIError(400, str(wrong_datatype(name, DATATYPE, datatype_name(x.dtype))))
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        expected = [-1, *want]
        raise APIError(400, f"input {name!r} has shape {list(x.shape)}, expected {expected}")
    if not 1 <= x.shape[0] <= model.max_batch:
        # The bound the config advertises; more than the queue's bound but within the batch is admission's 413.
        raise APIError(400, f"batch size {x.shape[0]} is outside 1..{model.largest_request} for model "
                            f"{model.name!r}")
    return np.ascontiguousarray(x)


def json_containers(model: ServedModel) -> int:
    """The JSON arrays and objects any request for `model` may hold: its largest batch nested as [B][C][H][W], plus
    room for shapes, outputs and parameters; a larger body may hold one per BYTES_PER_CONTAINER bytes
    (serve.protocol.container_bound). More is refused before it is parsed (16 MiB of `[],` became 650 MB of Python
    lists)."""
    c, h, _ = model.manifest.input.sample_shape
    return 1 + model.max_batch * (1 + c * (1 + h)) + 4096


# The limits serve.protocol's parser enforces (400 past them), declared from the same constants.
_TENSOR = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string", "example": "input"},
    "shape": {"type": "array", "maxItems": MAX_DIMS, "items": {"type": "integer", "minimum": 0, "maximum": MAX_DIM},
              "example": [1, 3, 32, 32]},
    "datatype": {"type": "string", "example": "FP32"},
    "parameters": {**parameters_schema({"binary_data_size": {"type": "integer", "minimum": 0}}),
                   "description": "binary_data_size: the tensor's bytes follow the JSON header"},
    "data": {"type": "array", "items": {}, "description": "row-major values, flat or nested"}}}
_ANSWER = {"type": "object", "required": ["model_name", "model_version", "outputs"], "properties": {
    "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
    "outputs": {"type": "array", "items": {
        "type": "object", "required": ["name", "datatype", "shape"], "properties": {
            "name": {"type": "string"}, "datatype": {"type": "string", "example": "FP32"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "parameters": {"type": "object", "description": "binary_data_size: the output's bytes follow the JSON"},
            "data": {"type": "array", "items": {}, "description": "row-major values (absent when in binary)"}}}}}}
_INFER_DOC = {"responses": {"200": {
    "description": "The outputs: JSON, or with any output in binary (binary_data, binary_data_output, or a raw "
                   "request) the JSON header followed by the outputs' bytes",
    "headers": {HEADER_LENGTH: {"description": "application/octet-stream answers only: the JSON header's length in "
                                               "bytes (before any Content-Encoding)", "schema": {"type": "integer"}}},
    "content": {"application/json": {"schema": _ANSWER}, "application/octet-stream": {"schema": {
        "type": "string", "format": "binary", "description": "the JSON header (as application/json; its length in "
                                                             f"{HEADER_LENGTH}), then each binary output's bytes"}}},
}}, "requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string", "maxLength": MAX_ID_CHARS}, "parameters": request_parameters_schema(),
        "inputs": {"type": "array", "items": _TENSOR},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "example": "logits"}, "parameters": parameters_schema({
                "binary_data": {"type": "boolean"},
                "classification": {"type": "integer", "minimum": 0, "maximum": INT64_MAX, "description":
                                   "the top k outputs as strings (0: the tensor itself)"}})}}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description":
                                            "Triton's binary tensor extension: the JSON header (its length in the "
                                            "Inference-Header-Content-Length header), then the tensors' bytes; "
                                            "with a length of 0, only the input's FP32 bytes, a batch of one "
                                            "(every output is answered in binary)"}},
}}}


# What infer answers besides 200, each as its checks here, serve.protocol's and deps' give it.
_INFER_ERRORS: dict[int | str, dict[str, Any]] = {
    400: error_doc("A malformed request (its JSON, binary tensor data or Inference-Header-Content-Length; a corrupt "
                   "gzip or deflate body), an input or output the model does not have, a wrong datatype, shape or "
                   "batch size, a parameter of the wrong type, or a classification whose rows x count passes the "
                   "ranked entries an answer may hold"),
    404: deps.NOT_SERVED,
    413: error_doc("Body too large (--max-body-bytes, also once decompressed), or more rows than --max-queue-size"),
    415: _UNSUPPORTED_CODING,
    422: error_doc("Outputs that are not finite for this input"),
    500: deps.RUNTIME_FAILED,
    503: deps.INFERENCE_UNAVAILABLE,
    504: deps.TIMED_OUT,
}


def _parse(budget: PixelBudget, body: bytes, header: str | None, containers: int | None,
           raw_input: tuple[str, tuple[int, ...]], datatypes: dict[str, str] | None = None) -> InferRequest:
    """parse_request, holding its memory (up to 20x the JSON's size) in the decode budget as images hold theirs:
    concurrent large JSON tensors wait or get 503 instead of taking the server past its memory."""
    pixels = -(-parse_memory(len(body), header) // BUDGET_PIXEL_BYTES)
    with budget.reserve(min(pixels, budget.pixels)):  # one body alone always parses, as one image decodes alone
        return parse_request(body, header, containers, raw_input, datatypes)


@router.post("/models/{name}/infer", summary="Inference (JSON or binary tensors)", responses=_INFER_ERRORS,
             openapi_extra=_INFER_DOC)
async def model_infer(request: Request, name: str) -> Response:
    return await _model_infer(request, name, None)


# Named as the unversioned route's handler, as it was when they shared it: its operationId stays the same.
@router.post("/models/{name}/versions/{version}/infer", summary="Inference on one version",
             responses={**_INFER_ERRORS, 404: _VERSION_NOT_SERVED}, openapi_extra=_INFER_DOC, name="model_infer")
async def version_infer(request: Request, name: str, version: str) -> Response:
    return await _model_infer(request, name, version)


async def _model_infer(request: Request, name: str, version: str | None) -> Response:
    """An inference request for the model `name` (at `version` when the path names one)."""
    settings: Settings = request.app.state.settings
    _check_version(deps.served(request, name), version)  # refused before the upload when it cannot be served
    lengths = set(request.headers.getlist(HEADER_LENGTH))
    if len(lengths) > 1:
        raise APIError(400, f"{HEADER_LENGTH} is given {len(lengths)} times with different values")
    # What the headers alone refuse is told before the body is asked for (`100 Continue`) and read.
    encoding = deps.body_coding(request)
    try:
        for value in lengths:
            header_length_digits(value)
    except ProtocolError as exc:
        raise APIError(exc.status, str(exc)) from None
    with stage(request, "receive"):
        body = await request.body()
    try:
        with stage(request, "decode"):
            model = deps.served(request, name)
            if encoding != "identity":  # inflated in the work pool: not at all once its client has gone
                body = await deps.unless_gone(
                    request, model, deps.inflated(request, body, encoding, settings.max_body_bytes), "decoding")
            header_length = next(iter(lengths), None)
            with deps.load_refusals_recorded(model):  # a 503 (pool full) is a failure, as in /v1's decode
                # Watched: a parse not yet started when its client goes is never run, its pool place freed.
                parsed = await deps.unless_gone(request, model, deps.off_loop(
                    request, _parse, request.app.state.pixel_budget, body, header_length, json_containers(model),
                    (model.manifest.input_name, (-1 if _unbatched(model) else 1, *model.manifest.input.sample_shape)),
                    {model.manifest.input_name: DATATYPE}, cheap=_cheap_parse(body, header_length)), "decoding")
    except ProtocolError as exc:
        raise APIError(exc.status, str(exc), exc.headers) from None
    # The version served now: a reload or unload during the upload does not wait for it (it holds no version
    # until admitted), and it runs on the new version, or is told the model is gone.
    model = deps.served(request, name)
    _check_version(model, version)
    return await _infer(request, model, parsed)


# A body parsed in well under a millisecond, which the event loop parses itself when the work pool is idle (two
# thread hand-offs cost more: 0.12-0.15 ms of a 3.5 ms binary request, measured): JSON of at most 16 KiB (Python's
# json reads FP32 lists at about 50 MB/s) and binary tensor data of at most 1 MiB (one copy).
_CHEAP_JSON_BYTES, _CHEAP_BODY_BYTES = 16 * 1024, 1024 * 1024


def _cheap_parse(body: bytes, header_length: str | None) -> bool:
    """Whether parsing `body` (its JSON part `header_length` bytes long, or all of it) is cheap."""
    json_bytes = len(body) if header_length is None else int(header_length_digits(header_length)[:8])
    return json_bytes <= _CHEAP_JSON_BYTES and len(body) <= _CHEAP_BODY_BYTES


async def _infer(request: Request, model: ServedModel, parsed: InferRequest) -> Response:
    x = _model_input(model, parsed.inputs)
    requested, output = parsed.outputs or [], model.manifest.output_name
    for out in requested:
        if out.name != output:
            raise APIError(400, f"model {model.name!r} has no output {out.name[:128]!r}; outputs: {output}")
    # Without Triton batching (max_batch_size 0) the batch is part of the tensor, as in Triton: the request is one
    # inference, and classification ranks the whole output, indices running over it (shape [k], not [B, k]).
    unbatched = _unbatched(model)
    spec = requested[0] if requested else None
    binary = parsed.binary_output if spec is None or spec.binary is None else spec.binary
    k = spec.classification if spec is not None else 0
    rows, size = (1, x.shape[0] * len(model.labels)) if unbatched else (x.shape[0], len(model.labels))
    if k:
        _bounded_answer(rows, k, size)  # before it is inferred
    with deps.recorded(model, 1 if unbatched else x.shape[0]) as spent:
        with deps.admission(model, x.shape[0]):
            deps.gone_already(request, model, "queued")
            work = deps.submit(model, x, timings(request), spent)
            logits = deps.finite_output(model, await deps.unless_gone(request, model, work))
        # Counted too: a large answer built in the work pool may find it full (503), or its client gone while it
        # is built (a disconnect: Triton's CANCELED), and that is no success.
        with stage(request, "encode"):
            # Ranked answers cost their entries and the sort of every value; FP32 in JSON a Python number and its
            # text each; FP32 in binary one copy of the tensor (on the loop).
            cost = (deps.answer_work(rows * min(k, size), rows * size) if k else
                    0 if binary else deps.answer_work(logits.size))
            (content, headers, media), kept = await deps.answered(
                request, model, cost,
                lambda budget: _encoded(budget, model, parsed.id, logits, k, binary, unbatched))
            try:  # a large answer's memory stays held while it is compressed, then while it is sent
                content = await _compressed(request, content, headers)
            except BaseException:
                if kept is not None:
                    kept.release()
                raise
            return deps.held_response(content, kept, media, headers)


def _bounded_answer(rows: int, k: int, size: int) -> None:
    """400 when ranking `k` of each row's `size` outputs (a larger `k` ranks them all) would answer more than
    MAX_RANKED entries."""
    n = rows * min(k, size)
    if n > deps.MAX_RANKED:
        shown = str(k) if k <= size else f"{k} (clamped to the output's {size:,})"
        raise APIError(400, f"the answer would rank {rows} row{'s' * (rows != 1)} x classification {shown} = {n:,} "
                            f"entries; at most {deps.MAX_RANKED:,} per request: send fewer rows per request, a "
                            "smaller classification, or ask for the raw FP32 output (no classification) and rank it "
                            "yourself")


def _encoded(budget: Kept | None, model: ServedModel, request_id: str | None, logits: np.ndarray, k: int,
             binary: bool, unbatched: bool) -> tuple[bytes, dict[str, str], str]:
    """encode_response of the model's output (its top `k` strings when k > 0), its memory held in `budget` (None: a
    small answer, nothing held)."""
    output = model.manifest.output_name
    if not k:
        tensor = OutputTensor(output, "FP32", logits, binary)
        with deps.answer_memory(budget, lambda: 0 if binary else logits.size * deps.ANSWER_BYTES_PER_JSON_VALUE):
            return encode_response(model.name, model.version, request_id, [tensor])
    ranked = logits.reshape(1, -1) if unbatched else logits
    order, labels = classification_order(ranked, k), model.classification_labels or []
    named = (labels[i] for i in order.ravel().tolist() if i < len(labels))
    with deps.answer_memory(budget, lambda: deps.ranked_memory(order.size, named)):
        top = classification_strings(ranked, k, labels, order)
        tensor = OutputTensor(output, "BYTES", top.reshape(-1) if unbatched else top, binary)
        return encode_response(model.name, model.version, request_id, [tensor])


INLINE_COMPRESSION = 64 * 1024  # an answer up to this size is compressed on the loop when the work pool is idle


async def _compressed(request: Request, content: bytes, headers: dict[str, str]) -> bytes:
    """The answer in the content coding its Accept-Encoding asks for (gzip or deflate, as Triton answers), with its
    headers set; as it is otherwise, or when the work pool cannot compress it now. Inference-Header-Content-Length
    still counts the uncompressed JSON header (tritonclient decompresses before it splits the body, as Triton's
    answers need)."""
    headers["Vary"] = "Accept-Encoding"
    coding = answer_coding(", ".join(request.headers.getlist("accept-encoding")))
    if coding is None:
        return content
    try:
        packed = await deps.off_loop(request, compress, content, coding, cheap=len(content) <= INLINE_COMPRESSION)
    except APIError as exc:
        # The pool is full, or has no memory or thread for the job (off_loop's 503s). The answer is computed and
        # counted a success: a 503 would have the client compute it again. Identity is a coding every client takes.
        if exc.status != 503:
            raise
        return content
    headers["Content-Encoding"] = coding
    return packed
