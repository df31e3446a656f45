"""What export certifies, the server loads; what the export tools are pointed at, they never pollute; bad input and
an exhausted machine are one line, found before the slow work.

- `python -m export.triton BUNDLE --out X` writes only into an absent or empty X or a repository of its own, never
  into, inside or above the bundle.
- An artifact export calls servable passes the server's load-time golden check on the same machine (the check runs
  at export; the load compares the artifact with what it computed there).
- Out of memory during an export, an unknown calibration dataset, an unwritable --out, and `export.report
  --served` on a read-only bundle or an unknown runtime: one line, before the work, nothing changed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_serve_fixtures import LEGACY, before_digests, micro_bundle, one_line

import runtimes
from export import bundle as export_bundle
from export import cli, report, served, triton
from export.bundle import build_bundle
from models.bundle import read_manifest
from runtimes import BackendError, BackendOptions

REPORT_ERROR = "python -m export.report: error: "
EXPORT_ERROR = "python -m export: error: "

EXPORT = ("--targets", "torch", "--max-batch", "4", "--parity-samples", "16", "--threads", "1")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """vit_c_micro (random head) with onnx and openvino artifacts, shared with the other export tests."""
    return micro_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def checkpoint(bundle) -> Path:
    return bundle.parent / "ckpt"


def _error_line(capsys) -> str:  # noqa: ANN001
    """The one error line an export that already reported progress ends with (no traceback)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith(EXPORT_ERROR), err
    assert sum(line.startswith(EXPORT_ERROR) for line in err.splitlines()) == 1, err
    return err.splitlines()[-1]


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its content (None for directories)."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def _no_slow_work(monkeypatch) -> None:  # noqa: ANN001
    """Fail the test if the export or the served measurement starts its slow part."""
    def slow(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the slow work started before the input was checked")

    monkeypatch.setattr(export_bundle, "parity_data", slow)
    monkeypatch.setattr(served, "measure", slow)


# --- python -m export.triton: --out -------------------------------------------------------------------------


def test_triton_refuses_an_out_that_is_in_or_around_the_bundle(bundle, tmp_path, capsys):
    copy = shutil.copytree(bundle, tmp_path / "work" / "b")
    before = _tree(tmp_path)
    cases = [(copy, "is the bundle"), (copy / "repo", "is the bundle"), (copy / "x" / "y", "is the bundle"),
             (copy.parent, "holds the bundle"), (tmp_path, "holds the bundle")]
    for out, says in cases:
        with pytest.raises(SystemExit) as info:
            triton.main([str(copy), "--out", str(out)])
        assert info.value.code == 2 and says in one_line(capsys), out
    # the same directory named another way (a relative path, a symlink) is the same directory
    link = tmp_path / "link"
    link.symlink_to(copy)
    with pytest.raises(SystemExit) as info:
        triton.main([str(copy), "--out", str(link)])
    assert info.value.code == 2 and "is the bundle" in one_line(capsys)
    link.unlink()
    assert _tree(tmp_path) == before
    # the bundle is untouched, and still exports and converts
    assert triton.write_repository(copy, tmp_path / "repo")


def test_triton_refuses_a_directory_it_did_not_write(bundle, checkpoint, tmp_path, capsys):
    ckpt = shutil.copytree(checkpoint, tmp_path / "ckpt")
    other = shutil.copytree(bundle, tmp_path / "other-bundle")  # another bundle: not the input, not a repository
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("keep me")
    fake_isvc = tmp_path / "fake"
    fake_isvc.mkdir()
    (fake_isvc / triton.ISVC_FILE).write_text("apiVersion: v1\nkind: Secret\n")
    before = _tree(tmp_path)
    for out, says in [(ckpt, "no inferenceservice.yaml"), (other, "no inferenceservice.yaml"),
                      (project, "no inferenceservice.yaml"), (fake_isvc, "was not written by this tool")]:
        with pytest.raises(SystemExit) as info:
            triton.main([str(bundle), "--out", str(out)])
        err = one_line(capsys)
        assert info.value.code == 2 and "not a model repository written by python -m export.triton" in err, err
        assert says in err, err
    assert _tree(tmp_path) == before


def test_triton_adds_to_its_own_repository_but_not_to_a_model_directory_of_someone_else(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert triton.write_repository(bundle, empty)  # an empty directory is fine
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    assert triton.main([str(bundle), "--out", str(repo)]) == 0  # our own repository: the next version
    capsys.readouterr()
    model = repo / "micro-onnx-fp32"
    assert sorted(p.name for p in model.iterdir() if p.is_dir()) == ["1", "2"]
    (model / "my-notes.txt").write_text("mine")
    before = _tree(repo)
    with pytest.raises(SystemExit) as info:
        triton.main([str(bundle), "--out", str(repo)])
    assert info.value.code == 2 and "micro-onnx-fp32/ is not a model directory of this tool" in one_line(capsys)
    assert _tree(repo) == before
    (model / "my-notes.txt").unlink()
    model.rename(tmp_path / "elsewhere")
    model.symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a model directory that is a link: said so
    with pytest.raises(SystemExit) as info:
        triton.main([str(bundle), "--out", str(repo)])
    assert info.value.code == 2 and "micro-onnx-fp32/ is not a model directory of this tool (a symbolic link" in \
        one_line(capsys)
    model.unlink()
    (tmp_path / "elsewhere").rename(model)
    (model / "my-notes.txt").write_text("mine")
    # a bundle that was polluted by an older export.triton (a repository written into it) is refused as --out too
    polluted = shutil.copytree(repo, tmp_path / "polluted")
    shutil.copy(bundle / "manifest.json", polluted / "manifest.json")
    (polluted / "micro-onnx-fp32" / "my-notes.txt").unlink()
    with pytest.raises(SystemExit) as info:
        triton.main([str(bundle), "--out", str(polluted)])
    assert info.value.code == 2 and "it holds manifest.json" in one_line(capsys)


# --- export certifies exactly what the server loads ------------------------------------------------------------


def _row_key(row: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(row, np.float32).tobytes()).hexdigest()


FLIPPED: set[str] = set()  # inputs whose top-1 the skewed runtime swaps with the runner-up


def _swap_top2(y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    y = y.copy()
    for i in np.flatnonzero(rows):
        a, b = np.argsort(y[i])[::-1][:2]
        y[i, [a, b]] = y[i, [b, a]]
    return y


class SkewedBackend:
    """The fp32 ONNX graph in onnxruntime, with top-1 and runner-up swapped on chosen inputs: an "INT8" artifact
    whose few disagreements with torch land on the golden images (as real INT8 near-ties can)."""

    runtime = "skewed"

    def __init__(self, spec) -> None:  # noqa: ANN001 - a LoadSpec
        self.inner = runtimes.get("onnxruntime").load(spec)
        self.precision, self.device, self.max_batch = spec.precision, spec.device, spec.max_batch
        self.parallelism = 1

    def infer(self, batch: np.ndarray) -> np.ndarray:
        y = np.asarray(self.inner.infer(batch), np.float32)
        return _swap_top2(y, np.array([_row_key(r) in FLIPPED for r in batch]))

    def describe(self) -> dict:
        return {}

    def close(self) -> None:
        self.inner.close()


def _skewed_build(ctx, precision):  # noqa: ANN001, ANN202
    from runtimes import onnx_graph
    from runtimes.build import Built

    out = onnx_graph.copy_hub(ctx.hub_onnx(), ctx.workdir / "model-skewed.onnx")
    return Built(onnx_graph.files_of(out), {})


SKEWED = runtimes.Runtime(
    name="skewed", target="skewed", packages=("onnxruntime",), install="(a test double)", format="onnx",
    triton_platform="onnxruntime_onnx", precisions=("int8",), default_precisions=("int8",), devices=("cpu",),
    build=_skewed_build, load=SkewedBackend, version=lambda: "0", needs_hub=True,
)


@pytest.fixture
def skewed():
    runtimes.register(SKEWED)
    try:
        yield SKEWED
    finally:
        runtimes.unregister(SKEWED.name)
        FLIPPED.clear()


def _golden_rows(checkpoint: Path, parity_samples: int, n: int) -> list[np.ndarray]:
    """The first n parity images, exactly as export preprocesses them (they become the golden inputs)."""
    from data.datasets import load_dataset
    from models.checkpoint import read_checkpoint_meta
    from models.preprocessing import preprocess

    meta = read_checkpoint_meta(checkpoint)
    val = load_dataset("animals", "val").subset(parity_samples, seed=0)
    return list(preprocess([val.image(i) for i in range(n)], meta.preprocessing))


def test_an_artifact_export_certifies_loads_on_the_machine_that_exported_it(skewed, checkpoint, tmp_path):
    # 3 of the 8 golden images disagree with torch, 3 of 400 parity images: 99.25 % agreement passes the INT8
    # gate; the 8 golden images alone (62.5 % < 80 %) used to make the server refuse what export had certified.
    FLIPPED.update(_row_key(r) for r in _golden_rows(checkpoint, 400, 3))
    out = tmp_path / "b"
    m = build_bundle(checkpoint, out, ["skewed-int8"], max_batch=8, parity_samples=400, calibration_samples=8,
                     threads=1, log=lambda _: None)
    art = next(a for a in m.artifacts if a.id == "skewed-int8")
    assert art.servable, art.refused_reason
    assert art.parity.top1_agreement == pytest.approx(397 / 400)
    backend = runtimes.open_backend(out, read_manifest(out), "skewed", options=BackendOptions(threads=1))
    backend.close()
    torch_backend = runtimes.open_backend(out, read_manifest(out), "torch", options=BackendOptions(threads=1))
    torch_backend.close()

    # The load still catches an artifact that no longer computes what export measured: it is judged against
    # torch then, and the reason names both.
    FLIPPED.update(_row_key(r) for r in _golden_rows(checkpoint, 400, 8))
    with pytest.raises(BackendError, match=r"does not reproduce the bundle's 8 golden inputs on this machine: its "
                                           r"logits differ from its own at export .*top-1 agreement with torch"):
        runtimes.open_backend(out, read_manifest(out), "skewed", options=BackendOptions(threads=1))


def test_a_bundle_without_recorded_outputs_is_judged_against_torch_as_before(skewed, checkpoint, tmp_path):
    from models.bundle import file_entries, write_manifest

    FLIPPED.update(_row_key(r) for r in _golden_rows(checkpoint, 400, 3))
    out = tmp_path / "b"
    build_bundle(checkpoint, out, ["skewed-int8"], max_batch=8, parity_samples=400, calibration_samples=8,
                 threads=1, log=lambda _: None)
    m = read_manifest(out)
    with np.load(out / "golden.npz", allow_pickle=False) as z:
        assert {f for f in z.files if not f.startswith("source.")} == {
            "pixels", "logits", "contract", "outputs.torch-fp32", "outputs.skewed-int8", "origin",
            "record.torch-fp32", "record.skewed-int8"}
        pixels, logits = z["pixels"], z["logits"]
    np.savez_compressed(out / "golden.npz", pixels=pixels, logits=logits)  # as bundles exported before it
    write_manifest(out, before_digests(m, file_entries(out, [out / "golden.npz"])[0]))
    with pytest.raises(BackendError, match="top-1 agreement with torch 62% < 80%"):
        runtimes.open_backend(out, read_manifest(out), "skewed", options=BackendOptions(threads=1))
    backend = runtimes.open_backend(out, read_manifest(out), "torch", options=BackendOptions(threads=1))
    backend.close()
    # and the legacy bundle (no golden inputs at all) still loads
    runtimes.open_backend(LEGACY, read_manifest(LEGACY), "onnxruntime").close()


def test_an_artifact_that_does_not_reproduce_itself_is_refused_at_export(skewed, checkpoint, tmp_path):
    from runtimes.loader import verify_golden

    calls = []

    def second_run_differs(backend, x, reference, artifact, own=None, compute=None, max_batch=1024):  # noqa: ANN001
        calls.append(artifact.id)
        if artifact.id == "skewed-int8":
            FLIPPED.update(_row_key(r) for r in x)  # from now on the artifact answers differently
        return verify_golden(backend, x, reference, artifact, own, compute, max_batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_bundle, "verify_golden", second_run_differs)
        m = build_bundle(checkpoint, tmp_path / "b", ["skewed-int8"], max_batch=8, parity_samples=64,
                         calibration_samples=8, threads=1, log=lambda _: None)
    art = next(a for a in m.artifacts if a.id == "skewed-int8")
    assert calls == ["torch-fp32", "skewed-int8"]
    assert not art.servable and art.refused_reason.startswith("golden inputs: "), art.refused_reason
    assert "differ from its own at export" in art.refused_reason
    with np.load(tmp_path / "b" / "golden.npz", allow_pickle=False) as z:
        assert "outputs.skewed-int8" not in z.files and "outputs.torch-fp32" in z.files


# --- python -m export: out of memory, datasets, unwritable --out ---------------------------------------------


ALLOC = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
         "allocate 12884901888 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("where", ["parity_data", "export_torch", "write_golden"])
@pytest.mark.parametrize("error", [RuntimeError(ALLOC), MemoryError()])
def test_out_of_memory_is_one_line_naming_what_to_lower_and_keeps_the_old_bundle(
        bundle, checkpoint, tmp_path, capsys, monkeypatch, where, error):
    out = shutil.copytree(bundle, tmp_path / "b")
    before = _tree(out)

    def oom(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise error

    monkeypatch.setattr(export_bundle, where, oom)
    rc = cli.main(["--checkpoint", str(checkpoint), "--out", str(out), "--targets", "onnx", "--max-batch", "1024",
                   "--parity-samples", "1024", "--threads", "1", "--replace"])
    err = _error_line(capsys) if where != "parity_data" else one_line(capsys)
    assert rc == 1 and err.startswith(EXPORT_ERROR + "out of memory"), err
    assert "lower --max-batch (1024), --parity-samples (1024) or --calibration-samples (300)" in err, err
    assert "previous bundle" in err
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"], "temporary or lock left behind"


def _replace_build(monkeypatch, name: str, build) -> None:  # noqa: ANN001
    """The registered runtime `name` with another `build` for the test's duration."""
    from runtimes import registry

    monkeypatch.setitem(registry._RUNTIMES, name, replace(runtimes.get(name), build=build))


def test_out_of_memory_in_one_runtime_stops_the_export_instead_of_refusing_the_artifact(
        checkpoint, tmp_path, capsys, monkeypatch):
    def oom_build(ctx, precision):  # noqa: ANN001, ANN202
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : std::bad_alloc")

    _replace_build(monkeypatch, "onnxruntime", oom_build)
    rc = cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), "--targets", "onnx",
                   "--max-batch", "4", "--parity-samples", "16", "--threads", "1"])
    err = _error_line(capsys)
    assert rc == 1 and "onnx-fp32: out of memory" in err and "lower --max-batch" in err, err
    assert not (tmp_path / "b").exists()


def test_a_genuine_runtime_error_still_refuses_only_its_artifact(checkpoint, tmp_path, capsys, monkeypatch):
    def broken(ctx, precision):  # noqa: ANN001, ANN202
        raise RuntimeError("converter does not support this op")

    _replace_build(monkeypatch, "onnxruntime", broken)
    rc = cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), "--targets", "onnx",
                   "--max-batch", "4", "--parity-samples", "16", "--threads", "1"])
    assert rc == 0
    assert "refused onnx-fp32: export failed: RuntimeError: converter does not support" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "says"), [
    (["--targets", "onnx-int8", "--calibration-dataset", "bogus"], "calibration data: unknown dataset 'bogus'"),
    (["--targets", "torch", "--calibration-dataset", "bogus"], "calibration data: unknown dataset 'bogus'"),
    (["--targets", "onnx-int8", "--calibration-dataset", "/no/such/dir"], "calibration data: unknown dataset"),
])
def test_a_bad_calibration_dataset_is_refused_before_any_work(checkpoint, tmp_path, capsys, monkeypatch, extra,
                                                              says):
    _no_slow_work(monkeypatch)
    rc = cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), "--max-batch", "4",
                   "--parity-samples", "16", "--threads", "1", *extra])
    assert rc == 2 and says in one_line(capsys)
    assert not list(tmp_path.iterdir())


def test_a_calibration_folder_without_a_train_split_is_refused(checkpoint, tmp_path, capsys, monkeypatch):
    _no_slow_work(monkeypatch)
    folder = tmp_path / "imgs" / "val" / "cat"
    folder.mkdir(parents=True)
    rc = cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), *EXPORT[2:],
                   "--targets", "onnx-int8", "--calibration-dataset", str(tmp_path / "imgs")])
    assert rc == 2 and "has no train/ directory" in one_line(capsys)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("arg", [["--max-batch", "0"], ["--max-batch", "1025"], ["--parity-samples", "0"],
                                 ["--calibration-samples", "-3"], ["--threads", "0"], ["--max-batch", "x"]])
def test_numeric_options_are_checked_by_the_parser(checkpoint, tmp_path, capsys, arg):
    with pytest.raises(SystemExit) as info:
        cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), *arg])
    assert info.value.code == 2 and arg[0] in one_line(capsys)
    assert not list(tmp_path.iterdir())


def _deny_writes_to(monkeypatch, *denied: Path) -> None:  # noqa: ANN001
    """os.access says 'not writable' for these directories, as for a non-root user on a chmod 555 directory
    (root ignores directory permissions, so the test suite running as root needs this)."""
    real = os.access
    denied_resolved = {d.resolve() for d in denied}

    def access(path, mode, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if mode & os.W_OK and Path(path).resolve() in denied_resolved:
            return False
        return real(path, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)


def test_an_unwritable_out_directory_is_refused_before_any_work(bundle, checkpoint, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    old = shutil.copytree(bundle, tmp_path / "old")  # a bundle of ours, that could be replaced if it were writable
    _deny_writes_to(monkeypatch, empty, old)
    _no_slow_work(monkeypatch)
    before = _tree(tmp_path)
    for out, locked in [(empty, empty), (old, old)]:
        rc = cli.main(["--checkpoint", str(checkpoint), "--out", str(out), *EXPORT, "--replace"])
        err = one_line(capsys)
        assert rc == 2 and err.startswith(f"{EXPORT_ERROR}cannot write bundle {out}"), err
        assert f"{locked} is not writable" in err, err
    assert _tree(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_out_directory_is_refused_for_real(checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    _no_slow_work(monkeypatch)
    try:
        rc = cli.main(["--checkpoint", str(checkpoint), "--out", str(out), *EXPORT])
        assert rc == 2 and "cannot write bundle" in one_line(capsys)
    finally:
        out.chmod(0o755)


# --- python -m export.report --served: checked before it measures ----------------------------------------------


@pytest.mark.parametrize(("args", "says"), [
    (["--runtime", "bogus"], "unknown backend 'bogus'; known: onnxruntime"),
    (["--runtime", ""], "unknown backend ''"),
    (["--runtime", "tensorrt"], "tensorrt"),
])
def test_report_served_checks_the_runtime_before_measuring(bundle, capsys, monkeypatch, args, says):
    _no_slow_work(monkeypatch)
    before = (bundle / "manifest.json").read_bytes()
    assert report.main([str(bundle), "--served", *args]) == 2
    err = one_line(capsys)
    assert err.startswith(REPORT_ERROR + "served path: ") and says in err, err
    assert (bundle / "manifest.json").read_bytes() == before


def test_report_served_options_without_served_are_refused(bundle, capsys):
    with pytest.raises(SystemExit) as info:
        report.main([str(bundle), "--runtime", "openvino"])
    assert info.value.code == 2 and "--served only" in one_line(capsys)


def test_report_served_refuses_a_bundle_it_cannot_record_in(bundle, tmp_path, capsys, monkeypatch):
    copy = shutil.copytree(bundle, tmp_path / "b")
    _deny_writes_to(monkeypatch, copy)
    _no_slow_work(monkeypatch)
    before = _tree(copy)
    assert report.main([str(copy), "--served", "--samples", "4"]) == 2
    err = one_line(capsys)
    assert "cannot record the result in" in err and "the bundle must be writable" in err, err
    assert _tree(copy) == before


def test_report_served_refuses_a_bundle_without_an_artifact_for_the_runtime(bundle, tmp_path, capsys, monkeypatch):
    from models.bundle import write_manifest

    copy = shutil.copytree(bundle, tmp_path / "b")
    m = read_manifest(copy)
    write_manifest(copy, replace(m, artifacts=tuple(a for a in m.artifacts if a.runtime != "openvino")))
    _no_slow_work(monkeypatch)
    assert report.main([str(copy), "--served", "--runtime", "openvino"]) == 2
    assert "openvino" in one_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_report_served_on_a_read_only_bundle_for_real(bundle, tmp_path, capsys, monkeypatch):
    copy = shutil.copytree(bundle, tmp_path / "b")
    _no_slow_work(monkeypatch)
    copy.chmod(0o555)
    try:
        assert report.main([str(copy), "--served"]) == 2
        assert "cannot record the result" in one_line(capsys)
    finally:
        copy.chmod(0o755)


@pytest.mark.parametrize(("outputs", "says"), [
    (np.zeros((8, 3), np.float32), "array 'outputs.onnx-fp32' is float32[8, 3], expected float32[8, 10]"),
    (np.full((8, 10), np.nan, np.float32), "the outputs recorded for 'onnx-fp32' are not finite"),
    (np.zeros((8, 10), np.float64), "expected float32[8, 10]"),
])
def test_recorded_outputs_are_checked_like_the_rest_of_the_golden_file(bundle, tmp_path, outputs, says):
    from models.bundle import BundleError, file_entries, write_manifest

    copy = shutil.copytree(bundle, tmp_path / "b")
    m = read_manifest(copy)
    with np.load(copy / "golden.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["outputs.onnx-fp32"] = outputs
    np.savez_compressed(copy / "golden.npz", **arrays)
    write_manifest(copy, replace(m, golden=replace(m.golden, file=file_entries(copy, [copy / "golden.npz"])[0])))
    with pytest.raises(BundleError, match="re-export the bundle") as info:
        runtimes.open_backend(copy, read_manifest(copy), "onnxruntime", "fp32", BackendOptions(threads=1))
    assert says in str(info.value) and "\n" not in str(info.value)


def test_export_without_the_graph_exporter_says_so_before_any_work(checkpoint, tmp_path, monkeypatch, capsys):
    """Without onnxscript (torch.onnx's exporter) every target but torch fails: said at once, with the install
    line, instead of after the checkpoint was loaded and measured."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    loaded = []
    monkeypatch.setattr(export_bundle, "build_bundle", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(export_bundle, "build", lambda *a, **k: loaded.append(a))  # what export.cli calls
    assert cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), "--targets", "onnx"]) == 2
    err = one_line(capsys)
    assert "not installed: onnxscript (the ONNX graph" in err and "'.[export]'" in err and not loaded
    assert not (tmp_path / "b").exists()
    # Without nncf an int8 target was refused with an import error in its manifest, and the export exited 0.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    assert cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), "--targets", "openvino"]) == 2
    assert "not installed: nncf (int8 quantisation; or leave the int8 targets out)" in one_line(capsys)
    assert not loaded and not (tmp_path / "b").exists()


def test_a_narrower_export_over_a_bundle_keeps_its_artifacts_unless_told(bundle, checkpoint, tmp_path, capsys,
                                                                        monkeypatch):
    """`python -m export.openvino --out B` used to replace B with an OpenVINO-only bundle, silently deleting its ONNX
    model (what a TensorRT server builds its engine from): now refused before any work, unless --replace."""
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    before = _tree(out)
    with monkeypatch.context() as m:
        _no_slow_work(m)
        assert cli.main(["--checkpoint", str(checkpoint), "--out", str(out), *EXPORT]) == 2
    err = one_line(capsys)
    held = [a.id for a in read_manifest(bundle).servable() if a.id != "torch-fp32"]
    assert f"would drop: {', '.join(held)}" in err and "--replace" in err and "--targets" in err, err
    assert _tree(out) == before
    assert cli.main(["--checkpoint", str(checkpoint), "--out", str(out), *EXPORT, "--replace"]) == 0
    assert [a.id for a in read_manifest(out).artifacts] == ["torch-fp32"]
    # A torch-only bundle is replaced by a wider export without being asked.
    capsys.readouterr()
    assert cli.main(["--checkpoint", str(checkpoint), "--out", str(out), *EXPORT]) == 0


def test_a_precision_the_runtime_lacks_is_named_as_a_precision(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"), "--precision", "fp32,bf16"],
                 family="onnx")
    assert exc.value.code == 2
    err = one_line(capsys)
    assert "--precision 'bf16' is not a precision of onnx; known: fp32, fp16, int8" in err, err


def test_precision_is_read_whatever_its_case_as_targets_are(checkpoint, tmp_path):
    """`--precision FP16` was refused while `--targets ONNX-FP16` worked."""
    p = cli.parser("onnx")
    args = p.parse_args(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"), "--precision", "FP16, Int8"])
    assert cli._targets(p, args, "onnx") == ["onnx-fp16", "onnx-int8"]


def _untrained_checkpoint(where: Path) -> Path:
    """vit_c_micro as built, its head zero-initialised: the same logits for every image, which certify nothing."""
    from data.datasets import ANIMAL_CLASSES, default_preprocessing
    from models import build_model
    from models.checkpoint import save_checkpoint

    return save_checkpoint(where / "untrained", build_model("vit_c_micro"), class_names=ANIMAL_CLASSES,
                           preprocessing=default_preprocessing("animals", 32), extra={"dataset": "animals"})


def test_an_export_with_no_servable_artifact_writes_nothing_and_exits_2(micro_checkpoint, tmp_path, capsys):
    # It ended "bundle written", exit 0, with a bundle every server refuses at start; over a bundle with --replace it
    # replaced one that served.
    untrained = _untrained_checkpoint(tmp_path)
    new = tmp_path / "new"
    assert cli.main(["--checkpoint", str(untrained), "--out", str(new), *EXPORT, "--strict"]) == 2
    line = _error_line(capsys)
    assert line == (f"{EXPORT_ERROR}no artifact is servable, not even the torch-fp32 reference (torch's logits are "
                    "the same for every image (an untrained head?): parity cannot be certified): nothing was "
                    f"written, {new} is as it was"), line
    assert not new.exists()
    served = tmp_path / "served"
    assert cli.main(["--checkpoint", str(micro_checkpoint(tmp_path)), "--out", str(served), *EXPORT]) == 0
    capsys.readouterr()
    before = _tree(served)
    assert cli.main(["--checkpoint", str(untrained), "--out", str(served), *EXPORT, "--replace"]) == 2
    assert "no artifact is servable" in _error_line(capsys)
    assert _tree(served) == before and read_manifest(served).artifacts[0].servable
