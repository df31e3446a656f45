"""Handing a repository to Triton and KServe, what tester hEH found: a version the config.pbtxt written for it would
not serve is refused before anything is written (a kept config's policy that leaves it unserved leaves labels.txt as
it is); --replace-isvc keeps only the name and storage URI, and the pod's GPUs follow the models' instance kinds
(--gpus 0 allowed when none runs on KIND_GPU); artifacts the export's gate refused are named, skipping one is allowed,
and a model an earlier export of the bundle left unrefreshed is named; the "kept" InferenceService of a relative
--out is not also said "wrote"; a linked inferenceservice.yaml is refused for what it is; a new version that changes
the input dims, the batch or the classes is named; only the main Triton image is accepted; storage URIs KServe or
Kubernetes would refuse are refused."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from test_serve_fixtures import micro_bundle
from test_triton_handover import _refused, _reseal, _tree

from export import kserve, triton
from export.triton_config import contract_change
from models.bundle import read_manifest, write_manifest

ONNX_ONLY = ["--skip", "openvino-fp32,openvino-fp16"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A bundle of the same name, `micro`, of a vit_c_micro at 48 px exported with max batch 4 (ONNX only)."""
    import torch

    from data.datasets import ANIMAL_CLASSES, default_preprocessing
    from export.bundle import build_bundle
    from models import build_model
    from models.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    model = build_model("vit_c_micro", image_size=48).eval()
    with torch.no_grad():  # a head drawn wide: the default zero head ties every logit, which the gate refuses
        model.head.weight.normal_(0, 0.5)
    ckpt = save_checkpoint(root / "ckpt", model, class_names=ANIMAL_CLASSES,
                           preprocessing=default_preprocessing("animals", 48), extra={"dataset": "animals"})
    build_bundle(ckpt, root / "micro", targets=("onnx",), name="micro", max_batch=4, parity_samples=16,
                 calibration_samples=16, log=lambda _: None)
    return root / "micro"


def _limits(repo: Path) -> dict:
    return yaml.safe_load((repo / triton.ISVC_FILE).read_text())["spec"]["predictor"]["model"]["resources"]["limits"]


def _model(repo: Path) -> dict:
    return yaml.safe_load((repo / triton.ISVC_FILE).read_text())["spec"]["predictor"]["model"]


def _with_refused(bundle: Path, tmp_path: Path, artifact_id: str) -> Path:
    """A copy of `bundle` (same name) in which the export's parity gate refused `artifact_id`, as export records it."""
    copy = shutil.copytree(bundle, tmp_path / "refused" / bundle.name)
    m = read_manifest(copy)
    artifacts = tuple(replace(a, servable=False, refused_reason="max abs logit error 4.5e+03 > 1.4e+03",
                              refused_files=a.files, files=()) if a.id == artifact_id else a for a in m.artifacts)
    write_manifest(copy, replace(m, artifacts=artifacts))
    return _reseal(copy)


# --- 1. a version the config written for it would not serve -------------------------------------------------------


def test_a_version_below_the_served_one_is_refused_before_anything_is_written(bundle, wide, tmp_path, capsys):
    """It rewrote config.pbtxt for version 3 (48 px) beside version 5 (32 px), which Triton and vitc serve: neither
    could load the model any more."""
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), *ONNX_ONLY, "--version", "5"]) == 0
    before = _tree(repo)
    for extra in ([], ["--replace-config"]):
        err = _refused([str(wide), "--out", str(repo), "--version", "3", *extra], capsys)
        assert ("micro-onnx-fp32: version 3 would never be served: the config.pbtxt generated for it serves the latest "
                "version, which is 5") in err and "pass a --version above 5" in err, err
        assert _tree(repo) == before
    assert triton.main([str(wide), "--out", str(repo), "--version", "6"]) == 0
    assert "dims: [ 3, 48, 48 ]" in (repo / "micro-onnx-fp32" / "config.pbtxt").read_text()


def test_after_the_int64_version_both_refusals_say_to_remove_it(bundle, tmp_path, capsys):
    """After --version 2^63-1, a lower --version said 'pass a --version above 2^63-1' and none 'pass --version with a
    free one': each sent the user to the other, and both refuse."""
    from models.tritonconfig import MAX_VERSION

    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), *ONNX_ONLY, "--version", str(MAX_VERSION)]) == 0
    top = repo / "micro-onnx-fp32" / str(MAX_VERSION)
    for version in (["--version", "5"], []):
        err = _refused([str(bundle), "--out", str(repo), *ONNX_ONLY, *version], capsys)
        assert f"no version can follow it, and one below it is never served; remove {top} to write another" in err, err
        assert "pass" not in err, err
    shutil.rmtree(top)
    assert triton.main([str(bundle), "--out", str(repo), *ONNX_ONLY, "--version", "5"]) == 0


def test_a_kept_config_that_does_not_serve_the_new_version_leaves_labels_as_they_are(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), *ONNX_ONLY]) == 0
    model = repo / "micro-onnx-fp32"
    config = model / "config.pbtxt"
    config.write_text(config.read_text().replace("latest: { num_versions: 1 }", "specific: { versions: [ 1 ] }"))
    os.utime(model / "labels.txt", ns=(10**18, 10**18))  # a labels.txt written again would have today's time
    capsys.readouterr()
    assert triton.main([str(bundle), "--out", str(repo), *ONNX_ONLY]) == 0
    out = capsys.readouterr().out
    assert (f"note: {config} is kept, and its version_policy specific {{ versions: [ 1 ] }} does not select the new "
            "version 2: neither Triton nor vitc will serve it (they serve 1), and labels.txt is left as it is; add it "
            "to the policy") in out, out
    assert (model / "labels.txt").stat().st_mtime_ns == 10**18 and (model / "2").is_dir()
    # A kept latest policy: a version below the newest is named with the version to pass.
    config.write_text(config.read_text().replace("specific: { versions: [ 1 ] }", "latest: { num_versions: 1 }")
                      + "# edited\n")
    assert triton.main([str(bundle), "--out", str(repo), *ONNX_ONLY, "--version", "5"]) == 0
    capsys.readouterr()
    assert triton.main([str(bundle), "--out", str(repo), *ONNX_ONLY, "--version", "3"]) == 0
    out = capsys.readouterr().out
    assert "does not select the new version 3: neither Triton nor vitc will serve it (they serve 5)" in out
    assert "pass a --version above 5" in out


# --- 2. --replace-isvc and the pod's GPUs ---------------------------------------------------------------------------


def test_the_gpu_request_follows_the_models_kinds(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), "--kind", "gpu"]) == 0
    assert _limits(repo)["nvidia.com/gpu"] == 1
    assert triton.main([str(bundle), "--out", str(repo), "--kind", "cpu"]) == 0  # every model on KIND_CPU now
    assert "nvidia.com/gpu" not in _limits(repo)
    assert triton.main([str(bundle), "--out", str(repo), "--kind", "gpu", "--gpus", "2"]) == 0
    assert _limits(repo)["nvidia.com/gpu"] == 2
    assert triton.main([str(bundle), "--out", str(repo)]) == 0  # still KIND_GPU: the GPUs are kept
    assert _limits(repo)["nvidia.com/gpu"] == 2
    err = _refused([str(bundle), "--out", str(repo), "--gpus", "0"], capsys)
    assert "--gpus 0: micro-onnx-fp32 of the repository run on KIND_GPU" in err and "--kind cpu" in err
    assert triton.main([str(bundle), "--out", str(repo), "--kind", "cpu", "--replace-isvc"]) == 0
    assert "nvidia.com/gpu" not in _limits(repo)
    assert triton.main([str(bundle), "--out", str(repo), "--gpus", "0"]) == 0
    assert "nvidia.com/gpu" not in _limits(repo)


def test_replace_isvc_keeps_only_the_name_and_the_storage_uri(bundle, tmp_path):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), "--isvc-name", "prod", "--storage-uri", "s3://b/repo",
                        "--triton-version", "25.02", "--cpus", "8", "--kind", "gpu", "--gpus", "3"]) == 0
    assert triton.main([str(bundle), "--out", str(repo), "--kind", "cpu", "--replace-isvc"]) == 0
    model = _model(repo)
    assert (model["storageUri"], model["runtimeVersion"]) == ("s3://b/repo", kserve.DEFAULT_TRITON_VERSION)
    assert _limits(repo) == {"cpu": str(kserve.DEFAULT_CPUS), "memory": "8Gi"}
    assert yaml.safe_load((repo / triton.ISVC_FILE).read_text())["metadata"]["name"] == "prod"


# --- 3. artifacts the export's gate refused -------------------------------------------------------------------------


def test_a_refused_artifact_is_named_and_may_be_skipped(bundle, tmp_path, capsys):
    refused = _with_refused(bundle, tmp_path, "openvino-fp16")
    assert triton.main([str(refused), "--out", str(tmp_path / "r1")]) == 0
    note = ("note: openvino-fp16 of bundle 'micro' is not exported: the export's parity gate refused it (max abs "
            "logit error 4.5e+03 > 1.4e+03)")
    assert note in capsys.readouterr().out
    assert not (tmp_path / "r1" / "micro-openvino-fp16").exists()
    assert triton.main([str(refused), "--out", str(tmp_path / "r2"), "--skip", "openvino-fp16"]) == 0
    assert note in capsys.readouterr().out
    err = _refused([str(refused), "--out", str(tmp_path / "r3"), "--skip", "nope"], capsys)
    assert "(onnx-fp32, openvino-fp32; refused at export: openvino-fp16)" in err


def test_a_model_an_earlier_export_left_unrefreshed_is_named(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    capsys.readouterr()
    assert triton.main([str(_with_refused(bundle, tmp_path, "openvino-fp16")), "--out", str(repo)]) == 0
    out = capsys.readouterr().out
    assert ("note: micro-openvino-fp16: not refreshed by this export (the export's parity gate refused it (max abs "
            "logit error 4.5e+03 > 1.4e+03)): it still serves version 1, from an earlier export of a bundle named "
            "'micro'") in out, out
    assert triton.main([str(bundle), "--out", str(repo), "--skip", "openvino-fp32"]) == 0
    out = capsys.readouterr().out
    assert "note: micro-openvino-fp32: not refreshed by this export (--skip left it out): it still serves version 2" \
        in out and "micro-openvino-fp16: not refreshed" not in out, out


# --- 4. and 5. what the InferenceService lines say -------------------------------------------------------------------


@pytest.mark.parametrize("out", ["repo", "repo/", "./repo"])
def test_a_kept_inference_service_of_a_relative_out_is_not_said_written(bundle, tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    assert triton.main([str(bundle), "--out", "repo", *ONNX_ONLY]) == 0
    path = tmp_path / "repo" / triton.ISVC_FILE
    path.write_text(path.read_text().replace("memory: 8Gi", "memory: 16Gi"))
    capsys.readouterr()
    assert triton.main([str(bundle), "--out", out, *ONNX_ONLY]) == 0
    said = capsys.readouterr().out
    assert f"kept {path}" in said and "wrote repo" not in said.replace("wrote repo/micro", ""), said


def test_a_linked_inference_service_is_refused_for_being_a_link(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), *ONNX_ONLY]) == 0
    victim = tmp_path / "victim.yaml"
    victim.write_text("mine\n")
    (repo / triton.ISVC_FILE).unlink()
    (repo / triton.ISVC_FILE).symlink_to(victim)
    err = _refused([str(bundle), "--out", str(repo), "--replace-isvc"], capsys)
    assert f"{repo / triton.ISVC_FILE} is a symbolic link, not a regular file" in err, err
    assert "no inferenceservice.yaml" not in err and victim.read_text() == "mine\n"


# --- 6. a new version clients must follow ---------------------------------------------------------------------------


def test_a_new_version_that_changes_the_input_or_the_batch_is_named(bundle, wide, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), *ONNX_ONLY]) == 0
    capsys.readouterr()
    assert triton.main([str(wide), "--out", str(repo)]) == 0
    assert ("note: micro-onnx-fp32: version 2 changes what clients send and read, against version 1 served now: "
            "input dims [3, 32, 32] -> [3, 48, 48]; max batch 32 -> 4") in capsys.readouterr().out
    assert triton.main([str(wide), "--out", str(repo)]) == 0
    assert "changes what clients send" not in capsys.readouterr().out


def test_changed_class_names_are_named(bundle, tmp_path):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), *ONNX_ONLY]) == 0
    m = read_manifest(bundle)
    renamed = replace(m, class_names=("Wolf", *m.class_names[1:]))
    assert contract_change(repo / "micro-onnx-fp32", m, 2) is None
    assert contract_change(repo / "micro-onnx-fp32", renamed, 2).endswith(
        f"against version 1 served now: 1 class names (class 0: {m.class_names[0]!r} -> 'Wolf'); every client of the "
        "model must change with it")


# --- 7. and 8. the Triton image and the storage URI ------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["24.06-trtllm-python-py3", "24.06-vllm-python-py3", "24.06-pyt-python-py3",
                                 "24.06-py3-custom", "24.06-igpu"])
def test_only_the_main_triton_image_is_accepted(bundle, tmp_path, capsys, tag):
    err = _refused([str(bundle), "--out", str(tmp_path / "repo"), "--triton-version", tag], capsys)
    assert f"--triton-version {tag} is not the release's main Triton image, YY.MM-py3 or YY.MM-py3-igpu" in err, err
    assert "use 24.06-py3," in err and not (tmp_path / "repo").exists()


@pytest.mark.parametrize(("uri", "says"), [
    ("pvc:///repo", "must be pvc://<claim>/<path>"), ("pvc://Bad_Claim/repo", "the claim a Kubernetes name"),
    ("pvc://claim", "must be pvc://<claim>/<path>"), ("pvc://claim/", "must be pvc://<claim>/<path>"),
    ("pvc://-claim/repo", "must be pvc://<claim>/<path>"), ("s3:///", "names no bucket: give s3://<bucket>/<path>"),
    ("gs:///repo", "names no bucket: give gs://<bucket>/<path>"),
    # the path is the volume's subPath: `..` or an absolute one (pvc://claim//x: subPath /x) is refused by
    # Kubernetes, `./` is the claim's root
    *((uri, "with no '.', '..' or empty element in the path") for uri in (
        "pvc://claim/../etc", "pvc://claim/./", "pvc://claim/repo/..", "pvc://claim/a/./b", "pvc://claim//x",
        "pvc://claim/a//b")),
])
def test_storage_uris_kubernetes_or_kserve_would_refuse_are_refused(bundle, tmp_path, capsys, uri, says):
    assert says in _refused([str(bundle), "--out", str(tmp_path / "repo"), "--storage-uri", uri], capsys)
    assert not (tmp_path / "repo").exists()
    kserve.check_storage_uri("pvc://models.team-a/repo/v 2")  # a dotted claim and a path with a space: fine
    kserve.check_storage_uri("pvc://claim/.models/v..2/...")  # dots within a name are a name's


def test_an_untouched_file_whose_storage_uri_is_now_refused_is_not_silently_replaced(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), *ONNX_ONLY]) == 0
    old = kserve.Service(name="vitc-micro", storage_uri="pvc://claim", runtime_version="24.05-py3", gpus=0)
    (repo / triton.ISVC_FILE).write_text(kserve.inference_service(old))  # as an earlier version wrote it
    err = _refused([str(bundle), "--out", str(repo), *ONNX_ONLY], capsys)
    assert 'names storageUri "pvc://claim", which KServe or Kubernetes refuses; pass --storage-uri' in err, err
    assert triton.main([str(bundle), "--out", str(repo), *ONNX_ONLY, "--storage-uri", "pvc://claim/repo"]) == 0
