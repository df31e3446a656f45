"""`python -m serve --help` takes every default and bound it states from serve.settings.Settings: they used to be
written into the help by hand ("default 32", "default 1,000", "at most 1 GiB"), free to drift from the settings."""

from __future__ import annotations

import argparse
import re

import pytest
from annotated_types import Le

from serve.__main__ import build_parser
from serve.server import DEFAULT_CONNECTIONS
from serve.settings import Settings

# Flags that shape the command itself, not the server: no Settings field behind them. Every other flag's dest is a
# Settings field (Settings(**args) refuses anything else), and its help takes the default and bounds from it.
CLI_ONLY = frozenset({"help"})
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
NUMBER = r"\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?"
VALUE = rf"(?:{NUMBER})(?: (?:{'|'.join(UNITS)}))?(?=[,;) ])"


def number(text: str) -> float:
    """A number as the help writes it ("16 MiB", "1,000", "2") as a plain number."""
    digits, _, unit = text.partition(" ")
    return float(digits.replace(",", "")) * UNITS.get(unit, 1)


def flags() -> list[argparse.Action]:
    return [a for a in build_parser()._actions if a.option_strings]


def effective_default(dest: str) -> object:
    """What the server runs with when the setting is not given (a None default is decided from other settings)."""
    computed = {"max_buffered_bytes": Settings.model_construct().buffered_bytes_limit,
                "max_connections": DEFAULT_CONNECTIONS}
    field = Settings.model_fields[dest]
    value = field.get_default(call_default_factory=True)
    return computed.get(dest, value) if value is None else value


def bounds(dest: str) -> dict[str, float]:
    return {k: getattr(m, k) for m in Settings.model_fields[dest].metadata for k in ("ge", "gt", "le", "lt")
            if hasattr(m, k)}


@pytest.mark.parametrize("action", flags(), ids=lambda a: a.option_strings[-1])
def test_every_flag_is_a_setting_and_its_help_states_the_settings_default(action):
    if action.dest in CLI_ONLY:
        return
    assert action.dest in Settings.model_fields, f"{action.option_strings}: no Settings field {action.dest!r}"
    text = " ".join(str(action.help).split())
    default = effective_default(action.dest)
    if m := re.search(rf"\(default ({VALUE})", text):  # (default 32, ...)
        assert isinstance(default, int | float) and not isinstance(default, bool), text
        assert number(m[1]) == default, (text, default)
    elif m := re.search(r"\(default (\S+?)\)", text):  # (default onnxruntime)
        assert m[1] == default, (text, default)
    elif default in (None, []):  # (default: on CUDA) in words, decided at start; or nothing (no model, no key)
        pass
    elif m := re.search(r"(\S+) \(default[:)]", text):  # cpu (default) | cuda ..., measured (default: only ...)
        assert m[1] == default, (text, default)
        annotation = Settings.model_fields[action.dest].annotation
        if literal := getattr(annotation, "__args__", None):  # every value of the setting is offered, no other
            offered = re.findall(rf"(?:^|: |\| |, )({'|'.join(map(re.escape, literal))})\b", text)
            assert sorted(set(offered)) == sorted(literal), (text, literal)
    else:  # no default named: a switch away from it (--compile, --no-access-log)
        assert action.nargs == 0 and action.const != default, (text, default)
    limits = bounds(action.dest)
    if m := re.search(rf"\bat most ({VALUE})", text):
        assert number(m[1]) == limits["le"], (text, limits)
    if m := re.search(rf", ({VALUE}) to ({VALUE})\)", text):
        assert (number(m[1]), number(m[2])) == (limits["ge"], limits["le"]), (text, limits)


def test_the_help_follows_a_changed_default_and_bound(monkeypatch):
    """Changing a default or a bound in Settings is enough: the help says the new one."""
    fields = Settings.model_fields
    monkeypatch.setattr(fields["max_batch_size"], "default", 48)
    monkeypatch.setattr(fields["keep_alive_s"], "default", 75.0)
    monkeypatch.setattr(fields["host"], "default", "0.0.0.0")
    monkeypatch.setattr(fields["log_level"], "default", "warning")
    monkeypatch.setattr(fields["jpeg_draft"], "default", "never")
    metadata = [Le(2 << 30) if isinstance(m, Le) else m for m in fields["max_body_bytes"].metadata]
    monkeypatch.setattr(fields["max_body_bytes"], "metadata", metadata)
    text = {a.option_strings[0]: " ".join(str(a.help).split()) for a in flags()}
    assert "(default 48, capped by the bundle)" in text["--max-batch-size"]
    assert "(default 75, 1 to 3600)" in text["--keep-alive-s"]
    assert text["--host"] == "bind address (default 0.0.0.0)"
    assert text["--log-level"] == "debug | info | warning (default) | error"
    assert "measured (only for models whose" in text["--jpeg-draft"]
    assert text["--jpeg-draft"].endswith(", always, never (default)")
    assert text["--max-body-bytes"] == "request body limit (default 16 MiB, at most 2 GiB)"


def test_the_help_reads_as_before():
    """Derived, the help still says what it said by hand (the numbers grouped, the sizes in MiB and GiB)."""
    text = " ".join(" ".join(str(a.help).split()) for a in flags())
    for said in ("onnxruntime | openvino | tensorrt | torch (default onnxruntime)", "cpu (default) | cuda | cuda:N",
                 "(default 8000; 0 picks a free one)", "(default 256 MiB, at least --max-body-bytes, at most 16 GiB)",
                 "(default 1,000, fewer if the open-file limit, ulimit -n, is lower)",
                 "(default 40,000,000, at most 1,000,000,000)", "(default 15, 1 to 3600)",
                 "(default 100,000,000 or --max-image-pixels if larger, at least --max-image-pixels, at most "
                 "10,000,000,000)",
                 "(default 0, at most 300; Kubernetes: 5)", "throughput (default: several batches in flight",
                 "| latency (one batch at a time on every CPU)", "debug | info (default) | warning | error",
                 "measured (default: only for models whose served-path record"):
        assert said in text, said
