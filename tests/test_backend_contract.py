"""The Backend contract, the same on every runtime (runtimes.base.Backend): what `infer` takes and refuses, what a
runtime's own error becomes, what `close` does to waiting, running and later calls; and the typed arguments of
BackendOptions, runtimes.register and export.bundle.build_bundle. Real onnxruntime, OpenVINO and torch backends."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_serve_fixtures import micro_bundle, val_batch

import runtimes
from export.bundle import build_bundle
from models.bundle import read_manifest
from models.failures import memory_failure
from runtimes import BackendError, BackendOptions, ExportError

REPO = Path(__file__).resolve().parents[1]
RUNTIMES = ("onnxruntime", "openvino", "torch")
# One call at a time on each (one stream, one infer request, the torch lock), no latency session: a second call
# always waits, which is what close() must wake.
SERIAL = {"onnxruntime": BackendOptions(threads=1, parallel=1), "openvino": BackendOptions(threads=1, hint="latency"),
          "torch": BackendOptions(threads=1)}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return micro_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def manifest(bundle):
    return read_manifest(bundle)


@pytest.fixture(scope="module")
def batch(manifest):
    return val_batch(manifest, 4)


def _open(bundle, manifest, runtime):
    return runtimes.open_backend(bundle, manifest, runtime, "fp32", SERIAL[runtime])


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text, text
    return text


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_infer_takes_float32_batches_of_1_to_max_batch_and_refuses_the_rest_before_the_runtime(
        bundle, manifest, batch, runtime):
    backend = _open(bundle, manifest, runtime)
    c, h, w = manifest.input.sample_shape
    most = backend.max_batch
    assert most == manifest.input.max_batch == 32
    full = np.ascontiguousarray(np.resize(batch, (most, c, h, w)))
    reference = backend.infer(full)
    assert reference.shape == (most, manifest.output.classes) and reference.dtype == np.float32
    # Any layout of float32 is taken (a strided view, NHWC memory), with the same answers.
    np.testing.assert_allclose(backend.infer(full[::2]), reference[::2], atol=1e-5, rtol=1e-5)
    nhwc = np.ascontiguousarray(full[:2].transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(backend.infer(nhwc), reference[:2], atol=1e-5, rtol=1e-5)
    refused = {
        "float64": (full[:2].astype(np.float64), "must be float32"),
        "float16": (full[:2].astype(np.float16), "must be float32"),
        "uint8": (np.zeros((2, c, h, w), np.uint8), "must be float32"),
        "big-endian": (full[:2].astype(">f4"), "must be float32"),
        "wrong side": (np.zeros((1, c, 2 * h, 2 * w), np.float32), rf"must have shape \(B, {c}, {h}, {w}\)"),
        "one channel": (np.zeros((1, 1, h, w), np.float32), "must have shape"),
        "3-D": (np.zeros((c, h, w), np.float32), "must have shape"),
        "a list": (full[:1].tolist(), "must be a numpy array, got list"),
        "batch 0": (np.zeros((0, c, h, w), np.float32), "at least 1 row"),
        "above max batch": (np.zeros((most + 1, c, h, w), np.float32), f"{most + 1} rows exceeds .* max batch {most}"),
    }
    for case, (x, reason) in refused.items():
        with pytest.raises(BackendError, match=reason) as err:
            backend.infer(x)
        _one_line(err)
        assert err.value.__cause__ is None, case  # refused by the contract, not by the runtime
    backend.close()


def _fail_inside_the_runtime(backend, runtime: str, bundle: Path, manifest) -> None:
    """Make the backend's next call fail inside the runtime itself (a real error of that runtime)."""
    from runtimes.base import CallPool

    if runtime == "onnxruntime":
        backend._outputs = ["no_such_output"]  # onnxruntime's own InvalidArgument, raised by session.run
    elif runtime == "openvino":
        import openvino as ov

        xml = next(f.path for f in manifest.select("openvino", "fp32").files if f.path.endswith(".xml"))
        model = ov.Core().read_model(str(bundle / xml))
        model.reshape([1, *manifest.input.sample_shape])  # a static batch of 1: a batch of 2 fails in OpenVINO
        request = ov.Core().compile_model(model, "CPU").create_infer_request()
        backend._pool = CallPool("this openvino backend", [request])
    else:
        import torch

        backend._pool = CallPool("this torch backend", [torch.nn.Linear(5, 5)])  # shapes torch cannot multiply


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_runtime_error_during_inference_is_one_backend_error_line_chained_from_the_runtimes_own(
        bundle, manifest, batch, runtime):
    backend = _open(bundle, manifest, runtime)
    _fail_inside_the_runtime(backend, runtime, bundle, manifest)
    with pytest.raises(BackendError, match=f"^{runtime} inference failed: ") as err:
        backend.infer(np.ascontiguousarray(batch[:2]))
    _one_line(err)
    native = err.value.__cause__
    assert native is not None and not isinstance(native, BackendError)
    if runtime == "openvino":  # OpenVINO's message starts with source locations over several lines
        assert "\n" in str(native) and "Exception from src" not in str(err.value)
    assert memory_failure(err.value) is None  # a failing input, not the machine


def test_out_of_memory_during_inference_stays_a_memory_failure(bundle, manifest, batch):
    """What tells the machine failing from a bad input (the server's load exits 1, the export keeps the old bundle)
    still finds the allocator's message: a MemoryError chained from it, not a BackendError."""
    from runtimes.base import CallPool

    backend = _open(bundle, manifest, "torch")

    def allocator_fails(_x):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 68719476736 bytes.")

    backend._pool = CallPool("this torch backend", [allocator_fails])
    with pytest.raises(MemoryError, match="out of memory in torch inference: .*can't allocate memory") as err:
        backend.infer(batch[:1])
    assert memory_failure(err.value) is err.value and isinstance(err.value.__cause__, RuntimeError)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_close_wakes_a_waiting_call_refuses_later_ones_and_lets_the_running_one_finish(
        bundle, manifest, batch, runtime):
    backend = _open(bundle, manifest, runtime)
    x = np.ascontiguousarray(batch[:1])
    expected = backend.infer(x)
    running = backend._pool.acquire()  # a call in flight holds the only slot ...
    outcome: list[str] = []

    def waiting_call() -> None:
        try:
            backend.infer(x)
            outcome.append("answered")
        except BackendError as exc:
            outcome.append(str(exc))

    waiter = threading.Thread(target=waiting_call, daemon=True)
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive() and not outcome  # ... so this one waits for it
    start = time.perf_counter()
    backend.close()
    waiter.join(5)
    assert not waiter.is_alive() and time.perf_counter() - start < 2, "a call waiting at close() never returned"
    assert outcome == [f"this {runtime} backend is closed"]
    with pytest.raises(BackendError, match=f"^this {runtime} backend is closed$"):
        backend.infer(x)
    # The call in flight finishes on what it holds (nothing was freed under it), then gives it back.
    np.testing.assert_array_equal(backend._compute(running, x), expected)
    backend._pool.give_back(running)
    with pytest.raises(BackendError, match="closed"):
        backend.infer(x)
    backend.close()  # a second close does nothing


def test_the_pool_releases_shared_resources_only_after_the_last_call_in_flight():
    from runtimes.base import CallPool

    released: list[str] = []
    pool = CallPool("this test backend", ["a", "b"])
    a, b = pool.acquire(), pool.acquire()
    pool.close(lambda: released.append("freed"))
    pool.give_back(a)
    assert released == []  # b still computes on what the release would free
    pool.give_back(b)
    assert released == ["freed"]
    idle = CallPool("this test backend", ["a"])
    idle.close(lambda: released.append("at once"))
    assert released == ["freed", "at once"]


# argv: bundle, runtime, seconds after which the child, taken to hang, prints every thread's stack and exits 1.
RACE = """
import faulthandler, sys
faulthandler.dump_traceback_later(float(sys.argv[3]), exit=True)
import collections, json, threading, time
import numpy as np
import runtimes
from models.bundle import read_manifest
from runtimes import BackendError, BackendOptions
bundle, runtime = sys.argv[1], sys.argv[2]
manifest = read_manifest(bundle)
options = {"onnxruntime": BackendOptions(threads=1, parallel=1), "openvino": BackendOptions(threads=1, hint="latency"),
           "torch": BackendOptions(threads=1)}
x = np.zeros((2, *manifest.input.sample_shape), np.float32)
backend = runtimes.open_backend(bundle, manifest, runtime, "fp32", options[runtime])
outcomes = collections.Counter()
def loop():
    while True:
        try:
            backend.infer(x)
            outcomes["ok"] += 1
        except BackendError as exc:
            outcomes["closed" if str(exc).endswith("is closed") else str(exc)] += 1
            return
        except Exception as exc:
            outcomes[type(exc).__name__ + ": " + str(exc)[:80]] += 1
            return
threads = [threading.Thread(target=loop, daemon=True) for _ in range(4)]
for t in threads:
    t.start()
time.sleep(0.3)
backend.close()
for t in threads:
    t.join(5)
print(json.dumps({"outcomes": dict(outcomes), "blocked": sum(t.is_alive() for t in threads)}))
"""
# The child loads one runtime (tens of seconds on a loaded 2-core runner; all three in one child once took over
# 120 s there) and joins its threads; it dumps its stacks well before the parent gives up on it.
RACE_LIMIT_S = 300
RACE_DUMP_S = 240


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_closing_under_concurrent_calls_ends_every_call_and_the_process_exits_cleanly(bundle, runtime):
    """Four threads calling one backend (one slot: three wait) while it closes: each ends with an answer or
    "closed", none blocks, and the interpreter exits 0 (a thread blocked inside OpenVINO aborted it: SIGABRT)."""
    try:
        done = subprocess.run([sys.executable, "-c", RACE, str(bundle), runtime, str(RACE_DUMP_S)], cwd=REPO,
                              capture_output=True, text=True, timeout=RACE_LIMIT_S)
    except subprocess.TimeoutExpired as exc:  # what it wrote so far comes as bytes, whatever `text` says
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        pytest.fail(f"the child still ran after {RACE_LIMIT_S} s (its own stack dump did not end it); its stderr:\n"
                    f"{err}")
    assert done.returncode == 0, done.stderr[-12000:]  # a hang: faulthandler's stacks of every thread
    assert "terminate called" not in done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["blocked"] == 0, report
    assert report["outcomes"].get("closed") == 4 and set(report["outcomes"]) <= {"ok", "closed"}, report


def test_backend_options_take_their_types_only():
    for bad, reason in (({"device": None}, "device must be"), ({"device": 0}, "device must be"),
                        ({"threads": True}, "threads must be an integer"), ({"parallel": False}, "parallel must"),
                        ({"threads": 2.0}, "threads must"), ({"hint": ["latency"]}, "hint must"),
                        ({"inference_precision": 16}, "inference_precision must"),
                        ({"compile": "yes"}, "compile must"), ({"channels_last": 1}, "channels_last must"),
                        ({"buckets": (True,)}, "buckets must"), ({"buckets": [1, 2.0]}, "buckets must"),
                        ({"buckets": []}, "buckets must"), ({"buckets": "12"}, "buckets must")):
        with pytest.raises(BackendError, match=reason) as err:
            BackendOptions(**bad)
        _one_line(err)
    listed = BackendOptions(buckets=[1, 4])  # a list means the tuple: equal to it, and hashable
    assert listed.buckets == (1, 4) and listed == BackendOptions(buckets=(1, 4))
    assert hash(listed) == hash(BackendOptions(buckets=(1, 4)))


def test_register_refuses_what_is_not_a_runtime():
    with pytest.raises(TypeError, match="register takes a runtimes.Runtime, got str 'x'"):
        runtimes.register("x")
    assert "x" not in runtimes.names()


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"max_batch": True}, "max batch must be an integer in 1..1024, got True"),
    ({"max_batch": "32"}, "max batch must be an integer"),
    ({"max_batch": 2.5}, "max batch must be an integer"),
    ({"targets": None}, "targets must be a list of target names"),
    ({"targets": "onnx"}, "targets must be a list of target names .* got str 'onnx'"),
    ({"targets": [5]}, r"targets must be target names \(strings\), got 5"),
    ({"threads": True}, "threads must be an integer in 1..1024, got True"),
    ({"parity_samples": 2.5}, "parity sample counts must be positive integers, got 2.5"),
    ({"calibration_samples": True}, "calibration sample counts must be positive integers, got True"),
    ({"opset": 5}, "opset must be an integer in 17..25"),
    ({"opset": True}, "opset must be an integer"),
    ({"opset": "20"}, "opset must be an integer"),
    ({"name": 7}, "name must be a string"),
    ({"dataset": 3}, "dataset must be a dataset name"),
    ({"tolerances": {"int8": 0.1}}, "tolerances must map"),
    ({"drop_artifacts": "yes"}, "drop_artifacts must be True or False"),
    ({"log": "stderr"}, "log must be a function"),
    ({"checkpoint": None}, "checkpoint must be a path"),
])
def test_build_bundle_refuses_a_mistyped_argument_before_any_work(tmp_path, kwargs, reason):
    args = {"checkpoint": str(tmp_path / "no-checkpoint"), "out": tmp_path / "b", "targets": ["onnx"], **kwargs}
    start = time.perf_counter()
    with pytest.raises(ExportError, match=reason) as err:
        build_bundle(args.pop("checkpoint"), args.pop("out"), args.pop("targets"), **args)
    _one_line(err)
    assert time.perf_counter() - start < 1 and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def checkpoint(bundle):
    return bundle.parent / "ckpt"  # what micro_bundle exported from


def _onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def test_the_recorded_opset_is_the_one_in_the_exported_file(checkpoint, tmp_path, monkeypatch):
    # numpy integers are integers (what a script computes its counts with)
    m = build_bundle(checkpoint, tmp_path / "b19", ["onnx"], max_batch=np.int64(4), parity_samples=np.int64(8),
                     opset=np.int32(19), threads=np.int32(1), log=lambda _: None)
    onnx_artifact = m.select("onnxruntime", "fp32")
    assert onnx_artifact.info["opset"] == 19 == _onnx_opset(tmp_path / "b19" / onnx_artifact.files[0].path)
    # An exporter that writes another opset than asked (as torch's did below 17: opset 5 became 18, recorded as 5)
    # fails the export instead of recording a number the file does not have.
    import export.bundle as export_bundle

    real = export_bundle.export_torch
    monkeypatch.setattr(export_bundle, "export_torch", lambda model, path, size, _opset, description:
                        real(model, path, size, 18, description))
    with pytest.raises(ExportError, match="the ONNX exporter wrote opset 18, not the 19 asked for") as err:
        build_bundle(checkpoint, tmp_path / "other", ["onnx"], max_batch=4, parity_samples=8, opset=19, threads=1,
                     log=lambda _: None)
    _one_line(err)
    assert not (tmp_path / "other").exists()
