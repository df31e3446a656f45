"""A v2 JSON request holds its parsing memory (up to 20x its size: a Python float and a list slot per number, then
numpy arrays) in the decode budget before it is parsed, as an image holds its pixels: concurrent large bodies
wait or get 503 instead of taking the server past its memory, and the start-up memory check counts one."""

from __future__ import annotations

import contextlib
import tracemalloc

import pytest

from serve.imaging import BUDGET_PIXEL_BYTES
from serve.protocol import JSON_MEMORY_PER_BYTE, ProtocolError, parse_memory
from serve.routes.v2 import _parse
from serve.server import memory_headroom
from serve.settings import Settings
from serve.workpool import Busy, PixelBudget

RAW = ("input", (1, 3, 32, 32))


def _body(rows: int) -> bytes:
    """Nested rows of small numbers: the dearest JSON to parse per byte."""
    data = b",".join([b"[0.1,0,1e0]"] * rows)
    return b'{"inputs":[{"name":"input","shape":[%d,3],"datatype":"FP32","data":[%s]}]}' % (rows, data)


class Recording(PixelBudget):
    """The real budget, remembering the largest reservation."""

    def __init__(self, pixels: int) -> None:
        super().__init__(pixels)
        self.largest = 0

    @contextlib.contextmanager
    def reserve(self, pixels: int):
        self.largest = max(self.largest, pixels)
        with super().reserve(pixels):
            yield


def test_the_reservation_covers_what_parsing_really_takes():
    body = _body(200_000)
    budget = Recording(10**9)
    tracemalloc.start()
    try:
        parsed = _parse(budget, body, None, None, RAW)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert parsed.inputs["input"].shape == (200_000, 3)
    assert peak > 5 * len(body), "the body parsed without the memory the test is about"
    assert budget.largest * BUDGET_PIXEL_BYTES >= peak, (budget.largest * BUDGET_PIXEL_BYTES, peak)
    assert budget.used == 0


def test_a_body_does_not_parse_past_the_budget_others_hold():
    body = _body(20_000)
    cost = -(-parse_memory(len(body), None) // BUDGET_PIXEL_BYTES)
    budget = PixelBudget(cost + 10)
    with budget.reserve(20), pytest.raises(Busy):
        _parse(budget, body, None, None, RAW)
    assert _parse(budget, body, None, None, RAW).inputs["input"].shape == (20_000, 3)  # once the budget is free


def test_a_body_larger_than_the_whole_budget_parses_alone():
    budget = PixelBudget(1000)
    assert _parse(budget, _body(5_000), None, None, RAW).inputs["input"].shape == (5_000, 3)


def test_binary_data_costs_less_than_json_and_a_bad_header_is_a_protocol_error():
    assert parse_memory(1000, "100") == 100 * JSON_MEMORY_PER_BYTE + 900 * 2
    assert parse_memory(1000, "0") == 2000  # a raw binary tensor
    with pytest.raises(ProtocolError):
        parse_memory(1000, "-1")


def test_the_start_up_memory_check_counts_one_body_parsing_alone():
    s = Settings(models=["x"], decode_budget_pixels=1000, max_image_pixels=100, max_body_bytes=64 * 2**20,
                 max_buffered_bytes=64 * 2**20)
    over = memory_headroom(s, 0, 1 << 30)  # 64 MiB x 20 = 1.25 GiB of parsing, past a 1 GiB limit
    assert over is not None and over["worst_case_bytes"] >= 64 * 2**20 * JSON_MEMORY_PER_BYTE


@pytest.mark.parametrize("data, says", [("null", "got null"), ("{}", "got an object"), ('"1"', "got a string"),
                                        ("1", "got a number")])
def test_data_that_is_not_a_list_is_named_as_json_names_it(data, says):
    body = b'{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":%s}]}' % data.encode()
    with pytest.raises(ProtocolError, match=f"'data' must be a list of numbers, {says}"):
        _parse(PixelBudget(10**9), body, None, None, RAW)


def test_a_repeated_key_is_refused_where_python_and_triton_would_read_different_values():
    image = '{"name":"input","shape":[1],"datatype":"FP32","data":[1]}'
    zeros = '{"name":"input","shape":[1],"datatype":"FP32","data":[0]}'
    for body in (f'{{"inputs":[{image}],"inputs":[{zeros}]}}',
                 '{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":[1],"data":[0]}]}'):
        with pytest.raises(ProtocolError, match="repeats the key"):
            _parse(PixelBudget(10**9), body.encode(), None, None, RAW)


def test_strings_are_refused_before_numpy_sizes_a_text_array_for_them():
    """numpy made a text array as wide as the longest string for every value: 40 KB of JSON took 400 MB."""
    data = ",".join(['"' + "x" * 50_000 + '"'] + ['""'] * 3071)
    body = b'{"inputs":[{"name":"input","shape":[3072],"datatype":"FP32","data":[%s]}]}' % data.encode()
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=r"data is not FP32 \(got strings\)"):
            _parse(PixelBudget(10**9), body, None, None, RAW)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * len(body), peak


@pytest.mark.parametrize("data, datatype, says", [
    ("[[1,2],[3]]", "FP32", r"3 values for shape \[1\] \(1 expected\)"), ("[1.5]", "INT32", "got fractional numbers"),
    ("[1" + "0" * 400 + "]", "FP32", "values outside the FP32 range"), ("[18446744073709551616]", "UINT64",
                                                                        "outside the UINT64 range")])
def test_values_that_do_not_fit_are_named(data, datatype, says):
    body = b'{"inputs":[{"name":"input","shape":[1],"datatype":"%s","data":%s}]}' % (datatype.encode(), data.encode())
    with pytest.raises(ProtocolError, match=says):
        _parse(PixelBudget(10**9), body, None, None, RAW)
    ok = b'{"inputs":[{"name":"input","shape":[1],"datatype":"UINT64","data":[18446744073709551615]}]}'
    assert int(_parse(PixelBudget(10**9), ok, None, None, RAW).inputs["input"][0]) == 2**64 - 1
