"""The version directories of a Triton model directory: the one rule the server reads by and export.triton writes by."""

from __future__ import annotations

import os
import re
from pathlib import Path

from models.tritonconfig import MAX_VERSION

# A version directory as Triton reads one: an int64 above 0 in ASCII digits, no leading zero (str.isdigit() would
# also take "²" or "٣"); other subdirectories are not versions and are ignored, as Triton ignores them.
VERSION_DIR = re.compile(r"[1-9][0-9]{0,18}")


def is_version_name(name: str) -> bool:
    """Whether `name` names a version directory: ASCII digits without a leading zero, 1..MAX_VERSION."""
    return VERSION_DIR.fullmatch(name) is not None and int(name) <= MAX_VERSION


def version_dirs(model_dir: str | os.PathLike) -> list[int]:
    """The versions of `model_dir`, lowest first ([] when it is not a directory); OSError when it cannot be listed."""
    path = Path(model_dir)
    if not path.is_dir():
        return []
    # A symbolic link to a directory counts: Triton lists the model directory and stat()s each entry, which follows
    # links (its LocalFileSystem::IsDirectory), so a linked version is one it loads. The server then serves what
    # Triton would, and export.triton never proposes a number Triton already reads as a version.
    return sorted(int(p.name) for p in path.iterdir() if is_version_name(p.name) and p.is_dir())
