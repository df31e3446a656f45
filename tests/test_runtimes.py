"""runtimes/ on a real exported bundle: same logits as the runtime libraries used directly, verified loading."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_gpu_paths_static import onnxruntime_cuda_skip_reason, skip_for, tensorrt_skip_reason
from test_serve_fixtures import micro_bundle, val_batch

import runtimes
from models.bundle import BundleError, read_manifest
from runtimes import BackendError, BackendOptions
from serve.launch import REPO


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return micro_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def manifest(bundle):
    return read_manifest(bundle)


@pytest.fixture(scope="module")
def batch(manifest):
    """Real validation images, preprocessed as the bundle says."""
    return val_batch(manifest, 12)


def _file(bundle, manifest, runtime, precision="fp32", suffix=""):
    art = manifest.select(runtime, precision)
    return next(bundle / f.path for f in art.files if f.path.endswith(suffix))


def load_backend(bundle, manifest, runtime, device="cpu", precision=None, options=None):
    options = options or BackendOptions()
    return runtimes.open_backend(bundle, manifest, runtime, precision,
                                 BackendOptions(device, options.threads, options.parallel, options.hint))


def test_onnxruntime_matches_direct_session(bundle, manifest, batch):
    import onnxruntime as ort

    backend = load_backend(bundle, manifest, "onnxruntime")
    assert (backend.runtime, backend.precision, backend.max_batch) == ("onnxruntime", "fp32", 32)
    session = ort.InferenceSession(str(_file(bundle, manifest, "onnxruntime")), providers=["CPUExecutionProvider"])
    direct = session.run(None, {"input": batch})[0]
    got = backend.infer(batch)
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-5)
    assert got.std(axis=0).max() > 1e-3, "logits do not depend on the image: the test would prove nothing"


def test_onnxruntime_lone_images_run_in_the_spinning_session_with_identical_answers(bundle, manifest, batch):
    backend = load_backend(bundle, manifest, "onnxruntime", options=BackendOptions(threads=2))
    assert backend.describe()["latency_session"] is True
    assert backend.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert backend._latency.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"
    batched = backend.infer(batch)
    for i in range(len(batch)):  # batch 1 (latency session) answers what the batch session answers for that row
        alone = backend.infer(batch[i:i + 1])
        np.testing.assert_array_equal(alone, backend.session.run(None, {"input": batch[i:i + 1]})[0])
        np.testing.assert_allclose(alone[0], batched[i], rtol=1e-5, atol=1e-5)
    # One thread has nothing to spin for: no second session.
    single = load_backend(bundle, manifest, "onnxruntime", options=BackendOptions(threads=1))
    assert single.describe()["latency_session"] is False


def _count_runs(backend, attr):
    """Record the batch sizes `backend.<attr>` (a real session) runs, passing every call through."""
    session, sizes = getattr(backend, attr), []

    class Counting:
        def run(self, outputs, feeds):
            sizes.append(len(next(iter(feeds.values()))))
            return session.run(outputs, feeds)

    setattr(backend, attr, Counting())
    return sizes


def test_default_streams_split_the_cores():
    from runtimes.onnxruntime import default_streams

    assert [default_streams(c) for c in (1, 2, 3, 4, 8, 16, 64)] == [1, 2, 3, 4, 2, 4, 16]
    assert default_streams(8, threads=2) == 4 and default_streams(2, threads=2) == 1 and default_streams(1, 4) == 1


def test_onnxruntime_streams_run_batches_concurrently_with_identical_answers(bundle, manifest, batch):
    from models.host import usable_cpus
    from runtimes.onnxruntime import default_streams

    streams = load_backend(bundle, manifest, "onnxruntime", options=BackendOptions(threads=1, parallel=2))
    assert streams.parallelism == min(2, usable_cpus()) and streams.describe()["threads_effective"] == 1
    if streams.parallelism == 2:  # one-thread streams share one session (one copy of the weights)
        sessions = [streams._pool.acquire() for _ in range(2)]
        assert sessions[0] is sessions[1]
        for s in sessions:
            streams._pool.give_back(s)
    sequential = streams.infer(batch)
    assert streams.describe()["latency_session"] is False  # one thread per call: nothing to spin for
    bounds = [(0, 1), (1, 3), (3, 7), (7, 12)]  # batch 1 too, while others run
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(streams.infer, [batch[a:b] for a, b in bounds] * 6))
    for k, out in enumerate(outs):  # every answer is its rows' own, bit for bit, whichever stream ran it
        a, b = bounds[k % len(bounds)]
        np.testing.assert_array_equal(out, sequential[a:b])
    if usable_cpus() >= 2:  # wider streams each have their own session (thread pool), the same answers
        wide = load_backend(bundle, manifest, "onnxruntime", options=BackendOptions(threads=2, parallel=2))
        sessions = [wide._pool.acquire() for _ in range(2)]
        assert sessions[0] is not sessions[1]
        for s in sessions:
            wide._pool.give_back(s)
        with ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(wide.infer, [batch[:6], batch[6:]] * 3))
        np.testing.assert_array_equal(np.concatenate(outs[:2]), sequential)
    # The defaults follow the hint: streams for throughput, one batch at a time on every core for latency.
    default = load_backend(bundle, manifest, "onnxruntime")
    assert default.parallelism == default_streams(usable_cpus())
    if default.parallelism > 1 and default.describe()["latency_session"]:
        # A lone batch (nothing else running) gets every core: the latency session, with the same answers.
        calls = _count_runs(default, "_latency")
        np.testing.assert_array_equal(default.infer(batch), sequential)
        assert calls == [len(batch)]
    latency = load_backend(bundle, manifest, "onnxruntime", options=BackendOptions(hint="latency"))
    assert latency.parallelism == 1 and latency.describe()["threads_effective"] == usable_cpus()
    streams.close()  # a late call on a closed backend fails at once instead of waiting for a stream forever
    with pytest.raises(BackendError, match="closed"):
        streams.infer(batch[:1])


def test_openvino_matches_direct_compile_and_is_thread_safe(bundle, manifest, batch):
    import openvino as ov

    backend = load_backend(bundle, manifest, "openvino", options=BackendOptions(hint="throughput"))
    compiled = ov.Core().compile_model(str(_file(bundle, manifest, "openvino", suffix=".xml")), "CPU",
                                       {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"})
    direct = compiled.create_infer_request().infer({0: batch})[0]
    np.testing.assert_allclose(backend.infer(batch), direct, rtol=1e-5, atol=1e-5)
    assert backend.parallelism == compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS") >= 1
    assert backend.describe()["inference_precision"] == "f32"
    # Concurrent calls (the batcher's workers) each get their own infer request and the right rows back.
    chunks = [batch[i:i + 3] for i in range(0, len(batch), 3)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(backend.infer, chunks * 4))
    np.testing.assert_allclose(np.concatenate(outs[: len(chunks)]), direct, rtol=1e-5, atol=1e-5)
    latency = load_backend(bundle, manifest, "openvino", options=BackendOptions(hint="latency"))
    assert latency.parallelism == 1


def test_openvino_renews_an_infer_request_whose_call_failed(bundle, manifest, batch, monkeypatch):
    """After a bad_alloc an OpenVINO infer request failed every later call ('Broken promise') while the model
    reported ready: the failed call's request is replaced by a fresh one."""
    from runtimes.openvino import OpenVINOBackend

    backend = load_backend(bundle, manifest, "openvino", options=BackendOptions(hint="latency"))
    assert backend.parallelism == 1
    want = backend.infer(batch)
    used, real = [], OpenVINOBackend._compute

    def compute(self, request, data):  # noqa: ANN001, ANN202
        used.append(request)
        if len(used) == 1:
            raise RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp:223:\nBroken promise")
        return real(self, request, data)

    monkeypatch.setattr(OpenVINOBackend, "_compute", compute)
    with pytest.raises(BackendError, match="Broken promise"):
        backend.infer(batch)
    np.testing.assert_array_equal(backend.infer(batch), want)
    assert used[1] is not used[0]


def test_openvino_precision_choice(bundle, manifest, batch):
    fp16 = load_backend(bundle, manifest, "openvino", precision="fp16")
    fp32 = load_backend(bundle, manifest, "openvino")
    assert (fp16.precision, fp32.precision) == ("fp16", "fp32")
    np.testing.assert_allclose(fp16.infer(batch), fp32.infer(batch), atol=5e-2)
    with pytest.raises(BundleError, match="no servable openvino/int8"):
        load_backend(bundle, manifest, "openvino", precision="int8")


def test_torch_backend_matches_checkpoint_model(bundle, manifest, batch):
    import torch

    from models.checkpoint import load_checkpoint

    backend = load_backend(bundle, manifest, "torch")
    model, _ = load_checkpoint(manifest.source.checkpoint)
    with torch.inference_mode():
        ref = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(backend.infer(batch), ref, rtol=1e-5, atol=1e-5)


def test_onnxruntime_opens_a_bundle_under_a_path_that_is_not_utf8(bundle, manifest, batch, tmp_path):
    """onnxruntime's binding refused the path ('__init__(): incompatible constructor arguments'); OpenVINO opens it."""
    copy = Path(os.fsdecode(os.fsencode(tmp_path) + b"/b\xff"))
    shutil.copytree(bundle, copy)
    got = load_backend(copy, manifest, "onnxruntime").infer(batch)
    np.testing.assert_array_equal(got, load_backend(bundle, manifest, "onnxruntime").infer(batch))
    onnx = _file(copy, manifest, "onnxruntime")
    onnx.with_name(onnx.name + ".data").write_bytes(b"")  # weights outside the file: no bytes to hand over
    with pytest.raises(BackendError, match=r"b\\xff/.*not valid UTF-8, which onnxruntime cannot open"):
        load_backend(copy, manifest, "onnxruntime")


def test_tampered_artifact_is_refused(bundle, manifest, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    onnx = _file(copy, manifest, "onnxruntime")
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_backend(copy, manifest, "onnxruntime")
    onnx.unlink()
    with pytest.raises(BundleError, match="missing"):
        load_backend(copy, manifest, "onnxruntime")


def test_unknown_missing_and_wrong_device_backends(bundle, manifest):
    with pytest.raises(BackendError, match="unknown backend"):
        load_backend(bundle, manifest, "tflite")
    with pytest.raises(BackendError, match="runs on cpu"):
        load_backend(bundle, manifest, "openvino", device="cuda")
    if not runtimes.get("tensorrt").installed():
        with pytest.raises(BackendError, match="not installed"):
            load_backend(bundle, manifest, "tensorrt", device="cuda")


def test_onnxruntime_cuda_must_really_be_active(bundle, manifest):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA-capable onnxruntime is installed; see test_onnxruntime_cuda")
    # The CPU build (or onnxruntime-gpu without a GPU) would silently run on the CPU: refuse instead.
    with pytest.raises(BackendError, match="CUDA provider"):
        load_backend(bundle, manifest, "onnxruntime", device="cuda")


@pytest.mark.gpu
@skip_for(onnxruntime_cuda_skip_reason())
def test_onnxruntime_cuda(bundle, manifest, batch):
    gpu = load_backend(bundle, manifest, "onnxruntime", device="cuda")
    # fp32 in true fp32: the CUDA provider's TF32 default would have failed the golden check at load.
    assert gpu.session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"
    cpu = load_backend(bundle, manifest, "onnxruntime")
    np.testing.assert_allclose(gpu.infer(batch), cpu.infer(batch), atol=1e-3)


@pytest.mark.gpu
@pytest.mark.tensorrt
@skip_for(tensorrt_skip_reason())
def test_tensorrt_builds_from_onnx_and_matches(bundle, manifest, batch):
    trt = load_backend(bundle, manifest, "tensorrt", device="cuda")
    cpu = load_backend(bundle, manifest, "onnxruntime")
    np.testing.assert_allclose(trt.infer(batch), cpu.infer(batch), atol=1e-3)


def test_serving_path_never_imports_torch(bundle):
    """The serving install has no torch: loading both CPU runtimes and building the app must not import it."""
    code = (
        "import sys\n"
        "from models.bundle import read_manifest\n"
        "from serve.app import create_app\n"
        "from serve.settings import Settings\n"
        "from serve.registry import load_models\n"
        "import serve.__main__, serve.server\n"
        f"for rt in ('onnxruntime', 'openvino'):\n"
        f"    s = Settings(models=[{str(bundle)!r}], backend=rt)\n"
        "    create_app(s, load_models(s))\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print('TORCH' if bad else 'CLEAN', bad[:3])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("CLEAN"), out.stdout


def test_runtimes_keep_their_usage_telemetry_off(bundle, tmp_path):
    """onnxruntime and OpenVINO send usage telemetry by default and leave tracking ids in $HOME: serving both
    runtimes (and importing NNCF, which export uses) must write nothing there."""
    home = tmp_path / "home"
    home.mkdir()
    code = (
        "from serve.app import create_app\n"
        "from serve.settings import Settings\n"
        "from serve.registry import load_models\n"
        f"for rt in ('onnxruntime', 'openvino'):\n"
        f"    s = Settings(models=[{str(bundle)!r}], backend=rt)\n"
        "    create_app(s, load_models(s))\n"
        "import nncf  # noqa\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "CI")}
    env["HOME"] = str(home)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []


def test_a_runtime_tool_run_as_a_child_reports_nothing_either():
    """OpenVINO's own tools (benchmark_app) are other processes: their environment carries the opt-out."""
    from runtimes import telemetry

    with telemetry.quiet_child_env() as env:
        home = Path(env["HOME"])
        out = subprocess.run([sys.executable, "-c", "import openvino.tools.ovc"], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == ["intel", "intel/openvino_telemetry"]
    assert not home.exists()


def test_an_openvino_model_keeps_its_answers_when_its_files_change_in_place(tmp_path_factory, tmp_path):
    """The weights it serves are those it verified: overwriting the served .bin in place (as cp or rsync --inplace
    do) changed live answers, and truncating it killed the server with SIGBUS, while OpenVINO mapped the file."""
    bundle = shutil.copytree(micro_bundle(tmp_path_factory), tmp_path / "b")
    m = read_manifest(bundle)
    x = val_batch(m, 4)
    backend = runtimes.open_backend(bundle, m, "openvino", "fp32", BackendOptions(threads=1))
    try:
        want = backend.infer(x)
        weights = bundle / "openvino-fp32.bin"
        size = weights.stat().st_size
        with weights.open("r+b") as f:  # the same inode, other bytes
            f.write(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())
        np.testing.assert_array_equal(backend.infer(x), want)
    finally:
        backend.close()


def _cgroup(root: Path, rel: str, name: str, text: str) -> None:
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(text)


def test_a_cpu_quota_is_read_from_cgroup_v2_and_v1_along_the_path(tmp_path):
    """A Kubernetes CPU limit is a CFS quota, not a CPU set: thread pools sized by the set oversubscribed it."""
    from models.host import cpu_quota

    v2 = tmp_path / "v2"
    _cgroup(v2, "", "cpu.max", "max 100000\n")
    _cgroup(v2, "kubepods", "cpu.max", "250000 100000\n")  # the pod: 2.5 CPUs
    _cgroup(v2, "kubepods/pod1", "cpu.max", "max 100000\n")
    assert cpu_quota(v2, "0::/kubepods/pod1\n") == 2.5
    assert cpu_quota(v2, "0::/\n") is None  # a container's own view of an unlimited cgroup
    v1 = tmp_path / "v1"
    _cgroup(v1, "cpu,cpuacct/docker/abc", "cpu.cfs_quota_us", "50000\n")
    _cgroup(v1, "cpu,cpuacct/docker/abc", "cpu.cfs_period_us", "100000\n")
    _cgroup(v1, "cpu,cpuacct", "cpu.cfs_quota_us", "-1\n")
    _cgroup(v1, "cpu,cpuacct", "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(v1, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n") == 0.5
    assert cpu_quota(v1, "3:cpu,cpuacct:/\n") is None
    _cgroup(v2, "bad", "cpu.max", "garbage\n")
    assert cpu_quota(v2, "0::/bad\n") is None and cpu_quota(tmp_path / "none", "0::/x\n") is None


def test_the_runtimes_are_sized_by_a_cpu_quota(bundle, manifest, monkeypatch):
    """Under a one-CPU quota every runtime runs one thread and one stream where it would have taken the CPU set."""
    from models import host

    monkeypatch.setattr(host, "cpu_quota", lambda *a, **k: 0.5)
    assert host.usable_cpus() == 1
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: a quota changes nothing here")
    assert host.quota_cpus() == 1
    ort = load_backend(bundle, manifest, "onnxruntime")
    assert ort.parallelism == 1 and ort.describe()["threads_effective"] == 1
    ov = load_backend(bundle, manifest, "openvino", precision="fp32")
    assert ov.describe()["threads_effective"] == 1 and ov.parallelism == 1
    torch_backend = load_backend(bundle, manifest, "torch")
    assert torch_backend.describe()["threads_effective"] == 1
    for b in (ort, ov, torch_backend):
        b.close()


def test_a_memory_limit_is_read_and_the_server_says_when_its_limits_exceed_it(tmp_path):
    """A pod's memory limit below what the decode budget and buffered bodies allow is OOM-killed under load instead
    of answering 503: the server says so at start."""
    from models.host import memory_limit
    from serve.server import memory_headroom
    from serve.settings import Settings

    _cgroup(tmp_path / "v2", "pod", "memory.max", "536870912\n")
    _cgroup(tmp_path / "v2", "pod/c", "memory.max", "max\n")
    assert memory_limit(tmp_path / "v2", "0::/pod/c\n") == 512 * 2**20
    _cgroup(tmp_path / "v1", "memory/docker/x", "memory.limit_in_bytes", "9223372036854771712\n")
    assert memory_limit(tmp_path / "v1", "5:memory:/docker/x\n") is None  # v1's "unlimited"
    s = Settings(models=["x"])  # 100 M decode pixels (500 MB) and 256 MiB of bodies by default
    over = memory_headroom(s, 200 * 2**20, 512 * 2**20)
    assert over is not None and over["worst_case_bytes"] > over["memory_limit_bytes"]
    assert memory_headroom(s, 200 * 2**20, 4 * 2**30) is None and memory_headroom(s, 200 * 2**20, None) is None


def test_export_sizes_torch_by_a_cpu_quota(monkeypatch):
    """torch sizes its pool by the CPU set: export's torch stage (and train.eval) ran it at every core of the node
    under a container's CPU limit."""
    import torch

    from export.bundle import torch_threads
    from models import host

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: a quota changes nothing here")
    monkeypatch.setattr(host, "cpu_quota", lambda *a, **k: 0.5)
    before = torch.get_num_threads()
    with torch_threads(None):
        assert torch.get_num_threads() == 1
    with torch_threads(2):  # an explicit --threads wins
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


def test_openvino_profile_counts_attention_as_matmul_work(bundle, manifest):
    """OpenVINO fuses attention (q.k^T, softmax, attn.v) into a Snippets "Subgraph" on CPUs with AVX-512; the
    breakdown counted that time as "the rest" while dividing all analytic flops, attention's included, by the
    remaining matmul time, and the GEMM column passed 100 % of the machine's limit."""
    from benchmarks.breakdown import is_matmul_op

    artifact = manifest.select("openvino", "fp32")
    spec = runtimes.LoadSpec(manifest, artifact, tuple(bundle / f.path for f in artifact.files),
                             BackendOptions(threads=1))
    by_type = runtimes.get("openvino").profile(spec, 2, 1)
    attention = [t for t in by_type if t.startswith(("ScaledDotProductAttention", "MatMul"))]
    assert attention and all(is_matmul_op(t) for t in attention), sorted(by_type)
