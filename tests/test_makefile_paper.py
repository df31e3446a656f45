"""The paper targets: the committed study resumes in place, and an output directory of one's own retrains it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize(("target", "var", "default"), [("paper-quick", "PAPER_QUICK_OUT", "results/paper-reduced"),
                                                        ("paper", "PAPER_OUT", "results/paper-full")])
def test_paper_targets_write_where_they_are_told(target, var, default):
    def planned(*extra: str) -> str:
        out = subprocess.run(["make", "-n", "-C", str(ROOT), target, *extra], capture_output=True, text=True,
                             check=True).stdout
        return next(line for line in out.splitlines() if "-m train.sweep" in line)

    assert f"--out {default} " in planned()
    assert "--out results/rerun " in planned(f"{var}=results/rerun")
