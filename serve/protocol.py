"""Open Inference Protocol (KServe v2) tensors over HTTP: JSON and Triton's binary tensor extension.

A request body is a JSON object, optionally followed by raw little-endian tensor bytes; the
`Inference-Header-Content-Length` header then gives the JSON's length, and each binary input says its size
in `parameters.binary_data_size`. Outputs are returned as binary when asked (`binary_data_output` on the
request or `binary_data` on an output), JSON otherwise; `classification: k` returns Triton's top-k strings.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DTYPES: dict[str, np.dtype] = {
    name: np.dtype(t).newbyteorder("<")
    for name, t in {
        "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
        "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
        "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    }.items()
}
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration"]


class ProtocolError(ValueError):
    """A malformed inference request (HTTP 400), or one over a size limit (`status` 413)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None
    classification: int = 0


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None  # None: every output
    binary_output: bool = False


@dataclass
class OutputTensor:
    name: str
    datatype: str
    data: np.ndarray  # numeric, or an object array of bytes for BYTES
    binary: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a gzip/deflate Content-Encoding without ever inflating past `limit` bytes."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise ProtocolError(f"unsupported Content-Encoding {encoding!r} (gzip, deflate or identity)", 415)
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"corrupt {encoding} body: {exc}") from None
    if len(out) > limit:
        raise ProtocolError(f"decompressed body is larger than the limit of {limit} bytes", 413)
    if not d.eof:
        raise ProtocolError(f"truncated {encoding} body")
    return out


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """Body (+ Inference-Header-Content-Length) -> InferRequest; raises ProtocolError with a reason."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {n} is outside the body of {len(body)} bytes")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"request is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("request must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("request needs a non-empty 'inputs' list")
    params = _params(doc, "request")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in raw_inputs:
        name, arr, used = _parse_input(spec, binary, offset)
        if name in inputs:
            raise ProtocolError(f"input {name!r} appears twice")
        inputs[name] = arr
        offset += used
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise ProtocolError("'outputs' must be a list")
        outputs = [_parse_output(o) for o in doc["outputs"]]
    rid = doc.get("id")
    return InferRequest(None if rid is None else str(rid), inputs, outputs, bool(params.get("binary_data_output")))


def _params(obj: dict, what: str) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(f"{what} 'parameters' must be an object")
    return params


def _parse_input(spec: Any, binary: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ProtocolError("every input needs a 'name'")
    name = spec["name"]
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    datatype = spec.get("datatype")
    if datatype not in DTYPES:
        raise ProtocolError(f"input {name!r}: unsupported datatype {datatype!r}; supported: {', '.join(DTYPES)}")
    dtype = DTYPES[datatype]
    count = math.prod(shape)
    params = _params(spec, f"input {name!r}")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != count * dtype.itemsize:
            raise ProtocolError(f"input {name!r}: binary_data_size {size!r} != {count} x {dtype.itemsize} bytes")
        if offset + size > len(binary):
            raise ProtocolError(f"input {name!r}: binary data ends after {len(binary) - offset} of {size} bytes")
        arr = np.frombuffer(binary[offset:offset + size], dtype).astype(dtype.newbyteorder("="), copy=True)
        return name, arr.reshape(shape), size
    if "data" not in spec:
        raise ProtocolError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    try:
        arr = np.asarray(spec["data"], dtype=dtype.newbyteorder("="))
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"input {name!r}: data is not {datatype}: {exc}") from None
    if arr.size != count:
        raise ProtocolError(f"input {name!r}: {arr.size} values for shape {shape} ({count} expected)")
    return name, arr.reshape(shape), 0


def _parse_output(spec: Any) -> RequestedOutput:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ProtocolError("every requested output needs a 'name'")
    params = _params(spec, f"output {spec['name']!r}")
    k = params.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ProtocolError(f"output {spec['name']!r}: classification must be a non-negative integer")
    binary = params.get("binary_data")
    return RequestedOutput(spec["name"], None if binary is None else bool(binary), k)


def classification_strings(logits: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Triton's classification extension: (B, k) "value:index:label" for the k highest outputs per row."""
    k = min(k, logits.shape[1])
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    rows = [[f"{logits[b, i]:f}:{i}:{labels[i]}".encode() for i in order[b]] for b in range(logits.shape[0])]
    return np.array(rows, dtype=object).reshape(logits.shape[0], k)


def _to_bytes(t: OutputTensor) -> bytes:
    if t.datatype == "BYTES":
        return b"".join(len(v).to_bytes(4, "little") + v for v in t.data.ravel())
    return np.ascontiguousarray(t.data, DTYPES[t.datatype]).tobytes()


def encode_response(model: str, version: str, request_id: str | None,
                    outputs: list[OutputTensor]) -> tuple[bytes, dict[str, str], str]:
    """(body, extra headers, media type) for an inference response."""
    entries, blobs = [], []
    for t in outputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.data.shape)}
        params = dict(t.parameters)
        if t.binary:
            raw = _to_bytes(t)
            params["binary_data_size"] = len(raw)
            blobs.append(raw)
        elif t.datatype == "BYTES":
            entry["data"] = [v.decode("utf-8", "replace") for v in t.data.ravel()]
        else:
            entry["data"] = t.data.ravel().tolist()
        if params:
            entry["parameters"] = params
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if request_id is not None:
        doc["id"] = request_id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, {}, "application/json"
    return head + b"".join(blobs), {HEADER_LENGTH: str(len(head))}, "application/octet-stream"
