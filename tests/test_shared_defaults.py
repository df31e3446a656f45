"""The default runtime and export targets are the registry's (runtimes.registry), used by every stage that has one."""

from __future__ import annotations

import inspect

import runtimes
from runtimes.registry import DEFAULT_RUNTIME, DEFAULT_TARGETS


def test_the_defaults_name_registered_runtimes():
    assert DEFAULT_RUNTIME in runtimes.names()
    for target in DEFAULT_TARGETS:
        assert runtimes.by_target(target) is not None, target


def test_every_stage_defaults_to_the_registry_runtime(monkeypatch):
    from benchmarks import e2e, load, overhead
    from export import served
    from serve.settings import Settings

    assert Settings.model_fields["backend"].default == DEFAULT_RUNTIME
    assert inspect.signature(served.measure).parameters["runtime"].default == DEFAULT_RUNTIME
    assert e2e.E2EConfig(url="start").backend == DEFAULT_RUNTIME
    assert inspect.signature(overhead.Server).parameters["backend"].default == DEFAULT_RUNTIME
    assert load.backend_of(load.build_parser().parse_args([])) == DEFAULT_RUNTIME


def test_export_report_takes_the_default_runtime_without_served(capsys, tmp_path):
    """--runtime applies to --served only: naming the default one is the same as leaving it out."""
    import pytest

    from export import report

    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path), "--runtime", "openvino"])
    assert exc.value.code == 2 and "--runtime and --samples apply to --served only" in capsys.readouterr().err
    assert report.main([str(tmp_path), "--runtime", DEFAULT_RUNTIME]) == 2  # on to reading the (absent) bundle
    assert "--served only" not in capsys.readouterr().err


def test_the_export_cli_defaults_to_the_registry_targets():
    from export import cli

    args = cli.parser().parse_args(["--checkpoint", "c", "--out", "o"])
    assert tuple(args.targets.split(",")) == DEFAULT_TARGETS
