"""A chunked request body's framing, followed ahead of the parser, which tells no chunk's size (serve.httpproto).

ChunkSizes is a pure parser: fed the bytes as they are read, it tells the sizes the chunk-size lines announced so
far, the bytes of framing (those lines, extensions included, a line counted once it ends, and the CRLF after each
chunk's data), and how far the body's chunks go in the bytes read (the parser is then given them in one piece,
whatever the chunk data holds). The parser checks the framing; once it refuses, nothing here is asked any more.
Chunk data is skipped, not searched, and a size line costs one match of _SIZE_LINE; a run of chunks of 1 to 15 bytes
costs two matches of the regex engine in all (_SMALL_RUN), however many it holds.
"""

from __future__ import annotations

import re

_HEX_DIGITS = b"0123456789abcdefABCDEF"
# A chunked body's size lines, as ChunkSizes walks them. A whole line, to its LF: its hex digits (leading zeros
# dropped; 17 tell 2^64 or more), then the rest (extensions) unread. Possessive: a long line fails in one pass.
_SIZE_LINE = re.compile(rb"0*+([0-9a-fA-F]{0,17}+)[^\n]*+\n")
# Chunks of 1 to 15 bytes (one hex digit after any zeros, extensions or not), whole with their data and its CRLF: a
# run of them is taken in one match, and its sizes are summed from their digits, whatever the data holds. The parser
# takes no CR or LF inside a size line and insists on the CRLF after the data, so a body it takes is walked in step.
_SMALL_CHUNK = b"0*+(?:" + b"|".join(b"%c(?:;[^\r\n]*+)?\r\n.{%d}\r\n" % (c, int(chr(c), 16))
                                   for c in b"123456789abcdefABCDEF") + b")"
_SMALL_RUN = re.compile(b"(?:" + _SMALL_CHUNK + b")*+", re.DOTALL)
_SMALL_SIZES = re.compile(b"(?=0*+([1-9a-fA-F]))" + _SMALL_CHUNK, re.DOTALL)
_HEX_VALUES = bytes.maketrans(b"123456789abcdefABCDEF", bytes(range(1, 16)) + bytes(range(10, 16)))


class ChunkSizes:
    """Follows one chunked body's framing as read: the sizes announced, the framing's bytes, where chunks end."""

    def __init__(self) -> None:
        self.announced = 0
        self.framing = 0
        self.last = False  # whether the last chunk's size line has ended (the trailers, if any, come next)
        self._left = 0  # bytes still to come of a chunk's data and the CRLF after it
        self._begun = False  # whether the size line being read began in bytes fed earlier
        # Its bytes so far: they count in `framing` once it ends (serve.httpproto.MAX_CHUNK_LINE bounds the line).
        self._partial = 0
        self._digits = b""  # that line's hex digits so far, leading zeros dropped (17 tell 2^64 or more)
        self._in_digits = True  # whether that line is still in its digits (not in its extensions)

    def feed(self, data: bytes, at: int = 0) -> tuple[int, bool]:
        """Follow the body's next bytes, `data` from `at`, up to the end of its last chunk's size line (its trailers,
        and what follows the body, are not followed): where that stopped, and whether a chunk-size line ended."""
        announced, end = False, len(data)
        if self._left:  # the rest of a chunk's data, and its CRLF
            step = min(self._left, end - at)
            at, self._left = at + step, self._left - step
        while at < end and not self.last:
            if not self._begun:
                run = _SMALL_RUN.match(data, at).end()  # whole small chunks, each with its CRLF
                if run > at:
                    sizes = sum(b"".join(_SMALL_SIZES.findall(data, at, run)).translate(_HEX_VALUES))
                    self.announced, self.framing = self.announced + sizes, self.framing + run - at - sizes
                    at, announced = run, True
                    if at == end:
                        break
                line = _SIZE_LINE.match(data, at)  # a whole size line: its digits, leading zeros dropped
                if line is not None:
                    stop, announced = line.end(), True
                    self.framing += stop - at
                    at = self._sized(int(line[1] or b"0", 16), stop, end)
                    continue
            # A size line that began in an earlier read, or does not end in this one: its digits are gathered.
            lf = data.find(b"\n", at)
            stop = end if lf < 0 else lf + 1
            if self._in_digits:
                digits = data[at:stop].lstrip(b"0") if not self._digits else data[at:stop]
                run = digits[:len(digits) - len(digits.lstrip(_HEX_DIGITS))]
                self._digits = (self._digits + run)[:17]
                self._in_digits = len(run) == len(digits)
            self._partial += stop - at
            at, self._begun = stop, lf < 0
            if lf >= 0:
                size, self._digits, self._in_digits, announced = int(self._digits or b"0", 16), b"", True, True
                self.framing, self._partial = self.framing + self._partial, 0
                at = self._sized(size, at, end)
        return at, announced

    def _sized(self, size: int, at: int, end: int) -> int:
        """A size line ended at `at`, announcing `size` bytes: they come next with their CRLF, skipped as far as
        `end` goes (where the walk goes on is returned), or (0) the trailers do."""
        self.announced += size
        if not size:
            self.last = True
            return at
        self.framing += 2
        at += size + 2
        if at > end:
            self._left, at = at - end, end
        return at

    @property
    def in_line(self) -> bool:
        """Whether the bytes walked so far end inside a line of the framing: a size line, or the trailers."""
        return self._begun or self.last
