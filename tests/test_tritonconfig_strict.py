"""A config.pbtxt checked as Triton checks it: every field name, value kind and enum value against
model_config.proto (the table is Triton's own schema), the rules of model_config_utils.cc and of the OpenVINO backend
that bear on what vitc serves, default_model_filename and label_filename against the model directory, and
max_batch_size 0 with the batch dimension in the dims (the OpenVINO backend's layout), served end to end."""

from __future__ import annotations

import logging
import re
import shutil

import numpy as np
import pytest
from test_serve_fixtures import micro_bundle

import runtimes
from export import triton
from models import tritonconfig, tritonschema
from models.tritonconfig import ConfigError, Tensor, TritonConfig, parse

INPUT, OUTPUT = Tensor("input", "TYPE_FP32", (3, 32, 32)), Tensor("logits", "TYPE_FP32", (10,))
OPENVINO = {"name": "m", "platform": "openvino", "backend": "openvino", "input": INPUT, "output": OUTPUT,
            "rules": runtimes.get("openvino").triton_rules(runtimes.runtimes())}
ONNX = {**OPENVINO, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
        "rules": runtimes.get("onnxruntime").triton_rules(runtimes.runtimes())}


def _triton_parse(text: str):  # noqa: ANN202 - a model_config_pb2.ModelConfig
    """`text` through Triton's own schema and protobuf's text parser (what tritonserver reads config.pbtxt with)."""
    pytest.importorskip("tritonclient")
    from google.protobuf import text_format
    from test_triton import _model_config_pb2

    return text_format.Parse(text, _model_config_pb2().ModelConfig())


def test_the_schema_is_tritons_model_config_proto():
    """Every message a config.pbtxt can reach from ModelConfig: field names, types, repetition, map entries, enum
    values in number order and oneofs, compared with the schema tritonclient ships."""
    pytest.importorskip("tritonclient")
    from google.protobuf.descriptor import FieldDescriptor as F
    from test_triton import _model_config_pb2

    scalars = {F.TYPE_STRING: "string", F.TYPE_BOOL: "bool", F.TYPE_INT32: "int32", F.TYPE_INT64: "int64",
               F.TYPE_UINT32: "uint32", F.TYPE_UINT64: "uint64", F.TYPE_FLOAT: "float", F.TYPE_DOUBLE: "double"}
    messages, enums, oneofs = {}, {}, {}

    def walk(m) -> None:  # noqa: ANN001 - a protobuf Descriptor
        name = m.full_name.removeprefix("inference.")
        if name in messages:
            return
        messages[name] = {}
        for f in m.fields:
            if f.message_type is not None:
                walk(f.message_type)
                kind = f.message_type.full_name.removeprefix("inference.")
            elif f.enum_type is not None:
                kind = f.enum_type.full_name.removeprefix("inference.")
                enums[kind] = tuple(v.name for v in sorted(f.enum_type.values, key=lambda v: v.number))
                assert [v.number for v in f.enum_type.values] == list(range(len(enums[kind])))
            else:
                kind = scalars[f.type]
            messages[name][f.name] = tritonschema.ProtoField(kind, f.is_repeated)
        for o in m.oneofs:
            if len(o.fields) > 1:
                oneofs[name] = tuple(f.name for f in o.fields)

    walk(_model_config_pb2().ModelConfig.DESCRIPTOR)
    assert len(messages) > 50
    assert (tritonschema.SCHEMA, tritonschema.ENUMS, tritonschema.ONEOFS) == (messages, enums, oneofs)


@pytest.mark.parametrize("text, says", [
    # A typo in a nested field ran with Triton's defaults (here: no batching delay at all) instead of failing.
    ("dynamic_batching { max_queue_delay_microsecond: 100000 }",
     "dynamic_batching.max_queue_delay_microsecond is not a field of ModelDynamicBatching"),
    ('input [{ name: "input" data_type: TYPE_FP32 dim: [ 3, 32, 32 ] dims: [ 3, 32, 32 ] }]',
     "input[0].dim is not a field of ModelInput"),
    ("instance_group [{ kind: KIND_TPU }]",
     "instance_group[0].kind 'KIND_TPU' is not a value of ModelInstanceGroup.Kind (KIND_AUTO, KIND_GPU, KIND_CPU"),
    ('input [{ name: "input" data_type: TYPE_FP32 format: FORMAT_NCWH dims: [ 3, 32, 32 ] }]',
     "input[0].format 'FORMAT_NCWH' is not a value of ModelInput.Format"),
    ('parameters { key: "A" value: { string_valu: "x" } }',
     "parameters[0].value.string_valu is not a field of ModelParameter"),
    ("model_warmup [{ inputs { key: \"input\" value: { data_type: TYPE_FP32 dims: [ 3 ] zero_dat: true } } }]",
     "model_warmup[0].inputs[0].value.zero_dat is not a field of ModelWarmup.Input"),
    ("instance_group [{ count: \"2\" }]", "instance_group[0].count takes type int32, not the quoted string '2'"),
    ("instance_group [{ count: 2147483648 }]", "count is out of the range of int32"),
    ("response_cache { enable: yes }", "response_cache.enable takes type bool, got 'yes'"),
    ("dynamic_batching { preserve_ordering: true preserve_ordering: false }", "preserve_ordering is given twice"),
    ("dynamic_batching { } sequence_batching { }", "dynamic_batching and sequence_batching are both given"),
    ("model_warmup [{ inputs { key: \"input\" value: { zero_data: true random_data: true } } }]",
     "value.zero_data and model_warmup[0].inputs[0].value.random_data are both given"),
    ("dynamic_batching { default_queue_policy: 3 }", "dynamic_batching.default_queue_policy must be a { ... } block"),
    ("name { }", "name takes type string, not a { ... } block"),
    # A list of scalars needs its colon (only a list of messages may leave it out); this one used to load.
    ('input [{ name: "input" data_type: TYPE_FP32 dims [ 3, 32, 32 ] }]', "dims needs ':' before its list"),
])
def test_what_tritons_parser_refuses_is_refused_with_its_path(text, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse(text)
    pytest.importorskip("tritonclient")
    from google.protobuf.text_format import ParseError

    with pytest.raises(ParseError):  # and Triton's own parser refuses it too
        _triton_parse(text)


def test_what_tritons_parser_accepts_is_read_as_it_reads_it():
    text = ('max_batch_size: 0x10\ninput [{ name: "input" data_type: 11 dims: [ 3, 32, 32 ] }]\n'
            "instance_group [{ kind: 2 count: 1 }]\ndynamic_batching { max_queue_delay_microseconds: 010 }\n"
            "optimization { cuda { graph_spec [{ input { key: \"input\" value { dim: [ 3 ] } } }] } }\n"
            'model_repository_agents { agents [{ name: "checksum" parameters { key: "k" value: "v" } }] }')
    config = parse(text)
    assert (config.max_batch_size, config.inputs, config.max_queue_delay_us) == (16, (INPUT,), 8)
    assert config.cpu_only  # kind 2 is KIND_CPU
    triton_config = _triton_parse(text)
    assert (triton_config.max_batch_size, triton_config.input[0].data_type) == (16, 11)
    # Escapes in strings decode as protobuf decodes them (they were kept escaped, and a valid name refused); signed
    # special floats and a leading + are numbers.
    escaped = ('name: "x\\055esc-name" max_batch_size: +8 output [{ name: "logits" data_type: TYPE_FP32 '
               'dims: [ 10 ] label_filename: "labels\\056txt" }]\n'
               "model_metrics { metric_control [{ histogram_options { buckets: [ -inf, +1.5, -Infinity, -nan ] } }] }")
    config = parse(escaped)
    assert (config.name, config.max_batch_size, config.label_filename) == ("x-esc-name", 8, "labels.txt")
    triton_config = _triton_parse(escaped)
    assert (triton_config.name, triton_config.output[0].label_filename) == ("x-esc-name", "labels.txt")
    # A number that is no value of its enum: protobuf keeps it (proto3 enums are open), but no Triton data type,
    # instance kind or format means it; refused by name.
    with pytest.raises(ConfigError, match=r"output\[0\].data_type '15' is not a value of DataType \(TYPE_INVALID"):
        parse('output [{ name: "logits" data_type: 15 dims: [ 10 ] }]')


@pytest.mark.parametrize("text, says", [
    ("max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 4, 16 ] }",
     "preferred_batch_size 16 must be in 1..max_batch_size (8)"),
    ("max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 0 ] }", "preferred_batch_size 0 must be in 1.."),
    ("max_batch_size: 0\ndynamic_batching { preferred_batch_size: [ 1 ] }", "preferred_batch_size 1 must be in 1..max"),
    ('max_batch_size: 0\ninput [{ name: "input" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ -1, 3, 32, 32 ] }]',
     "model input NHWC/NCHW require 3 dims"),
    ('input [{ name: "input" data_type: TYPE_FP32 dims: [ 0, 32, 32 ] }]', "dims must be integers >= 1, or -1"),
])
def test_tritons_validation_rules_are_applied(text, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse(text)
    _triton_parse(text)  # their parse succeeds: these are model_config_utils.cc's rules, not the parser's


def test_backend_rules_refuse_what_triton_would_not_load_and_no_more():
    for text, artifact, says in [
        # AutoCompleteBackendFields fills an absent backend from onnxruntime_onnx, never from "openvino".
        ('platform: "openvino"', OPENVINO, "platform 'openvino' without backend: Triton refuses it"),
        ('platform: "openvino"\ndefault_model_filename: "model.onnx"', OPENVINO, "Triton picks backend 'onnxruntime'"),
        ("instance_group [{ kind: KIND_CPU }, { kind: KIND_GPU }]", OPENVINO,
         "instance_group kind KIND_GPU: Triton's openvino backend supports only KIND_CPU and KIND_AUTO"),
        ("instance_group [{ kind: KIND_MODEL }]", OPENVINO, "kind KIND_MODEL"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            parse(text).check(**artifact)
    parse('platform: "openvino"\ndefault_model_filename: "model.xml"').check(**OPENVINO)  # backend filled in
    parse('platform: "onnxruntime_onnx"').check(**ONNX)
    parse("instance_group [{ kind: KIND_AUTO }, { kind: KIND_CPU }]").check(**OPENVINO)
    parse("instance_group [{ kind: KIND_GPU }]").check(**ONNX)


def test_default_model_filename_must_be_the_artifact_the_version_directory_holds(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "other.onnx").write_bytes(b"x")
    parse('default_model_filename: "model.onnx"').check_files(tmp_path, "model.onnx")
    parse("").check_files(tmp_path, "model.onnx")
    with pytest.raises(ConfigError, match=f"'nope.onnx' names a file that {tmp_path} does not hold"):
        parse('default_model_filename: "nope.onnx"').check_files(tmp_path, "model.onnx")
    with pytest.raises(ConfigError, match=r"'other.onnx' is not the artifact's file \('model.onnx'\)"):
        parse('default_model_filename: "other.onnx"').check_files(tmp_path, "model.onnx")
    parse('default_model_filename: "other.onnx"').check_files(tmp_path, None)  # a runtime Triton cannot serve


def test_labels_are_read_from_the_label_filename_as_triton_reads_them(tmp_path):
    config = parse('output [{ name: "logits" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "names.txt" }]')
    assert config.label_filename == "names.txt"
    assert parse('output [{ name: "logits" data_type: TYPE_FP32 dims: [ 3 ] }]').labels(tmp_path, 3) is None
    with pytest.raises(ConfigError, match="label_filename 'names.txt': .* holds no such file"):
        config.labels(tmp_path, 3)
    (tmp_path / "names.txt").write_text("Katze\nHund\nVogel\n")
    assert config.labels(tmp_path, 3) == ["Katze", "Hund", "Vogel"]
    (tmp_path / "names.txt").write_text("Katze\n\nVogel")  # std::getline: an empty line is a label too
    assert config.labels(tmp_path, 3) == ["Katze", "", "Vogel"]
    # Blank lines after the last label (an editor's) and a CRLF file's line ends label nothing.
    (tmp_path / "names.txt").write_bytes(b"Katze\r\nHund\r\nVogel\r\n\n\n")
    assert config.labels(tmp_path, 3) == ["Katze", "Hund", "Vogel"]
    (tmp_path / "names.txt").write_text("Katze\nHund\n")
    with pytest.raises(ConfigError, match=r"holds 2 lines, one label per class was expected \(3\)"):
        config.labels(tmp_path, 3)
    (tmp_path / "names.txt").write_bytes(b"a\n" * (tritonconfig.MAX_LABELS_BYTES // 2 + 1))
    with pytest.raises(ConfigError, match="larger than"):
        config.labels(tmp_path, 3)
    (tmp_path / "names.txt").write_bytes(b"\xff\nb\nc\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.labels(tmp_path, 3)
    for outside in ("../labels.txt", "/etc/hostname"):
        with pytest.raises(ConfigError, match="must name a file inside the model directory"):
            TritonConfig(label_filename=outside).labels(tmp_path / "names.txt", 3)


def test_max_batch_size_0_puts_the_batch_dimension_in_the_dims():
    """Triton's non-batching layout (the OpenVINO backend's advice for an IR with a dynamic batch): accepted, the
    dims carry -1 first, and requests never merge even with a dynamic_batching block (Triton's scheduler then runs
    batches of one request)."""
    text = ('max_batch_size: 0\ninput [{ name: "input" data_type: TYPE_FP32 dims: [ -1, 3, 32, 32 ] }]\n'
            'output [{ name: "logits" data_type: TYPE_FP32 dims: [ -1, 10 ] }]\ndynamic_batching { }')
    config = parse(text)
    assert config.max_batch_size == 0 and not config.dynamic_batching
    config.check(**OPENVINO)
    with pytest.raises(ConfigError, match=r"\[3, 32, 32\] is not the artifact's input: 'input' TYPE_FP32 "
                                          r"\[-1, 3, 32, 32\] \(max_batch_size 0: the dims start with"):
        parse(text.replace("-1, 3, 32, 32", "3, 32, 32")).check(**OPENVINO)
    _triton_parse(text)


def test_an_openvino_model_without_triton_batching_serves_through_v2(tmp_path_factory, tmp_path, caplog):
    """A generated OpenVINO config edited to max_batch_size 0 with dims [-1, 3, H, W]: it loads, v2 metadata still
    says [-1, 3, H, W], a request carries its own batch (up to the artifact's max batch) and is never merged with
    another, and the answer is the one the generated (batching) config gives."""
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    repo = tmp_path / "repo"
    triton.write_repository(micro_bundle(tmp_path_factory), repo)
    for d in repo.iterdir():
        if d.is_dir() and d.name != "micro-openvino-fp32":
            shutil.rmtree(d)
    name, x = "micro-openvino-fp32", np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    settings = Settings(model_control_mode="explicit", model_repository=repo, access_log=False, graceful_timeout_s=5)
    with TestClient(create_app(settings)) as c:
        batched = c.post(f"/v2/models/{name}/infer", json=body).json()["outputs"][0]["data"]
        unbatched = (f'name: "{name}"\nbackend: "openvino"\nmax_batch_size: 0\n'
                     'input [{ name: "input" data_type: TYPE_FP32 dims: [ -1, 3, 32, 32 ] }]\n'
                     'output [{ name: "logits" data_type: TYPE_FP32 dims: [ -1, 10 ] label_filename: "labels.txt" }]\n'
                     'instance_group [{ count: 1 kind: KIND_CPU }]\nversion_policy: { latest: { num_versions: 1 } }\n')
        _triton_parse(unbatched)
        (repo / name / "config.pbtxt").write_text(unbatched)
        r = c.post(f"/v2/repository/models/{name}/load")
        assert r.status_code == 200, r.text
        model = c.app.state.repository.models[name]
        assert (model.max_batch, model.batcher.merge) == (model.backend.max_batch, False)
        meta = c.get(f"/v2/models/{name}").json()
        assert (meta["inputs"][0]["shape"], meta["outputs"][0]["shape"]) == ([-1, 3, 32, 32], [-1, 10])
        r = c.post(f"/v2/models/{name}/infer", json=body)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["outputs"][0]["data"], batched, rtol=1e-5, atol=1e-5)
        too_many = np.zeros((model.backend.max_batch + 1, 3, 32, 32), np.float32)
        r = c.post(f"/v2/models/{name}/infer", json={"inputs": [{"name": "input", "shape": list(too_many.shape),
                                                               "datatype": "FP32", "data": too_many.ravel().tolist()}]})
        assert r.status_code == 400 and "batch size" in r.json()["error"]
        # The layout earlier versions wrote still serves here, with a warning: Triton cannot load it.
        old = unbatched.replace("max_batch_size: 0", "max_batch_size: 32").replace("[ -1, 3, 32, 32 ]", "[ 3, 32, 32 ]"
                                                                                 ).replace("[ -1, 10 ]", "[ 10 ]")
        (repo / name / "config.pbtxt").write_text(old)
        with caplog.at_level(logging.WARNING, logger="vitc.serve"):
            assert c.post(f"/v2/repository/models/{name}/load").status_code == 200
        assert any(r.msg == "config.pbtxt Triton cannot load" and r.model == name for r in caplog.records)


def test_hostile_configs_are_refused_fast_with_bounded_reasons(tmp_path):
    """A 30,000-digit float token held the GIL for 20 s (a backtracking pattern; the server's health probes with
    it); a 200,000-character field name came back whole in the one-line error."""
    import os
    import time

    start = time.perf_counter()
    with pytest.raises(ConfigError, match="more than any float has"):
        parse("sequence_batching { direct { minimum_slot_utilization: " + "1" * 30_000 + "x } }")
    assert time.perf_counter() - start < 1
    for text in ("x" * 200_000, 'input [{ name: "' + "n" * 100_000 + '" data_type: TYPE_FP32 dims: [ 0 ] }]'):
        with pytest.raises(ConfigError) as info:
            parse(text)
        assert len(str(info.value)) < 300
    # A label file that is a symlink out of the model directory is not read (its lines would be served).
    outside = tmp_path / "outside.txt"
    outside.write_text("secret-1\nsecret-2\n")
    (tmp_path / "model").mkdir()
    os.symlink(outside, tmp_path / "model" / "labels.txt")
    with pytest.raises(ConfigError, match="links to one outside"):
        TritonConfig(label_filename="labels.txt").labels(tmp_path / "model", 2)
    (tmp_path / "model" / "labels.txt").unlink()
    (tmp_path / "model" / "labels.txt").write_bytes(b"a\r\nb\r\n\r\n")  # a Windows editor's: CRLF, a blank line
    assert TritonConfig(label_filename="labels.txt").labels(tmp_path / "model", 2) == ["a", "b"]


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_config_that_is_not_a_regular_file_is_refused_not_ignored(tmp_path, kind):
    import os

    path = tmp_path / "config.pbtxt"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with pytest.raises(ConfigError, match="config.pbtxt: not a regular file"):
        tritonconfig.read(tmp_path)
    (tmp_path / "plain").mkdir()
    assert tritonconfig.read(tmp_path / "plain") is None  # no file at all: no configuration


def test_a_config_that_links_out_of_the_model_directory_is_refused_without_quoting_it(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t_password_9f8e\n")
    model = tmp_path / "repo" / "m"
    model.mkdir(parents=True)
    (model / "config.pbtxt").symlink_to(secret)
    with pytest.raises(ConfigError, match="links to a file outside the model directory") as info:
        tritonconfig.read(model)
    assert "s3cr3t" not in str(info.value)
    (model / "config.pbtxt").unlink()
    (model / "config.pbtxt").symlink_to(tmp_path / "gone.pbtxt")  # dangling: not "no configuration"
    with pytest.raises(ConfigError, match="a symbolic link to nothing readable"):
        tritonconfig.read(model)
    (model / "config.pbtxt").unlink()
    (model / "real.pbtxt").write_text('name: "m"\ninput [{ name: "x" data_type: TYPE_FP32 dims: [ 3 ] }]\n'
                                      'output [{ name: "y" data_type: TYPE_FP32 dims: [ 2 ] }]\n')
    (model / "config.pbtxt").symlink_to("real.pbtxt")  # a link inside the directory is read, as Triton reads it
    assert tritonconfig.read(model).name == "m"
