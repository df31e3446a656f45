"""The benchmark's bundle cache is its own: two runs sharing it (two CI jobs in one checkout) wait for each other
instead of failing, and a later run needing an artifact the cache lacks exports it with the cached ones kept,
never refused with advice meant for `python -m export`. Fast: one real micro export is the template, the
concurrent export a stand-in that copies it."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

import benchmarks.suite
from benchmarks import bundles
from benchmarks.latency import main
from export.bundle import ExportConfig, build
from models.bundle import read_manifest
from models.io import atomic_dir, writer_lock

MODEL = "vit_c_micro"
SMALL = {"parity_samples": 16, "calibration_samples": 16}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A cache holding the random-init checkpoint and its bundle with onnx-fp32 at batch 16 (a real export)."""
    cache = tmp_path_factory.mktemp("bench-cache-template")
    checkpoint = bundles.random_init_checkpoint(MODEL, cache)
    build(ExportConfig(checkpoint, cache / f"{MODEL}-random-init", ("onnx",), name=f"{MODEL}-random-init",
                       max_batch=16, tolerances=bundles._relaxed_int8(), log=lambda _msg: None, **SMALL))
    return cache


def _cache(template: Path, tmp_path: Path, *, bundle: bool) -> Path:
    """A fresh cache: the template's checkpoint, and its bundle when `bundle`."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copytree(template / f"init-{MODEL}", cache / f"init-{MODEL}")
    if bundle:
        shutil.copytree(template / f"{MODEL}-random-init", cache / f"{MODEL}-random-init")
    return cache


def test_a_run_waits_for_another_preparing_the_same_entry_and_reuses_its_bundle(template, tmp_path, monkeypatch):
    """The second of two concurrent runs stopped with exit 2, "another process is writing .../vit_c_micro-random-init",
    after it had measured the machine."""
    cache = _cache(template, tmp_path, bundle=False)
    exports: list[tuple[str, ...]] = []
    inside, release = threading.Event(), threading.Event()

    def slow_build(config: ExportConfig):  # the real one's lock and swap; its minutes are a wait for `release`
        exports.append(tuple(config.targets))
        with atomic_dir(config.out) as tmp:
            inside.set()
            assert release.wait(30)
            shutil.copytree(template / f"{MODEL}-random-init", tmp, dirs_exist_ok=True)
        return read_manifest(config.out)

    monkeypatch.setattr("export.bundle.build", slow_build)
    monkeypatch.setattr(bundles, "WAIT_POLL", 0.05, raising=False)
    results: dict[str, object] = {}
    logs: dict[str, list[str]] = {"first": [], "second": []}
    waiting = threading.Event()

    def run(name: str) -> None:
        def log(line: str) -> None:
            logs[name].append(line)
            if "waiting for it" in line:
                waiting.set()
        try:
            results[name] = bundles.prepare_model("micro", MODEL, cache=cache, targets=["onnx"], max_batch=16,
                                                  log=log, **SMALL)
        except Exception as exc:  # noqa: BLE001 - the finding: the loser's error
            results[name] = exc

    first = threading.Thread(target=run, args=("first",))
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    deadline = time.monotonic() + 20
    while second.is_alive() and not waiting.is_set() and time.monotonic() < deadline:
        time.sleep(0.02)
    release.set()
    first.join(30)
    second.join(30)
    assert not isinstance(results["second"], Exception), results["second"]
    assert not isinstance(results["first"], Exception), results["first"]
    assert exports == [("onnx",)]  # one export; the second run took its bundle
    assert results["second"].bundle == results["first"].bundle == cache / f"{MODEL}-random-init"
    assert results["second"].manifest.source.sha256 == bundles._weights_sha(cache / f"init-{MODEL}")
    notes = [line for line in logs["second"] if line.startswith("note: ")]
    assert len(notes) == 2 and "at most 60 min" in notes[0] and "done with vit_c_micro" in notes[1], logs["second"]
    assert not any(line.startswith("exporting") for line in logs["second"]), logs["second"]
    assert sorted(p.name for p in cache.iterdir()) == [f"init-{MODEL}", f"{MODEL}-random-init"]  # no lock left


def test_a_run_needing_an_artifact_the_cache_lacks_exports_it_keeping_the_cached_ones(template, tmp_path):
    """The cache held onnx-fp32; a run wanting openvino-fp32 was refused: "holds servable artifacts this export would
    drop: ... pass --replace" (the benchmark has no --replace)."""
    cache = _cache(template, tmp_path, bundle=True)
    logged: list[str] = []
    prepared = bundles.prepare_model("micro", MODEL, cache=cache, targets=["openvino-fp32"], max_batch=8,
                                     log=logged.append, **SMALL)
    servable = {a.id for a in prepared.manifest.servable()}
    assert {"torch-fp32", "onnx-fp32", "openvino-fp32"} <= servable
    assert prepared.manifest.input.max_batch == 16  # the cached batch size is kept too
    assert any("keeping the cached onnx-fp32" in line for line in logged), logged
    # Either run's targets now come from the cache as they are.
    for targets in (["onnx"], ["openvino-fp32"], ["onnx", "openvino-fp32"]):
        logged.clear()
        again = bundles.prepare_model("micro", MODEL, cache=cache, targets=targets, max_batch=16,
                                      log=logged.append, **SMALL)
        assert logged == [] and again.manifest == prepared.manifest, targets


def test_the_wait_is_bounded_and_its_end_is_one_line_and_exit_1(template, tmp_path, monkeypatch, capsys):
    cache = _cache(template, tmp_path, bundle=True)
    monkeypatch.setattr(bundles, "CACHE_WAIT_SECONDS", 0.3, raising=False)
    monkeypatch.setattr(bundles, "WAIT_POLL", 0.05, raising=False)
    monkeypatch.setattr("export.bundle.build", lambda _config: pytest.fail("exported under another run's lock"))
    monkeypatch.setattr(benchmarks.suite, "unavailable_here", lambda *_a, **_kw: None)
    monkeypatch.setattr(benchmarks.suite, "measure_limits", lambda *_a: {"cpu": {"bf16": {"native": False}}})
    monkeypatch.setattr(benchmarks.suite.machine, "environment", lambda _threads: {  # seconds of library imports
        "host": "vm", "cpu": {"model": "cpu", "usable_cpus": 1, "flags": []}, "gpus": [], "load_average": [0.0] * 3})
    with writer_lock(cache / f"{MODEL}.bench"):  # another run preparing vit_c_micro, for longer than the bound
        rc = main(["--quick", "--no-progress", "--targets", "onnxruntime-fp32", "--cache", str(cache),
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err
    assert err[-1] == ("python benchmarks/latency.py: error: another benchmark run has been preparing vit_c_micro in "
                       f"the bundle cache {cache} for 0 min: retry when it finishes, or give another --cache"), err
    assert any(line.startswith("note: another benchmark run is preparing vit_c_micro") for line in err), err
