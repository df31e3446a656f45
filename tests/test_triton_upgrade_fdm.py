"""Upgrading a Triton repository an earlier vitc wrote (hDP 1 -> fDM): `python -m export.triton` once on it, as
README's "Upgrading" and the server's warning say. Its first releases (d0d913b to ca5e35d^, e.g. 900a975) left an
empty `.<version>.lock` beside each version they wrote, and every release before the hash mark (f9e9147) wrote
config.pbtxt without one; the fixtures below are what 900a975 wrote for the micro bundle's models (byte for byte:
its `python -m export.triton` run on a bundle named micro, once, with the options each names)."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from test_serve_fixtures import micro_bundle

from export import triton
from models.bundle import read_manifest, write_manifest

# `.<version>.lock`, empty: models.io._writer_lock of those releases made it (O_CREAT) and never removed it.
OLD_LOCK, OLD_LOCK_CONTENT = ".1.lock", b""

_HEAD = ('backend: "{backend}"\nmax_batch_size: 32\n'
         'input [{{ name: "input" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 3, 32, 32 ] }}]\n'
         'output [{{ name: "logits" data_type: TYPE_FP32 dims: [ 10 ] label_filename: "labels.txt" }}]\n')
_WARMUP = ('version_policy: { latest: { num_versions: 1 } }\n'
           'model_warmup [{ name: "zeros" batch_size: 1 inputs { key: "input" value: { data_type: TYPE_FP32 '
           'dims: [ 3, 32, 32 ] zero_data: true } } }]\n')
_HINT = 'parameters { key: "INFERENCE_PRECISION_HINT" value: { string_value: "f32" } }\n'

# 900a975 --instances 3 --kind gpu --max-queue-delay-us 500
OLD_ONNX = ('name: "micro-onnx-fp32"\n' + _HEAD.format(backend="onnxruntime")
            + "dynamic_batching { preferred_batch_size: [ 8, 32 ] max_queue_delay_microseconds: 500 }\n"
            "instance_group [{ count: 3 kind: KIND_GPU }]\n" + _WARMUP)
OLD_OPENVINO_FP16 = ('name: "micro-openvino-fp16"\n' + _HEAD.format(backend="openvino")
                     + "dynamic_batching { preferred_batch_size: [ 8, 32 ] max_queue_delay_microseconds: 500 }\n"
                     "instance_group [{ count: 3 kind: KIND_GPU }]\n" + _WARMUP + _HINT)
# 900a975 with the defaults
OLD_OPENVINO_FP32 = ('name: "micro-openvino-fp32"\n' + _HEAD.format(backend="openvino")
                     + "dynamic_batching { preferred_batch_size: [ 8, 32 ] max_queue_delay_microseconds: 2000 }\n"
                     "instance_group [{ count: 1 kind: KIND_CPU }]\n" + _WARMUP + _HINT)
OLD_CONFIGS = {"micro-onnx-fp32": OLD_ONNX, "micro-openvino-fp16": OLD_OPENVINO_FP16,
               "micro-openvino-fp32": OLD_OPENVINO_FP32}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory)


def _old_repository(bundle: Path, root: Path, *, configs: bool = True, locks: bool = True) -> Path:
    """A repository as 900a975 left it: version 1 of each model, (`locks`) its lock file beside it, and (`configs`)
    the config.pbtxt it wrote."""
    triton.write_repository(bundle, root)
    for name, text in OLD_CONFIGS.items():
        if locks:
            (root / name / OLD_LOCK).write_bytes(OLD_LOCK_CONTENT)
        if configs:
            (root / name / "config.pbtxt").write_text(text)
    return root


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of one export.triton run (a refusal exits through SystemExit)."""
    try:
        code = triton.main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _group(config: Path) -> str:
    """The instance group of a generated config.pbtxt, as written ("count: 1 kind: KIND_CPU")."""
    return config.read_text().split("instance_group [{ ")[1].split(" }]")[0]


def test_the_lock_files_an_earlier_release_left_are_its_own_and_go_when_a_model_is_published(bundle, tmp_path,
                                                                                             capsys):
    """900a975's repository was refused as foreign ('it holds .1.lock'), --replace-config too."""
    for args in ([], ["--replace-config"]):
        repo = _old_repository(bundle, tmp_path / f"repo{len(args)}", configs=False)
        code, out, err = _run([str(bundle), "--out", str(repo), *args], capsys)
        assert (code, err) == (0, ""), err
        for name in OLD_CONFIGS:
            assert (repo / name / "2" / "manifest.json").is_file()
            assert sorted(p.name for p in (repo / name).iterdir()) == ["1", "2", "config.pbtxt", "labels.txt"]
    # A model this run does not write keeps its lock file, and is still the tool's.
    repo = _old_repository(bundle, tmp_path / "skip", configs=False)
    code, _, err = _run([str(bundle), "--out", str(repo), "--skip", "openvino-fp16"], capsys)
    assert (code, err) == (0, ""), err
    assert (repo / "micro-openvino-fp16" / OLD_LOCK).is_file() and not (repo / "micro-onnx-fp32" / OLD_LOCK).exists()
    assert not (repo / "micro-openvino-fp16" / "2").exists()


@pytest.mark.parametrize("entry", [
    ".1.lock holding bytes", ".01.lock", ".0.lock", ".1.lock as a directory", ".1.lock as a link", ".x.lock",
    "..1.lock", ".1.lock.bak",
])
def test_only_the_lock_files_an_earlier_release_wrote_are_taken_for_its_own(bundle, tmp_path, capsys, entry):
    """Nothing broader: a lock file with content, another name, a directory or a link is someone else's."""
    repo = _old_repository(bundle, tmp_path / "repo", configs=False)
    model = repo / "micro-onnx-fp32"
    name = entry.split(" ")[0]
    (model / OLD_LOCK).unlink()
    if entry.endswith("holding bytes"):
        (model / name).write_bytes(b"1234\n")
    elif entry.endswith("directory"):
        (model / name).mkdir()
    elif entry.endswith("link"):
        os.symlink("labels.txt", model / name)
    else:
        (model / name).write_bytes(b"")
    code, _, err = _run([str(bundle), "--out", str(repo)], capsys)
    assert code == 2 and f"micro-onnx-fp32/ is not a model directory of this tool (it holds {name!r})" in err
    assert not (model / "2").exists() and os.path.lexists(model / name)


def test_an_unedited_config_an_earlier_release_wrote_is_regenerated_keeping_its_options(bundle, tmp_path, capsys):
    """It carries no hash mark: it was taken for an edited one (OpenVINO's refused, ONNX's kept in the old layout).
    Byte for byte what that release wrote, it is regenerated in the new layout with its instances, kind and delay."""
    repo = _old_repository(bundle, tmp_path / "repo", locks=False)  # the lock files: the test above
    code, out, err = _run([str(bundle), "--out", str(repo)], capsys)
    assert (code, err) == (0, ""), err
    assert "kept" not in out
    onnx, fp16, fp32 = (repo / n / "config.pbtxt" for n in OLD_CONFIGS)
    for config in (onnx, fp16, fp32):
        assert config.read_text().startswith("# written by python -m export.triton")
    assert _group(onnx) == "count: 3 kind: KIND_GPU" and "max_queue_delay_microseconds: 500 }" in onnx.read_text()
    assert "max_batch_size: 32\n" in onnx.read_text()
    for config in (fp16, fp32):
        assert "max_batch_size: 0\n" in config.read_text() and "dims: [ -1, 3, 32, 32 ]" in config.read_text()
    assert _group(fp16) == "count: 3 kind: KIND_CPU" and _group(fp32) == "count: 1 kind: KIND_CPU"
    assert ("note: micro-openvino-fp16: KIND_CPU, not KIND_GPU as its previous config.pbtxt had: Triton's openvino "
            "backend runs it on the CPU only") in out


def test_the_config_is_recognised_by_the_version_it_was_written_for(bundle, tmp_path, capsys):
    """What that release wrote matches the version beside it, not the bundle exported now (here for max batch 4)."""
    small = shutil.copytree(bundle, tmp_path / "small")
    manifest = read_manifest(small)
    write_manifest(small, replace(manifest, input=replace(manifest.input, max_batch=4)))
    repo = _old_repository(bundle, tmp_path / "repo", locks=False)
    code, out, err = _run([str(small), "--out", str(repo)], capsys)
    assert (code, err) == (0, ""), err
    onnx = (repo / "micro-onnx-fp32" / "config.pbtxt").read_text()
    assert "max_batch_size: 4\n" in onnx and "count: 3 kind: KIND_GPU" in onnx and "kept" not in out


@pytest.mark.parametrize("edit", [
    lambda t: t + "# mine\n",
    lambda t: t.replace("preferred_batch_size: [ 8, 32 ]", "preferred_batch_size: [ 16, 32 ]"),
    lambda t: t.replace('"f32"', '"f16"'),
    lambda t: t.replace('name: "zeros"', 'name: "ones"'),
    lambda t: t.replace("\n", "\r\n"),
    lambda t: t.replace("count: 1 kind", "count: 01 kind"),
], ids=["comment", "preferred", "hint", "warm-up", "crlf", "leading-zero"])
def test_an_edited_config_of_an_earlier_release_is_still_refused_or_kept(bundle, tmp_path, capsys, edit):
    """One byte from what that release wrote is the user's: OpenVINO's old layout refused with what to write,
    ONNX's kept (as before this fix: the lock files are left out here)."""
    repo = _old_repository(bundle, tmp_path / "repo", locks=False)
    ov = repo / "micro-openvino-fp32" / "config.pbtxt"
    ov.write_text(edit(OLD_OPENVINO_FP32), newline="")
    code, _, err = _run([str(bundle), "--out", str(repo)], capsys)
    assert code == 2 and f"{ov} differs from what this tool writes" in err
    assert "max_batch_size 32: Triton's openvino backend fixes the batch" in err
    assert not (repo / "micro-onnx-fp32" / "2").exists()
    if edit(OLD_ONNX) == OLD_ONNX:  # an OpenVINO parameter
        return
    onnx = repo / "micro-onnx-fp32" / "config.pbtxt"
    onnx.write_text(edit(OLD_ONNX), newline="")
    edited = onnx.read_bytes()
    code, out, err = _run([str(bundle), "--out", str(repo), "--skip", "openvino-fp32,openvino-fp16"], capsys)
    assert (code, err) == (0, ""), err
    assert onnx.read_bytes() == edited and f"kept {onnx}" in out


def test_the_upgraded_repository_serves_without_the_earlier_layout_warning(bundle, tmp_path, capsys, caplog):
    """The server's warning names export.triton as the fix: after one run, nothing is left to warn about."""
    from serve.registry import close_models, load_models
    from serve.settings import Settings

    repo = _old_repository(bundle, tmp_path / "repo")
    code, _, err = _run([str(bundle), "--out", str(repo)], capsys)
    assert (code, err) == (0, ""), err
    with caplog.at_level(logging.WARNING, logger="vitc.serve"):
        models = load_models(Settings(model_repository=repo))
    try:
        assert set(models) == set(OLD_CONFIGS)
    finally:
        close_models(models)
    assert not [r for r in caplog.records if r.msg == "config.pbtxt Triton cannot load"]
