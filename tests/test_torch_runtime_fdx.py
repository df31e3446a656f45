"""The torch runtime's fixes from hDZ: a compile in flight no longer stalls other torch backends' calls, a weight
beyond a low precision's range is refused by name at build, and non-finite logits leave batch invariance
unmeasured (null, no numpy warning)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_serve_fixtures import micro_bundle, val_batch

import runtimes
from export.bundle import build_bundle
from models.bundle import Artifact, Manifest, read_manifest
from runtimes import BackendOptions, ExportError

HOLD_S = 20  # how long the held compile waits for the other backend's answers before it gives up on them


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return micro_bundle(tmp_path_factory, ("torch-bf16", "torch-fp16"))  # test_torch_runtime's: one build a session


def _open(bundle: Path, threads: int, **options: object) -> runtimes.Backend:
    return runtimes.open_backend(bundle, read_manifest(bundle), "torch", "fp32",
                                 BackendOptions(threads=threads, **options))


def _checkpoint(root: Path, change: Callable[[object], None]) -> Path:
    """micro_checkpoint's vit_c_micro (seed 0, wide random head) with `change` applied to it before it is saved."""
    import torch

    from data.datasets import ANIMAL_CLASSES, default_preprocessing
    from models import build_model
    from models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model("vit_c_micro").eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
        change(model)
    return save_checkpoint(root / "ckpt", model, class_names=ANIMAL_CLASSES,
                           preprocessing=default_preprocessing("animals", 32), extra={"dataset": "animals"})


def _export(checkpoint: Path, out: Path, targets: tuple[str, ...]) -> Manifest:
    return build_bundle(checkpoint, out, targets=targets, max_batch=4, parity_samples=16, threads=1,
                        log=lambda _: None)


def _artifact(manifest: Manifest, artifact_id: str) -> Artifact:
    return next(a for a in manifest.artifacts if a.id == artifact_id)


def test_a_compile_in_flight_does_not_stall_another_torch_backend(bundle, monkeypatch):
    """One process-wide lock was held for a whole forward call, and a compiled backend's warm-up calls are forward
    calls: while one model compiled (tens of seconds), every other torch model of the server waited for it, and
    answered 504, then 503 not ready. Here the compile is held at its start, in dynamo's own compile-start hook,
    until the other backend has answered: before the fix those answers waited for the compile instead."""
    import torch

    from runtimes import pytorch

    # Dynamo's start hook holds the compile, whichever backend dynamo hands the graph to: its "eager" backend keeps
    # the compile in flight without inductor's code generation and C++ builds (most of this test's time).
    inductor_options = pytorch.compile_options

    def eager_compile(cuda: bool, captured: int) -> dict[str, object]:
        options = inductor_options(cuda, captured)
        del options["mode"]  # inductor's modes; dynamo's eager backend takes none
        return {**options, "backend": "eager"}

    monkeypatch.setattr(pytorch, "compile_options", eager_compile)
    x = val_batch(read_manifest(bundle), 2)
    eager = _open(bundle, threads=1)
    expected, before = eager.infer(x), torch.get_num_threads()
    started, answered, held = threading.Event(), threading.Event(), []

    def hold(_args: object) -> None:  # runs on the compiling thread, inside its forward call
        started.set()
        held.append(answered.wait(HOLD_S))

    torch._dynamo.callback_handler.register_start_callback(hold)
    pool = ThreadPoolExecutor(1)
    try:  # another thread count than the eager backend's: the counts differ, the calls still overlap
        loading = pool.submit(_open, bundle, 2, compile=True, max_batch=1)
        assert started.wait(300), "the compile never started"
        answers = [eager.infer(x) for _ in range(3)]
        answered.set()
        compiled = loading.result()
    finally:
        answered.set()
        pool.shutdown()
        torch._dynamo.callback_handler.remove_start_callback(hold)
    try:
        assert held[0], "the eager backend's calls waited for the other backend's compile"
        for y in answers:
            np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(compiled.infer(x[:1]), expected[:1], rtol=1e-4, atol=1e-4)
        assert torch.get_num_threads() == before  # the caller's own count is back
    finally:
        compiled.close()
        eager.close()


def test_a_weight_beyond_bfloat16s_range_is_refused_by_the_build(micro_checkpoint, tmp_path):
    """bf16 has fp32's exponent but not its largest values: a weight near fp32's maximum rounds to infinity."""
    import torch

    from models.checkpoint import load_checkpoint
    from runtimes.build import ExportContext
    from runtimes.pytorch import build

    model, meta = load_checkpoint(micro_checkpoint(tmp_path))
    with torch.no_grad():
        model.pos_embed[0, 0, 0] = 3.4e38
    workdir = tmp_path / "work"
    workdir.mkdir()
    ctx = ExportContext(model=model, meta=meta, workdir=workdir, max_batch=4, opset=20, calibration_set=list)
    with pytest.raises(ExportError) as caught:
        build(ctx, "bf16")
    assert str(caught.value) == "parameter pos_embed (max |w| 3.4e+38) exceeds bfloat16's range (3.38953e+38)"
    assert not list(workdir.iterdir())  # refused before anything was written


def test_an_fp16_weight_beyond_its_range_is_refused_by_name_not_as_a_crash(tmp_path):
    """fp16 rounded a weight of 1e5 to infinity unchecked; the gate's load then reported "export failed:
    BackendError: weights <a deleted temp path>: pos_embed holds an infinite value; the checkpoint cannot be used",
    though the checkpoint is sound (fp32 and bf16 pass)."""
    def one_huge_position(model: object) -> None:  # the cls position, one channel: LayerNorm'd before any use
        model.pos_embed[0, 0, 0] = 1e5

    ckpt = _checkpoint(tmp_path, one_huge_position)
    manifest = _export(ckpt, tmp_path / "bundle", ("torch-bf16", "torch-fp16"))
    fp16 = _artifact(manifest, "torch-fp16")
    assert fp16.refused_reason == "parameter pos_embed (max |w| 1e+05) exceeds float16's range (65504)"
    assert not fp16.servable and not fp16.files and not fp16.refused_files  # nothing was written
    assert _artifact(manifest, "torch-fp32").servable and _artifact(manifest, "torch-bf16").servable


def test_non_finite_logits_leave_batch_invariance_unmeasured(tmp_path):
    """fp16 logits past 65504 are infinite: inf - inf is NaN, `max(0.0, nan)` is 0.0, so the refused artifact was
    recorded as perfectly batch-invariant, and numpy's "invalid value" warning reached the CLI."""
    from export.report import COLUMNS, rows

    ckpt = _checkpoint(tmp_path, lambda m: m.head.weight.mul_(2e4))  # weights within fp16, logits past it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = _export(ckpt, tmp_path / "bundle", ("torch-fp16",))
    fp16 = _artifact(manifest, "torch-fp16")
    assert not fp16.servable and fp16.refused_reason == "non-finite logits"
    assert fp16.parity.max_abs_err is None and fp16.parity.batch_invariance_max_abs is None
    assert not [str(w.message) for w in caught if Path(w.filename).name == "parity.py"]
    row = next(r for r in rows(manifest) if r[0] == "torch-fp16")
    assert row[COLUMNS.index("batch inv")] == row[COLUMNS.index("max abs err")] == "-"
