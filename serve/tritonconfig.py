"""The batching fields of a Triton `config.pbtxt` (protobuf text format), read when vitc serves a Triton-style
repository, so that editing a model's configuration changes how vitc batches it, as it would in Triton.

Only what vitc can honour is read: the top-level `max_batch_size` and `dynamic_batching.max_queue_delay_microseconds`.
The file is bounded and scanned token by token (strings, comments and nesting understood), never executed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from models.bundle import TRITON_CONFIG_FILE

MAX_CONFIG_BYTES = 1 << 20
MAX_QUEUE_DELAY_US = 60_000_000  # what python -m export.triton accepts
_TOKEN = re.compile(r"""\s+|\#[^\n]*|(?P<tok>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|[A-Za-z_][A-Za-z0-9_.]*"""
                    r"""|[-+]?[0-9][0-9A-Za-z_.+-]*|[-+]?\.[0-9][0-9A-Za-z_.+-]*|[{}\[\]<>:,;])""")
_FIELDS = {((), "max_batch_size"): "max_batch_size",
           (("dynamic_batching",), "max_queue_delay_microseconds"): "max_queue_delay_us"}
_MAX_DEPTH = 32


class ConfigError(ValueError):
    """A config.pbtxt that cannot be read or holds a value vitc cannot serve, in one line."""


@dataclass(frozen=True)
class TritonBatching:
    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None  # None: no dynamic_batching delay given


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ConfigError(f"unexpected character {text[pos]!r} at offset {pos}")
        if m.group("tok"):
            out.append(m.group("tok"))
        pos = m.end()
    return out


def parse(text: str) -> TritonBatching:
    """The batching fields of a config.pbtxt's text; ConfigError when malformed or out of range."""
    toks, found = _tokens(text), {}
    stack: list[str] = []  # the message fields we are inside ("[" keeps the list's field name)
    last_ident: str | None = None
    i = 0
    while i < len(toks):
        t = toks[i]
        if t in ("{", "<", "["):
            if len(stack) >= _MAX_DEPTH:
                raise ConfigError(f"nested deeper than {_MAX_DEPTH} levels")
            name = last_ident if last_ident is not None else (stack[-1] if stack else None)
            if name is None:
                raise ConfigError(f"{t!r} without a field name")
            stack.append(name)
            last_ident = None
        elif t in ("}", ">", "]"):
            if not stack:
                raise ConfigError(f"unbalanced {t!r}")
            stack.pop()
            last_ident = None
        elif t in (":", ",", ";"):
            pass
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", t) and not (i > 0 and toks[i - 1] == ":"):
            last_ident = t
            key = _FIELDS.get((tuple(stack), t))
            if key is not None and i + 2 < len(toks) and toks[i + 1] == ":" and toks[i + 2] not in "{<[":
                if key in found:
                    raise ConfigError(f"{t} is given twice")
                value = toks[i + 2]
                if not re.fullmatch(r"[0-9]{1,12}", value):
                    raise ConfigError(f"{t} must be a non-negative integer, got {value[:40]!r}")
                found[key] = int(value)
                i += 2
                last_ident = None
        else:
            last_ident = None
        i += 1
    if stack:
        raise ConfigError(f"unclosed {stack[-1]!r} block")
    batching = TritonBatching(**found)
    if batching.max_batch_size == 0:
        raise ConfigError("max_batch_size 0 (inputs without a batch dimension) is not served by vitc; give 1 or more")
    if batching.max_queue_delay_us is not None and batching.max_queue_delay_us > MAX_QUEUE_DELAY_US:
        raise ConfigError(f"max_queue_delay_microseconds must be at most {MAX_QUEUE_DELAY_US}")
    return batching


def read(model_dir: Path) -> TritonBatching | None:
    """The batching fields of `model_dir/config.pbtxt`; None when there is no such file."""
    path = model_dir / TRITON_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"larger than {MAX_CONFIG_BYTES} bytes")
        return parse(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ConfigError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
