"""What Triton 24.05 refuses when it loads a config.pbtxt, vitc refuses too, and what it loads, vitc loads: a
model_warmup sample Triton fails (a missing input_data_file in the model's warmup/ directory, dims, an input name or
a data type the model's input does not have, more items than a backend runs at once), gpus on a KIND_CPU group, and a
file without max_batch_size, which Triton run with --disable-auto-complete-config reads as 0 (the dims then carry
the batch dimension)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_repository_lifecycle import CONFIG, NAME, client, served

import runtimes
from models import tritonconfig
from models.tritonconfig import ConfigError, Tensor, parse

INPUT, OUTPUT = Tensor("input", "TYPE_FP32", (3, 32, 32)), Tensor("logits", "TYPE_FP32", (10,))
ONNX = {"name": "m", "platform": "onnxruntime_onnx", "backend": "onnxruntime", "input": INPUT, "output": OUTPUT,
        "rules": runtimes.get("onnxruntime").triton_rules(runtimes.runtimes())}
IO = ('input [{ name: "input" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] }]\n'
      'output [{ name: "logits" data_type: TYPE_FP32 dims: [ 10 ] }]\n')
IO_0 = IO.replace("[ 3, 32, 32 ]", "[ -1, 3, 32, 32 ]").replace("[ 10 ]", "[ -1, 10 ]")  # the batch dim in the dims
SAMPLE_BYTES = 3 * 32 * 32 * 4  # one FP32 image


def warmup(value: str, *, key: str = "input", batch: int = 1) -> str:
    return f'model_warmup [{{ name: "w" batch_size: {batch} inputs {{ key: "{key}" value: {{ {value} }} }} }}]\n'


def read(tmp_path: Path, text: str) -> tritonconfig.TritonConfig:
    model = tmp_path / "m"
    model.mkdir(exist_ok=True)
    (model / "config.pbtxt").write_text(text)
    config = tritonconfig.read(model)
    assert config is not None
    return config


def test_a_warmup_file_must_be_in_the_model_s_warmup_directory_and_hold_a_sample(tmp_path):
    """backend_model_instance.cc GenerateWarmupData reads <model>/warmup/<input_data_file> and fails the load
    without it, or when it holds less than one sample."""
    text = "max_batch_size: 8\n" + IO + warmup('data_type: TYPE_FP32 dims: [ 3, 32, 32 ] input_data_file: "x.bin"')
    with pytest.raises(ConfigError, match=r"input_data_file 'x.bin' is not a readable file in .*/m/warmup, where "
                                          "Triton reads it"):
        read(tmp_path, text)
    (tmp_path / "m" / "x.bin").write_bytes(bytes(SAMPLE_BYTES))  # beside config.pbtxt: not where Triton looks
    with pytest.raises(ConfigError, match="is not a readable file"):
        read(tmp_path, text)
    (tmp_path / "m" / "warmup").mkdir()
    (tmp_path / "m" / "warmup" / "x.bin").write_bytes(bytes(SAMPLE_BYTES - 1))
    with pytest.raises(ConfigError, match=f"holds {SAMPLE_BYTES - 1} bytes, and Triton's warm-up needs {SAMPLE_BYTES}"):
        read(tmp_path, text)
    (tmp_path / "m" / "warmup" / "x.bin").write_bytes(bytes(SAMPLE_BYTES))
    read(tmp_path, text).check(**ONNX)
    # Triton's JoinPath keeps an absolute name under warmup/ too.
    read(tmp_path, text.replace('"x.bin"', '"/x.bin"')).check(**ONNX)
    os.mkfifo(tmp_path / "m" / "warmup" / "fifo")  # not a file: refused, and opening it does not block
    with pytest.raises(ConfigError, match="'fifo' is not a readable file"):
        read(tmp_path, text.replace("x.bin", "fifo"))


@pytest.mark.parametrize("max_batch, io, sample, says", [
    ("max_batch_size: 8\n", IO, warmup("data_type: TYPE_FP32 dims: [ 3, 64, 64 ] zero_data: true"),
     r"input 'input' dims \[3, 64, 64\] do not fit the input's \[3, 32, 32\] \(without the batch dimension\)"),
    # The batch dimension is added by Triton where it batches, so giving it is one dimension too many.
    ("max_batch_size: 8\n", IO, warmup("data_type: TYPE_FP32 dims: [ 1, 3, 32, 32 ] zero_data: true"),
     r"dims \[1, 3, 32, 32\] do not fit"),
    ("max_batch_size: 0\n", IO_0, warmup("data_type: TYPE_FP32 dims: [ 3, 32, 32 ] zero_data: true"),
     r"dims \[3, 32, 32\] do not fit the input's \[-1, 3, 32, 32\] \(with the batch dimension: max_batch_size 0\)"),
    ("max_batch_size: 8\n", IO, warmup("data_type: TYPE_FP32 dims: [ 3, 32, 32 ] zero_data: true", key="nosuch"),
     "model_warmup\\[0\\] 'w' gives no input 'input'"),
    ("max_batch_size: 8\n", IO, warmup("data_type: TYPE_FP32 dims: [ 3, 32, 32 ] zero_data: true")[:-3]
     + ' inputs { key: "nosuch" value: { data_type: TYPE_FP32 dims: [ 1 ] zero_data: true } } }]\n',
     "input 'nosuch' is not an input of the config \\('input'\\)"),
    ("max_batch_size: 8\n", IO, warmup("data_type: TYPE_FP16 dims: [ 3, 32, 32 ] zero_data: true"),
     r"data_type TYPE_FP16 is not the input's \(TYPE_FP32\)"),
    ("max_batch_size: 8\n", IO, warmup("dims: [ 3, 32, 32 ] zero_data: true"), "data_type TYPE_INVALID"),
    # Each of batch_size requests is one item, all run in one execution: the backend refuses more than it takes.
    ("max_batch_size: 8\n", IO, warmup("data_type: TYPE_FP32 dims: [ 3, 32, 32 ] zero_data: true", batch=9),
     r"batch_size 9 is more than Triton's backend runs at once \(max_batch_size 8\)"),
    ("max_batch_size: 0\n", IO_0, warmup("data_type: TYPE_FP32 dims: [ 1, 3, 32, 32 ] zero_data: true", batch=2),
     r"batch_size 2 is more than .* \(max_batch_size 0: each request alone\)"),
])
def test_a_warmup_sample_triton_fails_is_refused(tmp_path, max_batch, io, sample, says):
    """The sample is a request prepared as any other (infer_request.cc Normalize): it must give the config's input,
    with its data type and dims; Triton fails the warm-up, and with it the load (and the whole server, by default)."""
    with pytest.raises(ConfigError, match=says):
        read(tmp_path, max_batch + io + sample)


@pytest.mark.parametrize("text", [
    "max_batch_size: 8\n" + IO + warmup("data_type: TYPE_FP32 dims: [ 3, 32, 32 ] random_data: true", batch=8),
    "max_batch_size: 0\n" + IO_0 + warmup("data_type: TYPE_FP32 dims: [ 1, 3, 32, 32 ] zero_data: true"),
    # Without batching, the -1 of the dims takes any batch in the sample.
    "max_batch_size: 0\n" + IO_0 + warmup("data_type: TYPE_FP32 dims: [ 5, 3, 32, 32 ] zero_data: true"),
    # batch_size 0 (or none) is a sample Triton skips ("Skipping batch 0 warmup sample"), whatever it holds.
    "max_batch_size: 8\n" + IO + warmup('dims: [ 7 ] input_data_file: "nope.bin"', key="nosuch", batch=0),
    'max_batch_size: 8\n' + IO + 'model_warmup [{ name: "w" inputs { key: "nosuch" value: { dims: [ -1 ] } } }]\n',
    # Passive instances generate no warm-up data.
    "max_batch_size: 8\n" + IO + "instance_group [{ kind: KIND_CPU passive: true }]\n"
    + warmup('data_type: TYPE_FP32 dims: [ 3, 32, 32 ] input_data_file: "nope.bin"'),
])
def test_a_warmup_sample_triton_runs_or_skips_is_accepted(tmp_path, text):
    config = read(tmp_path, text)
    config.check(**ONNX)


@pytest.mark.parametrize("value, says", [
    ("data_type: TYPE_FP32 dims: [ -1, 32, 32 ] zero_data: true", "warmup setting expects all variable-size"),
    ("data_type: TYPE_FP32 dims: [ 3, 32, 32 ]", "gives no data: Triton requires zero_data, random_data or "
                                                 "input_data_file"),
])
def test_what_a_warmup_sample_must_hold_is_a_rule_of_the_fragment(value, says):
    with pytest.raises(ConfigError, match=says):
        parse(warmup(value))


@pytest.mark.parametrize("kind", ["KIND_CPU", "KIND_MODEL"])
def test_gpus_on_a_group_that_is_not_a_gpu_one_is_refused(kind):
    """model_config_utils.cc ValidateInstanceGroup: "has kind KIND_CPU but specifies one or more GPUs"."""
    with pytest.raises(ConfigError, match=rf"instance_group\[1\] has kind {kind} but lists gpus \[0, 1\]: Triton "
                                          rf"refuses it \(\"has kind {kind} but specifies one or more GPUs\"\)"):
        parse(f"instance_group [{{ kind: KIND_CPU }}, {{ kind: {kind} gpus: [ 0, 1 ] }}]")
    assert parse("instance_group [{ kind: KIND_GPU gpus: [ 0, 1 ] }]").instance_kinds == ("KIND_GPU",)


def test_a_file_without_max_batch_size_is_read_as_triton_reads_it_0(tmp_path):
    """proto3's default, kept by Triton run with --disable-auto-complete-config: no batching, and the input's dims
    carry the batch dimension (the onnxruntime backend refuses [3, 32, 32] for the model's 4 dims)."""
    config = read(tmp_path, IO_0)
    assert (config.max_batch_size, config.dynamic_batching) == (0, False)
    config.check(**ONNX)  # Triton loads it
    with pytest.raises(ConfigError, match=r"\[3, 32, 32\] is not the artifact's input: 'input' TYPE_FP32 "
                                          r"\[-1, 3, 32, 32\] \(max_batch_size 0"):
        read(tmp_path, IO).check(**ONNX)  # Triton refuses it
    assert not read(tmp_path, IO_0 + "dynamic_batching { }").dynamic_batching
    with pytest.raises(ConfigError, match=r"preferred_batch_size 4 must be in 1..max_batch_size \(0: not given\)"):
        read(tmp_path, IO_0 + "dynamic_batching { preferred_batch_size: [ 4 ] }")
    # A fragment does not say: parse and check leave it open.
    assert parse(IO).max_batch_size is None
    parse(IO).check(**ONNX)
    assert parse("dynamic_batching { preferred_batch_size: [ 4 ] }").max_batch_size is None


def test_the_repository_load_refuses_what_triton_refuses_and_loads_what_it_loads(fake, repo):
    """Each edit below loaded and served here, and fails the load in Triton 24.05 (and the last one the other way
    round)."""
    config = repo / NAME / "config.pbtxt"
    from_file = warmup('data_type: TYPE_FP32 dims: [ 3, 32, 32 ] input_data_file: "nope.bin"')
    with client(served(repo)) as c:
        for text, says in [
            (CONFIG + from_file, "input_data_file 'nope.bin' is not a readable file in"),
            (CONFIG + warmup("data_type: TYPE_FP32 dims: [ 3, 64, 64 ] zero_data: true"),
             "dims [3, 64, 64] do not fit"),
            (CONFIG + warmup("data_type: TYPE_FP32 dims: [ 3, 32, 32 ] zero_data: true", key="nosuch"),
             "gives no input 'input'"),
            (CONFIG + "instance_group [{ kind: KIND_CPU gpus: [ 0 ] }]\n", "has kind KIND_CPU but lists gpus [0]"),
            (CONFIG.replace("max_batch_size: 8\n", ""), "[3, 32, 32] is not the artifact's input"),
        ]:
            config.write_text(text)
            r = c.post(f"/v2/repository/models/{NAME}/load")
            assert r.status_code == 400 and "config.pbtxt: " in r.json()["error"] and says in r.json()["error"], r.text
            assert c.get(f"/v2/models/{NAME}/ready").status_code == 200  # the version loaded before serves on
        (repo / NAME / "warmup").mkdir()
        (repo / NAME / "warmup" / "nope.bin").write_bytes(bytes(SAMPLE_BYTES))
        config.write_text(CONFIG + from_file)
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200
        # Without max_batch_size and with the batch dimension in the dims, as Triton loads it: no batching.
        config.write_text(CONFIG.replace("max_batch_size: 8\n", "").replace("format: FORMAT_NCHW dims: [ 3, 32, 32 ]",
                                                                            "dims: [ -1, 3, 32, 32 ]")
                          .replace("[ 10 ]", "[ -1, 10 ]"))
        r = c.post(f"/v2/repository/models/{NAME}/load")
        assert r.status_code == 200, r.text
        applied = c.get(f"/v2/models/{NAME}/config").json()
        assert applied["max_batch_size"] == 0 and "dynamic_batching" not in applied
        assert c.get(f"/v2/models/{NAME}").json()["inputs"][0]["shape"] == [-1, 3, 32, 32]
