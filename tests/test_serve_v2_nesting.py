"""/v2 infer `data` nested deeper than its tensor's shape is a 400 with a reason: numpy built arrays of up to 64
dimensions from it, then `.flat` (which takes 32) raised RuntimeError, a 500 and a logged traceback for a body
under 1 KB. Flat data and data nested as the shape (or less) still serve; JSON too deep to parse is a 400 too.
The real app in process (TestClient), its backend tests/fake_runtime.py."""

from __future__ import annotations

import time
from collections.abc import Iterator

import fake_runtime
import numpy as np
import pytest

from serve.protocol import ProtocolError, parse_request

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
@pytest.mark.parametrize("depth", [2, 5, 9, 33, 64, 100])
def test_data_nested_deeper_than_its_shape_is_refused_with_a_reason(client, depth, datatype):
    value = "true" if datatype == "BOOL" else "1"
    for shape in ([1], SHAPE, [1] * 8):  # ranks 1, 4 and the most a shape may have
        if depth <= len(shape):
            continue
        reason = _refused(client, _body(shape, _nested(depth, value), datatype))
        assert reason == (f"input 'input': 'data' nests lists more than {len(shape)} deep, deeper than its "
                          f"shape {shape} allows (send the values flat, or nested as the shape)"), reason


@pytest.mark.parametrize("depth, says", [(1000, "request JSON is nested too deeply"),
                                         (100_000, "request JSON holds 100004 arrays and objects")])
def test_json_too_deep_to_parse_is_refused_before_any_array_is_built(client, depth, says):
    assert _refused(client, _body([1], _nested(depth))).startswith(says)


def test_json_too_deep_to_parse_is_a_protocol_error_without_a_container_bound():
    for depth in (1000, 100_000):
        with pytest.raises(ProtocolError, match="request JSON is nested too deeply"):
            parse_request(_body([1], _nested(depth)), None, None)


def test_flat_and_shaped_data_still_serve_and_agree(client):
    flat = _served(client, str(IMAGE.ravel().tolist()))
    np.testing.assert_array_equal(_served(client, str(IMAGE.tolist())), flat)  # nested exactly as the shape
    np.testing.assert_array_equal(_served(client, str(IMAGE.reshape(1, -1).tolist())), flat)  # less deep
    # One list more than the shape has dimensions, with the right number of values: refused, not reshaped.
    reason = _refused(client, _body(SHAPE, str([IMAGE.tolist()])))
    assert reason.startswith("input 'input': 'data' nests lists more than 4 deep"), reason


def test_flat_data_of_the_wrong_size_or_shape_keeps_its_reason(client):
    wrong = "input 'input': 3 values for shape [1, 3, 32, 32] (3072 expected)"
    assert _refused(client, _body(SHAPE, "[1,2,3]")) == wrong
    assert _refused(client, _body([1], "[1]")) == "input 'input' has shape [1], expected [-1, 3, 32, 32]"
    assert _refused(client, _body([1, 1, 1, 1, 1, 1, 1, 1], _nested(8))).startswith("input 'input' has shape [1, 1,")
    assert _refused(client, _body([2, 1], "[[1],[2,3]]")).endswith("(got lists of uneven lengths)")


def test_a_scalar_takes_one_flat_value():
    assert parse_request(_body([], "[7]"), None).inputs["input"].shape == ()
    with pytest.raises(ProtocolError, match=r"nests lists more than 1 deep, deeper than its shape \[\] allows"):
        parse_request(_body([], "[[7]]"), None)


def test_deep_or_wide_data_costs_no_more_than_its_size():
    """A deep list behind a shallow first value, or many deep lists side by side, is refused in time linear in
    the body: nothing walks or builds past the shape's depth."""
    deep = _nested(900)
    wide = "[" + ",".join(["[[[[1]]]]"] * 3000) + "]"
    for shape, data in (([2], f"[1,{deep}]"), ([2, 1], f"[[1],{deep}]"), ([3000], wide)):
        start = time.perf_counter()
        with pytest.raises(ProtocolError, match="lists of uneven lengths|nests lists more than"):
            parse_request(_body(shape, data), None, 20_000)
        assert time.perf_counter() - start < 0.5
