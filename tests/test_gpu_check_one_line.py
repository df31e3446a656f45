"""gpu_check reads a step's one line through the shared helpers (models.cli.last_line for the line a step ended
with, models.oneline.first_line for a reason), not a copy of its own: a step's error reason, its JSON facts line
and a failed check's reason."""

from __future__ import annotations

import ast
from pathlib import Path

from benchmarks import gpu_check
from benchmarks.gpu_check import REASON_CHARS, Finished, fail, step_result

SOURCE = Path(gpu_check.__file__).read_text()


def test_gpu_check_has_no_one_line_helper_of_its_own():
    assert not hasattr(gpu_check, "_one_line") and not hasattr(gpu_check, "_last_line")
    calls = [n for n in ast.walk(ast.parse(SOURCE)) if isinstance(n, ast.Attribute) and n.attr == "splitlines"]
    assert not calls, [n.lineno for n in calls]  # no inline copy either


def test_a_failed_steps_reason_is_the_last_line_it_said():
    bad = step_result("s", ["x"], 50, Finished(2, False, 1.0, "progress\n", "Traceback\n  ...\nerror: no disk  \n\n"))
    assert bad["reason"] == "exit 2: error: no disk"
    quiet = step_result("s", ["x"], 50, Finished(2, False, 1.0, "epoch 1\nstopped\n", " \n"))
    assert quiet["reason"] == "exit 2: stopped"  # stderr blank: stdout's last line
    silent = step_result("s", ["x"], 50, Finished(2, False, 1.0, "", ""))
    assert silent["reason"] == "exit 2: no output" and silent["last_line"] == ""
    long = step_result("s", ["x"], 50, Finished(1, False, 1.0, "", "x" * 5000))
    assert long["reason"] == "exit 1: " + "x" * REASON_CHARS


def test_a_failed_checks_reason_is_the_first_line_without_a_source_location():
    step = step_result("s", ["x"], 50, Finished(0, False, 1.0, '{"a": 1}\n', ""))
    assert step["last_line"] == '{"a": 1}'
    fail(step, "Exception from src/inference/src/core.cpp:117:\nfp16: max abs diff 0.3 over 0.05\n")
    assert (step["status"], step["reason"], step["rc"]) == ("failed", "fp16: max abs diff 0.3 over 0.05", 1)
