"""Which files an ONNX model takes tensor data from, and its IR version, read from its protobuf wire format without
the onnx package (the serving install has none): every file a runtime reads must be one the bundle's manifest lists."""

from __future__ import annotations

import os
from typing import Any

MAX_LOCATION_BYTES = 4096  # an external-data location longer than a manifest path could ever be is refused

# ONNX's wire format, as far as finding the tensors that keep their data in another file needs it (the serving
# install has no onnx package): message -> {field number: the message that field holds}. A tensor's external_data
# (13) entries are (key 1, value 2) strings; every other field is skipped unread.
_ONNX_MESSAGES: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},
}
MAX_ONNX_FIELDS = 1 << 22  # fields walked (weights are skipped, not walked): a real model has tens of thousands
_MAX_ONNX_DEPTH = 64  # subgraphs in subgraphs


def onnx_external_locations(path: str | os.PathLike) -> set[str]:
    """The external-data `location`s the ONNX model at `path` names; ValueError when it is not a protobuf message
    (truncated, or nested or sized beyond the bounds). Streams the file: tensor payloads are skipped, not read."""
    found: set[str] = set()
    with open(path, "rb") as f:
        _Wire(f).message("model", os.fstat(f.fileno()).st_size, 0, found)
    return found


def onnx_ir_version(path: str | os.PathLike) -> int | None:
    """ModelProto.ir_version: field 1, a varint, which ONNX writers serialise first; None when it is not there."""
    with open(path, "rb") as f:
        if f.read(1) != b"\x08":  # the tag of field 1 as a varint
            return None
        try:
            return _Wire(f).varint(10)
        except ValueError:  # truncated, or longer than a varint
            return None


class _Wire:
    """Protobuf fields read one at a time from a file, with the offset kept here (no tell() per field)."""

    def __init__(self, f: Any) -> None:
        self.f, self.pos, self.fields = f, 0, 0

    def varint(self, end: int) -> int:
        value = shift = 0
        while shift < 64:
            if self.pos >= end:
                raise ValueError("truncated")
            byte = self.f.read(1)
            if not byte:
                raise ValueError("truncated")
            self.pos += 1
            value |= (byte[0] & 0x7F) << shift
            if byte[0] < 0x80:
                return value
            shift += 7
        raise ValueError("a varint longer than 64 bits")

    def skip(self, n: int, end: int) -> None:
        if n > end - self.pos:
            raise ValueError("a field runs past its message")
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def message(self, kind: str, end: int, depth: int, found: set[str]) -> None:
        """Walk one message of `kind` up to offset `end`, adding the locations of its tensors to `found`."""
        if depth > _MAX_ONNX_DEPTH:
            raise ValueError(f"nested more than {_MAX_ONNX_DEPTH} deep")
        holds, entry = _ONNX_MESSAGES[kind], {}
        while self.pos < end:
            self.fields += 1
            if self.fields > MAX_ONNX_FIELDS:
                raise ValueError(f"more than {MAX_ONNX_FIELDS:,} fields")
            tag = self.varint(end)
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                self.varint(end)
            elif wire == 1:
                self.skip(8, end)
            elif wire == 5:
                self.skip(4, end)
            elif wire != 2:
                raise ValueError(f"wire type {wire}, which ONNX does not use")
            else:
                n = self.varint(end)
                if n > end - self.pos:
                    raise ValueError("a field runs past its message")
                if number in holds:
                    self.message(holds[number], self.pos + n, depth + 1, found)
                elif kind == "entry" and number in (1, 2) and n <= MAX_LOCATION_BYTES:
                    entry[number] = self.f.read(n)
                    self.pos += len(entry[number])
                    if len(entry[number]) != n:
                        raise ValueError("truncated")
                else:
                    self.skip(n, end)
        if kind == "entry" and entry.get(1) == b"location":
            if 2 not in entry:
                raise ValueError(f"an external-data location longer than {MAX_LOCATION_BYTES} bytes, or none")
            found.add(entry[2].decode("utf-8", "replace"))
