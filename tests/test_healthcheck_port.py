"""The image's HEALTHCHECK and the server read VITC_PORT alike (hCV): a value the server listened on while the
healthcheck probed 8000 left the container unhealthy for good."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from serve.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")


def healthcheck_code(dockerfile: str) -> str:
    """The Python the Dockerfile's HEALTHCHECK runs."""
    text = (ROOT / dockerfile).read_text()
    m = re.search(r'HEALTHCHECK[^\n]*\n\s*CMD \["python", "-c", "(.*)"\]', text)
    assert m is not None, f"{dockerfile} has no python -c HEALTHCHECK"
    return m[1].encode().decode("unicode_escape")


def probed_port(code: str, value: str | None) -> int:
    """The port the healthcheck code probes for VITC_PORT=`value` (None: unset), read from the URL it opens."""
    # The real code, its opener swapped for one that records the URL: no server needed.
    stub = ("import urllib.request as _u, sys\n"
            "class _O:\n"
            "    def open(self, url, timeout=None): print(url); sys.exit(0)\n"
            "_u.build_opener = lambda *a: _O()\n")
    env = {"PATH": "/usr/bin:/bin"} | ({} if value is None else {"VITC_PORT": value})
    out = subprocess.run([sys.executable, "-c", stub + code], env=env, capture_output=True, text=True, check=True)
    return int(re.search(r":(\d+)/", out.stdout)[1])


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
@pytest.mark.parametrize("value", ["21166", " 21166", "21166 ", "\t21166\n", None, "tcp://10.96.0.12:8000"])
def test_the_healthcheck_probes_the_port_the_server_listens_on(dockerfile, value, monkeypatch):
    if value is None:
        monkeypatch.delenv("VITC_PORT", raising=False)
    else:
        monkeypatch.setenv("VITC_PORT", value)
    assert probed_port(healthcheck_code(dockerfile), value) == Settings(models=["x"]).port


@pytest.mark.parametrize("value", ["+21166", "21166.0", "٢١١٦٦", "0x5000", "21_166"])
def test_a_port_the_healthcheck_cannot_read_is_refused_by_the_server(value, monkeypatch):
    """The server took these (int() reads them) while the healthcheck fell back to 8000: now refused, one reason."""
    monkeypatch.setenv("VITC_PORT", value)
    with pytest.raises(ValueError, match="ASCII digits"):
        Settings(models=["x"])


def test_the_cli_names_a_refused_port_once(monkeypatch, capsys):
    """It said `... in ASCII digits, got '+21702' (got '+21702')`."""
    from serve.__main__ import main

    monkeypatch.setenv("VITC_PORT", "+21702")
    assert main(["--model", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].count("+21702") == 1 and "VITC_PORT" in err[0], err
