"""What the routers share: the model lookup dependency, settings, off-loop work and batcher errors -> HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import Depends, Request, Response

from models.config import MAX_CLASSES
from models.oneline import first_line
from runtimes import BackendError
from serve import timing
from serve.batching import BatcherClosed, InferenceTimeout, NotReady, QueueFull, Spent, TooLarge
from serve.errors import APIError, ClientGone
from serve.imaging import BUDGET_PIXEL_BYTES
from serve.middleware import body_hold
from serve.protocol import ProtocolError, content_coding, decompress
from serve.registry import ServedModel
from serve.responses import Error, HeldResponse
from serve.settings import Settings
from serve.workpool import Abandoned, Busy, Kept, PixelBudget

log = logging.getLogger("vitc.serve")
T = TypeVar("T")
RETRY_AFTER = {"Retry-After": "1"}
# The machine's limits met by a request (not its fault, nor a bug): 503, retried once memory or threads are free.
OUT_OF_MEMORY = "the server ran out of memory for this request; retry later"
OUT_OF_THREADS = "the server could not start a thread for this request (its thread or pids limit); retry later"


def error_doc(description: str) -> dict[str, Any]:
    """An error answer as a route's `responses` documents it: the Error shape (serve.responses), with an example."""
    return {"model": Error, "description": description,
            "content": {"application/json": {"example": {"error": "reason"}}}}


def retry_doc(description: str) -> dict[str, Any]:
    """A 503 as a route's `responses` documents it: `error_doc` with the Retry-After header every 503 carries."""
    return {**error_doc(description), "headers": {"Retry-After": {
        "description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 0}}}}


# The answers of the error paths here, worded once for every route that reaches them (each route words its own 400,
# 413, 415 and 422, which its own checks give; 401 is documented where a key is required: serve.app).
NOT_SERVED = error_doc("Unknown model, or one not loaded (the reason says which)")  # served
RUNTIME_FAILED = error_doc("The model's runtime failed on this input (the reason says how)")  # submit
INFERENCE_UNAVAILABLE = retry_doc(  # off_loop, admission, submit, answer_memory
    "Queue, decode pool or decode budget full; model stalled or shutting down; the server out of memory or threads: "
    "retry after Retry-After")
TIMED_OUT = error_doc("Inference exceeded the model's timeout")  # submit
POOL_UNAVAILABLE = retry_doc(  # off_loop, for work that is not inference
    "The work pool full, or the server out of memory or threads: retry after Retry-After")


def served(request: Request, name: str) -> ServedModel:
    """The version of the model named `name` served now; 404 listing the served names."""
    models: dict[str, ServedModel] = request.app.state.models
    model = models.get(name)
    if model is None:
        repository = getattr(request.app.state, "repository", None)
        why = repository.why_not_served(name) if repository is not None else None
        if why is not None:  # a model the server knows: say why it is not served, as the repository index does
            raise APIError(404, f"model {name[:200]!r} is not available: {why}")
        raise APIError(404, f"unknown model {name[:200]!r}; served: {', '.join(models) or 'none'}")
    return model


def is_ready(request: Request, model: ServedModel) -> bool:
    """Whether `model` takes requests: its batcher runs and is not stalled, and the server is not shutting down (from
    the first SIGTERM, through the shutdown delay, it reports not ready while it still answers)."""
    return bool(request.app.state.ready and model.batcher and model.batcher.ready)


# Dependencies are `async def` so FastAPI calls them inline instead of hopping to a worker thread per request.
async def get_model(name: str, request: Request) -> ServedModel:
    """`served` as a dependency, for the light endpoints (the inference ones call `served` themselves: FastAPI's
    dependency machinery costs a good part of a millisecond per request). A reload or unload drains a version only
    of the requests admitted to it (`admission`, once their body is in): a stalled upload holds none."""
    return served(request, name)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


ModelDep = Annotated[ServedModel, Depends(get_model)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def content_encoding(request: Request) -> str:
    """The request's Content-Encoding, lower case ("identity" without one), its field lines read as one list (RFC 9110
    5.3): lines "gzip" and "br" are "gzip, br", refused as that one line is, rather than "gzip" with "br" unheard."""
    return (", ".join(request.headers.getlist("content-encoding")) or "identity").strip().lower()


def body_coding(request: Request) -> str:
    """The request's Content-Encoding as one coding (identity, gzip or deflate), or APIError 415: called before the
    body is read, so that a client that sent `Expect: 100-continue` is refused without uploading it."""
    try:
        return content_coding(content_encoding(request))
    except ProtocolError as exc:
        raise APIError(exc.status, str(exc), exc.headers) from None


async def inflated(request: Request, body: bytes, encoding: str | None, limit: int) -> bytes:
    """`body` with its Content-Encoding undone off the loop (at most `limit` bytes), held against the body budget
    until the answer: a 20 KB gzip body inflates to 16 MiB, and hundreds of them waiting to be decoded would pass
    the budget the wire bytes are held to."""
    if (encoding or "identity").strip().lower() == "identity":
        return body
    try:
        out = await off_loop(request, decompress, body, encoding, limit)
    except ProtocolError as exc:
        raise APIError(exc.status, str(exc), exc.headers) from None
    hold = body_hold(request.scope)
    if hold is not None:
        hold.take(len(out))
    return out


def exhausted(exc: BaseException) -> APIError | None:
    """The 503 + Retry-After for `exc` when it is the machine's memory or threads running out (a MemoryError, or
    Python's `can't start new thread` under a pids or nproc limit), else None."""
    if isinstance(exc, MemoryError):
        return APIError(503, OUT_OF_MEMORY, RETRY_AFTER)
    if isinstance(exc, RuntimeError) and str(exc).startswith("can't start new thread"):
        return APIError(503, OUT_OF_THREADS, RETRY_AFTER)
    return None


class _Skipped(ClientGone):
    """A work-pool job not run because its client had gone; the disconnect is not counted yet (`unless_gone`)."""


async def off_loop(request: Request, fn: Callable[..., T], *args: Any, cheap: bool = False) -> T:
    """Run CPU work (decoding, tensor parsing, decompression) in the bounded work pool. A `cheap` job (a small
    image: about a millisecond) that finds the pool idle runs on the loop itself: cheaper than two thread
    hand-offs, and nothing else is waiting for the loop then. A job that would start once the client has gone is
    not run (ClientGone); awaited under `unless_gone`, one still waiting for a thread is cancelled when it goes."""
    try:
        return await request.app.state.work_pool.run(fn, *args, inline_if_idle=cheap,
                                                     unless=request.scope.get("vitc.unanswered"))
    except Abandoned:
        raise _Skipped from None
    except Busy as exc:
        raise APIError(503, f"{exc}; retry later", RETRY_AFTER) from None
    except (MemoryError, RuntimeError) as exc:  # in the job, or starting the pool's thread for it
        if (refusal := exhausted(exc)) is None:
            raise
        raise refusal from None


# The most ranked entries one answer may hold, over all its rows: /v1 files x top_k, v2 rows x classification. One
# image or row can always be ranked whole (every class of the widest model). The largest answer, built and encoded
# in the work pool, peaks at 12-30 MB with short labels (measured: 290 bytes an entry on /v1, 120-240 on v2) and
# takes 0.3-0.4 s of a core: small beside the 320 MB a 16 MiB v2 body's parse may hold. Unbounded, 64 files x top_k
# 100,000 built 6.4 M entries on the event loop: 2.6 GB, 35 s without an answer to anyone, and a 404 MB answer.
MAX_RANKED = MAX_CLASSES
# What building an answer costs, counted in entries: an entry is Python objects and their JSON (3-4 us, measured);
# ranking reads every output value (v2's stable sort: 0.2 us each, /v1's softmax and partition less), so
# RANK_VALUES_PER_ENTRY values cost about one entry.
RANK_VALUES_PER_ENTRY = 16
# An answer of at most this much work (a few milliseconds: the top 5 of 1,000 classes, 0.1 ms; one image ranked whole
# among them, 1-2 ms; a v2 batch of 32 x classification 5, 2,160) is built on the event loop: the common case, which
# a thread hand-off, and a wait behind queued decodes, would only delay. Anything larger (64 files x top_k 5 of 1,000
# classes, 2.5-5.5 ms, is 4,320) goes to the work pool, so that the loop answers other requests (liveness probes
# too) meanwhile.
INLINE_ANSWER_WORK = 4096
# Peak memory building and encoding an answer, measured, rounded up: per ranked entry besides its label; per
# character of the labels it names, ASCII or not (v2's JSON escapes the others as \uXXXX, an emoji as two); per FP32
# value answered in JSON.
ANSWER_BYTES_PER_ENTRY = 320
ANSWER_BYTES_PER_ASCII_CHAR = 4
ANSWER_BYTES_PER_OTHER_CHAR = 32
ANSWER_BYTES_PER_JSON_VALUE = 48


def answer_work(entries: int, values: int = 0) -> int:
    """The work of an answer of `entries` entries (or JSON values), ranked from `values` output values."""
    return entries + values // RANK_VALUES_PER_ENTRY


def ranked_memory(entries: int, labels: Iterable[str]) -> int:
    """The most memory (bytes) building and encoding `entries` ranked entries takes, naming `labels`."""
    chars = sum(len(s) * (ANSWER_BYTES_PER_ASCII_CHAR if s.isascii() else ANSWER_BYTES_PER_OTHER_CHAR)
                for s in labels)  # isascii() is O(1) on a str: this reads no label's text
    return entries * ANSWER_BYTES_PER_ENTRY + chars


async def answered(request: Request, model: ServedModel, work: int,
                   build: Callable[[Kept | None], T]) -> tuple[T, Kept | None]:
    """`build(kept)`, which builds an answer of `work` (`answer_work`), and what it keeps of the decode budget: on the
    event loop when it is small, nothing held (None); else in the work pool, holding its memory in the decode budget
    (`answer_memory`) past the build, until `held_response` has sent it. A client that leaves meanwhile is a
    disconnect (stage "answering"): a build not yet started never runs, and ClientGone ends the request."""
    if work <= INLINE_ANSWER_WORK:
        return build(None), None
    gone_already(request, model, "answering")
    kept = Kept(request.app.state.pixel_budget)
    try:
        return await _watched(request, model, off_loop(request, build, kept), lambda: "answering"), kept
    except BaseException:
        kept.release()  # a build still running gives its reservation back itself when it ends
        raise


@contextlib.contextmanager
def answer_memory(budget: PixelBudget | Kept | None, memory: Callable[[], int]) -> Iterator[None]:
    """Hold `memory()` bytes in the decode budget for the block (nothing, and nothing counted, without a budget), as
    a v2 body's parse holds its own: large answers built at once wait for each other, or get 503, rather than pass
    the server's memory. With a Kept (`answered`), a block that ends without an error hands them to it, and they
    stay held until the answer is sent."""
    if budget is None or (size := memory()) <= 0:
        yield
        return
    kept = budget if isinstance(budget, Kept) else None
    pool = kept.budget if kept is not None else budget
    pixels = min(-(-size // BUDGET_PIXEL_BYTES), pool.pixels)  # one answer alone always fits
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(pool.reserve(pixels, kept=kept))
        except Busy:  # the budget's own reason speaks of an image
            raise Busy(f"the server's decode budget is in use ({pool.used:,} of {pool.pixels:,} pixels); "
                       f"building this answer needs {pixels:,}") from None
        yield


def held_response(content: bytes, kept: Kept | None, media_type: str, headers: dict[str, str] | None = None
                  ) -> Response:
    """The answer `content` as a Response: a small one (nothing kept) as any; a large one holding its bytes (and
    the piece in the transport) in the decode budget until it is sent (HeldResponse), rather than the peak of
    building it. Slow readers of large answers thus wait for each other or get 503, as their builds do, instead of
    holding memory no limit counts until --receive-timeout-s lets them go."""
    if kept is None:
        return Response(content, media_type=media_type, headers=headers)
    try:
        kept.shrink(-(-len(content) // BUDGET_PIXEL_BYTES))
        return HeldResponse(content, kept.release, media_type=media_type, headers=headers)
    except BaseException:
        kept.release()
        raise


async def submit(model: ServedModel, x: np.ndarray, timings: dict[str, float] | None = None,
                 spent: Spent | None = None) -> np.ndarray:
    """Rows through the model's dynamic batcher; 503 when full, stalled or closing, 504 past the inference timeout.
    `timings` receives the request's queue and compute seconds, and `spent` (from `recorded`) has them added."""
    try:
        return await model.batcher.submit(x, timings, spent)
    except (QueueFull, NotReady, BatcherClosed) as exc:
        raise _unavailable(exc) from None
    except InferenceTimeout as exc:
        raise APIError(504, str(exc)) from None
    except Exception as exc:
        if (refusal := exhausted(exc)) is not None:  # the batch's thread, or the backend's memory: not a bug
            reason = str(exc)[:200] or type(exc).__name__
            log.warning("inference ran out of memory or threads", extra={"model": model.name, "reason": reason})
            raise refusal from None
        log.exception("inference failed", extra={"model": model.name})
        # A built-in backend says what failed in one line already (runtimes.base.inference_error); anything else is
        # named. A plugin's message may run over several lines: the answer gets its first (the log keeps them all).
        said = first_line(exc) if isinstance(exc, BackendError) else \
            f"inference failed: {type(exc).__name__}: {first_line(exc)}"
        raise APIError(500, said) from None


def gone_already(request: Request, model: ServedModel, stage: str) -> None:
    """ClientGone, the disconnect counted at `stage`, when the connection is known closed before work is handed on
    (rows submitted, an answer built): nothing is then computed for nobody."""
    # The protocol's word (serve.httpproto): a client that left during a decode of seconds is seen as gone at its
    # end, and its rows would otherwise be taken at once by an idle batcher and computed all the same.
    if (unanswered := request.scope.get("vitc.unanswered")) is not None and unanswered():
        request.app.state.metrics.disconnects.labels(model.name, stage).inc()
        raise ClientGone


async def unless_gone(request: Request, model: ServedModel, work: Awaitable[T], stage: str | None = None) -> T:
    """Await `work` while watching the connection: if the client leaves first, the disconnect is counted and
    ClientGone ends the request without an answer. Without `stage`, `work` is rows submitted with the request's
    `timings`: those still queued are dropped (cancelled futures are never computed). With it (e.g. "decoding"),
    `work` is the request's jobs in the work pool (`off_loop`): those not yet started are never run, their places
    in the pool's queue freed at once, and one running ends unheard."""
    return await _watched(request, model, work, (lambda: stage) if stage else lambda: _gone_stage(request))


async def _watched(request: Request, model: ServedModel, work: Awaitable[T], stage: Callable[[], str]) -> T:
    """Await `work` while watching the connection: if the client leaves first, `work` is cancelled, the disconnect
    is counted at `stage()`, and ClientGone ends the request without an answer."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the request itself was cancelled (the server's drain ran out): so is its work, whose
        task.cancel()  # error, if it ends with one first, nobody will ask for (asyncio would log it as unretrieved)
        task.add_done_callback(_retrieved)
        raise
    finally:
        gone.cancel()
    if task.done():
        if not task.cancelled() and isinstance(task.exception(), _Skipped):
            # A job saw the client gone before this watch did: the same disconnect, counted once, here.
            request.app.state.metrics.disconnects.labels(model.name, stage()).inc()
            raise ClientGone
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    request.app.state.metrics.disconnects.labels(model.name, stage()).inc()
    raise ClientGone


def _gone_stage(request: Request) -> str:
    """Where a departed client's rows were: "queued" (dropped, never computed), or "computing" once a batch took
    them (computed all the same, the answer dropped)."""
    # The batcher writes the request's queue time when a batch takes its rows. A request of several items (a /v1
    # form) gives its timings to the first, which is queued first and so never taken after the others.
    return "computing" if "queue" in timing.timings(request) else "queued"


def _retrieved(task: asyncio.Future) -> None:
    """Mark an abandoned task's outcome as seen."""
    if not task.cancelled():
        task.exception()


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body is already read: the next ASGI message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def all_or_none(aws: Iterable[Awaitable[T]]) -> list[T]:
    """Every result, or the first error with the others cancelled (their queued rows are then never computed)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


def finite_output(model: ServedModel, y: np.ndarray) -> np.ndarray:
    """The model's logits, or 422 when they are not finite (strict JSON has no NaN/Infinity to say them with)."""
    if not np.isfinite(y).all():
        raise APIError(422, f"model {model.name!r} produced non-finite outputs (NaN/Infinity) for this input; "
                            "it is outside the range the model handles")
    return y


class InvalidInput(APIError):
    """A request refused for its own content (an image that does not decode, too many pixels): a client error that
    the model's statistics do not count."""


@contextlib.contextmanager
def recorded(model: ServedModel, rows: int = 1, requests: int = 1) -> Iterator[Spent]:
    """Count the request (`rows` inferences, queued as `requests` items) in the model's statistics: success or
    failure, with its time in the server; only a request answered successfully counts its rows as inferences, and
    its items' queue and compute times, which the block's `submit` calls add to the Spent it yields."""
    # The rule follows Triton, whose statistics start once a request has passed validation (PrepareForInference)
    # and reached its scheduler. A request refused for its own content (wrong shape, datatype, batch size or output,
    # a bad top_k, an image that does not decode, more images than --max-queue-size: 4xx) counts nowhere, on /v1 as
    # on /v2: the routes check it before this block, or raise InvalidInput inside it. A valid one is a success, or a
    # failure when it is refused for load (503: queue full, model stalled, decode pool busy; Triton's REJECTED,
    # though Triton leaves out its own max_queue_size refusals: here an operator sees shed load), passes the
    # inference timeout (504), meets a backend error (500) or outputs that are not finite (422), or its client
    # leaves (Triton's CANCELED). As in Triton, a failure counts nothing but itself, even after its batch ran: that
    # batch is in execution_count and batch_stats all the same, its queue and compute times are not (serve.stats).
    start, spent = time.perf_counter(), Spent()
    try:
        yield spent
    except InvalidInput:
        raise
    except BaseException:
        model.stats.request(False, time.perf_counter() - start, rows, requests)
        raise
    model.stats.request(True, time.perf_counter() - start, rows, requests, spent.queue, spent.compute)


@contextlib.contextmanager
def load_refusals_recorded(model: ServedModel) -> Iterator[None]:
    """Count a refusal for load (503) raised in the block as a failed request in the model's statistics, as
    `recorded` would; anything else raised there (an invalid body) counts nowhere."""
    # For work a route must do before `recorded` can know the request's rows: /v2 parses its body in the work pool,
    # and a full pool's 503 is the failure /v1 counts for its decode (which runs inside `recorded`).
    start = time.perf_counter()
    try:
        yield
    except APIError as exc:
        if exc.status == 503:
            model.stats.request(False, time.perf_counter() - start)
        raise


@contextlib.contextmanager
def admission(model: ServedModel, images: int = 1) -> Iterator[None]:
    """Count the request's images against the model's bound for its whole life (decode + queue + compute), and the
    request as a user of this version: what an unload or reload waits for before closing it."""
    try:
        admitted = model.batcher.admit(images)
    except TooLarge as exc:
        # The request's own size, not the server's load: no Retry-After (it would be retried for ever), and no
        # failed inference in the statistics (as a wrong shape).
        raise InvalidInput(413, f"{exc}: split the request, or raise --max-queue-size") from None
    except (QueueFull, NotReady, BatcherClosed) as exc:
        raise _unavailable(exc) from None
    model.users += 1
    try:
        with admitted:
            yield
    finally:
        model.users -= 1


def _unavailable(exc: Exception) -> APIError:
    """A full, stalled or closing model: 503 with Retry-After (the reason says which)."""
    return APIError(503, f"{exc}; retry later" if isinstance(exc, QueueFull) else str(exc), RETRY_AFTER)
