"""runtimes.build.io_or_memory_cause: the disk or memory error behind a converter's own exception (it returns the
cause; models.cli.machine_failure is the one that prints and gives an exit code). And what stops an export (the
storage failing, however deep a runtime wraps it) versus what refuses one artifact (a runtime's own OSError)."""

from __future__ import annotations

import errno

import pytest

from models.failures import storage_failure
from runtimes.build import cause_in_chain, io_or_memory_cause


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


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.ESTALE])
def test_the_storage_failing_stops_the_export(code):
    cause = OSError(code, "storage")
    assert cause_in_chain(_wrapped(_wrapped(cause)), storage_failure) is cause


@pytest.mark.parametrize("inner", [OSError("libmyaccel.so.3: cannot open shared object file"),
                                   FileNotFoundError(errno.ENOENT, "No such file", "missing.onnx"),
                                   PermissionError(errno.EACCES, "Permission denied")])
def test_a_runtimes_own_oserror_refuses_its_artifact_only(inner):
    assert cause_in_chain(_wrapped(_wrapped(inner)), storage_failure) is None
