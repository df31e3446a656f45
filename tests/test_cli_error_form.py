"""Every command says bad input the same way: exactly one line on stderr, `{prog}: error: {reason}`, exit 2, where
prog is the documented name its parser uses. Some wrote `error: ...` without the name (serve, export, export.report,
export.triton, benchmarks/latency.py), and latency and train.sweep said a Ctrl-C without it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from models import cli


def _sweep_study(tmp: Path) -> list[str]:
    return ["--preset", "reduced", "--dataset", str(tmp / "missing"), "--out", str(tmp / "study"), "--dry-run"]


# (module, its main's arguments given a temporary directory, keyword arguments, the program's name). One bad input
# each, refused before any work (no training, no model loaded): the errors main raises as InputError where it can.
CASES = [
    ("models.__main__", lambda tmp: ["nope"], {}, "python -m models"),
    ("serve.__main__", lambda tmp: ["--api-key", " "], {}, "python -m serve"),
    ("serve.sample", lambda tmp: ["--out", str(tmp / "x.txt")], {}, "python -m serve.sample"),
    ("serve.tensor", lambda tmp: ["--bundle", str(tmp / "missing"), str(tmp / "img.png"), "--out",
                                  str(tmp / "x.npy")], {}, "python -m serve.tensor"),
    ("export.cli", lambda tmp: ["--checkpoint", str(tmp), "--out", str(tmp / "b"), "--targets", "bogus"], {},
     "python -m export"),
    ("export.cli", lambda tmp: ["--checkpoint", str(tmp), "--out", str(tmp / ("b" * 300)), "--precision", "fp32"],
     {"family": "onnx"}, "python -m export.onnx"),
    ("export.report", lambda tmp: [str(tmp / "missing")], {}, "python -m export.report"),
    ("export.triton", lambda tmp: [str(tmp / "missing"), "--out", str(tmp / "repo")], {}, "python -m export.triton"),
    ("train.__main__", lambda tmp: ["--model", "vit_c_micro", "--dataset", "animals", "--out", " "], {},
     "python -m train"),
    ("train.eval", lambda tmp: ["--checkpoint", str(tmp / "missing"), "--out", str(tmp)], {}, "python -m train.eval"),
    ("train.sweep.__main__", _sweep_study, {}, "python -m train.sweep"),
    ("train.sweep.runtime", lambda tmp: ["--models", "vit_c_nano,vit_c_micro"], {}, "python -m train.sweep.runtime"),
    ("benchmarks.latency", lambda tmp: ["--quick", "--out", str(tmp / "file")], {}, "python benchmarks/latency.py"),
    ("benchmarks.overhead", lambda tmp: ["--bundle", str(tmp / "missing"), "--out", str(tmp)], {},
     "python -m benchmarks.overhead"),
    ("benchmarks.naive_server", lambda tmp: [str(tmp / "missing"), "--port", "1"], {},
     "python -m benchmarks.naive_server"),
    ("benchmarks.gpu_check", lambda tmp: ["--device", "cpu", "--out", str(tmp)], {}, "python -m benchmarks.gpu_check"),
    ("benchmarks.load", lambda tmp: ["--port", "9000", "--out", str(tmp / "x.json")], {}, "python -m benchmarks.load"),
]


@pytest.mark.parametrize(("module", "argv", "kwargs", "prog"), CASES, ids=[c[3] for c in CASES])
def test_bad_input_is_one_line_naming_the_program_and_exit_2(module, argv, kwargs, prog, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    main = importlib.import_module(module).main
    try:
        code = main(argv(tmp_path), **kwargs)
    except SystemExit as exc:  # the parser's own errors (OneLineParser): the same line, the same code
        code = exc.code
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and captured.err.endswith("\n"), captured.err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert captured.out == ""


@pytest.mark.parametrize(("error", "code"), [(cli.InputError("bad --x"), 2), (cli.WorkFailed("disk full"), 1)])
def test_run_and_command_say_an_error_once_with_its_code(error, code, capsys):
    def main() -> int:
        raise error

    assert cli.command("prog")(main)() == code
    assert capsys.readouterr().err == f"prog: error: {error}\n"
    with pytest.raises(SystemExit) as done:
        cli.run(main, "prog")
    assert done.value.code == code and capsys.readouterr().err == f"prog: error: {error}\n"


def test_an_error_line_cannot_be_split_by_what_it_quotes(capsys):
    """A path given with a newline (or an escape sequence) stays on the one line, escaped."""
    assert cli.report("prog", cli.InputError("--out a\nb\x1b[2J: no such file")) == 2
    assert capsys.readouterr().err == "prog: error: --out a\\nb\\x1b[2J: no such file\n"


@pytest.mark.parametrize(("stop", "code", "word"), [(KeyboardInterrupt, 130, "interrupted"),
                                                    (cli.Terminated, 143, "terminated")])
def test_a_stop_is_said_with_the_program_name_and_what_main_noted(stop, code, word, capsys):
    """benchmarks/latency.py said a bare "interrupted", train.sweep one without the program's name: cli.run says both,
    with the note main adds (the sweep: its finished runs are kept)."""
    def main() -> int:
        try:
            raise stop
        except KeyboardInterrupt as exc:
            exc.add_note("finished runs are kept; rerun the same command to resume")
            raise

    with pytest.raises(SystemExit) as done:
        cli.run(main, "python -m train.sweep")
    assert done.value.code == code
    assert capsys.readouterr().err == (f"python -m train.sweep: {word}: finished runs are kept; rerun the same "
                                       "command to resume\n")


def test_last_line_of_an_empty_message_is_its_type():
    """`str(exc).strip().splitlines()[-1]` raised IndexError for an exception without a message."""
    assert cli.last_line(ValueError("")) == "ValueError"
    assert cli.last_line(ValueError("Traceback ...\n  File x\nDatasetError: bad file\n\n")) == "DatasetError: bad file"


def test_refuse_empty_paths_names_the_first_empty_flag(capsys):
    parser = cli.OneLineParser(prog="prog")
    cli.refuse_empty_paths(parser, [("--a", "x", "give a"), ("--b", None, "give b")])  # none empty: nothing said
    with pytest.raises(SystemExit) as done:
        cli.refuse_empty_paths(parser, [("--a", "x", "give a"), ("--b", " ", "give b"), ("--c", "", "give c")])
    assert done.value.code == 2 and capsys.readouterr().err == "prog: error: --b is empty: give b\n"


@pytest.mark.parametrize(("argv", "says"), [
    (["--bogus", "bad\narg"], r"unrecognized arguments: --bogus bad\narg"),  # argparse lists them raw
    (["--port", "9" * 5000], "invalid int value"),
])
def test_an_argument_error_is_one_bounded_line(capsys, argv, says):
    """argparse's own refusals (an unrecognized argument with a newline, a 5,000-digit value it quotes) are one line
    of a bounded length: the newline forged a second line, and the value was echoed whole."""
    parser = cli.OneLineParser(prog="python -m x")
    parser.add_argument("--port", type=int)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m x: error: ") and says in err, err
    assert len(err) < cli.MAX_ERROR_CHARS + 100, len(err)
