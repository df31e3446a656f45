"""The pod's CPU limit reaches Triton's runtimes: onnxruntime and OpenVINO size their thread pools from the node's
cores, not from the container's CPU quota, so each CPU model's config.pbtxt caps one instance's threads at the
InferenceService's limit (--cpus) shared by its instances, and vitc serving the repository honours the cap."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_serve_fixtures import micro_bundle
from test_triton_handover import _refused

from export import kserve, triton
from models import tritonconfig


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory)


def _threads(repo: Path) -> dict[str, dict[str, str]]:
    return {d.name: tritonconfig.read(d).parameters for d in sorted(repo.iterdir()) if d.is_dir()}


def _limits(repo: Path) -> dict:
    return yaml.safe_load((repo / triton.ISVC_FILE).read_text())["spec"]["predictor"]["model"]["resources"]


def test_cpu_models_share_the_pods_cpu_limit_as_threads(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    assert _threads(repo) == {"micro-onnx-fp32": {"intra_op_thread_count": "4"},
                              "micro-openvino-fp16": {"INFERENCE_NUM_THREADS": "4"},
                              "micro-openvino-fp32": {"INFERENCE_NUM_THREADS": "4"}}
    assert _limits(repo) == {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}}

    # --cpus sets the limit and the threads, split between the instances; a next version keeps both.
    repo2 = tmp_path / "repo2"
    assert triton.main([str(bundle), "--out", str(repo2), "--cpus", "7", "--instances", "2"]) == 0
    assert _threads(repo2)["micro-onnx-fp32"] == {"intra_op_thread_count": "3"}
    assert _limits(repo2)["limits"]["cpu"] == "7" and _limits(repo2)["requests"]["cpu"] == "4"
    assert triton.main([str(bundle), "--out", str(repo2)]) == 0
    assert _threads(repo2)["micro-openvino-fp32"] == {"INFERENCE_NUM_THREADS": "3"}
    assert _limits(repo2)["limits"]["cpu"] == "7"

    # More instances than CPUs: one thread each, never 0 (0 is the runtime's own choice: every core).
    repo3 = tmp_path / "repo3"
    assert triton.main([str(bundle), "--out", str(repo3), "--cpus", "2", "--instances", "3"]) == 0
    assert set(_threads(repo3)["micro-onnx-fp32"].values()) == {"1"}


def test_gpu_instances_get_no_cpu_thread_cap(bundle, tmp_path):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), "--kind", "gpu"]) == 0
    assert _threads(repo)["micro-onnx-fp32"] == {}  # KIND_GPU
    assert _threads(repo)["micro-openvino-fp32"] == {"INFERENCE_NUM_THREADS": "4"}  # OpenVINO stays on the CPU


@pytest.mark.parametrize("cpus", ["0", "257", "-1"])
def test_a_cpu_limit_out_of_range_is_refused(bundle, tmp_path, capsys, cpus):
    assert "--cpus must be in 1..256" in _refused([str(bundle), "--out", str(tmp_path / "r"), "--cpus", cpus], capsys)
    assert not (tmp_path / "r").exists()


def test_an_edited_inference_service_lends_its_cpu_limit_or_none(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    isvc = repo / triton.ISVC_FILE
    text = isvc.read_text()
    # Edited to block style with millicores: kept, and its limit (rounded down) caps the new version's threads.
    isvc.write_text(text.replace('        limits: {cpu: "4", memory: 8Gi}\n',
                                 "        limits:\n          memory: 8Gi\n          cpu: 2500m\n"))
    assert triton.main([str(bundle), "--out", str(repo), "--replace-config"]) == 0
    assert _threads(repo)["micro-onnx-fp32"] == {"intra_op_thread_count": "2"}
    assert "--cpus would not take effect" in _refused([str(bundle), "--out", str(repo), "--cpus", "8"], capsys)
    # No CPU limit at all: the runtimes keep their own choice.
    isvc.write_text(text.replace('        limits: {cpu: "4", memory: 8Gi}\n', "        limits: {memory: 8Gi}\n"))
    assert triton.main([str(bundle), "--out", str(repo), "--replace-config"]) == 0
    assert _threads(repo)["micro-onnx-fp32"] == {}


@pytest.mark.parametrize(("yaml_text", "cpus"), [
    ('        limits: {cpu: "4", memory: 8Gi}\n', 4),
    ("  limits: {memory: 8Gi, cpu: 12}\n", 12),
    ("  limits:\n    memory: 1Gi\n    cpu: '3'\n", 3),
    ("  limits:\n    cpu: 3500m\n", 3),
    ("  limits: {cpu: 500m}\n", 1),
    ("  limits: {cpu: 1.5}\n", 1),
    ("  limits: {memory: 8Gi}\n  other:\n    cpu: 12\n", None),  # another mapping's cpu
    ("  requests: {cpu: 2}\n", None),
    ('  limits: {cpu: "0"}\n', None),
    ("  limits: {cpu: 100000}\n", None),
])
def test_the_cpu_limit_is_read_from_flow_or_block_yaml(yaml_text, cpus):
    assert kserve.cpu_limit(yaml_text) == cpus


def test_vitc_serving_the_repository_honours_the_thread_cap(bundle, tmp_path):
    from serve.registry import close_models, load_models
    from serve.settings import Settings

    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), "--cpus", "1"]) == 0
    models = load_models(Settings(model_repository=repo))
    try:
        assert {n: m.backend.describe()["threads_effective"] for n, m in models.items()} == {
            "micro-onnx-fp32": 1, "micro-openvino-fp32": 1, "micro-openvino-fp16": 1}
    finally:
        close_models(models)
    # A value the backend cannot read fails that model's load, as in Triton.
    config = repo / "micro-onnx-fp32" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "1"', 'string_value: "two"'))
    with pytest.raises(Exception, match="intra_op_thread_count: 'two' is not a thread count"):
        close_models(load_models(Settings(model_repository=repo)))
