"""Runs the property-based fuzz suite (tests/fuzz_serving.py) in a child process with its address space capped:
a parser or decoder that allocates without bound fails the run instead of exhausting the machine."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEMORY_CAP = 3 << 30  # bytes of address space for the whole fuzzing process


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def test_fuzz_suite_passes_under_a_memory_cap():
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(REPO / "tests" / "fuzz_serving.py")],
        cwd=REPO, capture_output=True, text=True, timeout=600, preexec_fn=_cap_memory, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
