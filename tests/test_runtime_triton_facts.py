"""What Triton does with each runtime's artifacts is declared on its `Runtime` entry (fixed batch, CPU-only backend,
the model file a backend is picked by, the config.pbtxt note, what the oldest supported release reads, TensorRT's
release pinning), and the Triton modules read it from there: a runtime plugged in through the registry gets its
Triton repository with no other change, and no Triton module spells out runtime names."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import fake_runtime
import pytest

import runtimes
from export import triton
from models import tritonconfig
from models.bundle import read_manifest, write_manifest
from models.tritonconfig import BackendRules, ConfigError, Tensor
from runtimes.base import TritonRelease

REPO = Path(__file__).resolve().parents[1]
TRITON_MODULES = ("export/triton.py", "export/kserve.py", "export/triton_compat.py", "models/tritonconfig.py",
                  "models/tritonschema.py", "serve/registry.py")


def test_the_builtin_runtimes_declare_what_tritons_backends_do():
    by_name = {rt.name: rt for rt in runtimes.runtimes() if rt.name in ("onnxruntime", "openvino", "tensorrt",
                                                                         "torch")}
    every = runtimes.runtimes()
    # Triton fills an absent backend from the platforms onnxruntime_onnx and tensorrt_plan, never from "openvino",
    # and from default_model_filename for each runtime's model file.
    files = {"model.onnx": "onnxruntime", "model.xml": "openvino", "model.plan": "tensorrt"}
    assert by_name["onnxruntime"].triton_rules(every) == BackendRules(fills_from_platform=True, file_backends=files)
    assert by_name["tensorrt"].triton_rules(every) == BackendRules(fills_from_platform=True, file_backends=files)
    assert by_name["openvino"].triton_rules(every) == BackendRules(file_backends=files, cpu_only=True)
    assert [n for n, rt in by_name.items() if rt.triton_fixed_batch] == ["openvino"]
    assert [n for n, rt in by_name.items() if rt.triton_note] == ["openvino"]
    assert "HINT_BF16" in by_name["openvino"].triton_note
    assert [n for n, rt in by_name.items() if rt.triton_release is not None] == ["tensorrt"]
    assert [rt.triton_file for rt in by_name.values()] == ["model.onnx", "model.xml", "model.plan", None]


@pytest.fixture
def plugin(tmp_path) -> Iterator[Path]:
    """The fake runtime, made Triton-servable with facts of its own, and a bundle holding its artifact only."""
    refused_release = TritonRelease(
        cannot_load=lambda _a, tag: "it needs Triton 99.01" if tag != "99.01-py3" else None,
        cannot_tell=lambda _a, _tag: None, advice=lambda _a: "--triton-version 99.01", same=lambda a, b: a == b,
        loaded_by=lambda tag: f"built for {tag}")
    rt = dataclasses.replace(
        fake_runtime.RUNTIME, triton_backend="fake_backend", triton_files=((".npy", "model.npy"),),
        triton_fixed_batch=True, triton_cpu_only=True, triton_note="# Fake: a note of its own.\n",
        triton_min_check=lambda d, _a: "its file is too new" if (d / "TOO_NEW").exists() else None,
        triton_release=refused_release)
    runtimes.register(rt)
    try:
        bundle = fake_runtime.write_bundle(tmp_path / "bundle")
        (bundle / "model.onnx").unlink()
        m = read_manifest(bundle)
        write_manifest(bundle, dataclasses.replace(m, artifacts=tuple(a for a in m.artifacts if a.runtime == "fake")))
        yield bundle
    finally:
        runtimes.unregister("fake")


def test_a_runtime_plugged_in_gets_its_triton_layout_from_its_entry(plugin, tmp_path, capsys):
    repo = tmp_path / "repo"
    with pytest.raises(SystemExit):  # its release rule: the default Triton cannot load it
        triton.main([str(plugin), "--out", str(repo)])
    err = capsys.readouterr().err
    assert ("legacy-fake-fp32: Triton 24.05-py3 cannot load it: it needs Triton 99.01; pass --triton-version "
            "99.01") in err
    assert not repo.exists()
    assert triton.main([str(plugin), "--out", str(repo), "--triton-version", "99.01"]) == 0
    model_dir = repo / "legacy-fake-fp32"
    text = (model_dir / "config.pbtxt").read_text()
    assert 'backend: "fake_backend"' in text and "max_batch_size: 0\n" in text and "dynamic_batching" not in text
    assert text.endswith("# Fake: a note of its own.\n") and (model_dir / "1" / "model.npy").is_file()
    config = tritonconfig.read(model_dir)
    rt = runtimes.get("fake")
    m = read_manifest(model_dir / "1")
    artifact = {"name": model_dir.name, "platform": rt.triton_platform, "backend": rt.triton_backend,
                "input": Tensor("input", "TYPE_FP32", m.input.sample_shape),
                "output": Tensor("logits", "TYPE_FP32", (m.output.classes,)),
                "rules": rt.triton_rules(runtimes.runtimes())}
    config.check(**artifact)
    gpu = dataclasses.replace(config, instance_kinds=("KIND_GPU",))
    with pytest.raises(ConfigError, match="Triton's fake_backend backend supports only KIND_CPU and KIND_AUTO"):
        gpu.check(**artifact)
    # Its platform fills in no backend (triton_platform_fills False), its model file name does.
    fill = dataclasses.replace(config, backend=None, platform=rt.triton_platform, default_model_filename="model.npy")
    fill.check(**artifact)
    with pytest.raises(ConfigError, match="Triton picks backend 'onnxruntime'"):
        dataclasses.replace(fill, default_model_filename="model.onnx").check(**artifact)
    with pytest.raises(ConfigError, match="without backend: Triton refuses it"):
        dataclasses.replace(fill, default_model_filename=None).check(**artifact)


def test_what_the_oldest_release_reads_is_the_runtimes_own_check(plugin, tmp_path, capsys, monkeypatch):
    real = triton.stage_model

    def staged_too_new(bundle, manifest, artifact, model_dir, version, **kw):  # noqa: ANN001, ANN202 - a spy
        real(bundle, manifest, artifact, model_dir, version, **kw)
        (model_dir / str(version) / "TOO_NEW").touch()

    monkeypatch.setattr(triton, "stage_model", staged_too_new)
    rt = runtimes.get("fake")  # without its release rule: the check of the oldest release alone
    runtimes.unregister("fake")
    runtimes.register(dataclasses.replace(rt, triton_release=None))
    with pytest.raises(SystemExit):
        triton.main([str(plugin), "--out", str(tmp_path / "repo")])
    assert ("legacy-fake-fp32: Triton 24.05-py3 cannot load it: its file is too new; pass --triton-version with a "
            "newer release that does") in capsys.readouterr().err
    assert triton.main([str(plugin), "--out", str(tmp_path / "repo"), "--triton-version", "25.01"]) == 0


def test_no_triton_module_spells_out_runtime_names():
    """The facts above live on the runtimes' entries: a name compared or listed here would be a second table."""
    spelled = set(runtimes.names())
    for rt in runtimes.runtimes():
        spelled |= {rt.target, rt.triton_platform, *([rt.triton_backend] if rt.triton_backend else [])}
    offenders = []
    for module in TRITON_MODULES:
        for node in ast.walk(ast.parse((REPO / module).read_text())):
            if isinstance(node, ast.Compare):
                values = [node.left, *node.comparators]
            elif isinstance(node, ast.Dict):
                values = [*node.keys, *node.values]
            elif isinstance(node, ast.Tuple | ast.List | ast.Set):
                values = node.elts
            else:
                continue
            found = {v.value for v in values if isinstance(v, ast.Constant) and v.value in spelled}
            if found:
                offenders.append(f"{module}:{node.lineno} {sorted(found)}")
    assert not offenders, "runtime names outside runtimes/: " + "; ".join(offenders)
