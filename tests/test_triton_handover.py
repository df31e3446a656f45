"""Handing a repository to Triton and KServe: the InferenceService names a Triton release that loads the exports,
keeps its name, storage URI, release and GPUs (or the whole file, once edited) when versions or bundles are added,
names KServe accepts, and instance groups each runtime's Triton backend accepts; a new version keeps the options its
untouched configs were written with, and what an earlier vitc wrote that Triton cannot load is refused or named."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from test_serve_fixtures import micro_bundle

from export import kserve, triton, triton_config
from models.bundle import read_manifest, write_manifest


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory)


def _isvc(repo: Path) -> dict:
    return yaml.safe_load((repo / triton.ISVC_FILE).read_text())


def _model(repo: Path) -> dict:
    return _isvc(repo)["spec"]["predictor"]["model"]


def _refused(argv: list[str], capsys) -> str:
    """The one stderr line of a run that exits 2."""
    with pytest.raises(SystemExit) as info:
        triton.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    return err


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its content (None for directories)."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def _group(config: Path) -> tuple[str, str]:
    """(count, kind) of a generated config's one instance group."""
    count, kind = config.read_text().split("instance_group [{ count: ")[1].split(" }]")[0].split(" kind: ")
    return count, kind


def _renamed(bundle: Path, tmp_path: Path, name: str, keep=lambda _a: True) -> Path:  # noqa: ANN001
    """A copy of `bundle` under another name, holding the artifacts `keep` selects."""
    copy = shutil.copytree(bundle, tmp_path / name)
    m = read_manifest(copy)
    write_manifest(copy, replace(m, name=name, artifacts=tuple(a for a in m.artifacts if keep(a))))
    return _reseal(copy)


def _reseal(bundle: Path) -> Path:
    """`bundle` with its golden file recording exactly the artifacts its (edited) manifest lists, as an export of
    them would have: export.triton refuses what a server refuses (an artifact the golden file does not record, or
    one it records that is no longer listed)."""
    import numpy as np

    from models.bundle import file_entries

    m = read_manifest(bundle)
    golden = bundle / m.golden.file.path
    listed = {a.id for a in m.artifacts}
    with np.load(golden, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files
                  if k.partition(".")[0] not in ("record", "outputs") or k.partition(".")[2] in listed}
    arrays.update({f"record.{i}": np.frombuffer(bytes.fromhex(m.record(i)), np.uint8) for i in listed})
    np.savez_compressed(golden, **arrays)
    write_manifest(bundle, replace(m, golden=replace(m.golden, file=file_entries(bundle, [golden])[0])))
    return bundle


def test_adding_a_version_or_a_bundle_keeps_the_inference_service_name_uri_release_and_gpus(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    named = ["--storage-uri", "s3://my-bucket/models/repo", "--isvc-name", "prod-classifier"]
    assert triton.main([str(bundle), "--out", str(repo), *named]) == 0
    chosen = _isvc(repo)
    assert chosen["metadata"]["name"] == "prod-classifier" and _model(repo)["storageUri"] == "s3://my-bucket/models/repo"
    other = _renamed(bundle, tmp_path, "other")
    for again in (bundle, other):  # a new version of the same bundle, then another bundle (it used to rename it)
        assert triton.main([str(again), "--out", str(repo)]) == 0
        assert _isvc(repo) == chosen
    assert (repo / "other-onnx-fp32" / "1").is_dir() and (repo / "micro-onnx-fp32" / "2").is_dir()
    # Given again, an option takes effect and the others stay; the release and the GPUs are kept the same way.
    assert triton.main([str(bundle), "--out", str(repo), "--triton-version", "25.02", "--kind", "gpu",
                        "--gpus", "2"]) == 0
    assert triton.main([str(other), "--out", str(repo), "--storage-uri", "gs://b/repo"]) == 0
    assert (_isvc(repo)["metadata"]["name"], _model(repo)["storageUri"]) == ("prod-classifier", "gs://b/repo")
    assert _model(repo)["runtimeVersion"] == "25.02-py3" and _model(repo)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "kept" not in capsys.readouterr().out


def test_an_edited_inference_service_is_kept_and_options_that_would_not_apply_are_refused(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    triton.write_repository(bundle, repo, storage_uri="s3://b/repo", isvc_name="prod")
    path = repo / triton.ISVC_FILE
    path.write_text(path.read_text().replace('cpu: "4"', 'cpu: "8"'))
    edited = path.read_bytes()
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    assert path.read_bytes() == edited
    assert f"kept {path}" in capsys.readouterr().out
    before = sorted(p.name for p in (repo / "micro-onnx-fp32").iterdir())
    assert "--isvc-name would not take effect" in _refused([str(bundle), "--out", str(repo), "--isvc-name", "x"],
                                                           capsys)
    assert path.read_bytes() == edited and sorted(p.name for p in (repo / "micro-onnx-fp32").iterdir()) == before
    # --replace-isvc regenerates it, keeping only the edited file's name and storage URI (the README's word).
    assert triton.main([str(bundle), "--out", str(repo), "--replace-isvc", "--triton-version", "26.02-py3"]) == 0
    assert (_isvc(repo)["metadata"]["name"], _model(repo)["storageUri"]) == ("prod", "s3://b/repo")
    assert _model(repo)["runtimeVersion"] == "26.02-py3" and _model(repo)["resources"]["limits"]["cpu"] == "4"
    assert "kept" not in capsys.readouterr().out
    # An edited file that names a release that loads the models gets the plain line.
    path.write_text(path.read_text().replace('cpu: "4"', 'cpu: "6"'))
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "--replace-isvc regenerates it" in out and "runtimeVersion" not in out


def test_kind_gpu_with_a_kept_inference_service_that_asks_for_no_gpu_is_refused(bundle, tmp_path, capsys):
    """Every inferenceservice.yaml an earlier vitc wrote is kept; --kind gpu would put models on KIND_GPU in a pod
    without a GPU, where Triton cannot load them."""
    repo = tmp_path / "repo"
    triton.write_repository(bundle, repo)
    path = repo / triton.ISVC_FILE
    path.write_text(path.read_text().replace('memory: 2Gi', 'memory: 3Gi'))  # edited: kept, no GPU asked for
    before = _tree(repo)
    err = _refused([str(bundle), "--out", str(repo), "--kind", "gpu"], capsys)
    assert f"{path} differs from what this tool writes" in err and "it asks for no GPU: --kind gpu" in err
    assert "add --replace-isvc to regenerate it" in err
    assert _tree(repo) == before
    # Once it asks for a GPU (edited), or regenerated, --kind gpu is taken.
    path.write_text(path.read_text().replace("memory: 8Gi}", "memory: 8Gi, nvidia.com/gpu: 1}"))
    assert triton.main([str(bundle), "--out", str(repo), "--kind", "gpu"]) == 0
    assert f"kept {path}" in capsys.readouterr().out
    path.write_bytes(before[triton.ISVC_FILE])
    assert triton.main([str(bundle), "--out", str(repo), "--kind", "gpu", "--replace-isvc"]) == 0
    assert _model(repo)["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_a_new_version_keeps_the_instances_kind_and_queue_delay_of_an_untouched_config(bundle, tmp_path, capsys):
    """Like the InferenceService's name and GPUs, the options an untouched config.pbtxt was written with stay unless
    given again (adding a version used to reset them to the defaults, moving a GPU model to the CPU)."""
    repo = tmp_path / "repo"
    onnx, ov = repo / "micro-onnx-fp32" / "config.pbtxt", repo / "micro-openvino-fp32" / "config.pbtxt"
    assert triton.main([str(bundle), "--out", str(repo), "--kind", "gpu", "--instances", "3",
                        "--max-queue-delay-us", "7000"]) == 0
    capsys.readouterr()
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    assert (repo / "micro-onnx-fp32" / "2").is_dir() and "kept" not in capsys.readouterr().out
    assert _group(onnx) == ("3", "KIND_GPU") and "max_queue_delay_microseconds: 7000 }" in onnx.read_text()
    assert _group(ov) == ("3", "KIND_CPU")
    assert _model(repo)["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Given again, an option takes effect and the others stay.
    assert triton.main([str(bundle), "--out", str(repo), "--instances", "2", "--kind", "cpu"]) == 0
    assert _group(onnx) == ("2", "KIND_CPU") and "max_queue_delay_microseconds: 7000 }" in onnx.read_text()
    # A model new to the repository gets the defaults.
    other = _renamed(bundle, tmp_path, "other")
    assert triton.main([str(other), "--out", str(repo)]) == 0
    config = (repo / "other-onnx-fp32" / "config.pbtxt").read_text()
    assert _group(repo / "other-onnx-fp32" / "config.pbtxt") == ("1", "KIND_CPU")
    assert "max_queue_delay_microseconds: 2000 }" in config
    # An earlier vitc's --kind gpu put OpenVINO on KIND_GPU, which its Triton backend refuses: the CPU, said so.
    ov.write_text(kserve.marked(ov.read_text().partition("\n")[2].replace("KIND_CPU", "KIND_GPU"), triton_config._MARK))
    capsys.readouterr()
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    assert _group(ov) == ("2", "KIND_CPU")
    assert ("note: micro-openvino-fp32: KIND_CPU, not KIND_GPU as its previous config.pbtxt had: Triton's openvino "
            "backend runs it on the CPU only") in capsys.readouterr().out


def _old_openvino_config(name: str, bundle: Path, count: int) -> str:
    """The config.pbtxt an earlier vitc wrote for an OpenVINO model: batched, as Triton's OpenVINO backend cannot
    serve it."""
    m = read_manifest(bundle)
    c, h, w = m.input.sample_shape
    return (f'name: "{name}"\nbackend: "openvino"\nmax_batch_size: {m.input.max_batch}\n'
            f'input [{{ name: "{m.input.name}" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ {c}, {h}, {w} ] }}]\n'
            f'output [{{ name: "{m.output.name}" data_type: TYPE_FP32 dims: [ {m.output.classes} ] '
            'label_filename: "labels.txt" }]\n'
            f"dynamic_batching {{ preferred_batch_size: [ 8, {m.input.max_batch} ] "
            "max_queue_delay_microseconds: 2000 }\n"
            f"instance_group [{{ count: {count} kind: KIND_CPU }}]\n"
            "version_policy: { latest: { num_versions: 1 } }\n"
            f'model_warmup [{{ name: "zeros" batch_size: 1 inputs {{ key: "{m.input.name}" value: {{ data_type: '
            f"TYPE_FP32 dims: [ {c}, {h}, {w} ] zero_data: true }} }} }}]\n"
            'parameters { key: "INFERENCE_PRECISION_HINT" value: { string_value: "f32" } }\n')


def test_an_edited_openvino_config_of_an_earlier_layout_is_refused_with_what_to_write(bundle, tmp_path, capsys):
    """An earlier vitc gave OpenVINO models max_batch_size 32: Triton's OpenVINO backend then fixes the batch at 32
    and fails the batch-1 warm-up. Untouched, such a config is regenerated; edited (here its instance count), it
    used to be kept without a word."""
    repo = tmp_path / "repo"
    triton.write_repository(bundle, repo)
    config = repo / "micro-openvino-fp32" / "config.pbtxt"
    config.write_text(kserve.marked(_old_openvino_config("micro-openvino-fp32", bundle, 1), triton_config._MARK))
    assert triton.main([str(bundle), "--out", str(repo)]) == 0  # untouched: regenerated
    assert "max_batch_size: 0\n" in config.read_text() and "kept" not in capsys.readouterr().out
    config.write_text(_old_openvino_config("micro-openvino-fp32", bundle, 2) + "# tuned by hand\n")
    before = _tree(repo)
    err = _refused([str(bundle), "--out", str(repo)], capsys)
    assert f"{config} differs from what this tool writes" in err
    assert "max_batch_size 32: Triton's openvino backend fixes the batch at max_batch_size" in err
    assert ("write max_batch_size: 0 with input dims [ -1, 3, 32, 32 ] and output dims [ -1, 10 ] (warm-up dims "
            "[ 1, 3, 32, 32 ]), without dynamic_batching or FORMAT_NCHW; fix it, or pass --replace-config") in err
    assert _tree(repo) == before
    # With batch padding Triton serves every batch size (each padded to 32): the user's choice, kept.
    padding = 'parameters [{ key: "ENABLE_BATCH_PADDING" value: { string_value: "yes" } }]\n'
    config.write_text(config.read_text() + padding)
    assert triton.main([str(bundle), "--out", str(repo)]) == 0 and f"kept {config}" in capsys.readouterr().out
    config.write_text(config.read_text().replace('"yes"', '"NO"'))
    assert "fixes the batch" in _refused([str(bundle), "--out", str(repo)], capsys)
    assert triton.main([str(bundle), "--out", str(repo), "--replace-config"]) == 0
    assert "max_batch_size: 0\n" in config.read_text()


def test_an_inference_service_of_an_older_export_is_kept_until_replaced(bundle, tmp_path, capsys):
    """What the previous version of this tool wrote (no hash, no runtimeVersion) may have been edited: kept."""
    repo = tmp_path / "repo"
    triton.write_repository(bundle, repo)
    path = repo / triton.ISVC_FILE
    path.write_text("# Generated by `python -m export.triton`: Triton serving this model repository on KServe.\n"
                    "apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\nmetadata:\n  name: legacy\n"
                    "spec:\n  predictor:\n    model:\n      modelFormat:\n        name: triton\n"
                    '      protocolVersion: v2\n      storageUri: "s3://old/repo"\n')
    old = path.read_bytes()
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    # Kept (exit 0: the user's file), but applied it loads nothing: KServe's default Triton is too old.
    out = capsys.readouterr().out
    assert path.read_bytes() == old and f"kept {path}" in out
    assert "it names no runtimeVersion: KServe then runs its default Triton, 23.05, which cannot load" in out
    assert 'set runtimeVersion: "24.05-py3" in it, or pass --replace-isvc' in out
    path.write_text(path.read_text().replace("      storageUri", '      runtimeVersion: "24.02-py3"\n      storageUri'))
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    assert "its runtimeVersion 24.02-py3 is a Triton before 24.05" in capsys.readouterr().out
    assert triton.main([str(bundle), "--out", str(repo), "--replace-isvc"]) == 0
    assert (_isvc(repo)["metadata"]["name"], _model(repo)["storageUri"]) == ("legacy", "s3://old/repo")
    assert _model(repo)["runtimeVersion"] == kserve.DEFAULT_TRITON_VERSION


def test_gpu_instances_only_for_runtimes_triton_runs_on_a_gpu_and_one_gpu_by_default(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), "--kind", "gpu", "--instances", "3"]) == 0
    out = capsys.readouterr().out
    assert "note: micro-openvino-fp32: KIND_CPU, not KIND_GPU" in out
    kinds = {d.name: (d / "config.pbtxt").read_text().split("kind: ")[1].split()[0] for d in repo.iterdir()
             if d.is_dir()}
    assert kinds == {"micro-onnx-fp32": "KIND_GPU", "micro-openvino-fp32": "KIND_CPU",
                     "micro-openvino-fp16": "KIND_CPU"}
    # --instances counts instances per GPU: the pod asks for one GPU, not three.
    assert _model(repo)["resources"]["limits"]["nvidia.com/gpu"] == 1
    ov_only = _renamed(bundle, tmp_path, "ov", keep=lambda a: a.runtime != "onnxruntime")
    err = _refused([str(ov_only), "--out", str(tmp_path / "ov-repo"), "--kind", "gpu"], capsys)
    assert "--kind gpu: no model of bundle 'ov' runs on the GPU in Triton (its openvino artifact does not)" in err
    assert not (tmp_path / "ov-repo").exists()


@pytest.mark.parametrize(("args", "says"), [
    (["--isvc-name", "9-classifier"], "starting with a letter"),  # KServe's [a-z]([-a-z0-9]*[a-z0-9])?
    (["--isvc-name", "a" * 54], "1..53"),  # KServe's Service <name>-predictor is a 63-character label
    (["--triton-version", "23.05"], "Triton before 24.05 cannot load these models"),  # KServe's default
    (["--triton-version", "24.04-py3"], "Triton before 24.05 cannot load these models"),
    (["--triton-version", "latest"], "must be a Triton release tag"),
    (["--triton-version", "24.05\n  evil: 1"], "must be a Triton release tag"),
    (["--gpus", "17"], "--gpus must be in 0..16"),
    (["--kind", "gpu", "--gpus", "0"], "--gpus 0: micro-onnx-fp32 of the repository run on KIND_GPU"),
])
def test_names_releases_and_gpus_kserve_or_triton_would_refuse_are_refused(bundle, tmp_path, capsys, args, says):
    assert says in _refused([str(bundle), "--out", str(tmp_path / "repo"), *args], capsys)
    assert not list(tmp_path.iterdir())


def test_the_longest_name_kserve_accepts_and_a_long_default(bundle, tmp_path):
    triton.write_repository(bundle, tmp_path / "a", isvc_name="a" * 53)
    assert _isvc(tmp_path / "a")["metadata"]["name"] == "a" * 53
    long = _renamed(bundle, tmp_path, "x" * 60)
    triton.write_repository(long, tmp_path / "b")
    name = _isvc(tmp_path / "b")["metadata"]["name"]
    assert len(name) <= 53 and kserve.ISVC_NAME.fullmatch(name)


def test_an_artifact_newer_than_the_default_triton_reads_needs_a_newer_release(bundle, tmp_path, capsys, monkeypatch):
    """The exports (ONNX IR 10, OpenVINO opset13) are what Triton 24.05 reads; were an exporter to write newer ones,
    the default release is refused with the reason and nothing is written, and a named newer release is taken."""
    from runtimes import onnxruntime, openvino

    for module, name, lowered, says in (
            (onnxruntime, "TRITON_MIN_IR", 9, "micro-onnx-fp32: Triton 24.05-py3 cannot load it: its ONNX file is "
                                              "IR version 10"),
            (openvino, "TRITON_MIN_OPSET", 12, "its IR uses OpenVINO opset13")):
        with monkeypatch.context() as patch:  # one runtime's release reads lowered at a time
            patch.setattr(module, name, lowered)
            assert says in _refused([str(bundle), "--out", str(tmp_path / "repo")], capsys)
        assert not list(tmp_path.iterdir())
    assert triton.main([str(bundle), "--out", str(tmp_path / "repo"), "--triton-version", "26.02"]) == 0
    assert _model(tmp_path / "repo")["runtimeVersion"] == "26.02-py3"
