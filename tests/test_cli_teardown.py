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
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                # SIGHUP as a terminal's run has it, even where the tests run under nohup
                                preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
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


# main's result line is still in stdout's buffer when it returns (stdout is a pipe): run's final flush writes it, and
# the signal comes during that write, as it does when the reader is slow or reads the line and stops the command.
FLUSH = textwrap.dedent("""
    import os, sys
    from models.cli import run

    class SignalledWhileFlushed:
        def __init__(self, real):
            self.real, self.sent = real, False

        def write(self, text):
            return self.real.write(text)

        def flush(self):
            if not self.sent:
                self.sent = True
                os.kill(os.getpid(), SIGNUM)  # delivered before kill returns; Python's handler runs right after
            self.real.flush()

    def main():
        sys.stdout = SignalledWhileFlushed(sys.stdout)
        print("bundle written: out")
        return 0

    run(main, "probe")
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_the_result_is_flushed_ends_with_mains_code(signum):
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # main's print stays in the buffer
    done = subprocess.run([sys.executable, "-c", FLUSH.replace("SIGNUM", str(int(signum)))], env=env,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "bundle written: out\n", "")


def test_an_in_process_caller_keeps_its_signal_handling(monkeypatch):
    from models import cli

    class InterruptedFlush:  # the caller's own Ctrl-C, during the flush after main returned
        def write(self, text):
            return len(text)

        def flush(self):
            raise KeyboardInterrupt

    sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(sys, "stdout", InterruptedFlush())
    try:
        with pytest.raises(SystemExit) as done:
            cli.run(lambda: 3, "probe")
        assert done.value.code == 3  # the outcome was known: main's code, not 130
        assert signal.getsignal(signal.SIGINT) is sigint  # not ignored: the caller goes on
    finally:
        signal.signal(signal.SIGTERM, sigterm)
