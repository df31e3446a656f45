"""An exception, or free text, as one readable line: what every CLI error, HTTP reason and log field shows of it."""

from __future__ import annotations

import re

# OpenVINO's messages start with where in its sources they were raised ("Exception from src/.../core.cpp:117:"),
# and the reason follows on the next lines.
_SOURCE_LOCATION = re.compile(r"^(Exception from \S+:\d+:?|Check '.*' failed at \S+:\d+:?)$")


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of `exc`'s message that is not a source location (at most `limit` characters): its type when
    it has no message."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    reason = next((ln for ln in lines if not _SOURCE_LOCATION.match(ln)), lines[0] if lines else "")
    return (reason or type(exc).__name__)[:limit]


def one_line(text: str) -> str:
    """`text` with its unprintable characters escaped as repr escapes them: a path or name given with a newline (or
    an escape sequence) stays on the error's one line and cannot forge another, and a path's undecodable bytes (lone
    surrogates, which UTF-8 cannot encode) show as \\udcff in a JSON answer or a log line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
