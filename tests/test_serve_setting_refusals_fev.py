"""Start-up refusals of serve's settings (tester hEW): each is one line naming the setting as the user gave it, exit 2.
A deeply nested VITC_MODELS ended the start in a RecursionError traceback (exit 1)."""

from __future__ import annotations

import os

import pytest

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
