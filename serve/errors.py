"""The service's exceptions: startup failures (one line, exit 2) and HTTP errors (a JSON body with a reason).

Import-light on purpose: the CLI refuses bad arguments before FastAPI or any runtime is imported.
"""

from __future__ import annotations


class ServeError(RuntimeError):
    """The service cannot start (bad model path, tampered bundle, backend missing, port taken)."""


class APIError(Exception):
    """An HTTP error answered as {"error": reason}, with optional headers (Retry-After, WWW-Authenticate)."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


class ClientGone(Exception):
    """The client disconnected while its request waited; its work was dropped and nothing is answered."""
