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
    """Why `value`, a Host header's, is not `host [ ":" port ]`, in a few words, or None when it is."""
    # RFC 9112 5: the whitespace around a field value (OWS) is not part of it; llhttp hands a trailing one on.
    value = value.strip(b" \t")
    if value.startswith(b"["):
        literal, closed, rest = value[1:].partition(b"]")
        if not closed or not _ip_literal(literal):
            return "not an IPv6 address in brackets"
        port = rest[1:] if rest.startswith(b":") else None
        if rest and port is None:
            return "something other than a port after the bracketed address"
    else:
        host, colon, port_text = value.partition(b":")
        port = port_text if colon else None
        if not _REG_NAME.fullmatch(host) or _ENCODED_CONTROL.search(host):
            return "not a host name or IP address"
    if port is not None and not (_PORT.fullmatch(port) and (not port.lstrip(b"0") or
                                                            (len(port.lstrip(b"0")) <= 5 and int(port) <= MAX_PORT))):
        return f"the port is not a number from 0 to {MAX_PORT}"
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
