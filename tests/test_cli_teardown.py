"""Every `models.cli.run` command keeps its outcome past its own end: a signal while Python tears down (torch's
atexit hooks and destructors take a second or more) does not change main's exit code into 143 without a word, or
into a traceback under exit 0; and a closed stdout or stderr (`>&-`, `2>&-`) does not turn finished work into exit 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}

# main finishes (its result written and said), then an atexit hook stands for torch's slow teardown.
TEARDOWN = textwrap.dedent("""
    import atexit, sys, time
    from models.cli import run

    def slow_teardown():
        time.sleep(0.5)  # main has returned by now (the thread below starts while it runs)
        print("tearing down", file=sys.stderr, flush=True)
        time.sleep(1.5)

    def main():
        atexit.register(slow_teardown)
        print("bundle written: out")
        return 0

    run(main, "probe")
""")


# The same, where Python's teardown first waits for a thread the command left running (before any atexit hook).
THREAD = TEARDOWN.replace("atexit.register(slow_teardown)",
                          "import threading; threading.Thread(target=slow_teardown, daemon=False).start()")


@pytest.mark.parametrize("script", [TEARDOWN, THREAD], ids=["atexit", "thread"])
def test_a_signal_during_teardown_ends_with_mains_code(script):
    for signum in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        err_line = proc.stderr.readline()
        assert err_line.strip() == "tearing down", err_line
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (signum, proc.returncode, err)
        assert out == "bundle written: out\n" and err == "", (out, err)


def test_a_closed_stdout_or_stderr_does_not_fail_finished_work(tmp_path):
    for closed in (1, 2):
        done = subprocess.run([sys.executable, "-m", "models", "list"], env=ENV, cwd=tmp_path, timeout=60,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if closed == 1 else subprocess.DEVNULL,
                              preexec_fn=lambda fd=closed: os.close(fd))
        assert done.returncode == 0, (closed, done.returncode, done.stderr)
