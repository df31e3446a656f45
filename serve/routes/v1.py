"""/v1: image classification (multipart or raw image body) and model descriptions."""

from __future__ import annotations

import asyncio
import copy
import re
import time
from collections.abc import AsyncIterator, Awaitable
from json.encoder import encode_basestring as quoted  # C: as json.dumps(ensure_ascii=False) quotes a str
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from models.bundle import MAX_CLASSES
from models.imagecheck.png import PNG_SIGNATURE
from serve.errors import APIError
from serve.imaging import CONTENT_TYPES, IMAGE_CONTENT_TYPES, ImageError, cheap, prepare
from serve.protocol import short_reason
from serve.registry import ServedModel
from serve.routes.deps import (
    INFERENCE_UNAVAILABLE,
    MAX_RANKED,
    NOT_SERVED,
    RUNTIME_FAILED,
    TIMED_OUT,
    InvalidInput,
    ModelDep,
    admission,
    all_or_none,
    answer_memory,
    answer_work,
    answered,
    body_coding,
    content_encoding,
    error_doc,
    finite_output,
    gone_already,
    held_response,
    inflated,
    is_ready,
    off_loop,
    ranked_memory,
    recorded,
    served,
    submit,
    unless_gone,
)
from serve.settings import Settings
from serve.timing import stage, timings
from serve.workpool import Deferred, Holder, Kept

router = APIRouter(prefix="/v1", tags=["v1: classification"])
# The most classes a bundle may have: what the fast path accepts before the model's own count is checked.
MAX_TOP_K = MAX_CLASSES
CLASSIFY_PATH = "/v1/models/{name}/classify"
MAX_PART_FIELD_BYTES = 64 * 1024  # non-file form fields are tiny; files are bounded by the body limit
_NOT_A_FILE = ("{field} has no filename, so it is a text field, not a file upload: send each image "
               "as a file part (Content-Disposition with a filename; curl -F file=@image.jpg)")
# A raw body typed application/x-www-form-urlencoded is decoded as the bytes it is (curl's type for --data-binary
# as for -d). One that starts like an image yet does not decode is most often a file sent with -d, which strips its
# line breaks; anything else (a tensor file posted here by mistake) is told only what images are accepted.
_FORM_BODY = "form-urlencoded body"
_FORM_HINT = (" (it was sent as application/x-www-form-urlencoded: curl -d strips a file's line breaks, so send the "
              "file unchanged with --data-binary @image.jpg, or as multipart with -F file=@image.jpg)")
# How the formats vitc decodes start, as curl -d leaves them: a PNG's signature holds CR LF and LF (an intact one
# was not stripped); the others' magic has no line break, so a body with it that does not decode may have lost some.
_STRIPPED_PNG = b"\x89PNG"
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


class Prediction(BaseModel):
    label: str
    index: int
    score: float


class Classification(BaseModel):
    model: str
    predictions: list[Prediction]


_IMAGE_SCHEMA = {"type": "string", "format": "binary"}
_CLASSIFY_BODY = {
    # top_k is read as text and checked against the model's classes (serve.routes.v1._top_k), so every bad value gets
    # one answer naming the model's range; the schema still says what it is.
    "parameters": [{"name": "top_k", "in": "query", "required": False,
                    "description": "predictions per image, 1 .. the model's classes (default 5); with several "
                                   f"files, files x top_k at most {MAX_RANKED:,} (422)",
                    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K}}],
    "requestBody": {
        "required": True,
        "description": "One image as the raw body, or one or more images as multipart `file` parts (several files "
                       "answer a list, in order). JPEG, PNG, WebP, GIF, BMP, TIFF or AVIF, whichever type is named; "
                       "a raw body typed application/x-www-form-urlencoded (curl's default) is read as the image too. "
                       "A `file` part is a file upload when it has a filename or an image (or "
                       "application/octet-stream) Content-Type; one with neither is a text field, and refused.",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                "file": {"type": "array", "items": _IMAGE_SCHEMA}}},
                # Exactly the types a file part is taken with (read_images): another, image/* or image/heic, is a 415.
                "encoding": {"file": {"contentType": ", ".join(sorted(CONTENT_TYPES))}}},
            # Every type the server takes (serve.imaging); its bytes decide the format, whichever is named.
            **{t: {"schema": _IMAGE_SCHEMA} for t in sorted(IMAGE_CONTENT_TYPES)},
        },
    }
}


def document_max_files(app: FastAPI, settings: Settings) -> None:
    """The document's multipart `file` array says the most files the server takes, a setting of this app, not of the
    module-level route: --max-files (more are refused: 400) within --max-queue-size (more images than a model may
    have in progress can never be admitted: 413, whatever the model)."""
    max_files = min(settings.max_files, settings.max_queue_size)
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        schema = plain()
        operation = schema["paths"][CLASSIFY_PATH]["post"]
        # A copy: FastAPI's document refers to the module's _CLASSIFY_BODY, which every app shares.
        body = operation["requestBody"] = copy.deepcopy(_CLASSIFY_BODY["requestBody"])
        body["content"]["multipart/form-data"]["schema"]["properties"]["file"]["maxItems"] = max_files
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# What classify answers besides 200, each as its checks here (and deps') give it.
_CLASSIFY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: error_doc("An image that does not decode (corrupt, or no JPEG, PNG, WebP, GIF, BMP, TIFF or AVIF), a corrupt "
                   "gzip or deflate body, or a malformed multipart form (its closing boundary missing, a part's header "
                   "too large, more files than --max-files)"),
    404: NOT_SERVED,
    413: error_doc("Body or image too large (--max-body-bytes, also once decompressed; --max-image-pixels), or more "
                   "images than --max-queue-size"),
    415: error_doc("Unsupported content type, of the body or of a multipart file, or Content-Encoding (gzip or "
                   "deflate on an image body; none on a multipart form)"),
    422: error_doc("Invalid top_k, or files x top_k over the ranked entries an answer may hold; a multipart form with "
                   "no 'file' part, or a text field for it; outputs that are not finite for this input"),
    500: RUNTIME_FAILED,
    503: INFERENCE_UNAVAILABLE,
    504: TIMED_OUT,
}


def _ranked(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over one row of logits -> the k best classes, best first, and their probabilities."""
    z = logits.astype(np.float64) - logits.max()
    p = np.exp(z)
    p /= p.sum()
    # The k best without sorting every class (a partition, then k sorted); ties rank the lower index first, so a
    # tie across the k-th place falls back to the full stable sort.
    best = np.argpartition(-p, k - 1)[:k] if k < p.size else np.arange(p.size)
    kth = p[best].min()
    if np.count_nonzero(p == kth) != np.count_nonzero(p[best] == kth):
        best = np.argsort(-p, kind="stable")[:k]
    order = best[np.lexsort((best, -p[best]))]
    return order, p[order]  # not all of p: every row of a request is ranked before any is built


async def _one(work: Awaitable[np.ndarray]) -> list[np.ndarray]:
    """A lone image's result as a one-element list (no task and gather layers of `all_or_none` for it)."""
    return [await work]


def _media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


def _unsupported(media: str) -> APIError:
    return APIError(415, f"unsupported content type {media!r}: send an image body (image/jpeg, "
                         "image/png, image/webp, ..., or application/octet-stream) or multipart/form-data with "
                         "'file' fields")


def _unsupported_part(index: int, filename: str | None, media: str) -> APIError:
    """A multipart file refused for its type, named (a form may hold several)."""
    name = f" ({filename[:80]!r})" if filename else ""
    return APIError(415, f"multipart 'file' part #{index}{name} has unsupported content type {media!r}: type each "
                         "file as an image (image/jpeg, image/png, image/webp, ...) or application/octet-stream, or "
                         "leave its type out")


_BOUNDARY = re.compile(r'(?:^|;)\s*boundary\s*=\s*(?:"([^"]+)"|([^";\s]+))', re.IGNORECASE)


def _closed_multipart(body: bytes, content_type: str) -> bool:
    """Whether a multipart body ends with its closing delimiter (a cut upload leaves its last part unfinished,
    and the form parser would silently drop it): the last delimiter line must be the closing one."""
    m = _BOUNDARY.search(content_type)
    if m is None:
        return True  # no boundary: the form parser refuses it with its own reason
    delimiter = b"--" + (m.group(1) or m.group(2)).encode("latin-1")
    last = max(body.rfind(b"\r\n" + delimiter), 0 if body.startswith(delimiter) else -1)
    if last < 0:
        return False
    end = last + (2 if body[last:last + 2] == b"\r\n" else 0) + len(delimiter)
    return body[end:end + 2] == b"--"


def _part_type(headers: list[tuple[bytes, bytes]]) -> str:
    """A multipart part's media type (from its own headers), "" without one."""
    return _media_type(next((v for k, v in headers if k == b"content-type"), b"").decode("latin-1"))


class _FormParser(MultiPartParser):
    """Starlette's form parser, taking a part typed as an image (or application/octet-stream) as a file even without a
    filename: RFC 7578 makes the filename optional, and httpx's files=[("file", (None, data, "image/png"))] and
    openapi-python-client's File(payload, mime_type=...) send none. A part with neither stays a text field."""

    def on_headers_finished(self) -> None:
        part = self._current_part
        disposition = part.content_disposition
        if (disposition is not None and b"filename" not in parse_options_header(disposition)[1]
                and _part_type(part.item_headers) in IMAGE_CONTENT_TYPES):
            part.content_disposition = disposition + b'; filename=""'  # Starlette tells a file by its filename alone
        super().on_headers_finished()


async def _once(body: bytes) -> AsyncIterator[bytes]:
    """`body` as the form parser's stream: one chunk."""
    yield body


async def parse_form(request: Request, body: bytes, settings: Settings) -> FormData:
    """The multipart form of `body` (the request's whole body, already in memory), its file parts kept in memory."""
    # The same checks and refusals as `request.form()` (HTTPException 400 with the parser's reason).
    parser = _FormParser(request.headers, _once(body), max_files=settings.max_files,
                         max_fields=settings.max_files + _MORE_FIELDS, max_part_size=MAX_PART_FIELD_BYTES)
    # Starlette's `request.form()` writes every file part over 1 MiB to a temporary file: under a read-only root
    # file system there is none (a 500), a small /tmp fills up (ENOSPC), and the disk it takes is bounded by nothing
    # here. A part is never larger than the body it is in, which --max-body-bytes bounds: spooled up to the body's
    # size, no part leaves memory (as parts under 1 MiB never did), and reading one never needs a thread.
    parser.spool_max_size = max(len(body), 1)  # this parser's own limit (the class's stays 1 MiB)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise HTTPException(status_code=400, detail=_form_refusal(exc, settings)) from None


_MORE_FIELDS = 16  # text fields a form may hold beside its --max-files files


def _form_refusal(exc: MultiPartException, settings: Settings) -> str:
    """The reason of a form the parser refused: Starlette says "Invalid multipart data." of every python-multipart
    error, which keeps the real one as the cause; a part's headers past the parser's limits are said so, and a form
    past its counts names the setting (Starlette's "Too many files. Maximum number of files is 4." did not)."""
    cause = exc.__cause__
    max_files = settings.named("max_files", f" {settings.max_files}")
    if exc.message.startswith("Too many files"):
        return (f"the form has more than {settings.max_files} files, the most one request may send "
                f"({max_files}): send the others in another request")
    if exc.message.startswith("Too many fields"):  # Starlette counts the parts that are not files alone
        return (f"the form has more than {settings.max_files + _MORE_FIELDS} fields that are not files (the most: "
                f"{max_files}, plus {_MORE_FIELDS})")
    if not isinstance(cause, MultipartParseError):
        return exc.message
    # Imported here: only a python-multipart that bounds part headers raises these (Starlette passes its defaults).
    if str(cause) == "Maximum header size exceeded":
        from python_multipart.multipart import DEFAULT_MAX_HEADER_SIZE
        return (f"malformed multipart body: a part's header line is longer than {DEFAULT_MAX_HEADER_SIZE} bytes (the "
                "form parser's limit; a filename that long?)")
    if str(cause) == "Maximum header count exceeded":
        from python_multipart.multipart import DEFAULT_MAX_HEADER_COUNT
        return f"malformed multipart body: a part has more than {DEFAULT_MAX_HEADER_COUNT} header lines (the limit)"
    return f"malformed multipart body: {short_reason(cause)}"


async def read_images(request: Request, model: ServedModel, settings: Settings
                      ) -> tuple[list[tuple[str, bytes]], bool]:
    """The request's images as (name, bytes), and whether it was a multi-file (batch) form; a compressed body is
    inflated for `model`'s request (a disconnect during it is counted for that model)."""
    # A body without a Content-Type is application/octet-stream (RFC 9110 8.3), as a form's untyped part is: httpx's
    # `content=` and requests' `data=` send none, and were told "unsupported content type 'none'".
    content_type = request.headers.get("content-type") or "application/octet-stream"
    media = _media_type(content_type)
    encoding = content_encoding(request)
    if media == "multipart/form-data":
        if encoding != "identity":
            raise APIError(415, f"unsupported Content-Encoding {encoding!r} for a multipart form (identity only)",
                           {"Accept-Encoding": "identity"})
        body = await request.body()
        if not _closed_multipart(body, content_type):
            raise APIError(400, "malformed multipart body: its closing boundary is missing (a cut upload?)")
        try:
            form = await parse_form(request, body, settings)
        except HTTPException as exc:
            # Starlette's only part-size refusal is for a part without a filename (a text field): the same
            # mistake as a small one, so the same answer whatever its size.
            if str(exc.detail).startswith("Part exceeded maximum size"):
                raise APIError(422, _NOT_A_FILE.format(field="a multipart part")) from None
            raise
        try:
            files = form.getlist("file")
            if not files:
                raise APIError(422, "the multipart form has no 'file' field")
            images = []
            for i, f in enumerate(files):
                if not isinstance(f, UploadFile):
                    raise APIError(422, _NOT_A_FILE.format(field=f"multipart 'file' part #{i}"))
                part_media = _media_type(f.content_type) or "application/octet-stream"
                if part_media not in CONTENT_TYPES:
                    raise _unsupported_part(i, f.filename, part_media)
                images.append((f.filename or f"file #{i}", await f.read()))
                await f.close()  # its in-memory copy goes now, not with the whole form's
        finally:
            await form.close()
        return images, len(images) > 1
    if media in CONTENT_TYPES:
        label = _FORM_BODY if media == "application/x-www-form-urlencoded" else "body"
        coding = body_coding(request)  # a 415 before the body is read
        body = await request.body()
        if coding != "identity":  # inflated in the work pool: not at all once its client has gone
            body = await unless_gone(request, model, inflated(request, body, coding, settings.max_body_bytes),
                                     "decoding")
        return [(label, body)], False
    raise _unsupported(media or content_type.strip()[:80])  # a type without a media type (";charset=x")


def _prepare_timed(request: Request, model: ServedModel, data: bytes, settings: Settings,
                   holder: Holder | None = None) -> np.ndarray:
    t0 = time.perf_counter()
    x = prepare(data, model.spec, max_pixels=settings.max_image_pixels,
                jpeg_draft=model.jpeg_draft(settings.jpeg_draft), budget=request.app.state.pixel_budget,
                holder=holder)
    request.app.state.metrics.preprocess.labels(model.name).observe(time.perf_counter() - t0)
    return x


@router.get("/models", summary="List served models")
async def list_models(request: Request) -> dict[str, list[dict[str, Any]]]:
    return {"models": [_info(request, m) for m in request.app.state.models.values()]}


@router.get("/models/{name}", summary="Describe one model", responses={404: NOT_SERVED})
async def describe_model(request: Request, model: ModelDep) -> dict[str, Any]:
    return _info(request, model)


def _info(request: Request, model: ServedModel) -> dict[str, Any]:
    return {**model.info(), "ready": is_ready(request, model)}  # not ready either while the server shuts down


@router.post(
    CLASSIFY_PATH.removeprefix(router.prefix),
    summary="Classify images",
    response_model=Classification | list[Classification],
    responses=_CLASSIFY_ERRORS,
    openapi_extra=_CLASSIFY_BODY,
)
async def classify(
    request: Request,
    name: str,
    top_k: Annotated[str | None, Query(include_in_schema=False)] = None,
) -> Response:
    """Softmax top-k for one image (raw body or one `file`), or a list for several `file` fields."""
    return await classify_request(request, name, top_k)


async def classify_request(request: Request, name: str, top_k: int | str | None) -> Response:
    """The classify endpoint's work, shared with the fast path (serve.fastpath) that skips FastAPI's routing."""
    settings: Settings = request.app.state.settings
    model = served(request, name)
    _top_k(model, top_k)  # an unknown model or a bad top_k is refused before the upload
    with stage(request, "receive"):
        images, many = await read_images(request, model, settings)
    # The version served now: a reload or unload during the upload does not wait for it (it holds no version until
    # admitted), and it runs on the new version, or is told the model is gone.
    model = served(request, name)
    k = _top_k(model, top_k)
    _bounded_answer(len(images), k)  # before anything is decoded or inferred
    return await _classify(request, model, settings, k, images, many)


def _bounded_answer(files: int, k: int) -> None:
    """422 when `files` images of `k` predictions each would answer more than MAX_RANKED (one image never does)."""
    if files * k > MAX_RANKED:
        raise APIError(422, f"the answer would rank {files} files x top_k {k} = {files * k:,} predictions; at most "
                            f"{MAX_RANKED:,} per request: send fewer files per request, or a smaller top_k")


def _top_k(model: ServedModel, top_k: int | str | None) -> int:
    """Predictions per image: asked for (1 .. the model's classes; the fast path's int or the query's text), else 5."""
    n_classes = len(model.labels)
    if top_k is None:
        return min(5, n_classes)
    k = top_k if isinstance(top_k, int) else _whole_number(top_k)
    if k is None or not 1 <= k <= n_classes:
        text = str(top_k)
        shown = repr(text if len(text) <= 24 else text[:24] + "...")
        raise APIError(422, f"top_k must be a whole number between 1 and {n_classes} (the model's classes), "
                            f"got {shown}")
    return k


def _whole_number(text: str) -> int | None:
    """`text` as a decimal integer (ASCII spaces around it and a leading `+` allowed), or None; digits beyond any
    bundle's class count are never converted, so a huge value costs one scan of the query (bounded by the header
    limit), nothing more."""
    # Only ASCII spaces (a `+` in a query is one): str.strip() would take any Unicode whitespace or separator
    # (LF, tab, U+001C, NBSP, U+3000) around the number.
    digits = text.strip(" ").removeprefix("+")
    if not (digits.isascii() and digits.isdigit()):
        return None
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= len(str(MAX_TOP_K)) else MAX_TOP_K + 1


async def _decode(request: Request, model: ServedModel, settings: Settings, images: list[tuple[str, bytes]],
                  many: bool) -> list[np.ndarray]:
    """The images' model inputs, decoded at once as far as the pixel budget allows; the first refused is the answer."""
    own = Holder()  # what the request's images being decoded hold of the budget

    def job(data: bytes, inline: bool = False) -> Awaitable[np.ndarray]:
        return off_loop(request, _prepare_timed, request, model, data, settings, own, cheap=inline)

    decoded: list[Any] = await asyncio.gather(*(job(data, not many and cheap(data)) for _, data in images),
                                              return_exceptions=True)
    for (label, data), result in zip(images, decoded, strict=True):
        if isinstance(result, ImageError):
            raise _invalid(label, data, result, many)
        if isinstance(result, BaseException) and not isinstance(result, Deferred):
            raise result
    # Images that did not fit beside the request's own others (two large photos): one at a time now that those are
    # done, so the request never waits for budget it holds itself, and each fits alone (its cost is capped).
    for i, ((label, data), result) in enumerate(zip(images, decoded, strict=True)):
        if isinstance(result, Deferred):
            try:
                decoded[i] = await job(data)
            except ImageError as exc:
                raise _invalid(label, data, exc, many) from None
    return decoded


def _invalid(label: str, data: bytes, exc: ImageError, many: bool) -> InvalidInput:
    """An image's own fault (undecodable, too many pixels), named when the request has several."""
    hint = _FORM_HINT if label == _FORM_BODY and exc.status == 400 and _stripped_image(data) else ""
    return InvalidInput(exc.status, (f"{label}: " if many else "") + exc.reason + hint)


def _stripped_image(data: bytes) -> bool:
    """Whether an undecodable body starts like an image whose line breaks curl -d may have stripped."""
    if data.startswith(_STRIPPED_PNG):
        return not data.startswith(PNG_SIGNATURE)
    webp = data.startswith(b"RIFF") and b"WEBP" in data[4:12]  # a stripped size byte moves "WEBP" forward
    avif = b"ftypavi" in data[:12]  # after the box size, which may have lost a byte too (avif, avis)
    return webp or avif or data.startswith(_IMAGE_MAGIC)


async def _classify(request: Request, model: ServedModel, settings: Settings, k: int,
                    images: list[tuple[str, bytes]], many: bool) -> Response:
    # Every image counts, from decoding to its answer; each is queued on its own, so each is a request in the stats.
    with recorded(model, len(images), len(images)) as spent:
        with admission(model, len(images)):
            with stage(request, "decode"):
                # Watched: once the client has gone, no image of the request starts decoding (a form's later
                # files included), and those waiting for a decode thread give their places back at once.
                decoded = await unless_gone(request, model, _decode(request, model, settings, images, many),
                                            "decoding")
            gone_already(request, model, "queued")
            # Each image is queued on its own, and may go in another batch: the Server-Timing's queue and compute are
            # those of the image answered last, so that they add up to the request's wait (the first image's left
            # the later batches out). The statistics count every image's (`spent`).
            each: list[dict[str, float]] = [{} for _ in decoded]
            work = (all_or_none(submit(model, x, t, spent) for x, t in zip(decoded, each, strict=True))
                    if many else _one(submit(model, decoded[0], each[0], spent)))
            try:
                # Checked inside the statistics' count, as /v2 does: outputs that cannot be answered are a failed
                # inference.
                logits = [finite_output(model, y) for y in await unless_gone(request, model, work)]
            finally:
                timings(request).update(max(each, key=lambda t: t.get("queue", 0.0) + t.get("compute", 0.0)))
        # Counted too: a large answer built in the work pool may find it full (503), or its client gone while it
        # is built (a disconnect), and that is no success.
        with stage(request, "encode"):
            content, kept = await answered(request, model,
                                           answer_work(len(logits) * k, len(logits) * len(model.labels)),
                                           lambda budget: _answer(budget, model, logits, k, many))
            return held_response(content, kept, JSONResponse.media_type)


def _answer(budget: Kept | None, model: ServedModel, logits: list[np.ndarray], k: int, many: bool) -> bytes:
    """The images' top k as the answer's body, its memory held in `budget` (None: a small answer, nothing held)."""
    ranked = [_ranked(y[0], k) for y in logits]
    labels = model.labels
    named = (labels[i] for order, _ in ranked for i in order.tolist())
    with answer_memory(budget, lambda: ranked_memory(len(ranked) * k, named)):
        answers = [_answer_json(model.name, order.tolist(), scores.tolist(), labels) for order, scores in ranked]
        return ("[" + ",".join(answers) + "]" if many else answers[0]).encode()


def _answer_json(model_name: str, order: list[int], scores: list[float], labels: list[str]) -> str:
    """One image's answer ({"model", "predictions": [{"label", "index", "score"}]}) as JSONResponse writes it."""
    # Built in a worker thread, an answer must leave the event loop's thread the GIL: json.dumps holds it for a whole
    # call, and a dict per prediction has the garbage collector pass over them all, holding it too (for 100,000,
    # measured: 0.45 s and 0.1 s without an answer to a liveness probe).
    # What json.dumps(ensure_ascii=False) writes: a str as encode_basestring quotes it, a float as its repr.
    predictions = ",".join(f'{{"label":{quoted(labels[i])},"index":{i},"score":{p!r}}}'
                           for i, p in zip(order, scores, strict=True))
    return f'{{"model":{quoted(model_name)},"predictions":[{predictions}]}}'
