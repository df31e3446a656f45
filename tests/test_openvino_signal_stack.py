"""A signal after OpenVINO work ends the command cleanly: every OpenVINO use shares one Core, whose CPU plugin
leaves the thread on a live alternate signal stack (separate Cores released out of order left it on freed memory,
and `latency.py` stopped by Ctrl-C or SIGTERM while exporting died of SIGSEGV, exit 139)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The matmul limit and the CPU description (as latency.py does first), then SIGTERM handled by models.cli.run.
SCRIPT = textwrap.dedent("""
    import gc, os, signal, time
    from models.cli import run

    def main():
        from benchmarks import machine
        for _ in range(2):
            machine.cpu_matmul_limits(1, 0.02, sizes=(64,))
        machine._cpu_info()
        gc.collect()
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(50):
            time.sleep(0.01)
        return 0

    run(main, "probe")
""")


def test_sigterm_after_the_matmul_limit_ends_with_143_and_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 143, (done.returncode, done.stderr[-2000:])
    assert done.stderr.strip().splitlines()[-1] == "probe: terminated", done.stderr[-2000:]

