"""Start-up refusals of serve's settings (tester hEW): each is one line naming the setting as the user gave it (the
VITC_* variable where the environment set it, an item of a list by its place), with a bounded echo of the value,
exit 2; the variables are read by their upper-case names alone."""

from __future__ import annotations

import os

import pytest

from serve.address import host_problem
from serve.errors import ServeError
from serve.server import bind_socket
from serve.settings import Settings

SERVE_ERROR = "python -m serve: error: "


@pytest.fixture
def serve_main(monkeypatch):
    """serve's main with no VITC_* setting from outside; starting the server fails the test."""
    import serve.server
    from serve.__main__ import main

    for name in [n for n in os.environ if n.upper().startswith("VITC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(serve.server, "run", lambda settings: pytest.fail(f"the server started: {settings}"))
    return main


def _one_line(capsys) -> str:  # noqa: ANN001 - pytest's capsys
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.removesuffix("\n")


def test_a_deeply_nested_models_variable_is_one_line(serve_main, capsys, monkeypatch):
    monkeypatch.setenv("VITC_MODELS", "[" * 3000 + "]" * 3000)
    assert serve_main([]) == 2
    assert _one_line(capsys).startswith(SERVE_ERROR + "invalid setting --model (VITC_MODELS): JSON nested too deeply: "
                                        'give a JSON list of paths, ["PATH", "NAME=PATH"] (got ')


@pytest.mark.parametrize(("value", "said"), [
    ("[1,2]", "item 1: Input should be a valid string (got 1)"),
    ('["a",null]', "item 2: Input should be a valid string (got None)"),
    ("[[]]", "item 1: Input should be a valid string (got [])"),
    ('["a", " "]', "item 2: the path is empty (it would be the current directory): give a bundle directory as PATH or "
                   "NAME=PATH (got ' ')"),
])
def test_an_item_of_the_models_list_is_named_by_its_place_not_pydantics_path(serve_main, capsys, monkeypatch, value,
                                                                              said):
    """pydantic names an item `models.0`, which is no setting: it was `invalid setting models.0: ...`."""
    monkeypatch.setenv("VITC_MODELS", value)
    assert serve_main([]) == 2
    assert _one_line(capsys) == SERVE_ERROR + "invalid setting --model (VITC_MODELS): " + said


def test_a_repeated_model_flag_names_the_item_it_refuses(serve_main, capsys):
    assert serve_main(["--model", "a", "--model", "n="]) == 2
    assert _one_line(capsys) == (SERVE_ERROR + "invalid setting --model (VITC_MODELS): item 2: the path is empty (it "
                                 "would be the current directory): give a bundle directory as PATH or NAME=PATH "
                                 "(got 'n=')")


def test_an_ipv6_zone_naming_no_interface_says_so(serve_main, capsys, monkeypatch):
    """fe80::1%nosuchif was told it was no address or host name, 'without a scheme, brackets or a port'."""
    monkeypatch.setenv("VITC_HOST", "fe80::1%nosuchif")
    assert serve_main(["--model", "m"]) == 2
    assert _one_line(capsys).startswith(SERVE_ERROR + "invalid setting --host (VITC_HOST): names the unknown interface "
                                        "'nosuchif' after '%' (the zone of an IPv6 address is an interface of this "
                                        "machine: lo")
    assert host_problem("fe80::1%lo") is None  # lo's zone is taken; the bind tells whether the address is there


def test_a_bind_refusal_brackets_an_ipv6_address():
    """`fe80::1%lo:0` read as an address whose last group is the port."""
    with pytest.raises(ServeError, match=r"^cannot listen on \[fe80::1%lo\]:0: "):
        bind_socket("fe80::1%lo", 0)


def test_the_whitespace_around_the_host_is_no_part_of_it(monkeypatch):
    """As around VITC_PORT: ' 127.0.0.1 ' was refused as no IP address or host name, without naming the spaces."""
    monkeypatch.setenv("VITC_HOST", " 127.0.0.1\n")
    assert Settings(models=["m"]).host == "127.0.0.1"
    assert Settings(models=["m"], host=" ::1 ").host == "::1"


@pytest.mark.parametrize(("name", "value", "said"), [
    ("VITC_HOST", "a" * 100_000, "must be an IP address or a host name"),
    ("VITC_PORT", "9" * 5000, "has too many digits (5,000)"),  # was "must be a whole number": int()'s 4,300 digits
    ("VITC_MAX_FILES", " 1" + "0" * 4999, "has too many digits (5,000)"),
])
def test_a_huge_value_is_refused_in_a_line_of_reasonable_length(serve_main, capsys, monkeypatch, name, value, said):
    monkeypatch.setenv(name, value)
    assert serve_main(["--model", "m"]) == 2
    line = _one_line(capsys)
    assert said in line and len(line) < 400, line
    assert line.endswith(f"... ({len(repr(value)):,} characters))")


def _without_settings(monkeypatch) -> None:  # noqa: ANN001 - pytest's monkeypatch
    for name in [n for n in os.environ if n.upper().startswith("VITC_")]:
        monkeypatch.delenv(name)


@pytest.mark.parametrize(("variable", "flag"), [("VITC_MODEL_DIR", "--model-dir"),
                                                ("VITC_MODEL_REPOSITORY", "--model-repository")])
def test_a_directory_refusal_names_the_setting_as_given(monkeypatch, tmp_path, variable, flag):
    """The image's VITC_MODEL_DIR=/models, not mounted, was refused as `--model-dir /models`, a flag nobody gave."""
    from serve.registry import model_sources

    _without_settings(monkeypatch)
    setting = variable.removeprefix("VITC_").lower()
    monkeypatch.setenv(variable, str(tmp_path / "absent"))
    with pytest.raises(ServeError, match=f"^{variable}={tmp_path}/absent is not a directory$"):
        model_sources(Settings())
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(variable, str(tmp_path / "empty"))
    with pytest.raises(ServeError, match=f"^no models to serve: {variable}={tmp_path}/empty holds no "):
        model_sources(Settings())
    monkeypatch.setenv(variable, "/x" * 1500)  # echoed in part
    with pytest.raises(ServeError, match=rf"^{variable}=(/x){{60}}\.\.\. \(3,000 characters\) is not a directory$"):
        model_sources(Settings())
    monkeypatch.delenv(variable)
    with pytest.raises(ServeError, match=f"^{flag} {tmp_path}/absent is not a directory$"):
        model_sources(Settings(**{setting: tmp_path / "absent"}))


def _files_limit(n: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


@pytest.mark.parametrize(("env", "argv", "said"), [
    ({"VITC_MODEL_DIR": "/nonexistent-models"}, [], "VITC_MODEL_DIR=/nonexistent-models is not a directory"),
    ({"VITC_MAX_CONNECTIONS": "1000000"}, ["--model", "m"], "VITC_MAX_CONNECTIONS=1000000 needs 1100032 open files, "
     "but the limit is 1256 (hard limit 1256): give 1113 or less, or raise the limit (ulimit -n)"),
])
def test_the_start_refusals_name_a_variable_as_the_user_set_it(env, argv, said):
    """What `docker run` of the image prints with nothing mounted at /models: the exit line is the point here."""
    import functools
    import subprocess
    import sys
    from pathlib import Path

    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("VITC_")}
    run = subprocess.run([sys.executable, "-m", "serve", "--port", "0", *argv], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], env={**clean, **env}, timeout=60,
                         preexec_fn=functools.partial(_files_limit, 1256))
    assert (run.returncode, run.stderr) == (2, f"{SERVE_ERROR}{said}\n")


@pytest.mark.parametrize("order", [("VITC_PORT", "vitc_port"), ("vitc_port", "VITC_PORT")])
def test_a_setting_is_read_by_its_upper_case_name_alone(serve_main, capsys, monkeypatch, order):
    """`vitc_port` was read as the port, and of two spellings the one later in the environment won: the image's
    HEALTHCHECK, which reads VITC_PORT, then probed a port nobody listened on."""
    from serve.settings import unknown_environment

    values = {"VITC_PORT": "8000", "vitc_port": "9000"}
    for name in order:
        monkeypatch.setenv(name, values[name])
    assert Settings(models=["m"]).port == 8000
    assert unknown_environment(dict(os.environ))[0] == ["vitc_port: did you mean VITC_PORT?"]
    assert serve_main(["--model", "m"]) == 2
    assert _one_line(capsys) == (SERVE_ERROR + "environment variable vitc_port: did you mean VITC_PORT? (every setting "
                                 "is VITC_<SETTING>; see --help)")


def test_a_lower_case_spelling_alone_is_no_setting_either(monkeypatch):
    from serve.settings import unknown_environment

    _without_settings(monkeypatch)
    monkeypatch.setenv("Vitc_Max_Files", "7")
    monkeypatch.setenv("vitc_model", "x")
    assert Settings(models=["m"]).max_files == 64
    assert unknown_environment(dict(os.environ)) == (
        ["Vitc_Max_Files: did you mean VITC_MAX_FILES?", "vitc_model: did you mean VITC_MODELS?"], [])


@pytest.mark.parametrize(("field", "given", "read"), [
    ("backend", "ONNXRUNTIME", "onnxruntime"), ("precision", "FP32", "fp32"),
    ("backend", " onnxruntime ", "onnxruntime"), ("precision", " fp32", "fp32"),
    ("model_control_mode", "Explicit", "explicit"),
])
def test_names_are_read_in_any_case_as_export_reads_them(tmp_path, monkeypatch, field, given, read):
    """`serve --precision FP32` and `--backend ONNXRUNTIME` were refused while export took
    `--precision FP32` and `--targets ONNX-FP32` (hFC 6); as a flag and as a VITC_* variable alike."""
    from serve.settings import Settings

    bundle = tmp_path / "b"
    bundle.mkdir()
    assert getattr(Settings(models=[str(bundle)], **{field: given}), field) == read
    monkeypatch.setenv(f"VITC_{field.upper()}", given)
    assert getattr(Settings(models=[str(bundle)]), field) == read
