"""runtimes.build.io_or_memory_cause: the disk or memory error behind a converter's own exception (it returns the
cause; models.cli.machine_failure is the one that prints and gives an exit code)."""

from __future__ import annotations

import errno

from runtimes.build import io_or_memory_cause


def _wrapped(cause: BaseException) -> RuntimeError:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise RuntimeError("converter failed") from inner
    except RuntimeError as outer:
        return outer


def test_the_cause_is_found_behind_a_wrapper():
    full = OSError(errno.ENOSPC, "No space left on device")
    assert io_or_memory_cause(_wrapped(full)) is full
    memory = MemoryError()
    assert io_or_memory_cause(_wrapped(memory)) is memory
    assert io_or_memory_cause(full) is full


def test_no_cause_is_none_and_a_cycle_ends():
    assert io_or_memory_cause(_wrapped(ValueError("bad graph"))) is None
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert io_or_memory_cause(a) is None
