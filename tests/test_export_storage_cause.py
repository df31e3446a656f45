"""What stops an export (exit 1, the previous bundle kept) and what refuses one artifact: the storage failing (a full
disk, quota or file-size limit, an I/O error, a file system gone read-only, a stale NFS handle), however deep a
converter wraps it, is the machine's; any other OSError of a runtime (a shared library it cannot load, a file its
build did not write) is that runtime's own."""

from __future__ import annotations

import errno

import pytest

from export.bundle import _storage_cause


def _wrapped(inner: BaseException) -> RuntimeError:
    try:
        try:
            raise inner
        except OSError as exc:
            raise ValueError("converter failed") from exc
    except ValueError as exc:
        try:
            raise RuntimeError("runtime failed") from exc
        except RuntimeError as outer:
            return outer


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.ESTALE])
def test_the_storage_failing_stops_the_export(code):
    cause = OSError(code, "storage")
    assert _storage_cause(_wrapped(cause)) is cause


@pytest.mark.parametrize("inner", [OSError("libmyaccel.so.3: cannot open shared object file"),
                                   FileNotFoundError(errno.ENOENT, "No such file", "missing.onnx"),
                                   PermissionError(errno.EACCES, "Permission denied")])
def test_a_runtimes_own_oserror_refuses_its_artifact_only(inner):
    assert _storage_cause(_wrapped(inner)) is None
