"""The --host check made with the settings, before any model loads: an IP address, or a host name this machine
resolves within a bounded time. What only binding can tell (an address of another machine, a port in use) is left
to serve.server.bind_socket, which says it with the system's own reason."""

from __future__ import annotations

import re
import socket
import threading

RESOLVE_TIMEOUT_S = 10.0  # glibc's resolver tries 2 servers x 5 s by default: one that never answers must not hang
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")  # underscores too: /etc/hosts and some DNS zones hold them
NOT_A_HOST = ("must be an IP address or a host name, without a scheme, brackets or a port (the port is --port; "
              "0.0.0.0 listens on every interface, 127.0.0.1 on this machine only)")


def host_problem(host: str, timeout_s: float = RESOLVE_TIMEOUT_S) -> str | None:
    """Why the server cannot listen on `host`, as a setting's error ("is empty", "does not resolve: ..."), or None."""
    if not host.strip():
        return "is empty: give the address to listen on (0.0.0.0: every interface; 127.0.0.1: this machine only)"
    if _numeric(host):
        return None
    address, percent, zone = host.partition("%")
    if percent and ":" in address and _numeric(address):  # an IPv6 address whose zone getaddrinfo did not take
        return _unknown_zone(zone)
    if not _host_name(host):
        return NOT_A_HOST
    return _unresolved(host, timeout_s)


def _numeric(host: str) -> bool:
    """Whether `host` is an IP address as getaddrinfo reads one (no lookup: AI_NUMERICHOST never asks a resolver)."""
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):  # ValueError: a NUL in it
        return False
    return True


def _unknown_zone(zone: str) -> str:
    """The refusal of an IPv6 address's zone (`fe80::1%eth0`) that names no interface of this machine."""
    try:
        names = ", ".join(name for _, name in socket.if_nameindex())
    except OSError:  # no interface list to read: the zone is named alone
        names = ""
    return (f"names the unknown interface {zone[:40]!r} after '%' (the zone of an IPv6 address is an interface of this "
            f"machine{': ' + names if names else ''})")


def _host_name(host: str) -> bool:
    """Whether `host` is spelt as a host name (dot-separated labels; an international one as getaddrinfo encodes it)."""
    try:
        name = host.encode("idna").decode("ascii").removesuffix(".")
    except UnicodeError:
        return False
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def _unresolved(host: str, timeout_s: float) -> str | None:
    """Why the host name `host` does not resolve within `timeout_s`, or None: getaddrinfo has no timeout of its own,
    so it runs in a daemon thread that the start does not wait past."""
    outcome: list[str | None] = []

    def look_up() -> None:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            outcome.append(None)
        except (socket.gaierror, UnicodeError) as exc:
            outcome.append(f"does not resolve: {getattr(exc, 'strerror', None) or exc}")

    thread = threading.Thread(target=look_up, name="vitc-host-lookup", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # no thread to spare (a pids limit): binding resolves it and says what fails
        return None
    thread.join(timeout_s)
    if not outcome:
        return (f"did not resolve within {timeout_s:g} s (the resolver did not answer): give an IP address, or fix "
                "the DNS")
    return outcome[0]
