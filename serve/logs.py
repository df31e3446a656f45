"""Structured logs: one JSON object per line on stderr, for the access log and the server's own messages."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings

# Attributes every LogRecord has; anything else was passed with `extra=` and belongs in the JSON.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "color_message"}


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
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info") -> None:
    """Route our loggers and uvicorn's through one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
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
