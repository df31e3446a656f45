"""The Host header's grammar (RFC 9112 3.2: `uri-host [ ":" port ]`, RFC 3986 3.2.2-3.2.3), which a server must
answer 400 when a request breaks: a reg-name, an IPv4 address, or an IPv6 address (or IPvFuture) in brackets, then an
optional port of 0 to 65535."""

from __future__ import annotations

import ipaddress
import re

# RFC 3986's reg-name: unreserved, sub-delims and pct-encoded octets (empty too: a request target without an
# authority is sent with an empty Host, RFC 9112 3.2). An IPv4 address is a reg-name as far as the grammar goes.
_REG_NAME = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")
_IP_FUTURE = re.compile(rb"[vV][0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+")
# A pct-encoded control character (NUL, CR, LF, ...): no host has one, and a lookup or a log would take it whole.
_ENCODED_CONTROL = re.compile(rb"%(?:[01][0-9A-Fa-f]|7[Ff])")
_PORT = re.compile(rb"[0-9]*")
MAX_PORT = 65535


def host_field_problem(value: bytes) -> str | None:
    """Why `value`, a Host header's, is not `host [ ":" port ]`, as a sentence that quotes it (at most 64
    characters), or None when it is."""
    # RFC 9112 5: the whitespace around a field value (OWS) is not part of it; llhttp hands a trailing one on.
    value = value.strip(b" \t")
    if (detail := _detail(value)) is None:
        return None
    return f"{value.decode('latin-1')[:64]!r} is not host[:port]: {detail}"


def _detail(value: bytes) -> str | None:
    """What breaks the grammar in `value`, as a clause, or None."""
    if value.startswith(b"["):
        literal, closed, rest = value[1:].partition(b"]")
        if not closed:
            return "its '[' is not closed by a ']'"
        if not _ip_literal(literal):
            return ("the brackets hold no IPv6 address (a zone, '%', is not allowed)" if b"%" in literal
                    else "the brackets hold no IPv6 address")
        if rest and not rest.startswith(b":"):
            return "something other than ':' and a port follows the ']'"
        port = rest[1:] if rest else None
    else:
        host, colon, port_text = value.partition(b":")
        port = port_text if colon else None
        if (end := _REG_NAME.match(host).end()) < len(host):  # type: ignore[union-attr]  # `(...)*` always matches
            if host[end:end + 1] == b"%":
                return "the host holds a '%' that does not begin a %XX escape"
            return f"the host holds {host[end:end + 1].decode('latin-1')!r}, which no host name or IP address has"
        if match := _ENCODED_CONTROL.search(host):
            return f"the host holds an escaped control character ({match.group().decode()})"
        if port is not None and b":" in port:
            return "it has more than one ':' (an IPv6 address goes in brackets: [::1]:8000)"
    if port is not None and not (_PORT.fullmatch(port) and (not port.lstrip(b"0") or
                                                            (len(port.lstrip(b"0")) <= 5 and int(port) <= MAX_PORT))):
        return f"its port {port.decode('latin-1')[:16]!r} is not a number from 0 to {MAX_PORT}"
    return None


def _ip_literal(text: bytes) -> bool:
    """Whether `text` is an IPv6 address (no zone: RFC 3986 has none) or an IPvFuture."""
    if _IP_FUTURE.fullmatch(text):
        return True
    try:
        ipaddress.IPv6Address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    return b"%" not in text
