"""serve.hostfield: the whitespace around a Host value is no part of it (hFB 3: RFC 9112 5's OWS)."""

from __future__ import annotations

import pytest

from serve.hostfield import host_field_problem


@pytest.mark.parametrize("value", [b"localhost ", b" localhost", b"localhost:8000\t", b"\t[::1]:80 ", b" "])
def test_whitespace_around_a_value_is_not_part_of_it(value):
    assert host_field_problem(value) is None
