"""export.triton moving a repository to another Triton release: the TensorRT engines the repository serves already
(the versions their config's version_policy selects) must load in the release the InferenceService written now
runs, as the new ones must; Triton exits at start when one does not, every model with it. No GPU needed: the
engines are a few bytes and a manifest entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_serve_fixtures import micro_bundle
from test_triton_handover import _refused, _tree
from test_triton_handover_fixes import _with_engine

from export import triton


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory)


def _release(repo: Path) -> str:
    return yaml.safe_load((repo / triton.ISVC_FILE).read_text())["spec"]["predictor"]["model"]["runtimeVersion"]


def test_a_release_that_cannot_load_an_engine_already_there_is_refused_and_nothing_written(bundle, tmp_path, capsys):
    ta = _with_engine(bundle, tmp_path, "10.0.1.6", name="ta")
    tb = _with_engine(bundle, tmp_path, "10.3.0.26", name="tb")
    repo = tmp_path / "repo"
    assert triton.main([str(ta), "--out", str(repo)]) == 0
    before = _tree(repo)
    err = _refused([str(tb), "--out", str(repo), "--triton-version", "24.08"], capsys)
    assert ("ta-tensorrt-fp16 (version 1, in the repository): Triton 24.08-py3, which the inferenceservice.yaml "
            "written now would run, cannot load it: its engine was built with TensorRT 10.0.1.6 and that release "
            "ships TensorRT 10.3.0") in err
    assert ("pass --triton-version 24.05 (its image ships TensorRT 10.0.1) to keep a release that loads it, or "
            "first write a new version of ta-tensorrt-fp16 whose engine TensorRT 10.3.0 built, or remove "
            f"{repo / 'ta-tensorrt-fp16'}") in err
    assert _tree(repo) == before
    # Leaving the new engine out changes nothing: the release still moves, and the old engine still cannot load.
    assert "ta-tensorrt-fp16 (version 1" in _refused(
        [str(tb), "--out", str(repo), "--triton-version", "24.08", "--skip", "tensorrt-fp16"], capsys)
    assert _tree(repo) == before
    # The model removed, the release moves.
    triton.shutil.rmtree(repo / "ta-tensorrt-fp16")
    assert triton.main([str(tb), "--out", str(repo), "--triton-version", "24.08"]) == 0
    assert _release(repo) == "24.08-py3"


def test_only_the_versions_the_policy_serves_are_checked(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert triton.main([str(_with_engine(bundle, tmp_path / "a", "10.0.1.6", name="t")), "--out", str(repo)]) == 0
    newer = _with_engine(bundle, tmp_path / "b", "10.3.0.26", name="t")  # the same model, rebuilt for 24.08
    config = repo / "t-tensorrt-fp16" / triton.CONFIG_FILE
    config.write_text(config.read_text().replace("latest: { num_versions: 1 }", "latest: { num_versions: 2 }"))
    before = _tree(repo)
    err = _refused([str(newer), "--out", str(repo), "--triton-version", "24.08"], capsys)
    assert "t-tensorrt-fp16 (version 1, in the repository): Triton 24.08-py3" in err and _tree(repo) == before
    # The generated config serves the newest version alone: version 1 stays on disk, unloaded.
    assert triton.main([str(newer), "--out", str(repo), "--triton-version", "24.08", "--replace-config"]) == 0
    assert _release(repo) == "24.08-py3" and (repo / "t-tensorrt-fp16" / "2" / "model.plan").is_file()
    assert "version 1" not in capsys.readouterr().out


def test_a_release_whose_tensorrt_is_not_known_gets_a_note_for_the_engines_already_there(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert triton.main([str(_with_engine(bundle, tmp_path, "10.0.1.6", name="ta")), "--out", str(repo)]) == 0
    assert triton.main([str(_with_engine(bundle, tmp_path, None, name="tn")), "--out", str(repo)]) == 0
    capsys.readouterr()
    assert triton.main([str(bundle), "--out", str(repo), "--triton-version", "27.01"]) == 0
    out = capsys.readouterr().out
    assert ("note: ta-tensorrt-fp16 (version 1, in the repository): which TensorRT Triton 27.01-py3 ships is not "
            "known here") in out
    assert "note: tn-tensorrt-fp16 (version 1, in the repository): its manifest records no TensorRT version" in out
    assert _release(repo) == "27.01-py3"


def test_a_release_with_the_same_tensorrt_is_taken_and_one_already_run_only_noted(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    trt = _with_engine(bundle, tmp_path, "10.8.0.43", name="t")
    assert triton.main([str(trt), "--out", str(repo), "--triton-version", "25.01"]) == 0
    capsys.readouterr()
    # 25.02 ships the same TensorRT: no word about the engine, nor for an export that keeps the release.
    assert triton.main([str(bundle), "--out", str(repo), "--triton-version", "25.02"]) == 0
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    assert "t-tensorrt-fp16" not in capsys.readouterr().out and _release(repo) == "25.02-py3"
    # Broken already (an edited InferenceService moved the release): regenerating it with that release is noted,
    # not refused; this run breaks nothing that worked.
    path = repo / triton.ISVC_FILE
    path.write_text(path.read_text().replace('"25.02-py3"', '"24.08-py3"'))
    assert triton.main([str(bundle), "--out", str(repo), "--replace-isvc", "--triton-version", "24.08"]) == 0
    out = capsys.readouterr().out
    assert ("note: t-tensorrt-fp16 (version 1, in the repository): Triton 24.08-py3, which the repository runs "
            "already, cannot load it: its engine was built with TensorRT 10.8.0.43") in out
    assert "pass --triton-version 25.01 (its image ships TensorRT 10.8.0)" in out and _release(repo) == "24.08-py3"
