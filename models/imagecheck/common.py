"""What every format's structure check shares: the refusal (`DecodeError`, which `models.decoding` raises too) and
the bound on the header records several formats parse one by one."""

from __future__ import annotations

# JPEG marker segments / PNG chunks before the image data, entries of a TIFF directory, an AVIF's boxes a level
# (real files: a few dozen)
MAX_HEADER_SEGMENTS = 1024


class DecodeError(ValueError):
    """An image vitc does not decode: `reason` says why; `over_limit` when it has more pixels than allowed."""

    def __init__(self, reason: str, *, over_limit: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.over_limit = over_limit
