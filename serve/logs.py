"""Structured logs: one JSON object per line on stderr, for the access log and the server's own messages."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings

# Attributes every LogRecord has; anything else was passed with `extra=` and belongs in the JSON.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "color_message"}
# One line stays well under what log shippers take whole (Docker's json-file driver splits lines at 16 KiB): the
# fields a client controls are bounded where they are logged; this is the last guard, for text that reaches a log
# some other way (an exception's message).
MAX_LINE = 8192
MAX_FIELD = 2048  # characters of a string field of an over-long line: its start and its end are kept
_INVALID_REQUEST = "Invalid HTTP request received."  # uvicorn's warning, without client, status or reason


def _cut(text: str, limit: int) -> str:
    """`text`, or its start and end around a note of how much was cut."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}...[{len(text) - 2 * half} characters cut]...{text[-half:]}"


_DRAIN_CUT = "Cancel %s running task(s), timeout graceful shutdown exceeded"  # uvicorn's, at error level


class _UvicornLines(logging.Filter):
    """uvicorn's warning for each request its parser refuses says less than the "refused" line serve.httpproto
    logs for it (status, reason, client), and at warning level would let any client flood an operator's warnings:
    dropped. Its error when --graceful-timeout-s cuts requests short is the drain's documented end (each is answered
    503, serve.middleware), not a fault to page anyone for: a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _DRAIN_CUT:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return record.msg != _INVALID_REQUEST


_UVICORN_LINES = _UvicornLines()
# python-multipart's loggers (python_multipart.multipart; `multipart.*` in its releases before 0.0.13).
_FORM_PARSER = ("python_multipart", "multipart")


class _FormParserToDebug(logging.Filter):
    """python-multipart logs what is wrong with a client's form (a bad boundary, a bad header) as a warning, once
    per request: the 400 already says it, and at warning level any client could write to an operator's log at
    will. Its lines are debug lines, shown only at --log-level debug."""

    def __init__(self) -> None:
        super().__init__()
        self.shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] not in _FORM_PARSER:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.shown


_FORM_PARSER_TO_DEBUG = _FormParserToDebug()


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", **extra} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        line = json.dumps(entry, default=str)
        if len(line) > MAX_LINE:
            line = json.dumps({k: _cut(v, MAX_FIELD) if isinstance(v, str) else v for k, v in entry.items()},
                              default=str)
        return line


def configure_logging(level: str = "info") -> None:
    """Route our loggers and uvicorn's through one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    # On the handler, which every logger's records reach: a logger's own filter would miss its children's records.
    _FORM_PARSER_TO_DEBUG.shown = level.lower() == "debug"
    handler.addFilter(_FORM_PARSER_TO_DEBUG)
    for name in ("vitc", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    # Everything else (libraries such as python-multipart, and Python warnings) reaches the root logger: JSON too,
    # so no line on stderr breaks a log shipper's parsing.
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    logging.captureWarnings(True)
    # Pillow's warnings about a client's image ("Corrupt EXIF data", ...) say what the answer already says, once per
    # request: a client must not be able to flood the server's log with them.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    # uvicorn's own access log is replaced by ours (which knows the model and the request id).
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("uvicorn.error").addFilter(_UVICORN_LINES)
