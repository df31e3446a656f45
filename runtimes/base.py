"""The runtime contract: what one runtime module declares (`Runtime`), what it opens (`Backend`), and with what.

Every runtime module (runtimes/onnxruntime.py, openvino.py, tensorrt.py, pytorch.py) defines one `RUNTIME` and
imports its own package only inside functions, so a CPU image without TensorRT or torch imports every module, and a
runtime that is not installed is one clear error when it is asked for. Export builds artifacts through
`Runtime.build` (runtimes/build.py: what it is handed); the parity gate, the server and the benchmarks all open
them through `Runtime.load`.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

from models.bundle import MAX_BATCH_LIMIT, Artifact, BundleError, Manifest
from models.device import DEVICE_RULE, is_device
from models.extras import installed
from models.failures import memory_failure
from models.host import MAX_THREADS
from models.jsonfields import is_int
from models.oneline import first_line
from models.tritonconfig import BackendRules
from runtimes.jsondata import json_data

if TYPE_CHECKING:
    from runtimes.build import Built, ExportContext

INPUT_NAME = "input"  # the tensor names export gives every artifact
OUTPUT_NAME = "logits"
HINTS = ("throughput", "latency")
# The server's tuning settings a runtime may honour (Runtime.tunes): serve.settings.TUNING, whose flags the server
# refuses for a runtime that does not list them (a typo here would refuse --threads for it).
TUNABLES = ("threads", "parallel", "openvino_hint", "compile", "channels_last")


class BackendError(RuntimeError):
    """A runtime that is not installed, cannot run on the requested device, or cannot load its artifact."""


@runtime_checkable
class Backend(Protocol):
    """A loaded artifact: thread-safe `infer` for up to `max_batch` rows, `parallelism` calls at once."""

    # The loader checks these attributes once it has loaded one (`check_backend`). Which runtime a backend belongs
    # to is the `Runtime` that loaded it, never its `runtime` attribute: a backend subclassing another runtime's
    # keeps its parent's, and a name is only informational (PooledBackend's error messages use it).
    runtime: str
    precision: str
    device: str
    max_batch: int
    parallelism: int

    # The contract of `infer`, the same on every runtime (the built-in ones share it through `PooledBackend`):
    # - it takes a float32 numpy array of shape (B, C, H, W), the manifest's sample shape, with 1 <= B <= max_batch
    #   (any memory layout), of finite values; anything else (NaN or infinity included) is refused with a one-line
    #   BackendError before the runtime sees it (no runtime casts another dtype or pads another shape silently, and
    #   none makes up an answer for a value that is not a number);
    # - it returns (B, classes) float32 logits;
    # - what the runtime raises while it computes comes out as a one-line BackendError ("<runtime> inference
    #   failed: <reason>") chained from the runtime's own exception, except running out of memory, which is a
    #   MemoryError (chained too, so `models.failures.memory_failure` finds the allocator's message): the machine
    #   failed, not the input;
    # - after `close()`, every call waiting for a free slot and every later call raises BackendError("... is
    #   closed") at once; calls already computing finish (or fail) normally, and what they share is released
    #   after them.
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 with 1 <= B <= max_batch -> (B, num_classes) float32 logits (contract above)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What really runs: effective threads, precision hint, providers (for reports and benchmarks)."""
        ...

    def close(self) -> None:
        """Release runtime resources; later and waiting `infer` calls raise BackendError (see the class)."""
        ...


_FLOAT32 = np.dtype(np.float32)
# The most batches a caller may ask to run at once (BackendOptions.parallel, the server's --parallel): each is an
# inference thread of the server (an OpenVINO infer request, an onnxruntime CPU stream).
MAX_PARALLEL = 64
# The most rows (max_batch) a backend may declare: what a bundle, the export and the server batch at most (a backend
# without a limit of its own declares the bundle's, LoadSpec.max_batch); and the most calls at once (parallelism).
# A backend's parallelism is higher than MAX_PARALLEL: left to itself (parallel None) a runtime picks its own count
# (onnxruntime a stream per few cores, OpenVINO its optimal infer requests), which a big host makes large; the README
# states this bound of the runtime contract.
MAX_BACKEND_ROWS = MAX_BATCH_LIMIT
MAX_BACKEND_PARALLELISM = 4096


def check_batch(batch: Any, sample_shape: tuple[int, ...], max_batch: int) -> None:
    """BackendError (one line) unless `batch` is what `Backend.infer` takes: a float32 numpy array
    (B, *sample_shape) with 1 <= B <= max_batch, of finite values. It runs on every served batch: a few attribute
    reads, its minimum and its maximum."""
    if not isinstance(batch, np.ndarray):
        raise BackendError(f"a batch must be a numpy array, got {type(batch).__name__}")
    if batch.dtype is not _FLOAT32 and batch.dtype != _FLOAT32:  # the identity test is the common, fast case
        raise BackendError(f"a batch must be float32 (native byte order), got {batch.dtype}")
    shape = batch.shape
    if len(shape) != 4 or shape[1:] != tuple(sample_shape):
        want = ", ".join(str(d) for d in sample_shape)
        raise BackendError(f"a batch must have shape (B, {want}), got {shape}")
    if shape[0] < 1:
        raise BackendError("a batch must have at least 1 row, got 0")
    if shape[0] > max_batch:
        raise BackendError(f"a batch of {shape[0]} rows exceeds this backend's max batch {max_batch}")
    if not _finite(batch):
        raise BackendError("a batch must hold finite values, got NaN or infinity")


def _finite(batch: np.ndarray) -> bool:
    """Whether every value of a float32 batch is finite."""
    # Runtimes differ on NaN or infinity (onnxruntime and torch answer NaN, OpenVINO finite, confident logits), so
    # none is handed them. The minimum and maximum are finite only when every value is (a NaN propagates to both, an
    # infinity is one of them): exact, unlike a sum of finite values, which can overflow, and two reductions that
    # allocate nothing, where np.isfinite(batch).all() allocates a bool array of the batch's size (and is no faster).
    return bool(np.isfinite(batch.min()) and np.isfinite(batch.max()))


def check_logits(y: Any, rows: int, classes: int | None) -> np.ndarray:
    """`y` as a plain float32 ndarray if it is what `Backend.infer` returns for `rows` rows, an ndarray of shape
    (rows, classes) of a float dtype (another float dtype is cast, a subclass such as np.matrix or np.memmap is
    viewed as a plain ndarray), else BackendError (one line). `classes` None checks the rows alone."""
    if type(y) is not np.ndarray:  # the common case is one type test
        want = f"of shape ({rows}, {classes}) float32" if classes is not None else f"of {rows} rows"
        if isinstance(y, np.ma.MaskedArray):  # its masked values have no logits: v2 JSON sent them as null
            raise BackendError(f"backend returned a masked array (numpy.ma.MaskedArray), expected a plain numpy "
                               f"array {want}")
        if not isinstance(y, np.ndarray):
            raise BackendError(f"backend returned {type(y).__name__}, expected a numpy array {want}")
        # Routes index and serialise the rows as an ndarray's: np.matrix rows stay 2-D (an IndexError on v1, nested
        # v2 JSON data). The parity gate judges np.asarray of the output too: both see the same array.
        y = np.asarray(y)
    if classes is None:
        if not y.shape or y.shape[0] != rows:
            raise BackendError(f"backend returned shape {y.shape} for a batch of {rows}")
        return y
    if y.shape == (rows, classes) and y.dtype.kind == "f":
        return y if y.dtype is _FLOAT32 or y.dtype == _FLOAT32 else y.astype(np.float32)
    got = f"shape {y.shape}" if y.dtype.kind == "f" else f"{y.dtype} of shape {y.shape}"
    raise BackendError(f"backend returned {got}, expected ({rows}, {classes}) float32")


def check_backend(backend: Any) -> None:
    """BackendError (one line naming every problem) unless `backend` has what `Backend` lists, with usable values."""
    # What a runtime's `load` returned is checked once here, not found out by a server that crashes (a parallelism
    # of 0 sized its thread pool) or a route that answers 500. A numpy integer count is a whole number too: it is
    # stored back as an int (the server puts the counts in JSON answers, which take no numpy integer).
    problems = [f"no {name}()" for name in ("infer", "describe", "close")
                if not callable(getattr(backend, name, None))]
    missing = object()
    bounds = {"max_batch": MAX_BACKEND_ROWS, "parallelism": MAX_BACKEND_PARALLELISM}
    for name in ("precision", "device", "max_batch", "parallelism"):
        value = getattr(backend, name, missing)
        if value is missing:
            problems.append(f"no {name}")
        elif name in ("precision", "device") and not (isinstance(value, str) and value):
            problems.append(f"{name} must be a non-empty string, got {value!r:.40}")
        elif name in bounds and not (is_int(value, numpy=True) and 1 <= value <= bounds[name]):
            problems.append(f"{name} must be a whole number in 1..{bounds[name]}, got {value!r:.40}")
        elif name in bounds and type(value) is not int:
            try:
                setattr(backend, name, int(value))
            except (AttributeError, TypeError):  # a read-only property, __slots__
                problems.append(f"{name} must be an int, got {value!r:.40}, which cannot be stored back as one")
    if problems:
        raise BackendError(f"its Backend ({type(backend).__name__}) breaks the contract: {'; '.join(problems)}")


# What `describe()` may return: JSON data the server answers with in /v1/models (and export, the benchmarks and
# reports record), small and shallow: a plugin's nested or huge description is refused, not sent with every listing.
MAX_DESCRIPTION_BYTES = 64 * 1024


def description(backend: Any, runtime: str) -> dict[str, Any]:
    """`backend.describe()` as plain JSON data (numpy scalars as Python numbers); BackendError (one line naming
    `runtime`) when it raises or returns anything else."""
    # Checked by every stage that opens an artifact (runtimes.loader.open_artifact) and read through here by those
    # that keep it: a numpy integer in it made /v1/models answer 500 for every model, None was served but refused by
    # export, and a describe() that raised crashed the server's start.
    try:
        value = backend.describe()
    except Exception as exc:
        # The machine's memory or threads running out pass on as the warm-up's do (a server start exits 1 "out of
        # memory", not 2 as for a broken plugin): a bare MemoryError as it is, the runtime's words as a MemoryError.
        if not plugin_fault(exc):
            raise
        if isinstance(failure := inference_error(runtime, exc, "describe()"), MemoryError):
            raise failure from exc
        raise BackendError(f"{runtime} describe() failed: {type(exc).__name__}: {first_line(exc)}") from exc
    if not isinstance(value, dict):
        raise BackendError(f"{runtime} describe() returned {type(value).__name__}, expected a dict")
    try:
        plain = json_data(value)
        size = len(json.dumps(plain, allow_nan=False))
    except ValueError as exc:
        raise BackendError(f"{runtime} describe() returned {exc}") from None
    if size > MAX_DESCRIPTION_BYTES:
        raise BackendError(f"{runtime} describe() returned {size:,} bytes of JSON, more than the "
                           f"{MAX_DESCRIPTION_BYTES:,} allowed")
    return plain


def plugin_fault(exc: BaseException) -> bool:
    """Whether `exc`, raised by a loaded backend's code (its infer, its describe), is the runtime's own fault (a bad
    output, its own exception type): not the bundle's (BundleError), not an interrupt, not a bare MemoryError (the
    machine's)."""
    return isinstance(exc, Exception) and not isinstance(exc, BundleError) and type(exc) is not MemoryError


def inference_error(runtime: str, exc: BaseException, step: str = "inference") -> Exception:
    """What a runtime's own exception during inference (or another `step` of a loaded backend) becomes (raise it
    `from exc`): MemoryError when it is the machine's memory or threads running out, else a one-line BackendError."""
    if memory_failure(exc) is not None:
        return MemoryError(f"out of memory in {runtime} {step}: {first_line(exc)}")
    return BackendError(f"{runtime} {step} failed: {first_line(exc)}")


class CallPool:
    """The items `infer` calls hold while they compute, shared among a backend's concurrent calls, and its closing."""

    # An item: an OpenVINO infer request, an onnxruntime session, a model whose calls run one at a time.
    # A call waits for a free item. `close` wakes every waiting call and refuses every later one with
    # BackendError("<owner> is closed"), at once (a waiter used to block forever, and its thread kept the process
    # from exiting cleanly). A call already holding an item finishes with it; the backend's `release` (device
    # buffers, a thread pool) runs once the last such call has given its item back, never under a running call.

    def __init__(self, owner: str, items: Iterable[Any]) -> None:
        self.owner = owner  # "this openvino backend": what the refusal names
        self._free: deque = deque(items)
        self._cond = threading.Condition(threading.Lock())
        self._busy = 0  # items held by calls
        self._closed = False
        self._release: Callable[[], None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def refuse_if_closed(self) -> None:
        """BackendError once the pool is closed (for a call that computes without taking an item)."""
        if self._closed:
            raise BackendError(f"{self.owner} is closed")

    def acquire(self) -> Any:
        """A free item, waiting for one; BackendError when the pool is closed, or closes while this waits."""
        with self._cond:
            while not self._free and not self._closed:
                self._cond.wait()
            if self._closed:
                raise BackendError(f"{self.owner} is closed")
            self._busy += 1
            return self._free.popleft()

    def give_back(self, item: Any) -> None:
        """Return an item taken by `acquire`; after `close` it is dropped, and the last one runs the release."""
        with self._cond:
            self._busy -= 1
            if not self._closed:
                self._free.append(item)
                self._cond.notify()
                return
            release = self._release if self._busy == 0 else None
            if release is not None:
                self._release = None
        if release is not None:
            release()

    def close(self, release: Callable[[], None] | None = None) -> None:
        """Refuse every waiting and later call, drop the free items, and run `release` now, or once the calls in
        flight have given theirs back. A second close does nothing."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._free.clear()
            self._cond.notify_all()
            if self._busy:
                self._release, release = release, None
        if release is not None:
            release()


class PooledBackend:
    """The shared half of the built-in backends: checked `infer` on a CallPool, and `close`."""

    # `infer` checks the batch (`check_batch`), runs `_compute` on an item of the backend's CallPool, and turns the
    # runtime's own errors into `inference_error`; `close` closes the pool and runs `_release` once no call
    # computes any more. Subclasses set `runtime`, `max_batch`, `sample_shape` and `_pool`, and define `_compute`
    # (and `_release` when something outlives the pool's items).

    runtime: str
    max_batch: int
    sample_shape: tuple[int, int, int]
    _pool: CallPool

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 with 1 <= B <= max_batch -> (B, classes) float32 (the Backend contract)."""
        check_batch(batch, self.sample_shape, self.max_batch)
        try:
            return self._call(batch)
        except (BackendError, MemoryError):
            raise
        except Exception as exc:  # the runtime's own types, multi-line messages: one line, the native one chained
            raise inference_error(self.runtime, exc) from exc

    def _call(self, batch: np.ndarray) -> np.ndarray:
        """One call on a pooled item (a subclass routes some calls elsewhere by overriding this)."""
        item = self._pool.acquire()
        try:
            return self._compute(item, batch)
        except Exception:
            item = self._renewed(item)
            raise
        finally:
            self._pool.give_back(item)

    def _compute(self, item: Any, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _renewed(self, item: Any) -> Any:
        """The item to pool after a call on `item` failed: `item`, or a fresh one where a failure can leave it
        broken (an OpenVINO infer request after an out-of-memory fails every later call)."""
        return item

    def _release(self) -> None:
        """Free what the calls shared, once none runs (the pool's items themselves are already dropped)."""

    def close(self) -> None:
        """Refuse new and waiting calls at once; release the runtime's resources after the calls in flight."""
        self._pool.close(self._release)


@dataclass(frozen=True)
class BackendOptions:
    """How to run an artifact; None means the runtime's own sensible default."""

    device: str = "cpu"  # cpu | cuda | cuda:N
    threads: int | None = None  # intra-op threads of one inference
    parallel: int | None = None  # concurrent infer calls (OpenVINO infer requests, onnxruntime CPU streams)
    # Performance hint: "throughput" splits the CPU into streams with several batches in flight (OpenVINO's
    # THROUGHPUT hint, onnxruntime's streams); "latency" runs one batch at a time on every core.
    hint: Literal["throughput", "latency"] = "throughput"
    # Compute precision beyond what the artifact stores: OpenVINO's INFERENCE_PRECISION_HINT ("bf16"), torch
    # autocast ("bf16", "fp16"). None: the precision the artifact's parity gate measured.
    inference_precision: str | None = None
    # torch: torch.compile (on CUDA with a CUDA graph per batch bucket, captured at load); NHWC activations for the
    # stem's convolutions (None: on CUDA, where cuDNN runs them fastest).
    compile: bool = False
    channels_last: bool | None = None
    # The batch sizes a compiled model is captured at (each call is padded up to one); None: powers of two up to
    # the bundle's max batch. Fewer buckets, shorter start: a benchmark captures only the sizes it times.
    buckets: tuple[int, ...] | None = None
    # The largest batch the caller will send (the server's max batch size): at most MAX_BATCH_LIMIT, the most any
    # bundle takes, and a runtime caps it at its own bundle's; None: the bundle's. What a runtime that prepares per
    # batch size sizes itself by (torch captures its compiled buckets up to it).
    max_batch: int | None = None

    def __post_init__(self) -> None:
        # Types as well as values: the options are hashed and compared (benchmarks, the server's settings), and a
        # bool is not a count. A list of buckets is taken as the tuple it means, a numpy integer as the int.
        if not is_device(self.device):
            raise BackendError(f"device must be {DEVICE_RULE}, got {self.device!r}")
        if not (isinstance(self.hint, str) and self.hint in HINTS):
            raise BackendError(f"hint must be one of {', '.join(HINTS)}, got {self.hint!r}")
        for name, high in (("threads", MAX_THREADS), ("parallel", MAX_PARALLEL)):
            value = getattr(self, name)
            if value is not None and not (is_int(value, numpy=True) and 1 <= value <= high):
                raise BackendError(f"{name} must be an integer in 1..{high}, got {value!r}")
            self._as_int(name)
        if self.inference_precision is not None and not isinstance(self.inference_precision, str):
            raise BackendError(f"inference_precision must be a precision name or None, "
                               f"got {self.inference_precision!r}")
        if not isinstance(self.compile, bool):
            raise BackendError(f"compile must be True or False, got {self.compile!r}")
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise BackendError(f"channels_last must be True, False or None, got {self.channels_last!r}")
        if self.buckets is not None:
            if not (isinstance(self.buckets, tuple | list) and self.buckets
                    and all(is_int(b, numpy=True) and 1 <= b <= MAX_BATCH_LIMIT for b in self.buckets)):
                raise BackendError(f"buckets must be a tuple of batch sizes in 1..{MAX_BATCH_LIMIT}, "
                                   f"got {self.buckets!r}")
            object.__setattr__(self, "buckets", tuple(int(b) for b in self.buckets))
        if self.max_batch is not None and not (is_int(self.max_batch, numpy=True)
                                               and 1 <= self.max_batch <= MAX_BATCH_LIMIT):
            raise BackendError(f"max_batch must be a batch size in 1..{MAX_BATCH_LIMIT} or None, "
                               f"got {self.max_batch!r}")
        self._as_int("max_batch")

    def _as_int(self, name: str) -> None:
        """Store a numpy integer count as the int it means: the options are hashed, compared and put in JSON."""
        if (value := getattr(self, name)) is not None:
            object.__setattr__(self, name, int(value))

    @property
    def device_kind(self) -> str:
        """"cpu" or "cuda"."""
        return self.device.partition(":")[0]

    @property
    def device_index(self) -> int:
        """N of cuda:N (0 for plain cuda)."""
        return int(self.device.partition(":")[2] or 0)


@dataclass(frozen=True)
class LoadSpec:
    """Everything a runtime needs to open one artifact, its files already verified against the manifest."""

    manifest: Manifest  # during export: the bundle's header, before its artifacts are listed
    artifact: Artifact
    files: tuple[Path, ...]
    options: BackendOptions = field(default_factory=BackendOptions)

    @property
    def num_classes(self) -> int:
        return self.manifest.output.classes

    @property
    def max_batch(self) -> int:
        return self.manifest.input.max_batch

    @property
    def precision(self) -> str:
        return self.artifact.precision

    @property
    def device(self) -> str:
        return self.options.device

    def file(self, suffix: str) -> Path:
        """The artifact file ending in `suffix`; BackendError if the artifact has none."""
        for p in self.files:
            if p.name.endswith(suffix):
                return p
        raise BackendError(f"artifact {self.artifact.id!r} has no *{suffix} file")


@dataclass(frozen=True)
class Variant:
    """One way to run a runtime, as the benchmarks time it: a compute precision on a device."""

    precision: str
    device: str = "cpu"
    artifact: str | None = None  # artifact precision it runs (default: `precision`)
    inference_precision: str | None = None  # the BackendOptions.inference_precision it needs
    compile: bool = False  # BackendOptions.compile
    channels_last: bool | None = None  # BackendOptions.channels_last (None: the runtime's default)

    @property
    def artifact_precision(self) -> str:
        return self.artifact or self.precision

    @property
    def suffix(self) -> str:
        """What tells it apart from the plain variant of its precision: "-compiled", "-nchw", "-nhwc"."""
        layout = {None: "", False: "-nchw", True: "-nhwc"}[self.channels_last]
        return f"{'-compiled' if self.compile else ''}{layout}"


@dataclass(frozen=True)
class TritonRelease:
    """How the Triton release decides whether it loads a runtime's artifacts, for a runtime whose artifacts not every
    release from the oldest that export.triton supports on loads (TensorRT: an engine loads only in the TensorRT that
    built it, so only in the releases whose image ships that one). A release is an image tag, YY.MM[-suffix]."""

    cannot_load: Callable[[Artifact, str], str | None]  # why release `tag` cannot load it (None: it can, or unknown)
    cannot_tell: Callable[[Artifact, str], str | None]  # why it is not known whether `tag` loads it (None: known)
    advice: Callable[[Artifact], str]  # the --triton-version that loads it
    same: Callable[[str, str], bool]  # whether two releases load the same artifacts of this runtime
    # What a new version of the model must be for release `tag` to load it ("whose engine TensorRT 10.0.1 built").
    loaded_by: Callable[[str], str]


@dataclass(frozen=True)
class Runtime:
    """Everything the project knows about one runtime. Each runtime module defines one as `RUNTIME`."""

    name: str  # manifest "runtime" and the server's --backend value
    target: str  # export target family: `python -m export --targets <target>[-<precision>]`
    packages: tuple[str, ...]  # importable modules it needs
    install: str  # how to get them, printed when they are missing (models.cli.pip_command: fits a checkout or a wheel)
    format: str  # manifest "format" of its artifacts
    triton_platform: str  # Open Inference Protocol / Triton platform name
    precisions: tuple[str, ...]  # artifact precisions `build` makes
    default_precisions: tuple[str, ...]  # built when the target is named without a precision
    devices: tuple[str, ...]  # device kinds `load` runs on
    build: Callable[[ExportContext, str], Built]
    load: Callable[[LoadSpec], Backend]
    version: Callable[[], str]
    variants: tuple[Variant, ...] = ()  # benchmark targets
    export_device: str = "cpu"  # where the export's parity gate runs its artifacts
    # The pyproject.toml extra that brings its packages to an export environment, named with the others an export
    # lacks (None: its `install` line, as for TensorRT, whose extra would replace the CPU onnxruntime).
    export_extra: str | None = None
    needs_hub: bool = False  # `build` converts from the fp32 ONNX hub (ExportContext.hub_onnx)
    # An artifact of another runtime it can open when the bundle has none of its own (TensorRT: the ONNX file).
    fallback: tuple[str, str] | None = None
    unavailable: Callable[[str], str | None] = lambda _device: None  # why it cannot run on a device, or None
    # Why this machine cannot open one of its own artifacts on a device although the runtime runs there (a TensorRT
    # engine built for another GPU or TensorRT), or None: the loader then opens the `fallback` instead, if any.
    mismatch: Callable[[Artifact, str], str | None] = lambda _artifact, _device: None
    # Per-op-type milliseconds of one artifact at a batch size (spec, batch, reps), where the runtime can tell.
    profile: Callable[[LoadSpec, int, int], dict[str, float]] | None = None
    # Triton: the backend that serves this runtime's artifacts, the file names it expects (artifact file suffix ->
    # name in the version directory; other files keep theirs).
    triton_backend: str | None = None  # None: Triton cannot serve these artifacts
    triton_files: tuple[tuple[str, str], ...] = ()
    # The config.pbtxt parameter of that backend that caps CPU threads (None: it has none): one instance's, or, when
    # `triton_threads_shared`, the model's (OpenVINO's backend compiles one model that every instance shares).
    triton_threads: str | None = None
    triton_threads_shared: bool = False
    triton_streams: str | None = None  # the parameter that lets the shared model run that many requests at once
    # Triton fills an absent config.pbtxt `backend` in from `triton_platform` (from the model file name it always does).
    triton_platform_fills: bool = False
    triton_cpu_only: bool = False  # its Triton backend runs KIND_CPU (and KIND_AUTO) instance groups only
    # Its Triton backend fixes the batch at max_batch_size and refuses any other (the warm-up's too): export.triton
    # gives its models Triton's layout without a batch dimension (max_batch_size 0, dims [ -1, ... ]).
    triton_fixed_batch: bool = False
    triton_note: str = ""  # comment lines export.triton ends its config.pbtxt with: where Triton serves it unlike vitc
    # Why the oldest Triton release export.triton supports (export.triton_compat.MIN_TRITON_RELEASE) cannot load the
    # artifact's files staged in a version directory (a newer exporter wrote them); None when it can.
    triton_min_check: Callable[[Path, Artifact], str | None] = lambda _version_dir, _artifact: None
    triton_release: TritonRelease | None = None  # None: every release from the oldest supported on loads them
    # The server's tuning settings it honours beyond the device (of threads, parallel, openvino_hint, compile,
    # channels_last): the server refuses the others for it rather than let them silently do nothing.
    tunes: tuple[str, ...] = ()

    @property
    def triton_file(self) -> str | None:
        """The model file Triton's backend opens by default (None: Triton cannot serve these artifacts)."""
        return self.triton_files[0][1] if self.triton_backend is not None and self.triton_files else None

    def triton_rules(self, every: Iterable[Runtime]) -> BackendRules:
        """What Triton does with its backend, as models.tritonconfig checks a config.pbtxt (`every`: the registered
        runtimes, whose model file names Triton picks their backends by)."""
        files = {rt.triton_file: rt.triton_backend for rt in every if rt.triton_file and rt.triton_backend}
        return BackendRules(fills_from_platform=self.triton_platform_fills, file_backends=files,
                            cpu_only=self.triton_cpu_only)

    def installed(self) -> bool:
        """Whether every package it needs can be imported (checked without importing them)."""
        return all(installed(p) for p in self.packages)

    def require(self, device: str) -> None:
        """Raise BackendError unless this runtime is installed and can run on `device` here."""
        if not self.installed():
            raise BackendError(f"{self.name} is not installed (needs {', '.join(self.packages)}): {self.install}")
        check_device(device, self.devices, self.name)
        reason = self.unavailable(device)
        if reason:
            raise BackendError(f"{self.name} cannot run on {device}: {reason}")


def check_device(device: str, supported: tuple[str, ...], runtime: str) -> None:
    """Raise BackendError unless `device` ("cpu", "cuda" or "cuda:N") is one the runtime serves."""
    if not is_device(device):
        raise BackendError(f"device must be {DEVICE_RULE}, got {device!r}")
    if device.partition(":")[0] not in supported:
        raise BackendError(f"the {runtime} backend runs on {' or '.join(supported)}, not {device!r}")


STREAM_THREADS = 4  # threads per stream on bigger machines: wide enough for one batch, narrow enough to scale


def default_streams(cpus: int, threads: int | None = None) -> int:
    """Batches in flight on `cpus` cores (a throughput layout, like OpenVINO's THROUGHPUT hint): one-thread
    streams up to 4 cores, then streams of 4 threads; `threads` per stream when given."""
    per_stream = threads or (1 if cpus <= STREAM_THREADS else STREAM_THREADS)
    return max(1, cpus // per_stream)
