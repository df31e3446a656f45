"""The pod's CPU limit reaches Triton's runtimes: onnxruntime and OpenVINO size their thread pools from the node's
cores, not from the container's CPU quota, so each CPU model's config.pbtxt caps its threads at the InferenceService's
limit (--cpus): onnxruntime's per instance (each has its own session), OpenVINO's for the model (Triton's backend
compiles one model the instances share, in as many streams as instances). vitc serving the repository honours it."""

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

    # --cpus sets the limit and the threads, split between onnxruntime's instances; a next version keeps both.
    repo2 = tmp_path / "repo2"
    assert triton.main([str(bundle), "--out", str(repo2), "--cpus", "7", "--instances", "2"]) == 0
    assert _threads(repo2)["micro-onnx-fp32"] == {"intra_op_thread_count": "3"}
    assert _threads(repo2)["micro-openvino-fp32"] == {"INFERENCE_NUM_THREADS": "7", "NUM_STREAMS": "2"}
    assert _limits(repo2)["limits"]["cpu"] == "7" and _limits(repo2)["requests"]["cpu"] == "4"
    assert triton.main([str(bundle), "--out", str(repo2)]) == 0
    assert _threads(repo2)["micro-openvino-fp16"] == {"INFERENCE_NUM_THREADS": "7", "NUM_STREAMS": "2"}
    assert _limits(repo2)["limits"]["cpu"] == "7"

    # More instances than CPUs: one thread each, never 0 (0 is the runtime's own choice: every core).
    repo3 = tmp_path / "repo3"
    assert triton.main([str(bundle), "--out", str(repo3), "--cpus", "2", "--instances", "3"]) == 0
    assert _threads(repo3)["micro-onnx-fp32"] == {"intra_op_thread_count": "1"}
    assert _threads(repo3)["micro-openvino-fp32"] == {"INFERENCE_NUM_THREADS": "2", "NUM_STREAMS": "2"}


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


def _isvc(resources: str, where: str = "model") -> str:
    return ("apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\nspec:\n  predictor:\n"
            f"    {where}:\n      modelFormat: {{name: triton}}\n      resources:\n{resources}")


@pytest.mark.parametrize(("yaml_text", "cpus"), [
    (_isvc('        requests: {cpu: "2", memory: 2Gi}\n        limits: {cpu: "4", memory: 8Gi}\n'), 4),
    (_isvc("        limits: {memory: 8Gi, cpu: 12}\n"), 12),
    (_isvc("        limits:\n          memory: 1Gi\n\n          'cpu': '3'\n"), 3),  # blank line, quoted key
    (_isvc("        limits:\r\n          cpu: 3500m\r\n").replace("\n", "\r\n"), 3),  # CRLF
    (_isvc("        limits: {cpu: 500m}\n"), 1),
    (_isvc("        limits: {cpu: 1.5}\n"), 1),
    (_isvc("        limits: {cpu: 2}\n", where="triton"), 2),  # the older predictor layout
    (_isvc("        limits: {memory: 8Gi}\n"), None),
    (_isvc("        requests: {cpu: 2}\n"), None),
    (_isvc('        limits: {cpu: "0"}\n'), None),
    (_isvc("        limits: {cpu: 100000}\n"), None),
    (_isvc("        limits: {cpu: lots}\n"), None),
    ("spec: {predictor: {transformer: {resources: {limits: {cpu: 9}}}, model: {resources: {limits: {cpu: 3}}}}}", 3),
    ("spec: [unclosed", None),
])
def test_the_cpu_limit_is_the_predictors_in_any_yaml_style(yaml_text, cpus):
    assert kserve.cpu_limit(yaml_text) == cpus


def test_changing_the_cpu_limit_names_the_models_whose_threads_it_leaves(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), "--skip", "openvino-fp16"]) == 0
    capsys.readouterr()
    assert triton.main([str(bundle), "--out", str(repo), "--cpus", "2", "--skip", "onnx-fp32",
                        "--skip", "openvino-fp32"]) == 0
    out = capsys.readouterr().out
    assert ("note: micro-onnx-fp32, micro-openvino-fp32: config.pbtxt still caps threads for 4 CPUs, not the pod's 2 "
            "now; export a new version of each (or edit the thread parameters)") in out
    assert _threads(repo)["micro-openvino-fp16"] == {"INFERENCE_NUM_THREADS": "2"}


def test_vitc_serving_the_repository_honours_the_thread_cap(bundle, tmp_path):
    from serve.registry import close_models, load_models
    from serve.settings import Settings

    def served_threads() -> dict[str, int]:
        models = load_models(Settings(model_repository=repo))
        try:
            # OpenVINO's threads_effective is one stream's: the cap is on its compiled model's threads.
            return {n: (d := m.backend.describe()).get("inference_num_threads", d["threads_effective"])
                    for n, m in models.items()}
        finally:
            close_models(models)

    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), "--cpus", "1"]) == 0
    assert served_threads() == {"micro-onnx-fp32": 1, "micro-openvino-fp32": 1, "micro-openvino-fp16": 1}
    # vitc runs one instance: it takes all the instances' onnxruntime threads (2 x 1), OpenVINO's model threads (2).
    assert triton.main([str(bundle), "--out", str(repo), "--cpus", "2", "--instances", "2", "--replace-config"]) == 0
    assert served_threads() == {"micro-onnx-fp32": 2, "micro-openvino-fp32": 2, "micro-openvino-fp16": 2}
    # A value the backend cannot read fails that model's load, as in Triton.
    config = repo / "micro-onnx-fp32" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "1"', 'string_value: "two"'))
    with pytest.raises(Exception, match="intra_op_thread_count: 'two' is not a thread count"):
        close_models(load_models(Settings(model_repository=repo)))
