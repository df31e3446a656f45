"""Start refusals, one line and exit 2: with --model-repository alone, a flag each model's config.pbtxt (and its
version's artifact) decides instead (--backend, --precision, --max-batch-size, --max-queue-delay-ms), or a tuning flag
no repository model's runtime uses (--compile, --channels-last, ...), is refused, not silently ignored, while the flags
that do apply to repository models keep working; and a settings error names the flag and variable the user has, and
shows what the user gave escaped, on its one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fake_runtime
import pytest
from test_repository_lifecycle import CONFIG as FAKE_CONFIG
from test_repository_lifecycle import NAME as FAKE
from test_repository_lifecycle import add_version

from serve.__main__ import main
from serve.launch import REPO
from serve.settings import Settings, repository_tuning

SERVE_ERROR = "python -m serve: error: "

CONFIG = 'name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'


def _repository(root: Path, *, configured: bool = True) -> Path:
    """A repository layout (what the settings look at; nothing here is loaded): model m, version 1."""
    (root / "m" / "1").mkdir(parents=True)
    if configured:
        (root / "m" / "config.pbtxt").write_text(CONFIG)
    return root


def _one_line(capsys) -> str:  # noqa: ANN001 - pytest's capsys
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize(("args", "named"), [
    (["--precision", "int8"], "--precision does"),
    (["--backend", "torch"], "--backend does"),
    (["--backend", "onnxruntime"], "--backend does"),  # even the runtime a model may happen to have
    (["--max-batch-size", "4"], "--max-batch-size does"),
    (["--max-queue-delay-ms", "50"], "--max-queue-delay-ms does"),
    (["--max-batch-size", "4", "--precision", "fp16"], "--precision, --max-batch-size do"),
])
def test_a_flag_the_repository_decides_is_refused(tmp_path, capsys, args, named):
    """Before, each of these started (exit 0) and served as config.pbtxt says, without a word."""
    repo = _repository(tmp_path)
    assert main(["--model-repository", str(repo), *args]) == 2
    err = _one_line(capsys)
    assert err.startswith(f"{SERVE_ERROR}invalid settings: {named} not apply to --model-repository: each model's "
                          "config.pbtxt decides"), err
    assert err.endswith("leave it out, or serve bundles with --model") or \
        err.endswith("leave them out, or serve bundles with --model"), err


def test_the_environment_counts_as_given(tmp_path, capsys, monkeypatch):
    """An operator's VITC_PRECISION=int8 in a Deployment served fp32 without a word."""
    monkeypatch.setenv("VITC_PRECISION", "int8")
    assert main(["--model-repository", str(_repository(tmp_path))]) == 2
    assert "VITC_PRECISION=int8 does not apply to --model-repository" in _one_line(capsys)  # as the user set it


@pytest.mark.parametrize(("args", "named"), [
    (["--compile"], "--compile does"),
    (["--no-channels-last"], "--channels-last does"),
    (["--threads", "2", "--compile"], "--threads, --compile do"),
])
def test_a_tuning_flag_no_repository_model_uses_is_refused_once_they_are_loaded(tmp_path, args, named):
    """The runtime is the artifact's, known once loaded: --compile was accepted, and no model ran on torch."""
    repo = tmp_path / "repo"
    add_version(repo, FAKE, "1")
    (repo / FAKE / "config.pbtxt").write_text(FAKE_CONFIG)
    proc = subprocess.run(  # a real start (the fake runtime tunes --parallel only), which used to serve
        [sys.executable, "-m", "serve", "--model-repository", str(repo), "--port", "0", *args], cwd=REPO,
        env={**os.environ, **fake_runtime.server_env(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"{SERVE_ERROR}{named} not apply to --model-repository: no model of it runs on a runtime "
                          "that uses "), err
    assert "decide its runtime: fake)" in err


def test_a_tuning_flag_is_checked_against_the_runtimes_served(tmp_path):
    repo = _repository(tmp_path)
    compiled = Settings(model_repository=repo, compile=True, threads=2)
    assert repository_tuning(compiled, ["torch"]) is None  # a version directory holding a torch artifact uses both
    assert repository_tuning(compiled, ["onnxruntime"]).startswith("--compile does not apply")
    assert repository_tuning(compiled, []) is None  # nothing loaded (every runtime missing here): nothing to say
    assert repository_tuning(Settings(model_repository=repo, parallel=2), ["onnxruntime", "tensorrt"]) is None
    assert repository_tuning(Settings(models=["b"], model_repository=repo, backend="torch", compile=True),
                             ["onnxruntime"]) is None  # --backend torch serves the bundles: checked as ever


def test_the_flags_that_apply_to_repository_models_are_accepted(tmp_path):
    repo = _repository(tmp_path)
    s = Settings(model_repository=repo, device="cpu", threads=2, parallel=2, openvino_hint="throughput",
                 max_queue_size=8, compile=False, log_level="warning", graceful_timeout_s=5)
    assert (s.threads, s.parallel, s.max_queue_size) == (2, 2, 8)


def test_a_model_directory_without_config_takes_the_batching_flags(tmp_path):
    """The README: "a model directory without config.pbtxt serves with the server's settings": there they apply."""
    repo = _repository(tmp_path / "r")
    (repo / "plain" / "1").mkdir(parents=True)  # no config.pbtxt
    s = Settings(model_repository=repo, max_batch_size=4, max_queue_delay_ms=50)
    assert (s.max_batch_size, s.max_queue_delay_ms) == (4, 50)
    with pytest.raises(ValueError, match="--precision does not apply to --model-repository"):
        Settings(model_repository=repo, precision="int8")  # no directory's artifact is chosen by it


def test_with_bundles_beside_the_repository_the_flags_are_theirs(tmp_path):
    repo = _repository(tmp_path / "r")
    s = Settings(model_repository=repo, models=["b"], precision="fp16", max_batch_size=4, backend="openvino")
    assert (s.precision, s.max_batch_size) == ("fp16", 4)


def test_a_bad_access_log_variable_names_the_real_flag(capsys, monkeypatch):
    """`--access-log` does not exist: only --no-access-log, or VITC_ACCESS_LOG=true|false."""
    monkeypatch.setenv("VITC_ACCESS_LOG", "maybe")
    assert main(["--model", "nowhere"]) == 2
    err = _one_line(capsys)
    assert err.startswith(SERVE_ERROR + "invalid setting --no-access-log (VITC_ACCESS_LOG=true|false): "), err
    assert "--access-log " not in err and err.endswith("(got 'maybe')")


@pytest.mark.parametrize("args", [
    ["--model", "a\nb=/nowhere/x"],
    ["--model", "/nowhere/a\rb\x1b[31m"],
    ["--model-dir", "/nowhere/a\nb"],
    ["--model-repository", "/nowhere/a\u2028b"],
])
def test_what_the_user_gave_stays_on_the_error_line(capsys, args):
    """A --model with a newline printed its path raw the second time: the error spanned two lines."""
    assert main(args) == 2
    err = _one_line(capsys)
    assert "\r" not in err and "\x1b" not in err and "\u2028" not in err, err
    assert any(esc in err for esc in ("\\n", "\\r", "\\u2028")), err
