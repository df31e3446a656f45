"""The version directories of a Triton model directory: the one rule the server reads by and export.triton writes by."""

from __future__ import annotations

import os
import re
from pathlib import Path

from models.tritonconfig import MAX_VERSION

# A version directory as Triton reads one: an int64 above 0 in ASCII digits, no leading zero (str.isdigit() would
# also take "²" or "٣"); a subdirectory Triton skips is not a version and is ignored, as Triton ignores it.
VERSION_DIR = re.compile(r"[1-9][0-9]{0,18}")
# What Triton reads of any other subdirectory's name (model_lifecycle.cc, VersionsToLoad): a name of two or more
# characters starting with "0" is skipped; any other goes through std::stoll, which skips leading white space, takes a
# sign and the leading digits and ignores the rest, and only a name it cannot read at all is skipped. So "5.bak" is
# version 5 to Triton, whose backend then opens "5/".
_STOLL = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)")
MIN_INT64 = -(2**63)


def is_version_name(name: str) -> bool:
    """Whether `name` names a version directory: ASCII digits without a leading zero, 1..MAX_VERSION."""
    return VERSION_DIR.fullmatch(name) is not None and int(name) <= MAX_VERSION


def triton_reads(name: str) -> int | None:
    """The version Triton reads the subdirectory `name` as; None where it skips the name, or where its number is
    beyond int64 (std::stoll throws out_of_range, which Triton does not catch: no version here, as before)."""
    if len(name) > 1 and name.startswith("0"):
        return None
    m = _STOLL.match(name)
    if m is None:
        return None
    version = int(m[1])
    return version if MIN_INT64 <= version <= MAX_VERSION else None


def misread_versions(model_dir: str | os.PathLike) -> dict[str, int]:
    """The subdirectories of `model_dir` Triton reads as a version whose own directory does not exist ("5.bak" and
    no "5/"), name -> version; {} when it is not a directory. OSError when it cannot be listed."""
    path = Path(model_dir)
    if not path.is_dir():
        return {}
    read = {p.name: v for p in path.iterdir() if (v := triton_reads(p.name)) is not None and p.is_dir()}
    # "1.bak" beside "1/" is harmless: Triton counts version 1 once and opens "1/", the directory vitc serves too.
    return {name: v for name, v in read.items() if name != str(v) and str(v) not in read}


def misread_reason(name: str, version: int) -> str:
    """Why a model whose loaded version `version` Triton reads from the directory `name` cannot load there."""
    return (f"version directory {name!r} is read by Triton as version {version} (it parses the leading digits), and "
            f"'{version}/' does not exist: rename or remove it")


def version_dirs(model_dir: str | os.PathLike) -> list[int]:
    """The versions of `model_dir`, lowest first ([] when it is not a directory); OSError when it cannot be listed."""
    path = Path(model_dir)
    if not path.is_dir():
        return []
    # A symbolic link to a directory counts: Triton lists the model directory and stat()s each entry, which follows
    # links (its LocalFileSystem::IsDirectory), so a linked version is one it loads. The server then serves what
    # Triton would, and export.triton never proposes a number Triton already reads as a version.
    return sorted(int(p.name) for p in path.iterdir() if is_version_name(p.name) and p.is_dir())
