"""torch: the checkpoint's safetensors weights, rebuilt from the manifest's config, on the CPU or a CUDA GPU.

Artifacts: fp32 (the verified weights, copied), bf16 and fp16 (the weights rounded to that type, half the size,
run under torch autocast so LayerNorm, softmax and the reductions stay in fp32). Each one goes through the export's
parity gate for its precision, and the bundle's golden inputs are re-checked on the serving device at load.

How it runs (BackendOptions):
- `channels_last` (default: on CUDA): NHWC activations for the stem's convolutions, which cuDNN runs fastest;
  both stems are convolutions (ViT_P's patchify one is a stride-16 conv), so a C/P pair stays comparable.
- `compile`: `torch.compile`; on CUDA in "reduce-overhead" mode, so each batch bucket (powers of two up to the
  caller's `max_batch`, within the bundle's) is one CUDA graph replay. A batch is padded up to its bucket. Every
  bucket is compiled, captured and warmed up in the constructor, before the model can report ready, on one thread
  owned by the backend: CUDA graph trees are per thread, so every later call runs there too.
- fp32 on CUDA turns TF32 off (matmul and cuDNN), or fp32 parity could not hold.
Only this module imports torch; a server with another backend stays torch-free.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from models.extras import extras_hint
from models.host import quota_cpus
from models.oneline import first_line
from runtimes.base import (
    BackendError,
    BackendOptions,
    CallPool,
    LoadSpec,
    PooledBackend,
    Runtime,
    Variant,
)
from runtimes.build import Built, ExportContext, ExportError

if TYPE_CHECKING:
    from models.config import ViTConfig

WEIGHTS_FILE = "model.safetensors"
_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
_SAFETENSORS_DTYPES = {"bf16": "BF16", "fp16": "F16"}  # how the header names them


def version() -> str:
    """The torch version."""
    import torch

    return torch.__version__.split("+")[0]


def weights_file(precision: str) -> str:
    """The bundle file of one precision's weights."""
    return WEIGHTS_FILE if precision == "fp32" else f"model-{precision}.safetensors"


def build(ctx: ExportContext, precision: str) -> Built:
    """fp32: copy the verified checkpoint weights; bf16/fp16: those weights rounded to that type (buffers stay fp32)."""
    out = ctx.workdir / weights_file(precision)
    if precision == "fp32":
        shutil.copyfile(ctx.meta.weights_path, out)
        return Built([out], {"format_detail": "safetensors state_dict of models.vit.VisionTransformer"})
    if precision not in _DTYPES:
        raise ExportError(f"torch: unsupported precision {precision!r}")
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, _DTYPES[precision])
    params, weights = {name for name, _ in ctx.model.named_parameters()}, ctx.model.state_dict()
    state = {k: (v.to(dtype) if k in params and v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    if problem := _out_of_range(weights, state, params, torch.finfo(dtype)):
        raise ExportError(problem)  # before any file: the refusal is the reason, not a load of infinite weights
    save_file(state, str(out))
    return Built([out], {"format_detail": f"safetensors state_dict, parameters in {_DTYPES[precision]}",
                         "compute": f"torch autocast {_DTYPES[precision]}"})


def _out_of_range(original: dict[str, Any], rounded: dict[str, Any], params: set[str], finfo: Any) -> str | None:
    """Why the rounded parameters cannot be an artifact (None when every one is finite): a weight past the type's
    largest value (fp16: 65504) rounds to infinity, and the checkpoint itself may still serve in fp32 or bf16."""
    bad = [k for k, v in rounded.items() if k in params and v.is_floating_point() and not v.isfinite().all()]
    if not bad:
        return None
    name = bad[0]  # the first in the model's order
    more = f", as do {len(bad) - 1} more parameters" if len(bad) > 1 else ""
    return (f"parameter {name} (max |w| {float(original[name].abs().max()):.3g}) exceeds {finfo.dtype}'s range "
            f"({finfo.max:.6g}){more}")


def buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a compiled model is captured at: powers of two below max_batch, and max_batch."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


def capture_buckets(options: BackendOptions, bundle_max_batch: int) -> tuple[int, ...]:
    """The batch sizes a compiled backend captures: `options.buckets`, else `buckets` up to the caller's max batch
    (`options.max_batch`, within the bundle's); BackendError for a bucket beyond the bundle's max batch."""
    if options.buckets:
        if max(options.buckets) > bundle_max_batch:
            raise BackendError(f"batch bucket {max(options.buckets)} exceeds the bundle's max batch {bundle_max_batch}")
        return tuple(sorted(set(options.buckets)))
    return buckets(min(options.max_batch or bundle_max_batch, bundle_max_batch))


def compile_options(cuda: bool, captured: int) -> dict[str, Any]:
    """torch.compile's arguments for a backend that captures `captured` batch buckets."""
    return {
        # A CUDA graph per bucket on CUDA; inductor's kernels alone on the CPU.
        "mode": "reduce-overhead" if cuda else "default",
        # dynamo keeps its compiled entries per code object, and every backend compiles the same one
        # (VisionTransformer.forward): with one shared budget (recompile_limit, 8), the later compiled backends of
        # a benchmark process found it spent, and dynamo ran them eagerly after a log warning, their results still
        # reported as compiled. Each backend gets its own region, sized for its buckets: one entry per bucket at
        # worst, plus batch 1's specialisation and one spare.
        "isolate_recompiles": True,
        "recompile_limit": captured + 2,
        # A graph break, or a recompile past the limit, raises instead of running eagerly: an export-friendly
        # model (torch.export traces it whole for ONNX) has no reason for either.
        "fullgraph": True,
    }


class _ThreadCount:
    """torch's intra-op thread count, set by every backend call: the swap is serialised, never the call itself."""

    # A lock held for the whole call made one model's compile (its warm-up calls are calls: tens of seconds on the
    # CPU) stall every other torch model of the server into 504s and 503s. The count only decides how fast a call
    # runs, never what it computes: calls overlap, each one setting its own count as it starts (torch's OpenMP
    # build keeps it per calling thread; where it is one per process, overlapping calls share the latest). What
    # stays guaranteed: a call alone runs at its own count and leaves the count as it found it, and the count from
    # before the calls is back once none runs, whatever order overlapping calls ended in.
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0  # calls between enter and leave
        self._before = 0  # the count before the first of them

    def enter(self, torch: ModuleType, n: int) -> int:
        """Set n for a call that starts now; returns the count it found, for `leave`."""
        with self._lock:
            old = torch.get_num_threads()
            if old != n:
                torch.set_num_threads(n)
            if not self._running:
                self._before = old
            self._running += 1
            return old

    def leave(self, torch: ModuleType, old: int) -> None:
        """A call that found `old` ended: the count back to `old`, or to the one from before every call once none
        runs (with one count per process, `old` may be an overlapping call's count)."""
        with self._lock:
            self._running -= 1
            back = old if self._running else self._before
            if torch.get_num_threads() != back:
                torch.set_num_threads(back)


_THREAD_COUNT = _ThreadCount()


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with n intra-op threads (`_ThreadCount`), other backends' calls running alongside."""
    if n is None:
        yield
        return
    import torch

    old = _THREAD_COUNT.enter(torch, n)
    try:
        yield
    finally:
        _THREAD_COUNT.leave(torch, old)


def _check_header(path: Path, config: ViTConfig, precision: str) -> None:
    """BackendError unless the safetensors header of `path` lists `config`'s tensors at their shapes, floats in fp32
    or the artifact's `precision`: a manifest may claim a model of 2^32 parameters beside a 100 KB file, and building
    that model to find out cost 16 GiB; the header is compared on the meta device, with no memory."""
    from safetensors import SafetensorError

    from models.checkpoint import weights_problem

    floats = ("F32", _SAFETENSORS_DTYPES[precision]) if precision in _SAFETENSORS_DTYPES else ("F32",)
    try:
        problem = weights_problem(path, config, floats)
    except (SafetensorError, OSError, ValueError) as exc:
        raise BackendError(f"{path.name} cannot be read: {first_line(exc)}") from None
    if problem:
        raise BackendError(f"{path.name}: weights do not fit the manifest's config (the file's weights{problem})")


def _strict_fp32(torch: ModuleType) -> None:
    """No TF32 in matmuls or convolutions: fp32 on CUDA must reproduce the CPU's fp32 logits."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class TorchBackend(PooledBackend):
    """VisionTransformer in eval mode under inference_mode; autocast for bf16/fp16; optionally compiled."""

    runtime = "torch"
    parallelism = 1

    def __init__(self, spec: LoadSpec) -> None:
        import torch
        from safetensors.torch import load_file

        from models.checkpoint import CheckpointError, check_finite
        from models.vit import VisionTransformer

        options = spec.options
        cuda = options.device_kind == "cuda"
        if cuda and not torch.cuda.is_available():
            raise BackendError(f"--device {options.device}: torch sees no CUDA device")
        if cuda and options.device_index >= torch.cuda.device_count():
            raise BackendError(f"--device {options.device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
        compute = options.inference_precision or spec.precision
        if compute not in ("fp32", *_DTYPES):
            raise BackendError(f"torch computes in fp32, bf16 or fp16, not {compute!r}")
        self.device, self.precision, self.max_batch = options.device, spec.precision, spec.max_batch
        self.sample_shape = spec.manifest.input.sample_shape
        self._torch = torch
        self._autocast = getattr(torch, _DTYPES[compute]) if compute in _DTYPES else None
        # torch sizes its pool by the CPU set; under a CPU quota (a container limit) it is told the quota.
        self._threads = (options.threads or quota_cpus()) if not cuda else None
        self._channels_last = cuda if options.channels_last is None else options.channels_last
        self._compiled = options.compile
        wanted = capture_buckets(options, spec.max_batch)
        self._buckets = wanted if options.compile else ()
        if self._buckets:  # what a caller may send: the largest captured bucket
            self.max_batch = max(self._buckets)
        if cuda and compute == "fp32":
            _strict_fp32(torch)
        path = spec.file(".safetensors")
        _check_header(path, spec.manifest.config, spec.precision)  # before the model the config describes is built
        model = VisionTransformer(spec.manifest.config)
        state = load_file(str(path))
        try:  # a NaN pinned under a valid sha256 is refused here, not left to the golden check to notice
            check_finite(state, path)
        except CheckpointError as exc:
            raise BackendError(str(exc)) from None
        try:  # rounded weights come back to fp32 exactly; autocast rounds them again where it computes low
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                  strict=True)
        except RuntimeError as exc:
            raise BackendError(f"{path.name}: weights do not fit the manifest's config: {first_line(exc)}") from None
        del state
        model = model.eval().to(options.device)
        if self._channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._run = model
        # One thread runs every compiled call: CUDA graph trees and dynamo's caches are per thread.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="vitc-torch") if self._compiled else None
        self.compile_seconds: dict[int, float] = {}
        if self._compiled:
            try:
                self._executor.submit(self._compile).result()
            except BaseException:
                self._release()
                raise
        # The model, eager or compiled, runs one call at a time: a pool of one.
        self._pool = CallPool("this torch backend", [self._run])

    def _compile(self) -> None:
        """Compile with a symbolic batch axis (batch 1 is its own specialisation, and a size-dependent kernel choice
        may add one), then capture and warm every bucket, largest first (three calls each: warm-up, CUDA graph
        record, replay)."""
        import time

        torch = self._torch
        self._run = torch.compile(self.model, **compile_options(self.device.startswith("cuda"), len(self._buckets)))
        shape = (3, self.model.cfg.image_size, self.model.cfg.image_size)
        for b in sorted(self._buckets, reverse=True):
            start = time.perf_counter()
            for _ in range(3):
                self._forward(self._run, np.zeros((b, *shape), np.float32), dynamic=b > 1)
            self.compile_seconds[b] = round(time.perf_counter() - start, 3)

    def _forward(self, run: Any, batch: np.ndarray, dynamic: bool = False) -> np.ndarray:
        """One call of `run` (the model, or its compiled form) on `batch`, padded to its bucket when compiled
        (`dynamic` marks the batch axis symbolic)."""
        torch = self._torch
        n = len(batch)
        if self._buckets:
            size = next((b for b in self._buckets if b >= n), None)
            if size is None:
                raise BackendError(f"batch of {n} exceeds the largest captured batch {self.max_batch}")
            if size != n:
                batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), batch.dtype)])
        with _threads(self._threads), torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if dynamic:  # a hint, not a constraint: where a kernel choice guards on the size, that bucket recompiles
                torch._dynamo.maybe_mark_dynamic(x, 0)
            try:
                if self._autocast is None:
                    y = run(x)
                else:
                    with torch.autocast(x.device.type, dtype=self._autocast):
                        y = run(x)
            except Exception as exc:
                # fullgraph (compile_options): where dynamo would have run the call eagerly, it raises
                if self._compiled and isinstance(exc, torch._dynamo.exc.FailOnRecompileLimitHit):
                    raise BackendError(f"torch.compile would fall back to eager at batch {len(batch)}: dynamo's "
                                       f"recompile limit is spent ({first_line(exc)}); run it with "
                                       "TORCH_LOGS=recompiles to see why it recompiled") from exc
                raise
            return y[:n].float().cpu().numpy()  # copied out before the next replay reuses the graph's output

    def _compute(self, run: Any, batch: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 -> (B, classes) float32, on the compiling thread when compiled."""
        if self._executor is None:
            return self._forward(run, batch)
        return self._executor.submit(self._forward, run, batch).result()

    def describe(self) -> dict[str, Any]:
        return {"threads_effective": self._threads or self._torch.get_num_threads(),
                "inference_precision": str(self._autocast or self._torch.float32).replace("torch.", ""),
                "channels_last": self._channels_last, "compiled": self._compiled,
                "batch_buckets": list(self._buckets), "compile_seconds": dict(self.compile_seconds)}

    def _release(self) -> None:
        """Drop the model and the compiled graphs (after the call in flight, if any)."""
        self.model = self._run = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


RUNTIME = Runtime(
    name="torch", target="torch", packages=("torch", "safetensors"),
    install=extras_hint(["train"]), export_extra="train",
    format="safetensors", triton_platform="pytorch_libtorch", precisions=("fp32", "bf16", "fp16"),
    default_precisions=("fp32",), devices=("cpu", "cuda"), build=build, load=TorchBackend, version=version,
    variants=(
        Variant("fp32"), Variant("bf16"),
        # CUDA: channels_last by default; NCHW and compiled (CUDA graphs) variants show what each one buys.
        Variant("fp32", "cuda"),
        *(Variant(p, "cuda", compile=c, channels_last=cl) for p in ("bf16", "fp16") for c in (False, True)
          for cl in (None, False)),
    ),
    tunes=("threads", "compile", "channels_last"),  # one batch at a time: a lock serialises the calls
)
