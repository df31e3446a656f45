"""Open Inference Protocol (KServe v2) tensors over HTTP: JSON and Triton's binary tensor extension.

A request body is a JSON object, optionally followed by raw little-endian tensor bytes; the
`Inference-Header-Content-Length` header then gives the JSON's length, and each binary input says its size
in `parameters.binary_data_size`. A header of 0 is Triton's raw binary request: the whole body is the one
input's tensor, a batch of one, and every output is answered in binary. Outputs are returned as binary when
asked (`binary_data_output` on the request or `binary_data` on an output), JSON otherwise; `classification: k`
returns Triton's top-k strings.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.io import constant_refuser, unique_keys_hook
from models.jsonfields import is_int
from models.oneline import first_line

DTYPES: dict[str, np.dtype] = {
    name: np.dtype(t).newbyteorder("<")
    for name, t in {
        "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
        "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
        "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    }.items()
}
HEADER_LENGTH = "Inference-Header-Content-Length"
NO_SHARED_MEMORY = ("vitc does not serve Triton's shared memory extensions (no region is registered; see the "
                    "server metadata's extensions)")
# Triton reads `classification` as an int64 and clamps it to the output's size, so any count in that range is asked
# for (nothing is allocated by it: classification_strings takes the smaller of it and the output's size).
INT64_MAX = (1 << 63) - 1
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics"]


class ProtocolError(ValueError):
    """A malformed inference request (HTTP 400), or one over a size limit (`status` 413)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status

    @property
    def headers(self) -> dict[str, str]:
        """What the answer carries besides the reason: the codings accepted, for an unsupported one."""
        return {"Accept-Encoding": ACCEPTED_CODINGS} if self.status == 415 else {}


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


ACCEPTED_CODINGS = "gzip, deflate"  # Content-Encodings of request bodies (besides identity)
MAX_GZIP_MEMBERS = 16  # each member costs a copy of what follows it (zlib's unused_data): n members cost n x body


_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def content_coding(encoding: str | None) -> str:
    """The Content-Encoding `encoding` as one coding ("identity", "gzip" or "deflate"); ProtocolError 415 for any
    other, which the header alone tells (checked before the body is read)."""
    # A list whose empty elements are ignored, as RFC 9110 5.6.1.2 requires ("gzip," and ", gzip" are gzip); more
    # than one coding is refused below as the list it is.
    codings = [c.strip() for c in (encoding or "").lower().split(",", MAX_GZIP_MEMBERS)]
    encoding = ", ".join(c for c in codings if c) or "identity"
    encoding = {"x-gzip": "gzip"}.get(encoding, encoding)  # RFC 9110 8.4.1.3: the same coding
    if encoding != "identity" and encoding not in _WBITS:
        raise ProtocolError(f"unsupported Content-Encoding {encoding!r} (gzip, deflate or identity)", 415)
    return encoding


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a gzip/deflate Content-Encoding without ever inflating past `limit` bytes."""
    encoding = content_coding(encoding)
    if encoding == "identity":
        return body
    wbits = _WBITS[encoding]
    parts: list[bytes] = []
    size, rest = 0, body
    for _ in range(MAX_GZIP_MEMBERS):  # gzip allows members back to back (RFC 1952); each within what is left
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(rest, limit - size + 1)
        except zlib.error as exc:
            raise ProtocolError(f"corrupt {encoding} body: {exc}") from None
        size += len(out)
        if size > limit:
            raise ProtocolError(f"decompressed body is larger than the limit of {limit} bytes", 413)
        if not d.eof:
            raise ProtocolError(f"truncated {encoding} body")
        parts.append(out)
        rest = d.unused_data
        if not rest:
            return b"".join(parts)
        if encoding != "gzip" or not rest.startswith(b"\x1f\x8b"):
            raise ProtocolError(f"{len(rest)} bytes of junk after the {encoding} body")
    raise ProtocolError(f"the gzip body has more than {MAX_GZIP_MEMBERS} members")


# Content-Encodings an answer is sent in when the client's Accept-Encoding asks (as Triton's HTTP server): "deflate"
# is the zlib format, as tritonclient's response_compression_algorithm decodes it (and RFC 9110 defines it).
_ANSWER_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def answer_coding(accept_encoding: str | None) -> str | None:
    """The coding ("gzip" or "deflate") an answer is compressed with for `Accept-Encoding`, None to send it as is:
    the acceptable one of the higher q-value, gzip on a tie; none that the client weighs below identity."""
    weights: dict[str, float] = {}
    for item in (accept_encoding or "").lower().split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        q = _q_value(params)
        if coding and q is not None:
            weights.setdefault({"x-gzip": "gzip"}.get(coding, coding), q)  # RFC 9110 8.4.1.3: the same coding
    anything = weights.get("*", 0.0)  # "*": any coding not named
    identity = weights.get("identity", 0.0)
    best = max(("gzip", "deflate"), key=lambda c: weights.get(c, anything))  # max keeps the first of equals: gzip
    q = weights.get(best, anything)
    return best if q > 0 and q >= identity else None


def _q_value(params: list[str]) -> float | None:
    """The q-value of one Accept-Encoding item's parameters (1 without one); None when it is malformed."""
    q = 1.0
    for param in params:
        key, _, value = param.partition("=")
        if key.strip() != "q":
            continue
        try:
            q = float(value.strip())
        except ValueError:
            return None
        if not 0 <= q <= 1:  # NaN too
            return None
    return q


def compress(body: bytes, coding: str) -> bytes:
    """`body` in the content coding `coding` ("gzip" or "deflate"), at zlib's default level (as Triton)."""
    c = zlib.compressobj(wbits=_ANSWER_WBITS[coding])
    return c.compress(body) + c.flush()


MAX_DIMS = 8  # a tensor shape with more dimensions is refused before anything is allocated for it
MAX_DIM = 1 << 31
# The spec bounds no `id` and says it must be returned (Triton takes any string the body limit allows); this bound
# only keeps an id to the size of a request's headers, far beyond any UUID or trace id.
MAX_ID_CHARS = 65_536
MAX_HEADER_DIGITS = 20  # more than any body's length has (int() of 4,300 digits raises)
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


_refuse_constant = constant_refuser(
    lambda name: ProtocolError(f"{name} is not a number in JSON (non-finite values are refused)"))


def _json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words."""
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", dict: "an object", list: "a list"}.get(type(value), "a number")


# Python would keep a repeated key's last value and Triton its first, so the same body would mean two things.
unique_keys = unique_keys_hook(lambda key: ProtocolError(f"request JSON repeats the key {key[:64]!r} in one object"))


def loads(text: bytes) -> Any:
    """JSON as the server reads a request body: NaN, Infinity and a repeated key are refused (ProtocolError); invalid
    JSON and integer literals past Python's 4300 digits raise ValueError, nesting past the parser's RecursionError."""
    return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=unique_keys)


def parse_request(body: bytes, header_length: str | None, max_containers: int | None = None,
                  raw_input: tuple[str, tuple[int, ...]] | None = None,
                  datatypes: Mapping[str, str] | None = None) -> InferRequest:
    """Body (+ Inference-Header-Content-Length) -> InferRequest; raises ProtocolError with a reason."""
    # Everything a hostile body can do is a 4xx: invalid or deeply nested JSON, more arrays and objects than a
    # request for the model holds (`max_containers`, the model's own bound: see container_bound), numbers beyond
    # every float, integer literals too long to convert, NaN/Infinity, shapes with too many or too large
    # dimensions, values out of their datatype's range, non-finite floats in binary data. `datatypes` names the
    # datatype each of the model's inputs takes: another is refused naming both, before its data is read.
    n = _header_length(header_length, len(body))
    # A header of 0 is a raw binary request for the model's one FP32 input `raw_input` (name, shape of a batch of one).
    if n == 0:
        if raw_input is None:
            raise ProtocolError(f"a raw binary request ({HEADER_LENGTH}: 0) needs a model with one input")
        return _parse_raw(body, *raw_input)
    head, binary = (body, memoryview(b"")) if n is None else (body[:n], memoryview(body)[n:])
    # Counted before parsing: each costs a Python object many times its bytes of JSON.
    bound = None if max_containers is None else container_bound(len(head), max_containers)
    if bound is not None and (containers := count_containers(head, bound)) > bound:
        raise ProtocolError(f"request JSON holds {containers} arrays and objects; a request of {len(head)} bytes "
                            f"holds at most {bound}: send 'data' flat or nested as its shape, or nested otherwise "
                            f"with at most one list per {BYTES_PER_CONTAINER} bytes of JSON (a list per value takes "
                            f"values of {BYTES_PER_CONTAINER - 3} characters or more)")
    try:
        doc = loads(head)
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError("request JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and integers beyond 4300 digits
        end = _json_end(head, exc)
        if end is not None:  # a binary-extension body sent without its header, or with a wrong one
            raise ProtocolError(f"the body continues after the JSON at byte {end}: to send binary tensor data "
                                f"after the JSON, send {HEADER_LENGTH}: {end}"
                                + ("" if n is None else f" (not {n})")) from None
        if n is not None and (end := _cut_json_end(body, n, bound)) is not None:
            raise ProtocolError(f"{HEADER_LENGTH} {n} ends inside the JSON, which ends at byte {end}: send "
                                f"{HEADER_LENGTH}: {end}") from None
        raise ProtocolError(f"request is not valid JSON: {short_reason(exc)}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("request must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("request needs a non-empty 'inputs' list")
    params = _request_params(doc)
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in raw_inputs:
        name, arr, used = _parse_input(spec, binary, offset, datatypes or {})
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
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            raise ProtocolError("an output is requested twice")
    rid = doc.get("id")
    if rid is not None and (not isinstance(rid, str) or len(rid) > MAX_ID_CHARS):
        raise ProtocolError(f"'id' must be a string of at most {MAX_ID_CHARS} characters")
    return InferRequest(rid, inputs, outputs, params.get("binary_data_output", False))


# Peak memory of parsing, per byte of request: JSON numbers become a Python object and a list slot each, then a
# numpy array (measured: "0.1," 11x, nested [0,0,0] rows 19x); binary tensor data is copied once or twice.
JSON_MEMORY_PER_BYTE = 20
BINARY_MEMORY_PER_BYTE = 2
# A JSON array or object costs far more than its bytes (`{"":0},` about 200 bytes for 7, `[0],` about 100 for 4),
# so a request may hold one per BYTES_PER_CONTAINER bytes of JSON, and never fewer than its model's own bound (its
# largest batch nested as its shape). That keeps the dearest body within JSON_MEMORY_PER_BYTE (measured peak RSS
# for 16 MiB of `{"":0},` at the bound and numbers: 19x; at 12 bytes: 22x), and takes a list per value written
# as Python writes a float32 (`[0.6369616985321045],`). One list per value of the model's largest batch would have
# admitted 16 MiB of `[0],`: 29x.
BYTES_PER_CONTAINER = 16
_QUOTE, _BRACKET, _BRACE = b'"'[0], b"["[0], b"{"[0]


def container_bound(json_bytes: int, fixed: int) -> int:
    """The most JSON arrays and objects read in `json_bytes` of a request's JSON: one per BYTES_PER_CONTAINER
    bytes, and never fewer than `fixed` (the model's bound)."""
    return max(fixed, json_bytes // BYTES_PER_CONTAINER)


def count_containers(text: bytes, bound: int) -> int:
    """The JSON arrays and objects `text` opens (`[` and `{` outside strings), read exactly when more than `bound`
    brackets are in it; at most `bound` brackets in all need no reading."""
    brackets = text.count(b"[") + text.count(b"{")
    if brackets <= bound:
        return brackets
    if json.detect_encoding(text) not in ("utf-8", "utf-8-sig"):  # UTF-16/32: every bracket byte, never too few
        return brackets
    # An escape is a backslash and the byte after it, paired left to right as JSON reads them: dropping `\\`,
    # then `\"`, leaves only the quotes that open or close a string. Whatever follows a byte JSON refuses is
    # never parsed, so a count that goes wrong past it costs nothing. Vectorised: a byte loop in Python would take
    # a minute over a 100 MB header.
    codes = np.frombuffer(text.replace(b"\\\\", b"").replace(b'\\"', b""), np.uint8)
    outside = (np.cumsum(codes == _QUOTE, dtype=np.uint8) & 1) == 0  # an even number of quotes so far (mod 256)
    return int(np.count_nonzero(((codes == _BRACKET) | (codes == _BRACE)) & outside))


def parse_memory(body_size: int, header_length: str | None) -> int:
    """The most memory (bytes) `parse_request` can take for a body of `body_size` bytes; ProtocolError when the
    Inference-Header-Content-Length is malformed."""
    n = _header_length(header_length, body_size)
    json_bytes = body_size if n is None else n
    return json_bytes * JSON_MEMORY_PER_BYTE + (body_size - json_bytes) * BINARY_MEMORY_PER_BYTE


def header_length_digits(value: str) -> str:
    """An Inference-Header-Content-Length's digits, without leading zeros; ProtocolError when it is no decimal
    integer, which the header alone tells (checked before the body is read)."""
    digits = value.strip()
    if not digits.isdecimal() or not digits.isascii():  # no sign, no "1_0"
        raise ProtocolError(f"{HEADER_LENGTH} must be a decimal integer, got {value[:40]!r}")
    return digits.lstrip("0") or "0"


def _header_length(value: str | None, size: int) -> int | None:
    """The JSON header's length in bytes from Inference-Header-Content-Length (None: the whole body is JSON)."""
    if value is None:
        return None
    digits = header_length_digits(value)
    if len(digits) > MAX_HEADER_DIGITS or int(digits) > size:
        raise ProtocolError(f"{HEADER_LENGTH} {digits[:40]} is outside the body of {size} bytes")
    return int(digits)


def _parse_raw(body: bytes, name: str, shape: tuple[int, ...]) -> InferRequest:
    """Triton's raw binary request: the body is exactly the FP32 tensor `shape`, whose one -1 dimension (a model
    without Triton batching) is deduced from the body's size, as Triton does; every output comes back binary."""
    if -1 in shape:
        row = math.prod(d for d in shape if d != -1) * DTYPES["FP32"].itemsize
        if not body or len(body) % row:
            raise ProtocolError(f"a raw binary request ({HEADER_LENGTH}: 0) is input {name!r} as FP32 {list(shape)}: "
                                f"a whole number of {row}-byte rows, got {len(body)} bytes")
        shape = tuple(len(body) // row if d == -1 else d for d in shape)
    want = math.prod(shape) * DTYPES["FP32"].itemsize
    if len(body) != want:
        raise ProtocolError(f"a raw binary request ({HEADER_LENGTH}: 0) is input {name!r} as FP32 {list(shape)}: "
                            f"{want} bytes, got {len(body)}")
    arr = np.frombuffer(body, DTYPES["FP32"]).astype(np.float32).reshape(shape)
    return InferRequest(None, {name: _finite_tensor(name, arr)}, None, binary_output=True)


def _json_end(body: bytes, exc: Exception) -> int | None:
    """Where a JSON object at the start of `body` ends (a byte offset) when more bytes follow it and made
    `exc`; None when the JSON itself is what is wrong."""
    if isinstance(exc, UnicodeDecodeError):  # bytes that are not UTF-8: the text before them holds the JSON
        text = body[:exc.start].decode("utf-8", "surrogatepass")  # as json.loads decodes
    elif isinstance(exc, json.JSONDecodeError) and exc.msg == "Extra data":
        text = exc.doc
    else:
        return None
    try:
        doc, end = json.JSONDecoder().raw_decode(text, _JSON_SPACE.match(text).end())
    except (ValueError, RecursionError):
        return None
    # Byte offset of the end (not the error's position: tensor bytes may look like JSON whitespace).
    return len(text[:end].encode("utf-8", "surrogatepass")) if isinstance(doc, dict) else None


def _cut_json_end(body: bytes, n: int, bound: int | None) -> int | None:
    """Where the JSON at the start of `body` ends when a header length `n` shorter than it cut it (None: the JSON
    is what is wrong). Parsed again from the whole body only within the request's bound on arrays and objects."""
    if bound is not None and count_containers(body, bound) > bound:
        return None  # tensor bytes that look like brackets: no hint rather than an unbounded parse
    try:
        json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        end = _json_end(body, exc)
        return end if end is not None and end > n else None
    return len(body) if len(body) > n else None  # all of it is JSON


def short_reason(exc: BaseException) -> str:
    """An exception as the first line of its message, at most 200 characters (its type when it has none)."""
    return first_line(exc, 200)


def _params(obj: dict, what: str, own: tuple[str, ...] = ()) -> dict:
    """`obj`'s `parameters`, each value a string, number or boolean (the protocol's $parameter); the keys in `own`
    are left to their own, stricter checks (which word their refusals)."""
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ProtocolError(f"{what} 'parameters' must be an object")
    check_parameters(params, what, own)
    return params


def check_parameters(params: dict, what: str, own: tuple[str, ...] = ()) -> None:
    """ProtocolError naming the first key of `params` (outside `own`) whose value is not a string, number or
    boolean: an object, a list or null; or a number beyond every float."""
    for key, value in params.items():
        if key in own:
            continue
        if value is None or isinstance(value, dict | list):
            raise ProtocolError(f"{what} parameter {key[:64]!r} must be a string, a number or a boolean, "
                                f"got {_json_kind(value)}")
        # 1e999: Python reads it as infinity; Triton's JSON parser (RapidJSON) refuses it as too big for a double.
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(f"{what} parameter {key[:64]!r} is a number beyond every float")


# The protocol's $parameter: a string, number or boolean value (what check_parameters lets through), as JSON Schema.
PARAMETER_VALUE: dict[str, Any] = {"type": ["string", "number", "boolean"]}
RESERVED_PREFIX = "triton_"  # request parameter keys Triton keeps for itself
UINT64_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class _Kind:
    """The type Triton reads a request parameter as: how a refusal says it, its JSON Schema, and its check."""
    says: str
    schema: dict[str, Any]
    fits: Callable[[Any], bool]


def _uint64(value: Any) -> bool:
    return is_int(value) and 0 <= value <= UINT64_MAX


_UINT64 = {"type": "integer", "minimum": 0, "maximum": UINT64_MAX}
_BOOLEAN = _Kind("true or false", {"type": "boolean"}, lambda value: isinstance(value, bool))
# Request parameters Triton's HTTP server reads itself, and the values it takes there (it refuses any other): vitc
# checks them alike so that a request that fails on Triton fails here too, though it applies none of them.
_TRITON_PARAMETERS = {
    "sequence_id": _Kind("an unsigned integer or a string", {"anyOf": [_UINT64, {"type": "string"}]},
                         lambda value: _uint64(value) or isinstance(value, str)),
    "sequence_start": _BOOLEAN, "sequence_end": _BOOLEAN,
    "priority": _Kind("an unsigned integer", _UINT64, _uint64),
    "timeout": _Kind("an unsigned integer (microseconds)", _UINT64, _uint64),
    "binary_data_output": _BOOLEAN,
}


def parameters_schema(own: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON Schema of a `parameters` object: `own` keys with their own schemas, any other a $parameter value."""
    return {"type": "object", "properties": dict(own), "additionalProperties": PARAMETER_VALUE}


def request_parameters_schema() -> dict[str, Any]:
    """The JSON Schema of an inference request's `parameters`, as `_request_params` checks them."""
    return {**parameters_schema({key: kind.schema for key, kind in _TRITON_PARAMETERS.items()}),
            "propertyNames": {"not": {"pattern": f"^{RESERVED_PREFIX}"}}}


def _request_params(doc: dict) -> dict:
    """The request's `parameters`, checked as Triton checks them: scalar values, no key starting with "triton_"
    (reserved), and the keys of `_TRITON_PARAMETERS` of their type."""
    params = _params(doc, "request", tuple(_TRITON_PARAMETERS))
    for key, value in params.items():
        if key.startswith(RESERVED_PREFIX):
            raise ProtocolError(f"request parameter {key[:64]!r}: keys starting with {RESERVED_PREFIX!r} are reserved "
                                "for Triton")
        if (kind := _TRITON_PARAMETERS.get(key)) is not None and not kind.fits(value):
            raise ProtocolError(f"parameters.{key} must be {kind.says}, got {json.dumps(value)[:40]}")
    return params


def _parse_input(spec: Any, binary: memoryview, offset: int,
                 datatypes: Mapping[str, str]) -> tuple[str, np.ndarray, int]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ProtocolError("every input needs a 'name'")
    name = spec["name"][:128]
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of non-negative integers up to {MAX_DIM}")
    if len(shape) > MAX_DIMS:
        raise ProtocolError(f"input {name!r}: {len(shape)} dimensions; at most {MAX_DIMS}")
    datatype = spec.get("datatype")
    if name in datatypes and datatype != datatypes[name]:  # the model's list, not the parser's
        raise wrong_datatype(name, datatypes[name], datatype)
    if not isinstance(datatype, str) or datatype not in DTYPES:  # a list or object is unhashable: a 500 before
        raise ProtocolError(f"input {name!r}: unsupported datatype {str(datatype)[:40]!r}; "
                            f"supported: {', '.join(DTYPES)}")
    dtype = DTYPES[datatype]
    count = math.prod(shape)
    params = _params(spec, f"input {name!r}", ("binary_data_size", "shared_memory_region"))
    if "shared_memory_region" in params:
        raise ProtocolError(f"input {name!r}: {NO_SHARED_MEMORY}: send its values as 'data' or as binary data")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not is_int(size) or size < 0:
            raise ProtocolError(f"input {name!r}: binary_data_size must be a non-negative integer, "
                                f"got {json.dumps(size)[:40]}")
        if "data" in spec:
            raise ProtocolError(f"input {name!r} has both 'data' and parameters.binary_data_size; send one")
        if size != count * dtype.itemsize:
            raise ProtocolError(f"input {name!r}: binary_data_size {str(size)[:40]} != {count} x {dtype.itemsize} "
                                "bytes")
        if offset + size > len(binary):
            raise ProtocolError(f"input {name!r}: binary data ends after {len(binary) - offset} of {size} bytes")
        arr = np.frombuffer(binary[offset:offset + size], dtype).astype(dtype.newbyteorder("="), copy=True)
        return name, _finite_tensor(name, arr.reshape(shape)), size
    if "data" not in spec:
        raise ProtocolError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    if not isinstance(spec["data"], list):
        raise ProtocolError(f"input {name!r}: 'data' must be a list of numbers, got {_json_kind(spec['data'])}")
    arr = _json_values(name, spec["data"], datatype, dtype.newbyteorder("="))
    if arr.size != count:
        raise ProtocolError(f"input {name!r}: {arr.size} values for shape {shape} ({count} expected)")
    return name, _finite_tensor(name, arr.reshape(shape)), 0


def wrong_datatype(name: str, want: str, got: Any) -> ProtocolError:
    """The refusal of input `name` sent as `got` (a datatype name, or any JSON) to a model that takes `want`: one
    wording whatever was sent (Triton's names the expected type too)."""
    shown = got[:40] if isinstance(got, str) else _json_kind(got)
    return ProtocolError(f"input {name!r} must be {want} (the model's datatype), got {shown}")


def datatype_name(dtype: np.dtype) -> str:
    """The protocol's name of a numpy dtype the parser reads (BOOL ... FP64), else numpy's own."""
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype))


# What JSON values other than numbers are called in a refusal.
_VALUE_KINDS = {str: "strings", type(None): "null", dict: "objects", bool: "booleans", float: "fractional numbers",
                int: "integers"}
# Triton reads `data` nested to any depth and in any arrangement (uneven lists too) row-major, and checks only the
# number of values; clients wrap `x.tolist()` in one more list. The walk is iterative, so depth costs only its stack;
# this bound, far past a tensor's MAX_DIMS and any real client, gives the same answer whatever depth the JSON parser
# reaches on this Python (the request's arrays-and-objects limit bounds the lists too).
MAX_DATA_NESTING = 64


def _leaves(name: str, data: list) -> tuple[list, set[type]]:
    """`data`'s values in row-major order (nested lists of any lengths, as Triton reads them) and their types."""
    # Not numpy: np.asarray made object arrays of up to 64 dimensions from deep lists, which `.flat` refuses past 32
    # (a 500), and it cannot read uneven lists. A level of nothing but lists is joined in C; each JSON value is
    # visited once either way, so the time is linear in the body.
    level, depth = data, 1
    while True:
        kinds = set(map(type, level))
        if list not in kinds:
            return level, kinds
        if depth >= MAX_DATA_NESTING:
            raise _too_deep(name)
        if kinds != {list}:
            break
        level, depth = list(itertools.chain.from_iterable(level)), depth + 1
    flat: list = []  # numbers beside lists: walked in order, with a stack rather than recursion
    kinds = set()
    stack = [iter(level)]
    while stack:
        for value in stack[-1]:
            if type(value) is not list:
                kinds.add(type(value))
                flat.append(value)
                continue
            if depth + len(stack) > MAX_DATA_NESTING:
                raise _too_deep(name)
            inner = set(map(type, value))
            if list in inner:
                stack.append(iter(value))
                break
            kinds |= inner
            flat.extend(value)
        else:
            stack.pop()
    return flat, kinds


def _too_deep(name: str) -> ProtocolError:
    return ProtocolError(f"input {name!r}: 'data' nests lists more than {MAX_DATA_NESTING} deep (send the values "
                         "flat, or nested as the shape)")


def _json_values(name: str, data: list, datatype: str, dtype: np.dtype) -> np.ndarray:
    """JSON numbers (flat or nested lists) -> a flat array of `dtype`, refusing what does not fit it exactly."""
    # Read as Python objects until every value is known to be a number: given strings, numpy would make a text
    # array as wide as the longest for every value (a 40 KB body once took 400 MB).
    flat, kinds = _leaves(name, data)
    allowed = {bool} if datatype == "BOOL" else {int, float} if dtype.kind == "f" else {int}
    if odd := kinds - allowed:
        got = ", ".join(sorted(_VALUE_KINDS.get(t, t.__name__) for t in odd))
        raise ProtocolError(f"input {name!r}: data is not {datatype} (got {got})")
    if dtype.kind in "iu" and flat:  # Python integers: any size compares exactly
        info = np.iinfo(dtype)
        if min(flat) < info.min or max(flat) > info.max:
            raise ProtocolError(f"input {name!r}: values outside the {datatype} range {info.min}..{info.max}")
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # past the dtype's range: inf, refused by _finite_tensor
            return np.fromiter(flat, dtype, len(flat))
    except OverflowError:  # an integer literal beyond every float
        raise ProtocolError(f"input {name!r}: values outside the {datatype} range") from None


def _finite_tensor(name: str, arr: np.ndarray) -> np.ndarray:
    """Float tensors must be finite: NaN/Inf (or values beyond the datatype's range) are refused."""
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        raise ProtocolError(f"input {name!r} has non-finite values (NaN, Infinity, or beyond the datatype's range)")
    return arr


def _parse_output(spec: Any) -> RequestedOutput:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ProtocolError("every requested output needs a 'name'")
    params = _params(spec, f"output {spec['name'][:128]!r}", ("classification", "binary_data", "shared_memory_region"))
    k = params.get("classification", 0)
    if not is_int(k) or not 0 <= k <= INT64_MAX:
        raise ProtocolError(f"output {spec['name'][:128]!r}: classification must be an integer from 0 to 2^63-1 "
                            "(an int64, as in Triton; a count above the output's size ranks all of it), "
                            f"got {_count_kind(k)}")
    binary = params.get("binary_data")
    if "binary_data" in params and not isinstance(binary, bool):  # null too, as every other parameter
        raise ProtocolError(f"output {spec['name'][:128]!r}: binary_data must be true or false")
    if "shared_memory_region" in params:  # answering in the body instead would leave the client's region unwritten
        raise ProtocolError(f"output {spec['name'][:128]!r}: {NO_SHARED_MEMORY}: omit shared_memory_region to get "
                            "the output in the answer")
    return RequestedOutput(spec["name"], binary, k)


def _count_kind(value: Any) -> str:
    """A refused count as the refusal shows it: its value, or what it is when that is no int64."""
    if not is_int(value):
        return _json_kind(value)
    return str(value) if -INT64_MAX - 1 <= value <= INT64_MAX else "an integer outside int64"


def classification_order(logits: np.ndarray, k: int) -> np.ndarray:
    """(B, k) the indices of the k highest outputs per row (k clamped to the row's size), highest first: of equal
    outputs, the lower index first."""
    return np.argsort(-logits, axis=1, kind="stable")[:, :min(k, logits.shape[1])]


def classification_strings(logits: np.ndarray, k: int, labels: list[str] | None,
                           order: np.ndarray | None = None) -> np.ndarray:
    """Triton's classification extension: (B, k) "value:index:label" for the k highest outputs per row; without
    a label (no label file, an empty line in it, or an index past it) "value:index", as Triton writes it. `order`:
    classification_order(logits, k), when the caller has it already."""
    order = classification_order(logits, k) if order is None else order
    k = order.shape[1]
    labels = labels or []
    rows = [[(f"{logits[b, i]:f}:{i}" + (f":{labels[i]}" if i < len(labels) and labels[i] else "")).encode()
             for i in order[b]] for b in range(logits.shape[0])]
    return np.array(rows, dtype=object).reshape(logits.shape[0], k)


def _to_bytes(t: OutputTensor) -> bytes:
    if t.datatype == "BYTES":
        return b"".join(len(v).to_bytes(4, "little") + v for v in t.data.ravel())
    return np.ascontiguousarray(t.data, DTYPES[t.datatype]).tobytes()


# Values written per json.dumps call: the C encoder holds the GIL for a whole call, so an answer encoded at once in a
# worker thread would keep the event loop's thread waiting for all of it (32 x 100,000 FP32 values: over a second).
JSON_CHUNK = 1024


def json_list(items: Sequence[Any] | np.ndarray, dumps: Callable[[Any], str]) -> list[bytes]:
    """The JSON list that `dumps` writes of `items`, as pieces to join, written JSON_CHUNK items at a time (`dumps`
    gets a slice): other threads, the event loop's, run between them."""
    pieces = [b"["]
    for i in range(0, len(items), JSON_CHUNK):
        pieces += [b"," * (i > 0), dumps(items[i:i + JSON_CHUNK])[1:-1].encode()]
    pieces.append(b"]")
    return pieces


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _dumps_text(values: np.ndarray) -> str:
    """BYTES values (an object array of bytes) as a JSON list of strings."""
    return _dumps([v.decode("utf-8", "replace") for v in values])


def _dumps_numbers(values: np.ndarray) -> str:
    return _dumps(values.tolist())


def encode_response(model: str, version: str, request_id: str | None,
                    outputs: list[OutputTensor]) -> tuple[bytes, dict[str, str], str]:
    """(body, extra headers, media type) for an inference response."""
    # Written as json.dumps writes the whole document, each output's data a chunk at a time (json_list), as pieces
    # joined once: the answer's text is copied once more, not once per step.
    parts = [_dumps({"model_name": model, "model_version": version})[:-1].encode(), b',"outputs":[']  # "id" last
    blobs = []
    for n, t in enumerate(outputs):
        entry = {"name": t.name, "datatype": t.datatype, "shape": list(t.data.shape)}
        parts += [b"," * (n > 0), _dumps(entry)[:-1].encode()]  # its closing brace comes after data and parameters
        params = dict(t.parameters)
        if t.binary:
            raw = _to_bytes(t)
            params["binary_data_size"] = len(raw)
            blobs.append(raw)
        else:
            parts += [b',"data":', *json_list(t.data.ravel(), _dumps_text if t.datatype == "BYTES" else _dumps_numbers)]
        if params:
            parts += [b',"parameters":', _dumps(params).encode()]
        parts.append(b"}")
    parts.append(b"]")
    if request_id is not None:
        parts += [b',"id":', _dumps(request_id).encode()]
    parts.append(b"}")
    head = b"".join(parts)
    if not blobs:
        return head, {}, "application/json"
    return head + b"".join(blobs), {HEADER_LENGTH: str(len(head))}, "application/octet-stream"
