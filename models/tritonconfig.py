"""A Triton `config.pbtxt` (protobuf text format), read when vitc serves a Triton-style repository, so that a
model's configuration means in vitc what it means in Triton, and what Triton would refuse is refused here too.

What vitc honours: `max_batch_size`; `dynamic_batching` (its `max_queue_delay_microseconds`, 0 when not given, as
in Triton; without the block no request waits for companions: delay 0); `version_policy` (vitc serves one version:
the newest, or the highest of a `specific` list, each of which must exist); `instance_group` (all KIND_CPU: the
model runs on the CPU whatever the server's --device, as Triton runs it on a GPU machine).
What must agree with the artifact, or the load is refused: `name` (the model directory's), `platform` and
`backend`, the input and output names, data types and dims. A field that is not a ModelConfig field is refused,
as Triton's parser does. The file is bounded and scanned token by token (strings, comments and nesting
understood), never executed; no protobuf library is needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.bundle import TRITON_CONFIG_FILE

MAX_CONFIG_BYTES = 1 << 20
MAX_QUEUE_DELAY_US = 60_000_000  # what python -m export.triton accepts
MAX_VERSION = 2**63 - 1  # Triton's versions are int64
_TOKEN = re.compile(r"""\s+|\#[^\n]*|(?P<tok>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|[A-Za-z_][A-Za-z0-9_.]*"""
                    r"""|[-+]?[0-9][0-9A-Za-z_.+-]*|[-+]?\.[0-9][0-9A-Za-z_.+-]*|[{}\[\]<>:,;])""")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_DEPTH = 32
_PUNCTUATION = frozenset("{}<>[]:,;")
# The fields of Triton's ModelConfig message (model_config.proto): any other top-level name fails Triton's parse.
MODEL_CONFIG_FIELDS = frozenset({
    "name", "platform", "backend", "runtime", "version_policy", "max_batch_size", "input", "output", "batch_input",
    "batch_output", "optimization", "dynamic_batching", "sequence_batching", "ensemble_scheduling", "instance_group",
    "default_model_filename", "cc_model_filenames", "metric_tags", "parameters", "model_warmup", "model_operations",
    "model_transaction_policy", "model_repository_agents", "response_cache", "model_metrics",
})
_POLICIES = ("latest", "all", "specific")


class ConfigError(ValueError):
    """A config.pbtxt that cannot be read, that Triton would refuse, or that contradicts its artifact: one line."""


class _Quoted(str):
    """A string literal's value (an unquoted token is a number, an enum name or a boolean)."""


@dataclass(frozen=True)
class Tensor:
    """One `input` or `output` entry."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class VersionPolicy:
    """Which version directory serves: vitc serves one, the newest (`latest`, `all`) or the highest listed."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def pick(self, available: list[int]) -> int:
        """The version to serve among the numbered directories `available` (non-empty); ConfigError when the
        policy names a version the model directory does not hold."""
        if self.kind != "specific":
            return max(available)
        missing = sorted(set(self.versions) - set(available))
        if missing:
            raise ConfigError(f"version_policy specific lists version {', '.join(map(str, missing))}, which the "
                              f"model directory does not hold (it holds {', '.join(map(str, sorted(available)))})")
        return max(self.versions)

    def applied(self, served: str) -> dict[str, Any]:
        """The policy as vitc applies it, in Triton's JSON form (/config): one version is served."""
        if self.kind == "specific":
            return {"specific": {"versions": [int(served)]}}
        return {"latest": {"num_versions": 1}}


@dataclass(frozen=True)
class TritonConfig:
    """What vitc reads from a config.pbtxt (None: not given)."""

    name: str | None = None
    platform: str | None = None
    backend: str | None = None
    max_batch_size: int | None = None
    dynamic_batching: bool = False
    max_queue_delay_us: int | None = None  # None: no dynamic_batching delay given
    inputs: tuple[Tensor, ...] = ()
    outputs: tuple[Tensor, ...] = ()
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    instance_kinds: tuple[str, ...] = ()

    @property
    def cpu_only(self) -> bool:
        """Every instance group is KIND_CPU: Triton runs the model on the CPU even on a GPU machine."""
        return bool(self.instance_kinds) and set(self.instance_kinds) == {"KIND_CPU"}

    def check(self, *, name: str, platform: str, backend: str | None, input: Tensor, output: Tensor) -> None:
        """ConfigError when the configuration contradicts the model directory or its artifact (Triton refuses
        such a model too)."""
        if self.name is not None and self.name != name:
            raise ConfigError(f"name {self.name[:128]!r} is not the model directory's name {name!r}")
        if self.platform is not None and self.platform != platform:
            raise ConfigError(f"platform {self.platform[:64]!r} is not the artifact's ({platform!r})")
        if self.backend is not None and self.backend != backend:
            raise ConfigError(f"backend {self.backend[:64]!r} is not the artifact's ({backend or 'none'!r})")
        for what, given, expected in (("input", self.inputs, input), ("output", self.outputs, output)):
            if given and given != (expected,):
                got = "; ".join(f"{t.name[:64]!r} {t.data_type} {list(t.dims)}" for t in given[:4])
                raise ConfigError(f"{what} {got} is not the artifact's {what}: {expected.name!r} "
                                  f"{expected.data_type} {list(expected.dims)}")


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


class _Parser:
    """Protobuf text format into nested dicts: field name -> list of values (a scalar token or a dict)."""

    def __init__(self, toks: list[str]) -> None:
        self.toks, self.i = toks, 0

    def _peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _take(self, tok: str) -> bool:
        if self._peek() == tok:
            self.i += 1
            return True
        return False

    def message(self, close: str | None = None, depth: int = 0) -> dict[str, list[Any]]:
        fields: dict[str, list[Any]] = {}
        while (t := self._peek()) != close:
            if t is None:
                raise ConfigError(f"unclosed block: {close!r} expected at the end")
            if t in ("}", ">", "]"):
                raise ConfigError(f"unbalanced {t!r}")
            if not _IDENT.fullmatch(t):
                raise ConfigError(f"a field name was expected, got {t[:40]!r}")
            self.i += 1
            colon = self._take(":")
            fields.setdefault(t, []).extend(self._values(t, colon, depth))
            if not self._take(","):
                self._take(";")
        self.i += 1
        return fields

    def _values(self, name: str, colon: bool, depth: int) -> list[Any]:
        t = self._peek()
        if t in ("{", "<"):
            return [self._block(depth)]
        if t == "[":
            self.i += 1
            items: list[Any] = []
            while not self._take("]"):
                if items and not self._take(","):
                    raise ConfigError(f"',' or ']' expected in the list of {name}")
                items.append(self._block(depth) if self._peek() in ("{", "<") else self._scalar(name))
            return items
        if not colon:
            raise ConfigError(f"{name} needs ':' before its value")
        return [self._scalar(name)]

    def _block(self, depth: int) -> dict[str, list[Any]]:
        if depth >= _MAX_DEPTH:
            raise ConfigError(f"nested deeper than {_MAX_DEPTH} levels")
        opened = self.toks[self.i]
        self.i += 1
        return self.message("}" if opened == "{" else ">", depth + 1)

    def _scalar(self, name: str) -> str:
        t = self._peek()
        if t is None or t in _PUNCTUATION:
            raise ConfigError(f"{name} has no value")
        self.i += 1
        if t[0] not in "\"'":
            return t
        value = _unquote(t)
        while (nxt := self._peek()) is not None and nxt[0] in "\"'":  # adjacent literals are one string
            value += _unquote(nxt)
            self.i += 1
        return _Quoted(value)


def _unquote(tok: str) -> str:
    # Names worth comparing hold no escapes; an escaped one is kept escaped and then compares unequal (refused).
    return re.sub(r"\\([\"'\\])", r"\1", tok[1:-1])


def _one(msg: dict[str, list[Any]], name: str, where: str = "") -> Any:
    values = msg.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ConfigError(f"{where}{name} is given twice")
    return values[0]


def _int(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, str) or isinstance(value, _Quoted) or not re.fullmatch(r"-?[0-9]{1,19}", value):
        raise ConfigError(f"{what} must be an integer, got {str(value)[:40]!r}")
    number = int(value)
    if not low <= number <= high:
        raise ConfigError(f"{what} must be in {low}..{high}, got {number}")
    return number


def _string(value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, _Quoted):
        raise ConfigError(f"{what} must be a quoted string, got {str(value)[:40]!r}")
    return value


def _enum(value: Any, what: str) -> str | None:
    if value is not None and (not isinstance(value, str) or isinstance(value, _Quoted) or not _IDENT.fullmatch(value)):
        raise ConfigError(f"{what} must be an enum name such as TYPE_FP32 or KIND_CPU, got {str(value)[:40]!r}")
    return value


def _message(value: Any, what: str) -> dict[str, list[Any]]:
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a {{ ... }} block")
    return value


def _tensor(value: Any, what: str) -> Tensor:
    msg = _message(value, what)
    name = _string(_one(msg, "name", f"{what} "), f"{what} name")
    data_type = _enum(_one(msg, "data_type", f"{what} "), f"{what} data_type")
    dims = tuple(_int(d, f"{what} dims", -1, MAX_VERSION) for d in msg.get("dims", ()))
    if name is None or data_type is None or not dims:
        raise ConfigError(f"{what} {name or ''!r} must give a name, a data_type and dims (as Triton requires)")
    return Tensor(name, data_type, dims)


def _version_policy(value: Any) -> VersionPolicy:
    msg = _message(value, "version_policy")
    kinds = [k for k in msg if k in _POLICIES]
    if set(msg) - set(_POLICIES) or len(kinds) != 1 or len(msg[kinds[0]]) != 1:
        raise ConfigError("version_policy must be one of latest { num_versions: N }, all { } or "
                          "specific { versions: [...] }")
    kind = kinds[0]
    body = _message(msg[kind][0], f"version_policy {kind}")
    allowed = {"latest": {"num_versions"}, "all": set(), "specific": {"versions"}}[kind]
    if set(body) - allowed:
        raise ConfigError(f"version_policy {kind} has no field {sorted(set(body) - allowed)[0]!r}")
    if kind == "latest":
        n = _one(body, "num_versions", "version_policy latest ")
        return VersionPolicy("latest", num_versions=1 if n is None else _int(n, "num_versions", 1, 2**32 - 1))
    if kind == "specific":
        versions = tuple(_int(v, "version_policy specific versions", 1, MAX_VERSION) for v in body.get("versions", ()))
        if not versions:
            raise ConfigError("version_policy specific lists no version")
        return VersionPolicy("specific", versions=versions)
    return VersionPolicy("all")


def parse(text: str) -> TritonConfig:
    """The configuration in a config.pbtxt's text; ConfigError when malformed, refused by Triton or out of range."""
    top = _Parser(_tokens(text)).message()
    unknown = sorted(set(top) - MODEL_CONFIG_FIELDS)
    if unknown:
        raise ConfigError(f"unknown field {unknown[0][:64]!r} (not a Triton ModelConfig field: Triton refuses it)")
    for name in ("name", "platform", "backend", "max_batch_size", "version_policy", "dynamic_batching"):
        _one(top, name)  # each at most once
    batching = _one(top, "dynamic_batching")
    delay = None
    if batching is not None:
        delay = _one(_message(batching, "dynamic_batching"), "max_queue_delay_microseconds", "dynamic_batching ")
        delay = None if delay is None else _int(delay, "max_queue_delay_microseconds", 0, MAX_QUEUE_DELAY_US)
    max_batch = _one(top, "max_batch_size")
    max_batch = None if max_batch is None else _int(max_batch, "max_batch_size", 0, 2**31 - 1)
    if max_batch == 0:
        raise ConfigError("max_batch_size 0 (inputs without a batch dimension) is not served by vitc; give 1 or more")
    policy = _one(top, "version_policy")
    return TritonConfig(
        name=_string(_one(top, "name"), "name"),
        platform=_string(_one(top, "platform"), "platform"),
        backend=_string(_one(top, "backend"), "backend"),
        max_batch_size=max_batch,
        dynamic_batching=batching is not None,
        max_queue_delay_us=delay,
        inputs=tuple(_tensor(t, "input") for t in top.get("input", ())),
        outputs=tuple(_tensor(t, "output") for t in top.get("output", ())),
        version_policy=VersionPolicy() if policy is None else _version_policy(policy),
        instance_kinds=tuple(_enum(_one(_message(g, "instance_group"), "kind", "instance_group "),
                                   "instance_group kind") or "KIND_AUTO" for g in top.get("instance_group", ())),
    )


def read(model_dir: Path) -> TritonConfig | None:
    """The configuration in `model_dir/config.pbtxt`; None when there is no such file."""
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
