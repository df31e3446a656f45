"""serve.hostfield: the whitespace around a Host value is no part of it (hFB 3: RFC 9112 5's OWS), and every refusal
of a value is one sentence that quotes it and says what is wrong (hFB 4)."""

from __future__ import annotations

import pytest

from serve.hostfield import host_field_problem


@pytest.mark.parametrize("value, detail", [
    (b"a b c", "the host holds ' ', which no host name or IP address has"),
    (b"x@y", "the host holds '@', which no host name or IP address has"),
    (b"a%zz", "the host holds a '%' that does not begin a %XX escape"),
    (b"%00", "the host holds an escaped control character (%00)"),
    (b"host:80:80", "it has more than one ':' (an IPv6 address goes in brackets: [::1]:8000)"),
    (b"a:99999999", "its port '99999999' is not a number from 0 to 65535"),
    (b"a:b", "its port 'b' is not a number from 0 to 65535"),
    (b"[::1", "its '[' is not closed by a ']'"),
    (b"[1.2.3.4]", "the brackets hold no IPv6 address"),
    (b"[fe80::1%25eth0]", "the brackets hold no IPv6 address (a zone, '%', is not allowed)"),
    (b"[::1]x", "something other than ':' and a port follows the ']'"),
    (b"[::1]:x", "its port 'x' is not a number from 0 to 65535"),
], ids=["space", "at", "bad-escape", "escaped-control", "two-colons", "big-port", "word-port", "unclosed",
        "ipv4-in-brackets", "zone", "after-bracket", "bracket-word-port"])
def test_each_refusal_quotes_the_value_and_says_what_is_wrong(value, detail):
    assert host_field_problem(value) == f"{value.decode()!r} is not host[:port]: {detail}"


def test_the_quoted_value_and_port_are_bounded():
    said = host_field_problem(b"a:" + b"9" * 5000)
    assert said is not None and len(said) < 160, said


@pytest.mark.parametrize("value", [b"localhost ", b" localhost", b"localhost:8000\t", b"\t[::1]:80 ", b" "])
def test_whitespace_around_a_value_is_not_part_of_it(value):
    assert host_field_problem(value) is None
