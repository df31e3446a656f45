"""/v2 infer `data` is read as Triton reads it: lists nested to any depth (up to MAX_DATA_NESTING) and of any
lengths, flattened row-major, with the number of values checked against the shape. numpy once built object arrays
of up to 64 dimensions from deep lists, then `.flat` (which takes 32) raised RuntimeError: a 500 and a logged
traceback for a body under 1 KB; refusing lists deeper than the shape then turned away what Triton serves.
The real app in process (TestClient), its backend tests/fake_runtime.py."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import fake_runtime
import numpy as np
import pytest

from serve.protocol import MAX_DATA_NESTING, ProtocolError, parse_request

INFER = "/v2/models/fake/infer"
SHAPE = [1, 3, 32, 32]
IMAGE = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator:
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    bundle = fake_runtime.write_bundle(tmp_path_factory.mktemp("nesting") / "fake")
    with fake_runtime.registered():
        settings = Settings(models=[f"fake={bundle}"], backend="fake", access_log=False)
        with TestClient(create_app(settings)) as c:
            yield c


def _body(shape: list[int], data: str, datatype: str = "FP32") -> bytes:
    return (f'{{"inputs":[{{"name":"input","shape":{shape},"datatype":"{datatype}","data":{data}}}]}}'
            .replace(" ", "").encode())


def _nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def _refused(client, body: bytes) -> str:
    r = client.post(INFER, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    return r.json()["error"]


def _served(client, data: str) -> np.ndarray:
    r = client.post(INFER, content=_body(SHAPE, data), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:300]
    return np.asarray(r.json()["outputs"][0]["data"], np.float32)


@pytest.mark.parametrize("datatype", ["FP32", "INT32", "BOOL"])
@pytest.mark.parametrize("depth", [2, 5, 9, 33, 64])
def test_data_nested_deeper_than_its_shape_is_read_as_triton_reads_it(depth, datatype):
    value, expected = ("true", True) if datatype == "BOOL" else ("1", 1)
    for shape in ([1], [], [1] * 8):  # ranks 1, 0 and the most a shape may have, one value each
        arr = parse_request(_body(shape, _nested(depth, value), datatype), None).inputs["input"]
        assert arr.shape == tuple(shape) and arr.ravel().tolist() == [expected], (shape, arr)
    # The count is still checked, whatever the depth.
    with pytest.raises(ProtocolError, match=r"^input 'input': 1 values for shape \[1, 3, 32, 32\] \(3072 expected\)$"):
        parse_request(_body(SHAPE, _nested(depth, value), datatype), None)
    with pytest.raises(ProtocolError, match=r"^input 'input': 2 values for shape \[1\] \(1 expected\)$"):
        parse_request(_body([1], _nested(depth, f"{value},{value}"), datatype), None)


@pytest.mark.parametrize("datatype", ["FP32", "INT32", "BOOL"])
@pytest.mark.parametrize("depth", [MAX_DATA_NESTING + 1, 100, 900])
def test_data_nested_past_the_fixed_bound_is_refused_with_a_reason(client, depth, datatype):
    value = "true" if datatype == "BOOL" else "1"
    deep = (f"input 'input': 'data' nests lists more than {MAX_DATA_NESTING} deep (send the values flat, or nested "
            "as the shape)")
    for shape in ([1], SHAPE):
        body = _body(shape, _nested(depth, value), datatype)
        with pytest.raises(ProtocolError) as refused:  # the parser reads every datatype it has
            parse_request(body, None)
        assert str(refused.value) == deep
        # The server reads data in the model's datatype only: another is refused, naming both, before its data.
        reason = _refused(client, body)
        assert reason == (deep if datatype == "FP32" else
                          f"input 'input' must be FP32 (the model's datatype), got {datatype}"), reason


def test_the_bound_is_the_same_beside_numbers_as_in_lists_of_lists():
    """Lists beside numbers are walked one by one, lists of lists joined a level at a time: both stop at the bound."""
    # (data around the deep list, how many lists hold it, how many values besides its one)
    for wrap, around, others in (("[{}]", 1, 0), ("[1,{}]", 1, 1), ("[[{}],[1]]", 2, 1), ("[[1,{}]]", 2, 1)):
        ok = wrap.format(_nested(MAX_DATA_NESTING - around, "2"))
        assert 2 in parse_request(_body([others + 1], ok), None).inputs["input"], wrap
        deep = wrap.format(_nested(MAX_DATA_NESTING - around + 1, "2"))
        with pytest.raises(ProtocolError, match=f"nests lists more than {MAX_DATA_NESTING} deep"):
            parse_request(_body([others + 1], deep), None)


@pytest.fixture
def python_recursion_limit() -> Iterator[None]:
    """Python's default limit, which json's parser meets at 1000 levels: torch raises it when imported (an earlier
    test module's import then left these depths to the nesting bound, refused too, with its own reason)."""
    was = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        yield
    finally:
        sys.setrecursionlimit(was)


@pytest.mark.usefixtures("python_recursion_limit")
@pytest.mark.parametrize("depth, says", [(1000, "request JSON is nested too deeply"),
                                         (100_000, "request JSON holds 100004 arrays and objects")])
def test_json_too_deep_to_parse_is_refused_before_any_array_is_built(client, depth, says):
    assert _refused(client, _body([1], _nested(depth))).startswith(says)


@pytest.mark.usefixtures("python_recursion_limit")
def test_json_too_deep_to_parse_is_a_protocol_error_without_a_container_bound():
    for depth in (1000, 100_000):
        with pytest.raises(ProtocolError, match="request JSON is nested too deeply"):
            parse_request(_body([1], _nested(depth)), None, None)


def test_flat_and_shaped_data_still_serve_and_agree(client):
    flat = _served(client, str(IMAGE.ravel().tolist()))
    np.testing.assert_array_equal(_served(client, str(IMAGE.tolist())), flat)  # nested exactly as the shape
    np.testing.assert_array_equal(_served(client, str(IMAGE.reshape(1, -1).tolist())), flat)  # less deep
    # Wrapped in more lists than the shape has dimensions (the report's repro: [[x.tolist()]] and 8 deep), with the
    # right number of values: served as Triton serves it, the same tensor.
    np.testing.assert_array_equal(_served(client, str([IMAGE.tolist()])), flat)
    np.testing.assert_array_equal(_served(client, str([[[[IMAGE.tolist()]]]])), flat)
    two = IMAGE[0].tolist()
    r = client.post(INFER, content=_body([2, 3, 32, 32], str([[[two]], [[two]]])),
                    headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["outputs"][0]["shape"][0] == 2


def test_uneven_lists_are_read_row_major_as_triton_reads_them():
    """Triton's reader only counts values: lists of uneven lengths with the right number are served, in order."""
    arr = parse_request(_body([2, 3], "[[1],[2,[3,[]]],[],[[4],5,6]]", "INT32"), None).inputs["input"]
    np.testing.assert_array_equal(arr, np.array([[1, 2, 3], [4, 5, 6]], np.int32))
    with pytest.raises(ProtocolError, match=r"^input 'input': 3 values for shape \[2, 1\] \(2 expected\)$"):
        parse_request(_body([2, 1], "[[1],[2,3]]"), None)
    assert parse_request(_body([0, 3], "[[],[[]]]"), None).inputs["input"].shape == (0, 3)


def test_values_anywhere_in_the_nesting_keep_their_reasons():
    for data, datatype, says in (('[[1],[2,["x"]]]', "FP32", r"data is not FP32 \(got strings\)"),
                                 ("[[1],[2,[1.5]]]", "INT32", r"data is not INT32 \(got fractional numbers\)"),
                                 ("[[true],[[1]]]", "BOOL", r"data is not BOOL \(got integers\)"),
                                 ("[[1],[[{}]]]", "FP32", r"data is not FP32 \(got objects\)"),
                                 ("[[1],[[300]]]", "INT8", r"values outside the INT8 range -128..127"),
                                 ("[[1],[[1" + "0" * 400 + "]]]", "FP32", "values outside the FP32 range"),
                                 ("[[1],[[1e300]]]", "FP32", "has non-finite values")):
        with pytest.raises(ProtocolError, match=says):
            parse_request(_body([2], data, datatype), None)


def test_flat_data_of_the_wrong_size_or_shape_keeps_its_reason(client):
    wrong = "input 'input': 3 values for shape [1, 3, 32, 32] (3072 expected)"
    assert _refused(client, _body(SHAPE, "[1,2,3]")) == wrong
    assert _refused(client, _body(SHAPE, "[[[[[[1,2,3]]]]]]")) == wrong
    assert _refused(client, _body([1], "[1]")) == "input 'input' has shape [1], expected [-1, 3, 32, 32]"
    assert _refused(client, _body([1, 1, 1, 1, 1, 1, 1, 1], _nested(8))).startswith("input 'input' has shape [1, 1,")
    assert _refused(client, _body([2, 1], "[[1],[2,3]]")) == "input 'input': 3 values for shape [2, 1] (2 expected)"


def test_a_scalar_takes_one_value_flat_or_nested():
    assert parse_request(_body([], "[7]"), None).inputs["input"].shape == ()
    assert parse_request(_body([], "[[7]]"), None).inputs["input"].tolist() == 7
    with pytest.raises(ProtocolError, match=r"2 values for shape \[\] \(1 expected\)"):
        parse_request(_body([], "[[7],8]"), None)


# Linear walks take ~0.1 s here; a quadratic one over 80,000 values takes minutes. The bound is loose so that a busy
# CI machine (2 shared cores) cannot fail it, and still catches the quadratic walk.
LINEAR_S = 5.0


def test_deep_or_wide_data_costs_no_more_than_its_size():
    """A deep list behind a shallow first value, or many deep lists side by side, is read or refused in time linear
    in the body: the walk is iterative and takes each list of values whole."""
    deep = _nested(900)
    wide = "[" + ",".join(["[[[[1]]]]"] * 3000) + "]"
    ragged = "[" + ",".join(["[1]", "[[2,3]]", "4"] * 20_000) + "]"
    for shape, data, says in (([2], f"[1,{deep}]", "nests lists more than 64 deep"),
                              ([2, 1], f"[[1],{deep}]", "nests lists more than 64 deep"),
                              ([3001], wide, r"3000 values for shape \[3001\]"),
                              ([3], ragged, r"80000 values for shape \[3\]")):
        start = time.perf_counter()
        with pytest.raises(ProtocolError, match=says):
            parse_request(_body(shape, data), None, 200_000)
        assert time.perf_counter() - start < LINEAR_S
    start = time.perf_counter()
    assert parse_request(_body([3000], wide), None, 20_000).inputs["input"].shape == (3000,)
    assert parse_request(_body([80_000], ragged), None, 200_000).inputs["input"].shape == (80_000,)
    assert time.perf_counter() - start < LINEAR_S
