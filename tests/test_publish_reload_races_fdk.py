"""Readers racing writers (hDM findings 1 and 2): `python -m export.triton` adding a version to a model a server
reads, and a hot reload (or a start) overlapping `python -m export` swapping the bundle it loads.

A publish swaps each model directory in whole, so at every step of it (and after a kill at any step) the repository
loads as `serve --model-repository` loads it: the old version with its config or the new one with its own, never the
new version beside the old config. A load that a bundle swap overlaps loads again (the old or the new bundle), and
is never refused as tampered; a bundle really tampered with still is, once. The races are made deterministic: the
swap is done, with the RENAME_EXCHANGE helper export uses, from a hook between the load's steps.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import fake_runtime
import numpy as np
import pytest
from test_serve_fixtures import micro_bundle, micro_checkpoint

from export import triton, triton_publish
from models import io as models_io
from models import tritonconfig
from models.bundle import file_entries, read_manifest, write_manifest
from serve import registry
from serve.errors import ServeError
from serve.registry import ModelSource, load_model, load_models
from serve.settings import Settings

MODEL = "micro-onnx-fp32"
TAMPERED = "tampered or corrupt"


class _Killed(BaseException):
    """Stops a run at a kill point (nothing of a SIGKILLed run handles it)."""


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[Path, Path]:
    """Two bundles of one name: max batch 32, then 8 (the second one's config.pbtxt does not fit the first)."""
    from export.bundle import build_bundle

    wide = micro_bundle(tmp_path_factory, ("onnx",))
    root = tmp_path_factory.mktemp("narrow")
    narrow = root / "micro"
    build_bundle(micro_checkpoint(root), narrow, targets=("onnx",), name="micro", max_batch=8, parity_samples=16,
                 calibration_samples=16, log=lambda _: None)
    return wide, narrow


def _loaded_version(repo: Path) -> tuple[str, int]:
    """(version, max batch) the repository's model loads as `serve --model-repository` loads it; ServeError if not."""
    model = load_model(ModelSource(repo / MODEL, MODEL, repository=True),
                       Settings(model_control_mode="explicit", model_repository=repo, access_log=False))
    try:
        return model.version, model.max_batch
    finally:
        model.backend.close()


def _steps(monkeypatch: pytest.MonkeyPatch, after: Callable[[int], None]) -> None:
    """Call `after(n)` right after the nth file-system step (os's, and the exchange) from the start of the publish
    on, its staging directory's removal included (the steps before it write nothing of the repository)."""
    count = [0]
    publishing = [False]

    def wrap(real: Callable) -> Callable:
        def step(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - os's own signatures
            result = real(*args, **kwargs)
            if publishing[0]:
                count[0] += 1
                after(count[0])
            return result
        return step

    real_publish = triton.publish

    def publish(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        publishing[0] = True
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(triton, "publish", publish)
    for name in ("mkdir", "rename", "replace", "unlink", "rmdir", "link"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    # raising=False: at HEAD the publish did no exchange (its steps were renames alone)
    monkeypatch.setattr(triton_publish, "exchange", wrap(getattr(triton_publish, "exchange", models_io.exchange)),
                        raising=False)


@pytest.fixture()
def repo_v1(bundles, tmp_path) -> Path:
    """A repository holding version 1 of the max-batch-32 bundle (config.pbtxt: max_batch_size 32)."""
    repo = tmp_path / "base" / "repo"
    triton.write_repository(bundles[0], repo)
    assert _loaded_version(repo) == ("1", 32)
    return repo


@pytest.mark.parametrize("swap", ["exchange", "two-renames"])
def test_a_server_loading_at_any_step_of_a_publish_finds_a_config_that_fits(bundles, repo_v1, monkeypatch, swap):
    """Finding 1: version 2 (max batch 8) was published before its config, so a load in between was refused:
    "config.pbtxt max_batch_size 32 is more than the artifact was exported for (8)"."""
    if swap == "two-renames":  # where the kernel or file system has no RENAME_EXCHANGE
        monkeypatch.setattr(triton_publish, "exchange", lambda a, b: False, raising=False)
    seen: list[tuple[str, int] | None] = []

    def load_now(n: int) -> None:
        if swap == "two-renames" and not (repo_v1 / MODEL).exists():
            seen.append(None)  # between the two renames: the model is missing, never mismatched
            return
        seen.append(_loaded_version(repo_v1))  # ServeError here is the finding

    with monkeypatch.context() as m:
        _steps(m, load_now)
        triton.write_repository(bundles[1], repo_v1)
    assert _loaded_version(repo_v1) == ("2", 8)
    assert ("1", 32) in seen and ("2", 8) in seen, seen
    assert set(seen) <= {("1", 32), ("2", 8), None}, seen
    assert seen.count(None) == (1 if swap == "two-renames" else 0), seen
    assert seen == sorted(seen, key=[("1", 32), None, ("2", 8)].index), seen  # old, then new: never back
    assert sorted(os.listdir(repo_v1 / MODEL)) == ["1", "2", "config.pbtxt", "labels.txt"]
    assert "max_batch_size: 8" in (repo_v1 / MODEL / "config.pbtxt").read_text()


def _killed_at(bundle: Path, base: Path, work: Path, n: int, monkeypatch: pytest.MonkeyPatch) -> bool:
    """work/repo as a run into a copy of base/repo left it, SIGKILLed right after its nth step; False when the run
    has fewer steps (it finished)."""
    shutil.copytree(base, work, symlinks=True)
    snapshot = work.with_name(work.name + "-killed")
    finished = False

    def kill(i: int) -> None:
        if i == n:
            shutil.copytree(work, snapshot, symlinks=True)
            raise _Killed

    with monkeypatch.context() as m:
        _steps(m, kill)
        try:
            triton.write_repository(bundle, work / "repo")
        except _Killed:
            pass
        else:
            finished = True
    if finished:
        shutil.rmtree(work)
        return False
    shutil.rmtree(work)  # what the stopped run's own clean-up did: a SIGKILL runs none
    os.rename(snapshot, work)
    return True


@pytest.mark.parametrize("swap", ["exchange", "two-renames"])
def test_a_kill_at_any_step_of_a_publish_leaves_a_repository_that_loads_and_a_rerun_completes(
        bundles, repo_v1, tmp_path, monkeypatch, swap):
    """Finding 1: a SIGKILL between the version's rename and the config's left version 2 beside the old config: the
    repository did not serve until export.triton was run again."""
    if swap == "two-renames":
        monkeypatch.setattr(triton_publish, "exchange", lambda a, b: False, raising=False)
    base = repo_v1.parent
    outcomes = []
    n = 0
    while True:
        n += 1
        work = tmp_path / f"k{n}"
        if not _killed_at(bundles[1], base, work, n, monkeypatch):
            break
        repo = work / "repo"
        if (repo / MODEL).exists():
            outcomes.append(_loaded_version(repo))  # ServeError here is the finding
        else:  # killed between the two renames: the next run puts the old directory back
            assert swap == "two-renames", n
            outcomes.append(None)
        notes: list[str] = []
        written = triton.write_repository(bundles[1], repo, notes=notes)
        highest = written[0].name
        assert _loaded_version(repo) == (highest, 8), (n, notes)
        versions = sorted(int(v) for v in os.listdir(repo / MODEL) if v.isdigit())
        assert versions == list(range(1, int(highest) + 1)), (n, versions)
        for v in versions:
            read_manifest(repo / MODEL / str(v))
        assert sorted(p.name for p in work.iterdir()) == ["repo"], n  # the killed run's staging directory is gone
        shutil.rmtree(work)
    assert n > 5 and ("1", 32) in outcomes and ("2", 8) in outcomes, outcomes
    assert set(outcomes) <= {("1", 32), ("2", 8), None}, outcomes
    assert outcomes.count(None) == (1 if swap == "two-renames" else 0), outcomes


def test_a_kill_right_after_the_swap_is_not_reported_as_an_unfinished_publish(bundles, repo_v1, tmp_path,
                                                                              monkeypatch):
    """The old model directory lies where the staged one was until it is moved among the backups: a run after a kill
    there must not take it for a model still to publish."""
    base = repo_v1.parent
    (repo_v1 / "inferenceservice.yaml").write_text((repo_v1 / "inferenceservice.yaml").read_text() + "# edited\n")
    work = tmp_path / "k"
    shutil.copytree(base, work, symlinks=True)
    snapshot = tmp_path / "k-killed"

    def kill_after_exchange(a: Path, b: Path) -> bool:
        assert models_io.exchange(a, b)
        shutil.copytree(work, snapshot, symlinks=True)
        raise _Killed

    monkeypatch.setattr(triton_publish, "exchange", kill_after_exchange, raising=False)
    with pytest.raises(_Killed):
        triton.write_repository(bundles[1], work / "repo")
    monkeypatch.undo()
    shutil.rmtree(work)
    os.rename(snapshot, work)
    assert _loaded_version(work / "repo") == ("2", 8)
    notes: list[str] = []
    triton.write_repository(bundles[1], work / "repo", notes=notes)
    assert not [note for note in notes if "killed" in note], notes  # everything had been published
    assert _loaded_version(work / "repo") == ("3", 8)


def test_a_published_model_directory_shares_the_files_of_its_earlier_versions(bundles, repo_v1):
    """The earlier versions are hard-linked into the new model directory, not copied: a publish costs no disk space
    for them (a TensorRT engine is hundreds of MB), and a backend that holds one open keeps reading the same file."""
    before = os.stat(repo_v1 / MODEL / "1" / "model.onnx")
    triton.write_repository(bundles[1], repo_v1)
    after = os.stat(repo_v1 / MODEL / "1" / "model.onnx")
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    assert after.st_nlink == 1  # the old model directory is gone: no second name is left anywhere


def test_a_failing_publish_puts_the_old_model_directory_back(bundles, repo_v1, monkeypatch):
    """An error after the model's swap (the InferenceService's replacement fails) undoes it: the old directory is
    back, whole."""
    before = sorted(os.listdir(repo_v1 / MODEL))
    config = (repo_v1 / MODEL / "config.pbtxt").read_bytes()
    real = os.replace

    def failing(src, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if Path(dst) == repo_v1 / "inferenceservice.yaml":  # the publish's step, not the staging's
            raise OSError(28, "No space left on device")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        triton.write_repository(bundles[1], repo_v1, isvc_name="vitc-other")
    monkeypatch.undo()
    assert sorted(os.listdir(repo_v1 / MODEL)) == before
    assert (repo_v1 / MODEL / "config.pbtxt").read_bytes() == config
    assert _loaded_version(repo_v1) == ("1", 32)
    assert [p.name for p in repo_v1.parent.iterdir()] == ["repo"]


def test_a_server_reading_the_config_before_a_publish_swaps_the_model_loads_again(bundles, repo_v1, tmp_path,
                                                                                  monkeypatch):
    """The model directory swapped between the load's read of config.pbtxt and its listing of the versions: the load
    starts again and serves version 2 with its own config, not version 2 with the old one."""
    newer = tmp_path / "newer"
    shutil.copytree(repo_v1.parent, newer, symlinks=True)
    triton.write_repository(bundles[1], newer / "repo")
    real = tritonconfig.read
    swaps = []

    def read(model_dir: Path):  # noqa: ANN202
        config = real(model_dir)
        if not swaps:
            assert models_io.exchange(newer / "repo" / MODEL, repo_v1 / MODEL)
            swaps.append(model_dir)
        return config

    monkeypatch.setattr(tritonconfig, "read", read)
    assert _loaded_version(repo_v1) == ("2", 8)
    assert swaps


# Finding 2: a load that `python -m export` swapping the bundle overlaps.


def _fake_bundle(dest: Path, seed: int) -> Path:
    """A bundle of the fake runtime whose weights (and label names) depend on `seed`."""
    fake_runtime.write_bundle(dest)
    m = read_manifest(dest)
    np.save(dest / fake_runtime.WEIGHTS, fake_runtime.weights(3, len(m.class_names), seed))
    artifacts = tuple(dataclasses.replace(a, files=file_entries(dest, [dest / fake_runtime.WEIGHTS]))
                      if a.runtime == "fake" else a for a in m.artifacts)
    write_manifest(dest, dataclasses.replace(m, artifacts=artifacts,
                                             class_names=tuple(f"{n}-{seed}" for n in m.class_names)))
    return dest


@pytest.fixture()
def swapped(tmp_path) -> Iterator[tuple[Path, Path]]:
    """(--model-dir, the next bundle): md/m holds bundle 0; the next one, beside it, is swapped in by exchange."""
    with fake_runtime.registered():
        md = tmp_path / "md"
        _fake_bundle(md / "m", 0)
        yield md, _fake_bundle(tmp_path / "next", 1)


def _swap_after_manifest(monkeypatch: pytest.MonkeyPatch, bundle: Path, other: Path, times: int) -> list[Path]:
    """Swap `bundle` and `other` (as export swaps its --out) right after each of the next `times` manifest reads of a
    load, before the load reads the files: the old manifest, then the new files."""
    real = registry.read_manifest
    swaps: list[Path] = []

    def read(path: Path):  # noqa: ANN202
        manifest = real(path)
        if len(swaps) < times:
            assert models_io.exchange(other, bundle)
            swaps.append(path)
        return manifest

    monkeypatch.setattr(registry, "read_manifest", read)
    return swaps


def _settings(md: Path) -> Settings:
    return Settings(model_control_mode="explicit", model_dir=md, backend="fake", access_log=False, graceful_timeout_s=5)


def _labels(md: Path) -> list[str]:
    return list(read_manifest(md / "m").class_names)


@pytest.mark.parametrize("times", [1, 2])
def test_a_hot_reload_that_a_bundle_swap_overlaps_loads_the_new_bundle(swapped, monkeypatch, times):
    """Finding 2: the manifest was read before the swap and the files after it: a false 400 "does not match its
    sha256 in the manifest (tampered or corrupt)"."""
    from fastapi.testclient import TestClient

    from serve.app import create_app

    md, other = swapped
    with TestClient(create_app(_settings(md))) as c:
        swaps = _swap_after_manifest(monkeypatch, md / "m", other, times)
        r = c.post("/v2/repository/models/m/load", json={})
        assert r.status_code == 200, r.text
        assert len(swaps) == times
        assert c.get("/v1/models/m").json()["labels"] == _labels(md)  # the bundle there now, whole
        assert c.post("/v2/repository/models/m/load", json={}).status_code == 200  # no swap: loads as before


def test_a_start_that_a_bundle_swap_overlaps_serves_the_new_bundle(swapped, monkeypatch):
    md, other = swapped
    swaps = _swap_after_manifest(monkeypatch, md / "m", other, 1)
    models = load_models(_settings(md))
    try:
        assert swaps and models["m"].labels == _labels(md)
    finally:
        registry.close_models(models)


def test_a_bundle_swapped_at_every_attempt_is_not_called_tampered(swapped, monkeypatch):
    """An export replacing the bundle again and again: the load gives up after a bounded number of attempts and says
    why, without blaming the bundle's files."""
    md, other = swapped
    swaps = _swap_after_manifest(monkeypatch, md / "m", other, 1000)
    with pytest.raises(ServeError) as err:
        load_model(ModelSource.model_dir_bundle(md / "m"), _settings(md), "m")
    assert TAMPERED not in str(err.value) and "replaced while it was loaded" in str(err.value), err.value
    assert str(md) not in str(err.value)  # a load's answer names no server path
    assert 1 < len(swaps) <= 10, len(swaps)


def test_a_really_tampered_bundle_is_still_refused_with_its_reason_at_once(swapped, monkeypatch):
    from fastapi.testclient import TestClient

    from serve.app import create_app

    md, _ = swapped
    with TestClient(create_app(_settings(md))) as c:
        real = registry.read_manifest
        calls = []
        monkeypatch.setattr(registry, "read_manifest", lambda p: calls.append(p) or real(p))
        weights = np.load(md / "m" / fake_runtime.WEIGHTS)
        np.save(md / "m" / fake_runtime.WEIGHTS, weights + 1)  # same size, another sha256
        r = c.post("/v2/repository/models/m/load", json={})
        assert r.status_code == 400, r.text
        assert "does not match its sha256 in the manifest (tampered or corrupt)" in r.json()["error"], r.text
        assert len(calls) == 1  # read once: nothing was swapped, so nothing is tried again
