"""--host (VITC_HOST) is checked with the other settings, before any model loads: an empty value, one that is no
address or host name, or a name that does not resolve is one line naming `--host (VITC_HOST)`, exit 2. Before, each
went to the resolver once every model had loaded (minutes for a large repository, on each restart of a pod) and was
reported as a `--host` a container's user never gave. What only the bind can tell keeps the bind's own reason."""

from __future__ import annotations

import os
import socket
import threading

import fake_runtime
import pytest

from serve.address import NOT_A_HOST, host_problem
from serve.errors import ServeError
from serve.server import bind_socket
from serve.settings import Settings

SERVE_ERROR = "python -m serve: error: invalid setting --host (VITC_HOST): "


@pytest.fixture
def serve_main(tmp_path, monkeypatch):
    """serve's main with a servable bundle and no VITC_* setting from outside; starting the server (which loads the
    models) fails the test."""
    import serve.server
    from serve.__main__ import main

    for name in [n for n in os.environ if n.upper().startswith("VITC_")]:
        monkeypatch.delenv(name)
    bundle = fake_runtime.write_bundle(tmp_path / "b")
    monkeypatch.setattr(serve.server, "run", lambda settings: pytest.fail(f"the server started: {settings}"))
    return lambda argv: main(["--model", str(bundle), *argv])


def _one_line(capsys) -> str:  # noqa: ANN001 - pytest's capsys
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("host", "why"), [
    ("", "is empty: give the address to listen on"),
    ("0.0.0.0:8000", NOT_A_HOST),
    ("http://0.0.0.0", NOT_A_HOST),
    ("[::1]", NOT_A_HOST),
    ("my pod", NOT_A_HOST),
    ("-pod", NOT_A_HOST),
    ("a" * 64, NOT_A_HOST),
    ("my-pod.invalid", "does not resolve: Name or service not known"),  # RFC 6761: .invalid never resolves
])
def test_a_host_nothing_can_listen_on_is_refused_before_the_models_load(serve_main, capsys, monkeypatch, host, why):
    real = socket.getaddrinfo

    def no_such_name(name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - socket.getaddrinfo's signature
        # The resolver's answer for a name no zone holds, as glibc gives it: CI's DNS may be unreachable (no network),
        # where a real lookup would time out instead of answering.
        if name.endswith(".invalid") and not kwargs.get("flags", 0) & socket.AI_NUMERICHOST:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    monkeypatch.setenv("VITC_HOST", host)
    assert serve_main([]) == 2
    assert _one_line(capsys).startswith(SERVE_ERROR + why)
    monkeypatch.delenv("VITC_HOST")
    assert serve_main([f"--host={host}"]) == 2  # the flag reads the same
    assert _one_line(capsys).startswith(SERVE_ERROR + why)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::", "::1", "localhost"])
def test_addresses_and_names_that_resolve_are_taken(host):
    assert host_problem(host) is None
    assert Settings(host=host).host == host


def test_an_address_of_another_machine_is_left_to_the_bind_and_its_reason():
    """192.0.2.1 (TEST-NET-1) is an address, but not this machine's: only the bind knows, and says so."""
    assert Settings(host="192.0.2.1").host == "192.0.2.1"
    with pytest.raises(ServeError, match=r"cannot listen on 192\.0\.2\.1:0: Cannot assign requested address"):
        bind_socket("192.0.2.1", 0)


def test_a_resolver_that_never_answers_is_given_up_on(monkeypatch):
    """getaddrinfo has no timeout: a DNS server that never answers held the start (no such server can run here)."""
    real, answered = socket.getaddrinfo, threading.Event()

    def silent(host, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - socket.getaddrinfo's signature
        if host == "pod.example" and not kwargs.get("flags", 0) & socket.AI_NUMERICHOST:  # a lookup, not a parse
            answered.wait(5)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", silent)
    try:
        assert host_problem("pod.example", timeout_s=0.2) == ("did not resolve within 0.2 s (the resolver did not "
                                                              "answer): give an IP address, or fix the DNS")
    finally:
        answered.set()
