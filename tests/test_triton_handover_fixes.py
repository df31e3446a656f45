"""Handing a repository to Triton and KServe, what a review against Triton 24.05 and KServe found: a TensorRT engine
is paired only with a Triton release that ships the TensorRT that built it; a repository whose inferenceservice.yaml
lost its first line, or was deleted, is still recognised (and --replace-isvc regenerates the file); a kept config
that will not serve the new version is named; an edited labels.txt is kept like an edited config.pbtxt; storage URIs
KServe refuses are refused. No GPU needed: the TensorRT artifact is a manifest entry over a few bytes."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from test_serve_fixtures import micro_bundle
from test_triton_handover import _refused, _reseal, _tree

from export import kserve, triton
from models.bundle import Artifact, file_entries, read_manifest, write_manifest


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory)


def _model(repo: Path) -> dict:
    return yaml.safe_load((repo / triton.ISVC_FILE).read_text())["spec"]["predictor"]["model"]


def _with_engine(bundle: Path, tmp_path: Path, built_with: str | None, name: str = "trt") -> Path:
    """A copy of `bundle` holding also a TensorRT fp16 artifact whose manifest says TensorRT `built_with` built it
    (None: records no version), as python -m export.tensorrt records it; the engine is a few bytes (no GPU here)."""
    copy = shutil.copytree(bundle, tmp_path / name)
    engine = copy / "model-fp16.engine"
    engine.write_bytes(b"not a real plan" * 64)
    recorded = {"tensorrt_version": built_with} if built_with else {}
    artifact = Artifact(id="tensorrt-fp16", runtime="tensorrt", format="tensorrt-engine", precision="fp16",
                        files=file_entries(copy, [engine]), servable=True, runtime_version=built_with or "",
                        info={**recorded, "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    m = read_manifest(copy)
    write_manifest(copy, replace(m, name=name, artifacts=(*m.artifacts, artifact)))
    return _reseal(copy)


# --- 1. TensorRT engines and the Triton release ------------------------------------------------------------------


def test_the_table_knows_the_tensorrt_of_every_release_the_other_checks_cover():
    from export.triton_compat import MIN_TRITON_RELEASE
    from runtimes.tensorrt import TRITON_TENSORRT, triton_tensorrt

    assert TRITON_TENSORRT[MIN_TRITON_RELEASE] == "10.0.1"  # 24.05 (NVIDIA's support matrix)
    assert triton_tensorrt(kserve.DEFAULT_TRITON_VERSION) == "10.0.1"
    assert triton_tensorrt("24.05-trtllm-python-py3") is None  # another image, another TensorRT


def test_an_engine_of_another_tensorrt_than_the_release_ships_is_refused_with_both_versions(bundle, tmp_path, capsys):
    """constraints.txt pins TensorRT 11.4: Triton 24.05 ships 10.0.1 and cannot deserialise that plan; Triton then
    exits at start and every model of the repository goes down with it."""
    trt = _with_engine(bundle, tmp_path, "11.4.0.106")
    repo = tmp_path / "repo"
    err = _refused([str(trt), "--out", str(repo)], capsys)
    assert ("trt-tensorrt-fp16: Triton 24.05-py3 cannot load it: its engine was built with TensorRT 11.4.0.106 and "
            "that release ships TensorRT 10.0.1") in err
    assert "pass --triton-version with a release whose image ships TensorRT 11.4.0" in err
    assert "or --skip tensorrt-fp16 to leave the model out" in err
    assert not repo.exists()
    # A release whose TensorRT is another is refused alike; leaving the model out writes the others.
    assert "ships TensorRT 10.9.0" in _refused([str(trt), "--out", str(repo), "--triton-version", "25.03"], capsys)
    assert triton.main([str(trt), "--out", str(repo), "--skip", "tensorrt-fp16"]) == 0
    assert not (repo / "trt-tensorrt-fp16").exists() and (repo / "trt-onnx-fp32" / "1").is_dir()


def test_the_release_that_ships_the_engines_tensorrt_is_named_and_taken(bundle, tmp_path, capsys):
    trt = _with_engine(bundle, tmp_path, "10.9.0.34")
    repo = tmp_path / "repo"
    assert "pass --triton-version 25.03 (its image ships TensorRT 10.9.0)" in _refused(
        [str(trt), "--out", str(repo)], capsys)
    assert triton.main([str(trt), "--out", str(repo), "--triton-version", "25.03"]) == 0
    assert _model(repo)["runtimeVersion"] == "25.03-py3"
    assert (repo / "trt-tensorrt-fp16" / "1" / "model.plan").is_file()
    assert "note: trt-tensorrt-fp16" not in capsys.readouterr().out  # the release is known to fit
    # An engine built by the TensorRT of the default release is taken as it is.
    same = _with_engine(bundle, tmp_path, "10.0.1.6", name="same")
    assert triton.main([str(same), "--out", str(tmp_path / "r2")]) == 0
    assert _model(tmp_path / "r2")["runtimeVersion"] == kserve.DEFAULT_TRITON_VERSION


def test_a_release_or_an_engine_this_cannot_tell_about_gets_a_note(bundle, tmp_path, capsys):
    trt = _with_engine(bundle, tmp_path, "11.4.0.106")
    assert triton.main([str(trt), "--out", str(tmp_path / "repo"), "--triton-version", "27.01"]) == 0
    assert "note: trt-tensorrt-fp16: which TensorRT Triton 27.01-py3 ships is not known here" in \
        capsys.readouterr().out
    unrecorded = _with_engine(bundle, tmp_path, None, name="unrecorded")
    assert triton.main([str(unrecorded), "--out", str(tmp_path / "r2")]) == 0
    assert "note: unrecorded-tensorrt-fp16: its manifest records no TensorRT version" in capsys.readouterr().out


def test_a_kept_inference_service_whose_release_cannot_load_the_engine_gets_a_note(bundle, tmp_path, capsys):
    trt = _with_engine(bundle, tmp_path, "10.9.0.34")
    repo = tmp_path / "repo"
    assert triton.main([str(trt), "--out", str(repo), "--triton-version", "25.03"]) == 0
    path = repo / triton.ISVC_FILE
    path.write_text(path.read_text().replace('"25.03-py3"', '"24.05-py3"'))  # edited: kept
    capsys.readouterr()
    assert triton.main([str(trt), "--out", str(repo)]) == 0
    out = capsys.readouterr().out
    assert (f"note: trt-tensorrt-fp16: the kept {triton.ISVC_FILE} runs Triton 24.05-py3, which cannot load it") in out
    assert "pass --replace-isvc with --triton-version 25.03" in out and f"kept {path}" in out


def test_skip_names_only_artifacts_of_the_bundle(bundle, tmp_path, capsys):
    err = _refused([str(bundle), "--out", str(tmp_path / "repo"), "--skip", "nope"], capsys)
    assert "--skip 'nope': bundle 'micro' has no such artifact Triton can serve" in err
    assert "--skip 'a\\nb'" in _refused([str(bundle), "--out", str(tmp_path / "repo"), "--skip", "a\nb"], capsys)
    err = _refused([str(bundle), "--out", str(tmp_path / "repo"),
                    "--skip", "onnx-fp32,openvino-fp32", "--skip", "openvino-fp16"], capsys)
    assert "--skip leaves out every artifact of bundle 'micro' Triton can serve" in err
    assert not list(tmp_path.iterdir())


# --- 2. recognising the repository without its InferenceService header ------------------------------------------


def test_an_inference_service_without_its_first_line_is_kept_and_replace_isvc_regenerates_it(bundle, tmp_path,
                                                                                              capsys):
    repo = tmp_path / "repo"
    triton.write_repository(bundle, repo, storage_uri="s3://b/repo", isvc_name="prod")
    path = repo / triton.ISVC_FILE
    path.write_text(path.read_text().partition("\n")[2])  # a YAML formatter drops the header comment
    edited = path.read_bytes()
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    assert path.read_bytes() == edited and f"kept {path}" in capsys.readouterr().out
    assert (repo / "micro-onnx-fp32" / "2").is_dir()
    assert triton.main([str(bundle), "--out", str(repo), "--replace-isvc"]) == 0
    assert path.read_text().startswith(kserve.ISVC_HEADER)
    assert (_model(repo)["storageUri"], yaml.safe_load(path.read_text())["metadata"]["name"]) == ("s3://b/repo", "prod")


def test_a_deleted_inference_service_is_written_again(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    triton.write_repository(bundle, repo)
    (repo / triton.ISVC_FILE).unlink()
    assert triton.main([str(bundle), "--out", str(repo), "--storage-uri", "gs://b/repo"]) == 0
    out = capsys.readouterr().out
    assert (repo / "micro-onnx-fp32" / "2").is_dir() and _model(repo)["storageUri"] == "gs://b/repo"
    assert f"note: {repo / triton.ISVC_FILE}: the repository had none, so it was written" in out
    (repo / triton.ISVC_FILE).unlink()
    assert triton.main([str(bundle), "--out", str(repo), "--replace-isvc"]) == 0
    assert (repo / triton.ISVC_FILE).read_text().startswith(kserve.ISVC_HEADER)


def test_without_the_header_only_model_directories_this_tool_wrote_make_a_repository(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    triton.write_repository(bundle, repo)
    (repo / triton.ISVC_FILE).unlink()
    (repo / "notes.txt").write_text("mine")
    before = _tree(repo)
    err = _refused([str(bundle), "--out", str(repo)], capsys)
    assert "no inferenceservice.yaml, and it holds 'notes.txt'" in err and _tree(repo) == before
    # Directories of the shape but with no version this tool wrote: not recognised either.
    shaped = tmp_path / "shaped"
    (shaped / "m" / "1").mkdir(parents=True)
    shutil.copy(bundle / "manifest.json", shaped / "m" / "1" / "manifest.json")  # a bundle, not named after m
    err = _refused([str(bundle), "--out", str(shaped)], capsys)
    assert "none of its directories holds a model version written by this tool" in err


# --- 3. a kept config that does not select the new version -------------------------------------------------------


def test_a_kept_config_pinned_to_specific_versions_is_named_when_it_will_not_serve_the_new_one(bundle, tmp_path,
                                                                                              capsys):
    repo = tmp_path / "repo"
    triton.write_repository(bundle, repo)
    config = repo / "micro-onnx-fp32" / "config.pbtxt"
    config.write_text(config.read_text().replace("latest: { num_versions: 1 }", "specific: { versions: [ 1 ] }"))
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    out = capsys.readouterr().out
    assert (f"note: {config} is kept, and its version_policy specific {{ versions: [ 1 ] }} does not select the new "
            "version 2: neither Triton nor vitc will serve it") in out
    assert out.count("does not select") == 1  # the untouched configs of the other models serve their new version
    config.write_text(config.read_text().replace("versions: [ 1 ]", "versions: [ 1, 3 ]"))
    assert triton.main([str(bundle), "--out", str(repo)]) == 0  # version 3: listed, served
    assert "does not select" not in capsys.readouterr().out


# --- 4. an edited labels.txt ---------------------------------------------------------------------------------------


def test_an_edited_labels_file_is_kept_and_replace_config_regenerates_it(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    triton.write_repository(bundle, repo)
    labels = repo / "micro-onnx-fp32" / "labels.txt"
    generated = labels.read_bytes()
    labels.write_text(labels.read_text().replace("Bear\n", "Brown bear\n"))
    edited = labels.read_bytes()
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    out = capsys.readouterr().out
    assert labels.read_bytes() == edited and f"kept {labels}: it differs from the labels this tool wrote" in out
    assert out.count("labels.txt") == 1  # the untouched ones are regenerated without a word
    # One label too few would shift Triton's classification answers: refused, nothing written.
    labels.write_text("Bear\nBird\n")
    before = _tree(repo)
    err = _refused([str(bundle), "--out", str(repo)], capsys)
    assert f"{labels} differs from what this tool writes (edited)" in err and "holds 2 labels, the model has 10" in err
    assert _tree(repo) == before
    assert triton.main([str(bundle), "--out", str(repo), "--replace-config"]) == 0
    assert labels.read_bytes() == generated


# --- 5. storage URIs KServe refuses -----------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["ftp://host/repo", "S3://bucket/repo", "modelscope://org/repo",
                                 "https://acct.blob.core.windows.net"])
def test_a_storage_uri_kserve_refuses_is_refused(bundle, tmp_path, capsys, uri):
    err = _refused([str(bundle), "--out", str(tmp_path / "repo"), "--storage-uri", uri], capsys)
    assert f"--storage-uri {uri!r}: KServe accepts only storage URIs that start with gs://, s3://" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("uri", ["hf://org/model", "oci://registry/repo:tag", "webhdfs://nn/repo",
                                 "https://acct.blob.core.windows.net/container/repo", "pvc://vol/repo"])
def test_every_scheme_kserve_accepts_is_taken(uri):
    kserve.check_storage_uri(uri)
