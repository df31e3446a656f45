"""One version everywhere: what the server reports (GET /v2, the OpenAPI document) is the package's version, which
bundles, checkpoints and reports record (models.host.vitc_version, from the installed metadata)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import serve
from models.host import vitc_version

ROOT = Path(__file__).resolve().parents[1]


def test_the_server_reports_the_version_of_the_package():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert serve.__version__ == declared
    installed = vitc_version()  # "unknown" only when vitc runs uninstalled (PYTHONPATH on a clone)
    assert installed in (declared, "unknown"), (installed, declared)
