"""What vitc reads from a Triton config.pbtxt: what export.triton writes reads back, the format's comments,
strings and nesting are understood, what Triton's parser refuses is refused, a configuration that contradicts its
artifact is refused with the reason, and version_policy selects the version served."""

from __future__ import annotations

import pytest
from test_serve_fixtures import micro_bundle

import runtimes
from export import triton_config
from models import tritonconfig
from models.bundle import read_manifest
from models.tritonconfig import ConfigError, Tensor, TritonConfig, VersionPolicy, parse

INPUT, OUTPUT = Tensor("input", "TYPE_FP32", (3, 32, 32)), Tensor("logits", "TYPE_FP32", (10,))
ARTIFACT = {"name": "m", "platform": "onnxruntime_onnx", "backend": "onnxruntime", "input": INPUT, "output": OUTPUT,
            "rules": runtimes.get("onnxruntime").triton_rules(runtimes.runtimes())}


def test_what_export_triton_writes_reads_back(tmp_path_factory):
    bundle = micro_bundle(tmp_path_factory)
    m = read_manifest(bundle)
    onnx = next(a for a in m.servable() if a.runtime == "onnxruntime")
    text = triton_config.config_pbtxt("micro-onnx-fp32", m, onnx, kind="cpu", instances=2, max_queue_delay_us=750)
    config = parse(text)
    assert config == TritonConfig(name="micro-onnx-fp32", backend="onnxruntime", max_batch_size=m.input.max_batch,
                                  dynamic_batching=True, max_queue_delay_us=750, inputs=(INPUT,), outputs=(OUTPUT,),
                                  instance_kinds=("KIND_CPU",), instance_count=2, label_filename="labels.txt",
                                  parameters={"intra_op_thread_count": "2"})  # the pod's 4 CPUs, 2 instances
    assert config.cpu_only and config.version_policy == VersionPolicy("latest", 1)
    config.check(**{**ARTIFACT, "name": "micro-onnx-fp32"})  # agrees with its own artifact


def test_only_the_fields_at_their_place_count():
    text = """
    # max_batch_size: 99 in a comment
    name: "max_batch_size: 77"
    model_warmup [ { name: "max_queue_delay_microseconds" batch_size: 5 } ]
    input [ { name: "x" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] }, { name: 'y' "z" data_type: TYPE_FP32 dims: 1 } ]
    max_batch_size : 16
    dynamic_batching < preferred_batch_size: [ 4, 8 ]; max_queue_delay_microseconds: 300 >
    version_policy: { latest: { num_versions: 1 } }
    """
    config = parse(text)
    assert (config.name, config.max_batch_size, config.max_queue_delay_us) == ("max_batch_size: 77", 16, 300)
    assert config.inputs == (Tensor("x", "TYPE_FP32", (3, 32, 32)), Tensor("yz", "TYPE_FP32", (1,)))
    assert parse('name: "m"\nbackend: "onnxruntime"') == TritonConfig(name="m", backend="onnxruntime")
    # dynamic_batching without a delay is Triton's delay 0; without the block, no dynamic batching at all.
    assert parse("dynamic_batching { }").dynamic_batching and not parse("max_batch_size: 4").dynamic_batching
    assert parse("sequence_batching { oldest { max_queue_delay_microseconds: 5 } }").max_queue_delay_us is None


@pytest.mark.parametrize("text, says", [
    ("max_batch_size: 4\nmax_batch_size: 8", "given twice"),
    ("max_batch_size: -1", r"in 0\.\."),
    ("max_batch_size: 1.5", "must be an integer"),
    ("max_batch_size: 08", "must be an integer"),
    ("dynamic_batching { max_queue_delay_microseconds: 99999999999 }", r"in 0\.\.60000000"),
    ("dynamic_batching { max_batch_size: 4", "unclosed"),
    ("}", "unbalanced"),
    ("name: \"unterminated", "unexpected character"),
    ("{ }", "field name was expected"),
    ("name other", "needs ':'"),
    ("name: other", "quoted string"),
    ("input [ { name: \"x\" dims: [3] } ]", "must give a name, a data_type and dims"),
    ("input [ { name: \"x\" data_type: 99 dims: [3] } ]", "'99' is not a value of DataType"),
    ("bogus_field: 3", "bogus_field is not a field of ModelConfig"),
    ("a {" * 40 + "}" * 40, "deeper than"),
    ("version_policy { latest { num_versions: 1 } all { } }", "latest and version_policy.all are both given"),
    ("version_policy { }", "must be one of"),
    ("version_policy { newest { } }", "version_policy.newest is not a field of ModelVersionPolicy"),
    ("version_policy { latest { num_versions: 0 } }", r"num_versions must be in 1\.\."),
    ("version_policy { specific { } }", "lists no version"),
    ("version_policy { specific { versions: [ 1, 0 ] } }", "must be in 1.."),
    ("version_policy { all { num_versions: 2 } }", "all.num_versions is not a field of ModelVersionPolicy.All"),
])
def test_what_vitc_or_triton_cannot_serve_is_refused_with_the_reason(text, says):
    with pytest.raises(ConfigError, match=says):
        parse(text)


@pytest.mark.parametrize("edit, says", [
    ({"name": "other"}, "name 'other' is not the model directory's name 'm'"),
    ({"platform": "tensorrt_plan"}, "platform 'tensorrt_plan' is not the artifact's"),
    ({"backend": "tensorrt"}, "backend 'tensorrt' is not the artifact's"),
    ({"inputs": (Tensor("images", "TYPE_FP32", (3, 32, 32)),)}, "input 'images'"),
    ({"inputs": (Tensor("input", "TYPE_FP32", (3, 64, 64)),)}, r"\[3, 64, 64\] is not the artifact's input"),
    ({"inputs": (Tensor("input", "TYPE_FP16", (3, 32, 32)),)}, "TYPE_FP16"),
    ({"inputs": (INPUT, INPUT)}, "input"),
    ({"outputs": (Tensor("logits", "TYPE_FP32", (1000,)),)}, r"output 'logits' TYPE_FP32 \[1000\]"),
])
def test_a_configuration_that_contradicts_its_artifact_is_refused(edit, says):
    TritonConfig(name="m", platform="onnxruntime_onnx", backend="onnxruntime", inputs=(INPUT,),
                 outputs=(OUTPUT,)).check(**ARTIFACT)  # all agree
    TritonConfig().check(**ARTIFACT)  # nothing given: nothing to contradict
    with pytest.raises(ConfigError, match=says):
        TritonConfig(**edit).check(**ARTIFACT)


def test_the_version_policy_selects_one_version():
    assert parse("version_policy { latest { num_versions: 3 } }").version_policy.pick([1, 2, 5]) == 5
    assert parse("version_policy: { all: {} }").version_policy.pick([1, 2, 5]) == 5
    specific = parse("version_policy { specific { versions: [ 2, 1 ] } }").version_policy
    assert specific.pick([1, 2, 5]) == 2 and specific.applied("2") == {"specific": {"versions": [2]}}
    assert VersionPolicy("all").applied("5") == {"latest": {"num_versions": 1}}  # one version served: the newest
    with pytest.raises(ConfigError, match=r"lists version 3, which the model directory does not hold \(it holds 1, 2"):
        parse("version_policy { specific { versions: [ 1, 3 ] } }").version_policy.pick([1, 2])


def test_instance_groups_all_on_the_cpu_put_the_model_there():
    assert parse("instance_group [ { count: 2 kind: KIND_CPU }, { kind: KIND_CPU } ]").cpu_only
    assert not parse("instance_group [ { kind: KIND_CPU }, { kind: KIND_GPU } ]").cpu_only
    assert not parse("instance_group [ { count: 1 } ]").cpu_only  # KIND_AUTO: the server's device
    assert not parse("").cpu_only


def test_the_file_is_bounded_and_optional(tmp_path):
    assert tritonconfig.read(tmp_path) is None
    (tmp_path / "config.pbtxt").write_bytes(b"#" * (tritonconfig.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        tritonconfig.read(tmp_path)
    (tmp_path / "config.pbtxt").write_bytes(b"max_batch_size: 3 \xff")
    with pytest.raises(ConfigError, match="config.pbtxt"):
        tritonconfig.read(tmp_path)


def test_settings_vitc_does_not_apply_are_named():
    """Accepted as Triton accepts them, but listed so the server can say it serves without them; the hints vitc's
    own batching, --parallel and warm-up stand in for are not."""
    config = parse("""
    max_batch_size: 8
    dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 100 preserve_ordering: true
                       default_queue_policy { max_queue_size: 1 timeout_action: REJECT } priority_levels: 2 }
    instance_group [ { count: 4 kind: KIND_CPU rate_limiter { priority: 1 } } ]
    response_cache { enable: true }
    model_transaction_policy { decoupled: false }
    model_warmup [ { name: "w" batch_size: 1 } ]
    """)
    assert config.unapplied == ("response_cache", "model_transaction_policy", "dynamic_batching.default_queue_policy",
                                "dynamic_batching.priority_levels", "instance_group.rate_limiter")
    assert parse("max_batch_size: 8\ninstance_group [ { count: 2 kind: KIND_CPU } ]").unapplied == ()
    ragged = parse('input [ { name: "input" data_type: TYPE_FP32 dims: [ 3, 8, 8 ] allow_ragged_batch: true '
                   'reshape { shape: [ 192 ] } } ]\noutput [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] '
                   'label_filename: "labels.txt" } ]')
    assert ragged.unapplied == ("input.allow_ragged_batch", "input.reshape")
