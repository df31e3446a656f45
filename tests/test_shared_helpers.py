"""One copy of each small helper on the ground floor (models/), used by every stage that needs it: the integer and
number predicates, the strict-JSON refusal of NaN/Infinity, the ONNX IR version reader and the exception's one line.
Also: the recipe knobs of `python -m train` take their help's defaults from the recipes, and what nothing used is
gone."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from models.jsonfields import is_finite, is_int, is_number
from models.oneline import first_line
from models.onnx_wire import onnx_ir_version


def test_export_counts_numpy_integers_through_the_one_is_int():
    import export.bundle
    from export.bundle import ExportConfig, ExportError

    assert not hasattr(export.bundle, "_is_int")
    assert all(is_int(v, numpy=True) for v in (7, np.int64(3), np.uint8(3), np.int32(-1)))
    assert not is_int(np.int64(3))  # a JSON contract holds Python integers only
    assert not any(is_int(v, numpy=True) for v in (True, np.bool_(True), 1.0, np.float32(1), "1", None))
    config = ExportConfig("ckpt", "out", max_batch=np.int64(8), threads=np.int32(2))
    assert (config.max_batch, config.threads) == (8, 2) and type(config.max_batch) is int
    with pytest.raises(ExportError, match=r"^max batch must be an integer in 1\.\.\d+, got "):
        ExportConfig("ckpt", "out", max_batch=np.bool_(True))


def test_resume_state_numbers_use_the_shared_predicates():
    import train.state

    assert not hasattr(train.state, "_finite") and not hasattr(train.state, "_is_num")
    assert all(is_number(v) for v in (3, 0.5, math.nan, -math.inf)) and not is_number(True)
    assert all(is_finite(v) for v in (3, 0.5, -2)) and not any(is_finite(v) for v in (math.nan, math.inf, True, "1"))
    # A diverged epoch's loss sum may be NaN (the weights tell whether the run can go on); a reported loss may not.
    assert train.state._epoch_acc({"loss_sum": math.nan, "samples": 1, "time": 0.5, "corrupt": 0})
    assert not train.state._epoch_acc({"loss_sum": True, "samples": 1, "time": 0.5, "corrupt": 0})
    result = {"top1": 0.5, "top5": 0.9, "samples": 10, "skipped_corrupt": 0}
    assert train.state._eval_result({**result, "loss": 1.5})
    assert not train.state._eval_result({**result, "loss": math.nan})


def test_both_strict_json_readers_refuse_nan_and_infinity_in_their_own_words():
    import serve.protocol
    from models.io import constant_refuser, parse_strict_json
    from serve.protocol import ProtocolError, parse_request

    assert serve.protocol.constant_refuser is constant_refuser  # one hook, each reader with its own error
    with pytest.raises(ValueError) as info:
        parse_strict_json(b'{"a": -Infinity}', 100)
    assert str(info.value) == "ValueError: non-finite number -Infinity (the file must be strict JSON)"
    with pytest.raises(ProtocolError) as request:
        parse_request(b'{"inputs": [{"name": "x", "data": [NaN]}]}', None)
    assert (str(request.value), request.value.status) == (
        "NaN is not a number in JSON (non-finite values are refused)", 400)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@pytest.mark.parametrize(("data", "version"), [
    (b"\x08" + _varint(10) + b"\x12\x03vit", 10),  # ir_version, then producer_name
    (b"\x08" + _varint(300), 300),  # a version of two varint bytes
    (b"\x08" + _varint(1 << 63), 1 << 63),  # ten bytes: the longest varint
    (b"\x08" + b"\xff" * 10, None),  # longer than a varint
    (b"\x08\x8a", None),  # cut inside the varint
    (b"\x12\x03vit", None),  # ir_version not first
    (b"", None),
])
def test_the_onnx_ir_version_is_read_from_the_wire(tmp_path, data, version):
    import runtimes.onnxruntime

    (tmp_path / "model.onnx").write_bytes(data)
    assert onnx_ir_version(tmp_path / "model.onnx") == version
    assert not hasattr(runtimes.onnxruntime, "_onnx_ir_version")


def test_a_real_onnx_file_names_its_ir_version(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "model.onnx"))
    assert onnx_ir_version(tmp_path / "model.onnx") == 9


def test_checkpoint_errors_say_the_exception_in_its_first_real_line(tmp_path):
    import models.checkpoint
    from models.checkpoint import CheckpointError, _validated

    assert not hasattr(models.checkpoint, "_one_line")

    class Odd(dict):
        def get(self, *_args: object) -> object:
            raise ValueError("\n  Exception from src/core.cpp:117:\n  what went wrong\nmore")

    with pytest.raises(CheckpointError) as info:
        _validated(tmp_path, Odd(), "checkpoint.json", "corrupt checkpoint metadata ")
    assert str(info.value) == "corrupt checkpoint metadata checkpoint.json: ValueError: what went wrong"
    assert first_line(ValueError("x" * 400), 300) == "x" * 300


def test_a_process_group_failure_is_the_first_line_of_its_reason(monkeypatch):
    from train.distributed import DistEnv, _setup_failure

    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    said = _setup_failure(RuntimeError("\n  Connection refused.  \nat socket.cpp:10"), DistEnv(world_size=2))
    assert said == "could not form the process group of 2 ranks at 10.0.0.1:29500: Connection refused"


def test_every_recipe_knob_ends_its_help_with_each_recipes_default():
    from train.config import RECIPES
    from train.options import build_parser

    actions = {a.dest: a for a in build_parser()._actions}
    assert set(RECIPES["paper"]) <= actions.keys()  # every knob a recipe sets is an option
    for key in RECIPES["paper"]:
        values = {name: r[key] for name, r in RECIPES.items()}
        said = (f"default {values['paper']}" if len(set(map(str, values.values()))) == 1
                else "defaults: " + ", ".join(f"{n} {v}" for n, v in values.items()))
        assert actions[key].help.endswith(f"({said})"), (key, actions[key].help)
    assert actions["lr_ref_batch"].help == ("global batch at which --lr applies "
                                            "(defaults: paper 2048, paper-sgd 2048, small 128)")
    assert actions["optimizer"].help == "(defaults: paper adamw, paper-sgd sgd, small adamw)"


def test_what_nothing_used_is_gone():
    import serve.registry
    import train.distributed
    import train.sweep.claims

    assert not hasattr(serve.registry, "model_args")  # model_sources(settings) is what the server reads
    assert not hasattr(train.sweep.claims, "se_diff")  # welch() is the standard error the verdicts use
    assert not hasattr(train.distributed, "env_rank") and not hasattr(train.distributed, "launched_by_torchrun")


def test_the_runtimes_take_first_line_from_the_ground_floor():
    import export.bundle
    import export.served
    import runtimes.openvino
    import runtimes.pytorch

    for module in (export.bundle, export.served, runtimes.openvino, runtimes.pytorch):
        source = Path(module.__file__).read_text()
        assert "from models.oneline import first_line" in source and "    first_line,\n" not in source
