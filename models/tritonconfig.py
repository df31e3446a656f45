"""A Triton `config.pbtxt` (protobuf text format), read when vitc serves a Triton-style repository, so that a
model's configuration means in vitc what it means in Triton, and what Triton would refuse is refused here too.

What vitc honours: `max_batch_size` (0, or absent, as Triton reads a file without it: Triton does not batch, the
dims start with the batch dimension -1 and each request carries its own batch, up to what the artifact takes);
`dynamic_batching` (its `max_queue_delay_microseconds`, 0 when not given, as in Triton; without the block no request
waits for companions: delay 0); `version_policy` (vitc serves one version: the newest, or the highest of a
`specific` list, each of which must exist); `instance_group` (all KIND_CPU: the model runs on the CPU whatever the
server's --device, as Triton runs it on a GPU machine); the output's `label_filename` (the classification
extension's labels, one a line, as Triton reads them). What must agree with the artifact, or the load is refused:
`name` (the model directory's), `platform` and `backend`, `default_model_filename`, the input and output names, data
types and dims; and the file must declare the input and the output (Triton run without auto-complete refuses one
that does not, an empty file included). Every field name, value kind and enum value is checked against Triton's
model_config.proto (models.tritonschema), as Triton's parser checks them, and so are the rules of Triton's
model_config_utils.cc and of its backends that bear on what vitc serves, and the `model_warmup` samples Triton runs
at load (vitc warms up its own way, but a sample Triton fails fails the load there). The file is bounded and scanned
token by token (strings, comments and nesting understood), never executed; no protobuf library is needed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from models.bundle import MAX_MANIFEST_BYTES, TRITON_CONFIG_FILE
from models.config import MAX_LABEL_CHARS, is_label
from models.host import MAX_THREADS
from models.io import not_a_file
from models.tritonschema import ENUMS, INT_RANGES, ONEOFS, POLICIES, SCHEMA

MAX_CONFIG_BYTES = 1 << 20
# One label per class, written from a manifest's class names: any manifest's fit (export.triton and the server read
# a labels.txt with this one bound).
MAX_LABELS_BYTES = MAX_MANIFEST_BYTES
MAX_QUEUE_DELAY_US = 60_000_000  # a minute: anything longer is a typo, not a batching policy (export.triton's bound)
MAX_VERSION = 2**63 - 1  # Triton reads version directories as int64
_TOKEN = re.compile(r"""\s+|\#[^\n]*|(?P<tok>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|-?[A-Za-z_][A-Za-z0-9_.]*"""
                    r"""|[-+]?[0-9][0-9A-Za-z_.+-]*|[-+]?\.[0-9][0-9A-Za-z_.+-]*|[{}\[\]<>:,;])""")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Integers as protobuf's text format writes them: decimal, 0x hexadecimal, 0-prefixed octal.
_INTEGER = re.compile(r"([-+]?)(?:0[xX](?P<hex>[0-9A-Fa-f]{1,20})|0(?P<oct>[0-7]{1,30})|(?P<dec>0|[1-9][0-9]{0,24}))")
# One way to split each run of digits (a backtracking `[0-9]+\.?[0-9]*` made a failing 30,000-digit token take 20 s
# under the GIL); number tokens are bounded before any pattern runs anyway (MAX_NUMBER_CHARS).
_FLOAT = re.compile(r"[-+]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?[fF]?|(?i:inf|infinity|nan))")
MAX_NUMBER_CHARS = 400  # longer than any number a config means (a double's digits, 0x... of 64 bits)
_BOOLS = frozenset({"true", "True", "t", "1", "false", "False", "f", "0"})
_MAX_DEPTH = 32
_PUNCTUATION = frozenset("{}<>[]:,;")


class ConfigError(ValueError):
    """A config.pbtxt that cannot be read, that Triton would refuse, or that contradicts its artifact: one line."""


class LabelsError(ConfigError):
    """A labels.txt Triton would misread; its text says what the file is or holds, `lines` how many labels Triton
    reads from it (None: it is too large, or not text)."""

    def __init__(self, problem: str, lines: int | None = None) -> None:
        super().__init__(problem)
        self.lines = lines


@dataclass(frozen=True)
class BackendRules:
    """What Triton does with the backend that serves an artifact, as its runtime declares it (runtimes/base.py
    `Runtime.triton_rules`; this module sits below the runtimes and takes their facts as arguments)."""

    # Triton's auto-fill of an absent `backend` (model_config_utils.cc AutoCompleteBackendFields): from the platform
    # where `fills_from_platform` (onnxruntime_onnx, tensorrt_plan; never "openvino"), else from default_model_filename
    # (`file_backends`: file name -> the backend it picks); an empty backend is then refused (ValidateModelConfig:
    # "unexpected platform type").
    fills_from_platform: bool = False
    file_backends: Mapping[str, str] = field(default_factory=dict)
    # The backend runs KIND_CPU and KIND_AUTO instance groups only (openvino_backend src/openvino.cc
    # ModelInstanceState: "Triton OpenVINO backend supports only Kind CPU and AUTO").
    cpu_only: bool = False


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

    def loads(self, available: list[int]) -> list[int]:
        """The versions Triton loads among `available` under this policy (vitc serves the newest of them)."""
        if self.kind == "specific":
            return sorted(self.versions)
        return sorted(available) if self.kind == "all" else sorted(available)[-self.num_versions:]

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
    max_batch_size: int | None = None  # `read` gives a file's absent one as 0, as Triton reads it
    # Whether requests wait for companions and merge: the dynamic_batching block, on a model with a batch dimension
    # (with max_batch_size 0 Triton's scheduler runs batches of one request: dynamic_batch_scheduler.cc
    # `max_batch_size_((size_t)std::max(1, max_batch_size))`).
    dynamic_batching: bool = False
    max_queue_delay_us: int | None = None  # None: no dynamic_batching delay given
    inputs: tuple[Tensor, ...] = ()
    outputs: tuple[Tensor, ...] = ()
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    instance_kinds: tuple[str, ...] = ()
    instance_count: int = 1  # the instances of its groups (each group's count, 1 when not given)
    default_model_filename: str | None = None
    label_filename: str | None = None  # the output's, relative to the model directory
    parameters: dict[str, str] = field(default_factory=dict)  # key -> string_value (a map: the last entry wins)
    unapplied: tuple[str, ...] = ()  # fields given that change how Triton serves, outside what vitc applies (_APPLIED)

    def threads(self, key: str | None) -> int | None:
        """The threads of one instance that the backend parameter `key` sets (onnxruntime's intra_op_thread_count,
        OpenVINO's INFERENCE_NUM_THREADS); None when absent or 0 (the runtime's own choice). ConfigError for a value
        that is not a count, which the backend refuses at load."""
        value = self.parameters.get(key) if key is not None else None
        if value is None:
            return None
        if not re.fullmatch(r"\s*[+-]?[0-9]{1,9}\s*", value):  # the backends parse it as an integer, or fail the load
            raise ConfigError(f"parameter {key}: {value[:64]!r} is not a thread count")
        return min(int(value), MAX_THREADS) if int(value) > 0 else None

    def performance_hint(self, key: str | None) -> str | None:
        """The hint (latency or throughput) the backend parameter `key` sets (OpenVINO's PERFORMANCE_HINT); None
        when absent or a hint vitc does not run (CUMULATIVE_THROUGHPUT: over several devices)."""
        value = self.parameters.get(key, "").strip().upper() if key is not None else ""
        return {"LATENCY": "latency", "THROUGHPUT": "throughput"}.get(value)

    def streams(self, key: str | None, high: int) -> int | None:
        """The requests the shared model runs at once that the parameter `key` sets (OpenVINO's NUM_STREAMS), at
        most `high`; None when absent or not a count (AUTO, NUMA: OpenVINO's own choice, as without it)."""
        value = self.parameters.get(key) if key is not None else None
        if value is None or not re.fullmatch(r"\s*\+?[0-9]{1,9}\s*", value) or int(value) < 1:
            return None
        return min(int(value), high)

    @property
    def cpu_only(self) -> bool:
        """Every instance group is KIND_CPU: Triton runs the model on the CPU even on a GPU machine."""
        return bool(self.instance_kinds) and set(self.instance_kinds) == {"KIND_CPU"}

    def check(self, *, name: str, platform: str, backend: str | None, input: Tensor, output: Tensor,
              rules: BackendRules) -> None:
        """ConfigError when the configuration contradicts the model directory or its artifact (Triton refuses
        such a model too); `input` and `output` are the artifact's, without the batch dimension, `rules` what Triton
        does with its backend."""
        if self.name is not None and self.name != name:
            raise ConfigError(f"name {self.name[:128]!r} is not the model directory's name {name!r}")
        if self.platform is not None and self.platform != platform:
            raise ConfigError(f"platform {self.platform[:64]!r} is not the artifact's ({platform!r})")
        if self.backend is not None and self.backend != backend:
            raise ConfigError(f"backend {self.backend[:64]!r} is not the artifact's ({backend or 'none'!r})")
        if backend is not None and self.backend is None and self.platform is not None:
            # self.platform is the artifact's here (checked above): it fills in `backend`, or the file name does.
            filled = (backend if rules.fills_from_platform else None) or rules.file_backends.get(
                self.default_model_filename or "")
            if filled != backend:
                triton = f"picks backend {filled!r}" if filled else "refuses it (unexpected platform type)"
                raise ConfigError(f"platform {self.platform!r} without backend: Triton {triton}; give backend: "
                                  f"\"{backend}\"")
        other = sorted(set(self.instance_kinds) - {"KIND_CPU", "KIND_AUTO"}) if rules.cpu_only else []
        if other:
            raise ConfigError(f"instance_group kind {other[0]}: Triton's {backend} backend supports only KIND_CPU "
                              "and KIND_AUTO")
        # max_batch_size 0: Triton does not batch, so the dims carry the batch dimension themselves (None: a fragment
        # that does not say; `read` gives a whole file's absent max_batch_size as the 0 Triton reads).
        batch = (-1,) if self.max_batch_size == 0 else ()
        for what, given, artifact in (("input", self.inputs, input), ("output", self.outputs, output)):
            expected = replace(artifact, dims=batch + artifact.dims)
            if given and given != (expected,):
                got = "; ".join(f"{t.name[:64]!r} {t.data_type} {list(t.dims[:8])}" for t in given[:4])
                why = " (max_batch_size 0: the dims start with the batch dimension -1)" if batch else ""
                raise ConfigError(f"{what} {got} is not the artifact's {what}: {expected.name!r} "
                                  f"{expected.data_type} {list(expected.dims)}{why}")

    def check_files(self, version_dir: Path, model_file: str | None) -> None:
        """ConfigError when default_model_filename is not one file name of the version directory, names a file it
        does not hold (Triton's backend cannot open it) or another file than the artifact's `model_file` (None: any),
        the one vitc serves."""
        given = self.default_model_filename
        if given is None or given == model_file:
            return
        where = f"default_model_filename {given[:128]!r}"
        # Checked before the file is looked for: whether a path elsewhere exists is not the config's to ask (the
        # load's refusal goes back to an HTTP client).
        if given in (".", "..") or "/" in given:
            raise ConfigError(f"{where} must be the name of a file in the version directory (no '/' or '..')")
        _check_inside(version_dir, version_dir / given, f"{where} must be the name of a file in the version directory")
        try:
            held = (version_dir / given).exists()
        except (OSError, ValueError):  # a name too long, or holding a NUL
            held = False
        if not held:
            raise ConfigError(f"default_model_filename {given[:128]!r} names a file that {version_dir} does not hold")
        if model_file is not None:
            raise ConfigError(f"default_model_filename {given[:128]!r} is not the artifact's file ({model_file!r}), "
                              "the one vitc serves")

    def labels(self, model_dir: Path, classes: int) -> list[str] | None:
        """The classification labels in the output's label_filename (one a line, as Triton reads them), or None
        when it names none; ConfigError when the file is outside `model_dir`, unreadable, larger than
        MAX_LABELS_BYTES or not one line per class."""
        name = self.label_filename
        if name is None:
            return None
        where = f"label_filename {name[:128]!r}"
        # Triton refuses a label file outside the model directory (model.cc: "is outside model directory").
        path, raw = _inside(model_dir, name, where), None
        try:
            if path.is_file():
                with path.open("rb") as f:
                    raw = f.read(MAX_LABELS_BYTES + 1)
        except (OSError, ValueError) as exc:  # unreadable, a name too long, or holding a NUL
            raise ConfigError(f"{where}: {path} cannot be read ({exc})") from None
        if raw is None:
            raise ConfigError(f"{where}: {model_dir} holds no such file (Triton refuses the load)")
        try:
            return read_labels(raw, classes)
        except LabelsError as exc:
            raise ConfigError(f"{where}: {path} {exc}") from None


def read_labels(raw: bytes, classes: int) -> list[str]:
    """The labels in a labels.txt's bytes (read up to MAX_LABELS_BYTES + 1 of them), one a line as Triton reads
    them; LabelsError when it is larger than MAX_LABELS_BYTES, not UTF-8, or not one label per class. The one reader
    of the file: the server's and export.triton's (which keeps an edited one) never disagree."""
    if len(raw) > MAX_LABELS_BYTES:
        raise LabelsError(f"is larger than {MAX_LABELS_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LabelsError("is not UTF-8 text") from None
    # Triton splits it with std::getline: a final newline ends the last line, it does not start another; blank
    # lines after the last label (an editor's) label nothing.
    bare = _without_line_ends(text)
    text = bare + "\n" if len(bare.split("\n")) == classes else text
    lines = text.count("\n") + (text != "" and not text.endswith("\n"))
    if lines != classes:
        raise LabelsError(f"holds {lines} lines, one label per class was expected ({classes})", lines)
    # A CRLF file's labels lose their "\r", which Triton's getline would keep in each label: an editor's line ends
    # are not part of a class name.
    labels = [label.removesuffix("\r") for label in text.split("\n")[:classes]]
    _check_labels(labels)
    return labels


def _check_labels(labels: list[str]) -> None:
    """LabelsError for the first label that breaks the class names' rule (`is_label`; an empty line labels nothing,
    as in Triton): every answer row of the classification extension copies a label, so one of 16 MiB made a 393 KB
    request cost a 537 MB answer, and a control character would reach the clients' terminals and logs."""
    for line, label in enumerate(labels, 1):
        if label and not is_label(label):
            what = f"of {len(label):,} characters" if len(label) > MAX_LABEL_CHARS else "holding a control character"
            raise LabelsError(f"holds at line {line} a label {what}: each must be 1..{MAX_LABEL_CHARS} characters "
                              "without control characters, as a class name (or empty: no label)")


def _without_line_ends(text: str) -> str:
    """`text` without the line ends (LF or CRLF) it ends with, in linear time (a regular expression anchored at the
    end took quadratic time on a run of newlines followed by anything: minutes for a file of a few hundred KiB)."""
    end = len(text)
    while end and text[end - 1] == "\n":
        end -= 1 + (end > 1 and text[end - 2] == "\r")
    return text[:end]


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
            if not colon and self.toks[self.i + 1:self.i + 2] not in (["{"], ["<"], ["]"]):
                raise ConfigError(f"{name[:64]} needs ':' before its list of values (only a list of messages may leave "
                                  "it out)")
            self.i += 1
            items: list[Any] = []
            while not self._take("]"):
                if items and not self._take(","):
                    raise ConfigError(f"',' or ']' expected in the list of {name[:64]}")
                items.append(self._block(depth) if self._peek() in ("{", "<") else self._scalar(name))
            return items
        if not colon:
            raise ConfigError(f"{name[:64]} needs ':' before its value")
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
            raise ConfigError(f"{name[:64]} has no value")
        self.i += 1
        if t[0] not in "\"'":
            return t
        value = _unquote(t)
        while (nxt := self._peek()) is not None and nxt[0] in "\"'":  # adjacent literals are one string
            value += _unquote(nxt)
            self.i += 1
        return _Quoted(value)


_ESCAPES = {"n": b"\n", "t": b"\t", "r": b"\r", "a": b"\a", "b": b"\b", "f": b"\f", "v": b"\v", "\\": b"\\",
            "'": b"'", '"': b'"', "?": b"?"}
_ESCAPE = re.compile(r"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})|(.))", re.DOTALL)


def _unquote(tok: str) -> str:
    """A quoted string's value, its C-style escapes decoded as protobuf's text format decodes them (octal and hex
    bytes, \\n, \\u, ...), then read as UTF-8."""
    out, pos, body = bytearray(), 0, tok[1:-1]
    for m in _ESCAPE.finditer(body):
        out += body[pos:m.start()].encode()
        octal, hex_, u4, u8, char = m.groups()
        if octal or hex_:
            out.append(int(octal or hex_, 8 if octal else 16) & 0xFF)
        elif u4 or u8:
            try:
                out += chr(int(u4 or u8, 16)).encode()
            except (ValueError, UnicodeEncodeError):
                raise ConfigError(f"invalid escape \\{'u' if u4 else 'U'}{u4 or u8} in a string") from None
        elif char in _ESCAPES:
            out += _ESCAPES[char]
        else:
            raise ConfigError(f"invalid escape \\{char!r:.10} in a string")
        pos = m.end()
    out += body[pos:].encode()
    try:
        return out.decode()
    except UnicodeDecodeError:
        raise ConfigError("a string is not UTF-8 once its escapes are decoded") from None


def _checked(msg: dict[str, list[Any]], message: str, path: str = "") -> None:
    """Refuse in `msg`, a `message`, what Triton's protobuf text parser refuses: a field the message lacks, a
    non-repeated field given twice, two members of one oneof, a value of the wrong kind or out of its type's range, a
    name its enum lacks. Integers are normalised to decimal and enum numbers to names (data_type: 11 is TYPE_FP32)."""
    fields = SCHEMA[message]
    for name, values in msg.items():
        spec = fields.get(name)
        if spec is None:
            raise ConfigError(f"{path}{name[:64]} is not a field of {message} (Triton's parser refuses it)")
        if len(values) > 1 and not spec.repeated:
            raise ConfigError(f"{path}{name} is given twice")
        for i, value in enumerate(values):
            values[i] = _value(value, spec.type, f"{path}{name}[{i}]" if spec.repeated else f"{path}{name}")
    given = [f for f in ONEOFS.get(message, ()) if f in msg]
    if len(given) > 1:
        raise ConfigError(f"{path}{given[0]} and {path}{given[1]} are both given: {message} takes one of "
                          f"{', '.join(ONEOFS[message])}")


def _value(value: Any, type_name: str, where: str) -> Any:
    if type_name in SCHEMA:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a {{ ... }} block (type {type_name}), got {str(value)[:40]!r}")
        _checked(value, type_name, f"{where}.")
        return value
    if isinstance(value, dict):
        raise ConfigError(f"{where} takes type {type_name}, not a {{ ... }} block")
    if type_name == "string":
        if not isinstance(value, _Quoted):
            raise ConfigError(f"{where} must be a quoted string, got {value[:40]!r}")
        return value
    if isinstance(value, _Quoted):
        raise ConfigError(f"{where} takes type {type_name}, not the quoted string {value[:40]!r}")
    if len(value) > MAX_NUMBER_CHARS:
        raise ConfigError(f"{where} is a value of {len(value):,} characters, more than any {type_name} has")
    if type_name in ENUMS:
        names = ENUMS[type_name]
        number = _integer(value)
        if value in names or (number is not None and 0 <= number < len(names)):
            return value if number is None else names[number]
        raise ConfigError(f"{where} {value[:40]!r} is not a value of {type_name} ({', '.join(names)})")
    if type_name not in INT_RANGES:  # bool, float or double
        if value not in _BOOLS if type_name == "bool" else not _FLOAT.fullmatch(value):
            raise ConfigError(f"{where} takes type {type_name}, got {value[:40]!r}")
        return value
    number = _integer(value)
    if number is None:
        raise ConfigError(f"{where} must be an integer ({type_name}), got {value[:40]!r}")
    low, high = INT_RANGES[type_name]
    if not low <= number <= high:
        raise ConfigError(f"{where} is out of the range of {type_name} ({low}..{high}), got {number}")
    return str(number)


def _integer(token: str) -> int | None:
    m = _INTEGER.fullmatch(token)
    if m is None:
        return None
    sign = -1 if m.group(1) == "-" else 1
    if m.group("hex"):
        return sign * int(m.group("hex"), 16)
    return sign * int(m.group("oct") or m.group("dec"), 8 if m.group("oct") else 10)


def _one(msg: dict[str, list[Any]], name: str) -> Any:
    """A non-repeated field's value (checked: given at most once), or None."""
    return msg[name][0] if name in msg else None


def _int(value: str, what: str, low: int, high: int) -> int:
    number = int(value)  # checked and normalised to decimal by _checked
    if not low <= number <= high:
        raise ConfigError(f"{what} must be in {low}..{high}, got {number}")
    return number


def _tensor(msg: dict[str, list[Any]], what: str) -> Tensor:
    name, data_type = _one(msg, "name"), _one(msg, "data_type")
    dims = tuple(int(d) for d in msg.get("dims", ()))
    if not name or data_type in (None, "TYPE_INVALID") or not dims:
        raise ConfigError(f"{what} {(name or '')[:64]!r} must give a name, a data_type and dims (as Triton requires)")
    # model_config_utils.cc ValidateIOShape and ValidateModelInput.
    if any(d < 1 and d != -1 for d in dims):
        raise ConfigError(f"{what} {name[:64]!r} dims must be integers >= 1, or -1 for a variable-size dimension")
    if _one(msg, "format") in ("FORMAT_NCHW", "FORMAT_NHWC") and len(dims) != 3:
        raise ConfigError(f"{what} {name[:64]!r}: model input NHWC/NCHW require 3 dims (Triton's rule), got "
                          f"{list(dims[:8])}")
    return Tensor(name, data_type, dims)


def _version_policy(msg: dict[str, list[Any]]) -> VersionPolicy:
    kind = next((k for k in POLICIES if k in msg), None)  # one at most: a oneof
    if kind is None:
        raise ConfigError("version_policy must be one of latest { num_versions: N }, all { } or "
                          "specific { versions: [...] }")
    body = msg[kind][0]
    if kind == "latest":
        n = _one(body, "num_versions")
        return VersionPolicy("latest", num_versions=1 if n is None else _int(n, "num_versions", 1, 2**32 - 1))
    if kind == "specific":
        versions = tuple(_int(v, "version_policy specific versions", 1, MAX_VERSION) for v in body.get("versions", ()))
        if not versions:
            raise ConfigError("version_policy specific lists no version")
        return VersionPolicy("specific", versions=versions)
    return VersionPolicy("all")


# What vitc applies or stands in for, by message: a field given outside these changes how Triton serves the model
# (queue policies and priorities, sequence or ensemble scheduling, the response cache, accelerators, rate limits,
# decoupled answers, ...) and vitc does not do it. Preferred batch sizes, instance counts and warm-up requests are
# hints vitc's own batching, `--parallel` and warm-up replace; preserve_ordering holds anyway (each HTTP request
# gets its own answer).
_APPLIED = {
    "": {"name", "platform", "backend", "max_batch_size", "input", "output", "version_policy", "instance_group",
         "default_model_filename", "parameters", "dynamic_batching", "model_warmup"},
    "dynamic_batching": {"max_queue_delay_microseconds", "preferred_batch_size", "preserve_ordering"},
    "instance_group": {"name", "kind", "count"},
    "input": {"name", "data_type", "format", "dims"},  # checked against the artifact
    "output": {"name", "data_type", "dims", "label_filename"},
}


def _unapplied(top: dict[str, list[Any]]) -> tuple[str, ...]:
    found = [name for name in top if name not in _APPLIED[""]]
    for block in ("dynamic_batching", "instance_group", "input", "output"):
        for value in top.get(block, ()):
            found += [f"{block}.{name}" for name in value if name not in _APPLIED[block]]
    return tuple(dict.fromkeys(found))


def parse(text: str) -> TritonConfig:
    """The configuration in a config.pbtxt's text; ConfigError when malformed, refused by Triton or out of range.
    Test and tooling API: vitc itself reads a model's file with `read`."""
    return _config(_top(text))


def _top(text: str) -> dict[str, list[Any]]:
    top = _Parser(_tokens(text)).message()
    _checked(top, "ModelConfig")
    return top


def _config(top: dict[str, list[Any]]) -> TritonConfig:
    max_batch = _one(top, "max_batch_size")
    max_batch = None if max_batch is None else _int(max_batch, "max_batch_size", 0, 2**31 - 1)
    batching = _one(top, "dynamic_batching")
    delay = None
    if batching is not None:
        delay = _one(batching, "max_queue_delay_microseconds")
        delay = None if delay is None else _int(delay, "max_queue_delay_microseconds", 0, MAX_QUEUE_DELAY_US)
        _preferred_sizes(batching, max_batch)
    groups = top.get("instance_group", ())
    for i, group in enumerate(groups):
        # model_config_utils.cc ValidateInstanceGroup: only a KIND_GPU group (or a KIND_AUTO one, which becomes
        # KIND_GPU where every GPU listed is present, KIND_CPU otherwise) may list gpus.
        kind = _one(group, "kind") or "KIND_AUTO"
        if kind in ("KIND_CPU", "KIND_MODEL") and group.get("gpus"):
            gpus = [int(g) for g in group["gpus"][:8]]
            raise ConfigError(f"instance_group[{i}] has kind {kind} but lists gpus {gpus}: Triton refuses it (\"has "
                              f"kind {kind} but specifies one or more GPUs\")")
    _warmup_samples(top)  # what a sample must hold whatever the model (the rest: read, which knows the whole file)
    outputs = top.get("output", ())
    policy = _one(top, "version_policy")
    return TritonConfig(
        name=_one(top, "name"),
        platform=_one(top, "platform"),
        backend=_one(top, "backend"),
        max_batch_size=max_batch,
        dynamic_batching=batching is not None and max_batch != 0,
        max_queue_delay_us=delay,
        inputs=tuple(_tensor(t, "input") for t in top.get("input", ())),
        outputs=tuple(_tensor(t, "output") for t in outputs),
        version_policy=VersionPolicy() if policy is None else _version_policy(policy),
        instance_kinds=tuple(_one(g, "kind") or "KIND_AUTO" for g in groups),
        instance_count=min(max(1, sum(int(_one(g, "count") or 1) for g in groups)), MAX_THREADS),
        default_model_filename=_one(top, "default_model_filename") or None,  # proto3: "" is not given
        label_filename=(_one(outputs[0], "label_filename") or None) if outputs else None,
        parameters={_one(e, "key") or "": _one(_one(e, "value") or {}, "string_value") or ""
                    for e in top.get("parameters", ())},
        unapplied=_unapplied(top),
    )


def read(model_dir: Path) -> TritonConfig | None:
    """The configuration in `model_dir/config.pbtxt`, an absent max_batch_size read as 0 (as Triton reads it); None
    when there is no such file, ConfigError when it cannot be read, is malformed, does not declare the model's input
    and output, or holds a warm-up sample Triton fails."""
    path = model_dir / TRITON_CONFIG_FILE
    if not path.is_file():
        if path.exists():  # a directory, a FIFO, a device: a configuration that cannot be read is not "none"
            raise ConfigError(f"{path}: not a regular file")
        if path.is_symlink():  # dangling, or a loop: a configuration meant to be there, not its absence
            raise ConfigError(f"{path}: a symbolic link to nothing readable")
        return None
    if model_dir.resolve() not in path.resolve().parents:  # a link out of the model directory, as label_filename:
        # read, its parse errors would quote another file's first characters back to whoever asked for the load
        raise ConfigError(f"{path}: links to a file outside the model directory; put the configuration itself there")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"larger than {MAX_CONFIG_BYTES} bytes")
        top = _top(raw.decode("utf-8"))
        config = _config(top)
        _require_io(config, empty=not raw.strip())
        return _whole_file(config, top, model_dir)
    except (OSError, UnicodeDecodeError, ConfigError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _require_io(config: TritonConfig, *, empty: bool) -> None:
    """ConfigError when a model's config.pbtxt does not declare its input and output (a rule of the whole file:
    fragments stay valid for `parse` and `check`)."""
    # Triton run with --disable-auto-complete-config (as export.triton's InferenceService runs it) refuses such a
    # model: its backend finds "configuration expects 0 inputs, model provides 1". Filled in from the manifest, a
    # file emptied or cut short at a line end loaded here and served without its dynamic batching and label file.
    missing = [what for what, given in (("input", config.inputs), ("output", config.outputs)) if not given]
    if not missing:
        return
    if empty:
        what = "is empty (a half-finished copy"
    else:
        what = f"declares no {' and no '.join(missing)} (cut short by a half-finished copy"
    raise ConfigError(f"{what} or a full disk?): Triton run with --disable-auto-complete-config, as the "
                      "InferenceService runs it, refuses a config that does not declare the model's input and output")


def _preferred_sizes(batching: dict[str, list[Any]], max_batch: int | None, *, absent: bool = False) -> None:
    """ConfigError for a preferred batch size Triton refuses (model_config_utils.cc ValidateModelConfig: "dynamic
    batching preferred size must be positive" and "... must be <= max batch size"); `max_batch` None: not known yet
    (a fragment: only positive sizes are required), `absent`: the file gives none and Triton reads 0."""
    for size in map(int, batching.get("preferred_batch_size", ())):
        if size <= 0 or max_batch is not None and size > max_batch:
            given = "not given" if max_batch is None else f"{max_batch}: not given" if absent else max_batch
            raise ConfigError(f"dynamic_batching preferred_batch_size {size} must be in 1..max_batch_size "
                              f"({given}), as Triton requires")


def _whole_file(config: TritonConfig, top: dict[str, list[Any]], model_dir: Path) -> TritonConfig:
    """`config` with the rules of a whole file applied, which a fragment (`parse`, `check`) is not held to: an
    absent max_batch_size is 0, and the warm-up samples must fit the inputs and find their files."""
    if config.max_batch_size is None:
        # proto3: an absent max_batch_size is 0. Triton run with --disable-auto-complete-config, as the InferenceService
        # runs it, keeps 0 (only the backend's auto-complete fills it in from the model): no batching, and the dims
        # carry the batch dimension (the onnxruntime backend's CompareDimsSupported refuses [3, H, W] for a model of
        # 4 dims).
        batching = _one(top, "dynamic_batching")
        if batching is not None:
            _preferred_sizes(batching, 0, absent=True)
        config = replace(config, max_batch_size=0, dynamic_batching=False)
    _check_warmups(top, config, model_dir)
    return config


_WARMUP_DIR = "warmup"  # core constants.h kWarmupDataFolder: the warm-up files' directory in the model's
# triton::common GetDataTypeByteSize (TYPE_STRING: variable).
_TYPE_BYTES = {"TYPE_BOOL": 1, "TYPE_UINT8": 1, "TYPE_UINT16": 2, "TYPE_UINT32": 4, "TYPE_UINT64": 8, "TYPE_INT8": 1,
               "TYPE_INT16": 2, "TYPE_INT32": 4, "TYPE_INT64": 8, "TYPE_FP16": 2, "TYPE_FP32": 4, "TYPE_FP64": 8,
               "TYPE_BF16": 2}
_TRUE = frozenset({"true", "True", "t", "1"})


def _warmup_samples(top: dict[str, list[Any]]) -> list[tuple[str, int, dict[str, dict[str, list[Any]]]]]:
    """(where, batch_size, inputs by name) of each model_warmup sample Triton runs when it loads the model, ConfigError
    when one fails whatever the model is (backend_model_instance.cc TritonModelInstance::GenerateWarmupData)."""
    groups = top.get("instance_group", ())
    # Passive instances generate no warm-up data (TritonModelInstance::CreateInstance); without a group Triton adds
    # one that is not passive (NormalizeInstanceGroup).
    if groups and all(_one(g, "passive") in _TRUE for g in groups):
        return []
    samples = []
    for i, warmup in enumerate(top.get("model_warmup", ())):
        batch = int(_one(warmup, "batch_size") or 0)
        if batch == 0:  # "Skipping batch 0 warmup sample" (0 is also what an absent batch_size reads as)
            continue
        name = _one(warmup, "name") or ""
        inputs: dict[str, dict[str, list[Any]]] = {}
        for entry in warmup.get("inputs", ()):  # a map: the last entry of a key wins
            inputs[_one(entry, "key") or ""] = _one(entry, "value") or {}
        for key, value in inputs.items():
            where = f"model_warmup[{i}] {name[:64]!r} input {key[:64]!r}"
            dims = [int(d) for d in value.get("dims", ())]
            if any(d < 0 for d in dims):
                raise ConfigError(f"{where} dims {dims[:8]}: Triton requires every dimension given (\"warmup setting "
                                  "expects all variable-size dimensions are specified\")")
            if not any(k in value for k in ONEOFS["ModelWarmup.Input"]):
                raise ConfigError(f"{where} gives no data: Triton requires zero_data, random_data or input_data_file")
        samples.append((f"model_warmup[{i}] {name[:64]!r}", batch, inputs))
    return samples


def _check_warmups(top: dict[str, list[Any]], config: TritonConfig, model_dir: Path) -> None:
    """ConfigError for a warm-up sample that fails against this model, and so fails its load in Triton: its request
    is prepared as any other (infer_request.cc InferenceRequest::Normalize) and its data files are read from the
    model's warmup/ directory (GenerateWarmupData)."""
    max_batch = config.max_batch_size or 0
    declared = {t.name: t for t in config.inputs}
    for where, batch, inputs in _warmup_samples(top):
        # Each of the sample's batch_size requests is one item, all run in one execution, and the backends refuse
        # more than max_batch_size items (1 without batching): onnxruntime's and openvino's ProcessRequests "batch
        # size N for '<model>', max allowed is M".
        if batch > max(max_batch, 1):
            raise ConfigError(f"{where} batch_size {batch} is more than Triton's backend runs at once (max_batch_size "
                              f"{max_batch}{': each request alone' if max_batch == 0 else ''})")
        missing = [n for n in declared if n not in inputs]
        if missing:  # InferenceRequest::ValidateRequestInputs: "expected N inputs but got M"
            raise ConfigError(f"{where} gives no input {missing[0][:64]!r}: Triton requires every input of the model "
                              "in a warm-up sample")
        for key, value in inputs.items():
            what = f"{where} input {key[:64]!r}"
            tensor = declared.get(key)
            if tensor is None:  # core hands it to the backend as an extra tensor, which the model does not take
                raise ConfigError(f"{what} is not an input of the config ({', '.join(map(repr, declared))}): Triton "
                                  "fails the warm-up, and the load")
            data_type = _one(value, "data_type") or "TYPE_INVALID"
            if data_type != tensor.data_type:
                raise ConfigError(f"{what} data_type {data_type} is not the input's ({tensor.data_type}): Triton "
                                  "fails the warm-up, and the load")
            dims = tuple(int(d) for d in value.get("dims", ()))
            # GenerateWarmupData prepends the batch dimension 1 only where max_batch_size is not 0, and Normalize then
            # takes it off again: the sample's dims are the config's, each -1 of the config matched by any size.
            if len(dims) != len(tensor.dims) or any(c not in (-1, d) for c, d in zip(tensor.dims, dims, strict=True)):
                how = "with the batch dimension: max_batch_size 0" if max_batch == 0 else "without the batch dimension"
                raise ConfigError(f"{what} dims {list(dims[:8])} do not fit the input's {list(tensor.dims)} ({how}): "
                                  "Triton fails the warm-up, and the load")
            data_file = _one(value, "input_data_file")
            if data_file is not None:
                size = 1 if dims else 0  # GetElementCount: 0 for no dims
                for d in dims:
                    size *= d
                _check_warmup_file(model_dir, data_file, size * _TYPE_BYTES.get(data_type, 0), what)


def _check_warmup_file(model_dir: Path, name: str, needed: int, what: str) -> None:
    """ConfigError unless `name`, as Triton joins it to the model's warmup/ directory (JoinPath: a leading / too),
    is a regular file inside the model directory that it can read, of at least `needed` bytes (GenerateWarmupData:
    "warmup setting expects N bytes")."""
    folder = model_dir / _WARMUP_DIR
    where = f"{what}: input_data_file {name[:128]!r}"
    # Where the name leads is checked before anything there is looked at: the refusal goes back to an HTTP client
    # (POST .../load), which learnt from it whether any file the server could open existed, and its size.
    path = _inside(model_dir, str(PurePosixPath(_WARMUP_DIR, name.lstrip("/"))), where)
    try:
        problem = not_a_file(path)  # a FIFO or a device is refused from its stat, never opened
        if problem is None:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
    except (OSError, ValueError):  # unreadable, a name too long or holding a NUL
        problem = "cannot be read"
    if problem is not None:
        raise ConfigError(f"{where} is not a readable file in {folder}, where Triton reads it when it loads the "
                          "model (it fails the load without it)")
    if size < needed:  # a file of the model's own (checked above): its size helps whoever edits the config
        raise ConfigError(f"{where} holds {size} bytes, and Triton's warm-up needs {needed} (it fails the load)")


def _inside(model_dir: Path, name: str, where: str) -> Path:
    """`model_dir / name`; ConfigError unless `name` is a relative path without '..' that no symbolic link takes
    out of `model_dir` (`where`: the field, for the message)."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise ConfigError(f"{where} must name a file inside the model directory")
    path = model_dir / name
    _check_inside(model_dir, path, f"{where} must name a file inside the model directory")
    return path


def _check_inside(folder: Path, path: Path, refusal: str) -> None:
    """ConfigError(`refusal`, with why) when `path` resolves out of `folder`: a link to a file elsewhere is refused
    whether that file exists or not (its target's path alone tells), so the refusal tells nothing about it."""
    try:
        inside = folder.resolve() in path.resolve().parents
    except (OSError, ValueError):  # a link loop, a name too long, a NUL
        inside = False
    if not inside:
        raise ConfigError(f"{refusal} (it links to one outside)")
