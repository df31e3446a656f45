"""Server settings: CLI flags and VITC_* environment variables, validated once at start (pydantic-settings)."""

from __future__ import annotations

import difflib
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, Field, PrivateAttr, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

import runtimes
from models.bundle import MAX_BATCH_LIMIT, NAME_RE, NAME_RULE, TRITON_CONFIG_FILE
from models.config import MAX_IMAGE_PIXELS
from models.device import DEVICE_RULE, is_device
from models.host import MAX_THREADS
from models.preprocessing import DEFAULT_MAX_IMAGE_PIXELS
from models.tolerance import TOLERANCES
from runtimes.base import MAX_PARALLEL, TUNABLES
from runtimes.registry import DEFAULT_RUNTIME, load_failures, shadowed
from serve.address import host_problem

MiB = 1 << 20
GiB = 1 << 30
# Upper bounds of the size limits: far above any sane setting, low enough that a typo (1e21) is refused at start
# rather than silently meaning "no limit" (a body or buffer that big would exhaust memory long before).
MAX_BODY_BYTES = 1 * GiB
MAX_BUFFERED_BYTES = 16 * GiB
MAX_DECODE_BUDGET_PIXELS = 10_000_000_000
TUNING = TUNABLES  # the settings a runtime may honour (runtimes.base.Runtime.tunes); the rest are refused for it
# The precisions an artifact can have: those export gates (models.tolerance), the one list of them.
Precision = Literal[tuple(TOLERANCES)]


# Settings whose flag is spelt otherwise than the setting: `access_log` is only ever turned off on the command line.
FLAGS = {"models": "--model", "access_log": "--no-access-log"}


def flag(setting: str) -> str:
    """The command-line flag of a setting."""
    return FLAGS.get(setting) or "--" + setting.replace("_", "-")


# What a Triton-style repository decides per model instead of the server's settings (served alone, they would be
# ignored): the runtime and precision are its version's artifact's, as its config.pbtxt's platform says
# (serve.registry.load_model), the batching is its config.pbtxt's (read as Triton reads it: a file without
# max_batch_size has 0). --device and --max-queue-size apply to every repository model, and the tuning flags to those
# whose runtime uses them (`repository_tuning`).
REPOSITORY_DECIDES = {
    "backend": "its platform, the runtime of its version's artifact",
    "precision": "its version's artifact",
    # No setting's name in these: serve.__main__ turns those into flags.
    "max_batch_size": "its max batch size",
    "max_queue_delay_ms": "its dynamic_batching delay, 0 when not given",
}
# What a model directory without config.pbtxt takes from the server's settings (the README: "serves with the server's
# settings").
UNCONFIGURED = ("max_batch_size", "max_queue_delay_ms")


# The settings given as flags (Settings' keyword arguments) while a Settings is validated: its cross-setting checks
# run before the instance can hold them, and must name a VITC_* variable where the value came from one (`named`).
_FLAGS_GIVEN: ContextVar[frozenset[str]] = ContextVar("vitc_flags_given", default=frozenset())


def environment_value(setting: str) -> str | None:
    """The raw value of the VITC_* variable of `setting` (spelt in upper case, as Settings reads it)."""
    return os.environ.get(f"VITC_{setting.upper()}")


class _UpperCaseEnvironment(EnvSettingsSource):
    """The environment as Settings reads it: the VITC_* variables by their upper-case names alone. pydantic-settings
    matches a name in any case (its case_sensitive=True would want VITC_max_batch_size), so `vitc_port` was read as the
    port, and of two spellings the later in the environment won (the image's HEALTHCHECK reads VITC_PORT alone); any
    other spelling is now a misspelt setting (`unknown_environment`)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in os.environ.items() if name == name.upper()}


EMPTY_PATH = "the path is empty (it would be the current directory): "
ECHO_CHARS = 120  # of a value a refusal echoes: enough to know it by, not a 100 KB line (a file pasted into VITC_HOST)
_DIGITS = re.compile(r"\s*[+-]?(\d+)\s*")  # a whole number as int() reads one (Unicode digits too)


def clipped(text: str) -> str:
    """`text` as a refusal echoes it: its first ECHO_CHARS characters, and its length where it was cut."""
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text):,} characters)"


def model_path_text(arg: str) -> str:
    """The path of a --model value, `path` or `name=path`, as written (serve.registry.parse_model_arg's reading)."""
    name, sep, path = arg.partition("=")
    return path if sep and NAME_RE.fullmatch(name) else arg


def misnamed_model(arg: str) -> str | None:
    """Why the --model value `arg` names no model, or None: `NAME=PATH` whose NAME breaks the naming rule while PATH
    is a directory and `arg` as a whole is none. Read as a path (a bundle's path may hold '='), it was reported as a
    missing directory, which hid the real mistake."""
    name, sep, path = arg.partition("=")
    if not sep or NAME_RE.fullmatch(name) or not path.strip() or not _is_dir(path) or _is_dir(arg):
        return None
    return (f"{name!r} is not a model name (the part before '=' of {arg!r}): a model name is {NAME_RULE}; "
            "give NAME=PATH with such a name, or PATH alone to serve the bundle under its own name")


def _is_dir(path: str) -> bool:
    """Path.is_dir, False where it cannot be looked at (Python 3.11 raises EACCES for a closed parent)."""
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return False


def split_models(value: str) -> object:
    """The --model values of VITC_MODELS: a JSON list, or comma-separated (ValueError for malformed JSON)."""
    value = value.strip()
    if not value.startswith("["):
        return [s.strip() for s in value.split(",") if s.strip()]
    try:
        return json.loads(value)
    except RecursionError:  # json's decoder recurses once per level: '[' * 3000 ended the start in a traceback
        raise ValueError('JSON nested too deeply: give a JSON list of paths, ["PATH", "NAME=PATH"]') from None


def _model_path_given(arg: str) -> str:
    """A --model value names a path (an empty one, or `name=`, would be the current directory). Checked per item, so
    that a refusal names the item (`item 2`) and echoes it, not the whole list."""
    if not model_path_text(arg).strip():
        raise ValueError(EMPTY_PATH + "give a bundle directory as PATH or NAME=PATH")
    if why := misnamed_model(arg):
        raise ValueError(why)
    return arg


class Settings(BaseSettings):
    """Everything the service is configured by; flags override VITC_<NAME> environment variables."""

    model_config = SettingsConfigDict(env_prefix="VITC_", extra="forbid", protected_namespaces=())
    _flags: frozenset[str] | None = PrivateAttr(None)  # the settings given as flags (`named`)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   **_others: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags, then the VITC_* variables spelt in upper case (no .env or secrets file is configured)."""
        return init_settings, _UpperCaseEnvironment(settings_cls)

    def __init__(self, **values: Any) -> None:
        token = _FLAGS_GIVEN.set(frozenset(values))
        try:
            super().__init__(**values)
        finally:
            _FLAGS_GIVEN.reset(token)
        self._flags = frozenset(values)

    def named(self, setting: str, shown: str = "") -> str:
        """A setting as the user gave it, for a refusal: `VITC_PARALLEL=4` when the environment set it (no flag was
        passed: naming --parallel sent users looking for a flag they never gave), else its flag followed by
        `shown` (its value as the message shows it, or nothing)."""
        flags = self._flags if self._flags is not None else _FLAGS_GIVEN.get()
        if setting in self.model_fields_set and setting not in flags and \
                (value := environment_value(setting)) is not None:
            return f"VITC_{setting.upper()}={clipped(value)}"
        return flag(setting) + shown

    # Which models: bundle paths, `name=path`, every bundle under model_dir, every model of model_repository.
    models: Annotated[list[Annotated[str, AfterValidator(_model_path_given)]], NoDecode] = Field(default_factory=list)
    model_dir: Path | None = None
    model_repository: Path | None = None  # a Triton-style repository (python -m export.triton writes one)
    # The default is checked too where it runs bundles: a plugin named like it that failed to register would
    # otherwise silently not run (`_known_backend`).
    backend: str = Field(DEFAULT_RUNTIME, description="a runtime of the registry (runtimes/registry.py)",
                         validate_default=True)
    device: str = Field("cpu", description=DEVICE_RULE)
    precision: Precision | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = None

    # Dynamic batching, per model.
    max_batch_size: int = Field(32, ge=1, le=MAX_BATCH_LIMIT)  # a bundle's, and BackendOptions.max_batch's, bound too
    max_queue_delay_ms: float = Field(2.0, ge=0, le=10_000, allow_inf_nan=False)
    max_queue_size: int = Field(256, ge=1, le=1_000_000)
    threads: int | None = Field(None, ge=1, le=MAX_THREADS, description="intra-op threads of one inference")
    parallel: int | None = Field(None, ge=1, le=MAX_PARALLEL, description="batches run at once (OpenVINO infer "
                                 "requests, onnxruntime CPU streams)")
    openvino_hint: Literal["throughput", "latency"] = "throughput"
    compile: bool = Field(False, description="torch: torch.compile (CUDA graphs per batch bucket on CUDA)")
    channels_last: bool | None = Field(None, description="torch: NHWC stem activations (None: on CUDA)")

    # Hard edges.
    max_body_bytes: int = Field(16 * MiB, ge=1024, le=MAX_BODY_BYTES)
    max_buffered_bytes: int | None = Field(None, ge=1024, le=MAX_BUFFERED_BYTES,
                                           description="request bodies held at once, all requests together, "
                                           "before 503 (None: 256 MiB or max_body_bytes if larger)")
    max_connections: int | None = Field(None, ge=1, le=1_000_000, description="connections open at once before "
                                        "503 (None: 1,000, fewer if the open-file limit is lower)")
    receive_timeout_s: float = Field(60.0, gt=0, le=3600, allow_inf_nan=False, description="a request's headers, "
                                     "and then its body, must each arrive within this, else 408")
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1, le=MAX_IMAGE_PIXELS,
                                  description="decoded width*height limit (decompression bombs)")
    max_files: int = Field(64, ge=1, le=1024, description="images per multipart request")
    # Draft decoding of big JPEGs (1/2, 1/4 or 1/8 scale, much faster): "measured" uses it only for models whose
    # served-path record shows it costs <= 0.1 point of accuracy; "always" / "never" for every model.
    jpeg_draft: Literal["measured", "always", "never"] = "measured"
    decode_threads: int | None = Field(None, ge=1, le=256)
    decode_queue: int = Field(256, ge=0, le=100_000, description="decode jobs waiting for a thread before 503")
    decode_budget_pixels: int = Field(100_000_000, ge=1, le=MAX_DECODE_BUDGET_PIXELS,
                                      description="pixels decoded at once, all requests (at least "
                                      "max_image_pixels)")
    # uvicorn closes an idle keep-alive connection silently after this. A proxy or load balancer that pools
    # connections to this server must drop idle ones sooner (AWS ALB keeps them 60 s, nginx's upstream keepalive_timeout
    # 60 s, GCP's backend service 600 s): otherwise it sends a request on a connection being closed, and its client
    # gets a 502 (a POST is not retried).
    keep_alive_s: float = Field(15.0, ge=1, le=3600, allow_inf_nan=False,
                                description="how long an idle keep-alive connection stays open")
    inference_timeout_s: float = Field(30.0, gt=0, le=3600, allow_inf_nan=False,
                                       description="one batch's limit before 504")
    # As Triton's --strict-readiness (default true): /v2/health/ready is false while a model the server knows is not
    # ready and was not unloaded (a load that failed, a runtime not installed here), or while it serves no model at
    # all (every one unloaded), so a readiness probe keeps a server that lost a model, or serves nothing, out of
    # service; false: ready once started, whatever its models' state.
    strict_readiness: bool = Field(True, description="/v2/health/ready needs a model served and every model it "
                                   "knows ready (Triton's --strict-readiness)")
    # As Triton's --model-control-mode: "none" (Triton's default) serves the models found at start and refuses the
    # repository API's load and unload (any client that reached the port could otherwise take every model offline);
    # "explicit" lets a client load and unload them.
    model_control_mode: Literal["none", "explicit"] = "none"
    graceful_timeout_s: float = Field(30.0, ge=0, le=3600, allow_inf_nan=False,
                                      description="in-flight requests' time to finish at SIGTERM / SIGINT")
    # Kubernetes removes a terminating pod from its Service's endpoints while it sends SIGTERM, not before: kube-proxy
    # and ingresses keep routing to it for a second or more. Reporting not ready at once and answering on meanwhile
    # (as Triton does) keeps a rolling update from refusing connections; 0 stops at once (Ctrl-C, local use).
    shutdown_delay: float = Field(0.0, ge=0, le=300, allow_inf_nan=False, description="seconds between SIGTERM / "
                                  "SIGINT and the drain, reporting not ready while requests are still answered")

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True

    @property
    def buffered_bytes_limit(self) -> int:
        """max_buffered_bytes, or its default: 256 MiB, at least one largest body."""
        return self.max_buffered_bytes or max(256 * MiB, self.max_body_bytes)

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, v: object) -> object:
        """VITC_MODELS may be a JSON list or comma-separated."""
        return split_models(v) if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _model_dir_of_the_environment_is_a_default(cls, data: Any) -> Any:
        """A model directory from the environment (the image's VITC_MODEL_DIR=/models) gives way to models given any
        other way, as flags or variables alike: VITC_MODELS=/models/x serves x alone, as `--model /models/x` does,
        and VITC_MODEL_REPOSITORY=/models is a repository alone, whose refusals then apply. A --model-dir flag is
        the user's own choice and serves beside them."""
        if isinstance(data, dict) and "model_dir" in data and "model_dir" not in _FLAGS_GIVEN.get() \
                and (_names_models(data.get("models")) or data.get("model_repository") is not None):
            return {k: v for k, v in data.items() if k != "model_dir"}
        return data

    @field_validator("model_dir", "model_repository", mode="before")
    @classmethod
    def _path_given(cls, v: object) -> object:
        """An empty path is refused: Path("") is the current directory, so `--model-dir "$MODELS"` (or
        VITC_MODEL_DIR=$MODELS) with MODELS unset would serve whatever bundles lie where the server started."""
        if isinstance(v, str) and not v.strip():
            raise ValueError(EMPTY_PATH + "give a directory, or leave the setting out")
        return v

    @model_validator(mode="after")
    def _buffer_holds_one_body(self) -> Settings:
        """The largest body allowed must fit the buffer budget, or it could never be received."""
        if self.max_buffered_bytes is not None and self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError(f"{self.named('max_buffered_bytes', f' ({self.max_buffered_bytes})')} must be at least "
                             f"{self.named('max_body_bytes', f' ({self.max_body_bytes})')}")
        return self

    @model_validator(mode="after")
    def _budget_holds_one_image(self) -> Settings:
        """The largest image allowed must fit the decode budget, or it could never be decoded: a budget left at its
        default grows to hold it, one set too small is refused."""
        if "decode_budget_pixels" not in self.model_fields_set:
            self.decode_budget_pixels = max(self.decode_budget_pixels, self.max_image_pixels)
        if self.decode_budget_pixels < self.max_image_pixels:
            raise ValueError(f"{self.named('decode_budget_pixels', f' ({self.decode_budget_pixels})')} must be at "
                             f"least {self.named('max_image_pixels', f' ({self.max_image_pixels})')}")
        return self

    @property
    def repository_alone(self) -> bool:
        """Whether every model comes from model_repository (each then runs on its own artifact's runtime)."""
        return _repository_alone(self.models, self.model_dir, self.model_repository)

    def tuning_ignored(self, honoured: Iterable[str]) -> list[str]:
        """The tuning settings given that a runtime honouring only `honoured` would silently ignore."""
        fields, honoured = type(self).model_fields, set(honoured)
        # --parallel 1 is what a backend without streams does anyway (a VITC_PARALLEL=1 meant for all is no error).
        return [n for n in TUNING if n not in honoured and getattr(self, n) != fields[n].default
                and not (n == "parallel" and self.parallel == 1)]

    @model_validator(mode="after")
    def _tuning_the_backend_honours(self) -> Settings:
        """A tuning setting the backend does not honour is refused: it would silently do nothing. (Repository
        models run on their own artifact's runtime: a repository alone is checked by `_repository_decides`, and
        once its models are loaded, by `repository_tuning`.)"""
        if self.repository_alone:
            return self
        honoured = runtimes.get(self.backend).tunes
        if ignored := self.tuning_ignored(honoured):
            takes = ", ".join(flag(n) for n in honoured) or "none of them"
            raise ValueError(f"{self.named('backend', f' {self.backend}')} does not use "
                             f"{', '.join(map(self.named, ignored))} (its tuning flags: {takes})")
        return self

    @model_validator(mode="after")
    def _repository_decides(self) -> Settings:
        """With a repository alone, a setting each model's config.pbtxt decides instead is refused, not ignored (an
        operator's VITC_PRECISION=int8 would serve fp32 without a word). Those that still apply to a model directory
        without config.pbtxt (UNCONFIGURED) are refused only where every model directory has one."""
        if not self.repository_alone:
            return self
        given = [n for n in REPOSITORY_DECIDES if n in self.model_fields_set]
        if any(n in UNCONFIGURED for n in given) and not _every_model_configured(self.model_repository):
            given = [n for n in given if n not in UNCONFIGURED]
        if given:
            names, them = ", ".join(map(self.named, given)), "it" if len(given) == 1 else "them"
            why = "; ".join(f"{flag(n)}: {REPOSITORY_DECIDES[n]}" for n in given)
            raise ValueError(f"{names} {'does' if len(given) == 1 else 'do'} not apply to "
                             f"{self.named('model_repository')}: each model's config.pbtxt decides {them} ({why}); "
                             f"leave {them} out, or serve bundles with --model")
        return self

    @model_validator(mode="after")
    def _latency_runs_one_batch(self) -> Settings:
        """The latency hint runs one batch at a time on every core: more at once contradicts it."""
        if self.openvino_hint == "latency" and (self.parallel or 1) > 1:
            raise ValueError(f"{self.named('openvino_hint', ' latency')} runs one batch at a time; "
                             f"{self.named('parallel', f' {self.parallel}')} needs --openvino-hint throughput")
        return self

    @field_validator("jpeg_draft", mode="before")
    @classmethod
    def _draft_from_bool(cls, v: object) -> object:
        """Earlier releases took a boolean (VITC_JPEG_DRAFT=false, --no-jpeg-draft): false is "never"."""
        if isinstance(v, bool) or str(v).strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return "measured" if str(v).strip().lower() in ("true", "1", "yes") else "never"
        return v

    @field_validator("model_control_mode", "backend", "precision", mode="before")
    @classmethod
    def _any_case(cls, v: object) -> object:
        """Names read in any case, spaces around them dropped (EXPLICIT, ONNXRUNTIME, FP16), as Triton reads
        --model-control-mode and export reads --targets and --precision: every one is lower case (runtime names by the
        registry's rule). Devices keep the runtimes' own rule (cpu, cuda:N)."""
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        """A device name the runtimes take, within their bounds (cuda:100 is refused here, not when a model loads)."""
        if not is_device(v):
            raise ValueError(f"must be {DEVICE_RULE}")
        return v

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str, info: ValidationInfo) -> str:
        """One of the registered runtimes (the registry is the only list of them), and where it runs bundles, not
        one whose name a module that failed to register claimed (a plugin meant to be this backend did not load:
        the other would run). A repository alone runs none on it: each model's artifact picks its runtime, checked
        as it loads (runtimes.registry.pick), and a --backend given with it is refused (`_repository_decides`)."""
        if v not in runtimes.names():
            raise ValueError(f"unknown backend; known: {', '.join(runtimes.names())}{load_failures()}")
        given = info.data  # the fields declared before this one: which models there are
        alone = _repository_alone(given.get("models"), given.get("model_dir"), given.get("model_repository"))
        if not alone and (why := shadowed("name", v)):
            raise ValueError(why)
        return v

    @field_validator("*", mode="before")
    @classmethod
    def _whole_number(cls, v: object, info: ValidationInfo) -> object:
        """A count from VITC_* is read as its flag reads it (int()): pydantic alone would take "4.0" for 4, which
        the flag refuses."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(v, str) and int in (annotation, *get_args(annotation)):
            try:
                return int(v)
            except ValueError:
                # Digits alone fail only past Python's limit on converting them (4,300): a whole number, far too long.
                if digits := _DIGITS.fullmatch(v):
                    raise ValueError(f"has too many digits ({len(digits[1]):,})") from None
                raise ValueError("must be a whole number") from None
        return v

    @field_validator("host")
    @classmethod
    def _host_to_listen_on(cls, v: str) -> str:
        """An address or a host name that resolves (serve.address), checked before any model loads: an empty or
        unresolvable VITC_HOST was refused only after every model had loaded, as a --host the user never gave. The
        whitespace around it is no part of it, as around VITC_PORT (a value read from a file ends in a newline)."""
        v = v.strip()
        if why := host_problem(v):
            raise ValueError(why)
        return v

    @field_validator("port", mode="before")
    @classmethod
    def _not_a_service_link(cls, v: object) -> object:
        """VITC_PORT=tcp://10.96.0.12:8000 is Kubernetes naming a Service `vitc` (see `service_links`), not this
        server's port: the default stands (the start log lists the links it ignored)."""
        if isinstance(v, str) and _URL.fullmatch(v.strip()):
            return cls.model_fields["port"].default
        # The image's HEALTHCHECK reads VITC_PORT as stripped ASCII digits: a port it would read otherwise ("+9000",
        # "9000.0", Arabic-Indic digits: int() takes them all) would leave the container unhealthy for good.
        if isinstance(v, str) and not (v.strip().isascii() and v.strip().isdigit()):
            raise ValueError("must be a port number in ASCII digits")
        return v.strip() if isinstance(v, str) else v

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: object) -> object:
        # HTTP strips the whitespace around a header's value: a key read from a file (a Kubernetes Secret made with
        # --from-file ends in a newline) could never match with its own.
        v = v.strip() if isinstance(v, str) else v
        return None if v in ("", None) else v

    @model_validator(mode="after")
    def _key_a_header_carries(self) -> Settings:
        """A key no Authorization header can carry is refused at start: the server would answer 401 to everyone.
        Checked here, not on the field, so that the refusal never shows the key (a field's error carries its
        input, which the command prints)."""
        if self.api_key is not None and (why := header_problem(self.api_key.get_secret_value())):
            raise ValueError(f"api_key (VITC_API_KEY) {why}, which no Authorization header can carry: every request "
                             "but the health checks would be refused (401); fix the key, or the Secret or file it "
                             "comes from")
        return self


def header_problem(key: str) -> str | None:
    """Why an HTTP header value cannot carry `key` (the server compares its UTF-8 bytes), or None: a control
    character (a line break, NUL, DEL, ESC; a tab inside is allowed, as HTTP allows it), or bytes that are not
    UTF-8 (Python reads those from the environment or argv as lone surrogates, which have no UTF-8 bytes)."""
    for ch in key:
        kind = unicodedata.category(ch)
        if kind == "Cs":
            return "holds bytes that are not UTF-8"
        if kind == "Cc" and ch != "\t":
            return f"holds the control character U+{ord(ch):04X}"
    return None


def _names_models(value: object) -> bool:
    """Whether a raw --model / VITC_MODELS value names a model (a malformed one counts: validation refuses it)."""
    if isinstance(value, str):
        try:
            return bool(split_models(value))
        except ValueError:
            return True
    return bool(value)


def _repository_alone(models: list[str] | None, model_dir: Path | None, model_repository: Path | None) -> bool:
    """Whether these settings serve model_repository's models alone (`Settings.repository_alone`)."""
    return model_repository is not None and not models and model_dir is None


def repository_tuning(settings: Settings, served: Iterable[str]) -> str | None:
    """With a repository alone, once its models are loaded on the runtimes `served`: the refusal of the tuning flags
    given that none of them uses (--compile with no model on torch), else None. Which runtime a model runs on is its
    artifact's, known only once loaded (a version directory holding a whole bundle runs its first artifact)."""
    served = sorted(set(served))
    if not settings.repository_alone or not served:
        return None
    if not (ignored := settings.tuning_ignored(t for name in served for t in runtimes.get(name).tunes)):
        return None
    names, them = ", ".join(map(settings.named, ignored)), "it" if len(ignored) == 1 else "them"
    return (f"{names} {'does' if len(ignored) == 1 else 'do'} not apply to {settings.named('model_repository')}: "
            f"no model of it runs on a runtime that uses {them} (each model's config.pbtxt and artifact decide its "
            f"runtime: {', '.join(served)}); leave {them} out, or serve bundles with --model")


def _every_model_configured(root: Path) -> bool:
    """Whether every model directory of the repository at `root` (as serve.registry.model_sources lists them) has a
    config.pbtxt; False when there is none, or it cannot be read (the start then says why)."""
    try:
        dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and NAME_RE.fullmatch(p.name)]
        return bool(dirs) and all((p / TRITON_CONFIG_FILE).is_file() for p in dirs)
    except OSError:
        return False


# Names a user may reach for: the flag's own spelling where the setting is named otherwise.
ENV_ALIASES = {"VITC_MODEL": "VITC_MODELS", "VITC_NO_ACCESS_LOG": "VITC_ACCESS_LOG=false",
               "VITC_NO_JPEG_DRAFT": "VITC_JPEG_DRAFT=never"}
OTHER_ENV = frozenset({"VITC_RUNTIMES"})  # read by the runtime registry, not a setting


# Kubernetes gives every pod the address of each Service of its namespace: a Service named `vitc` (or `vitc-api`)
# makes VITC_PORT (VITC_API_PORT) `tcp://10.96.0.12:8000`, VITC_SERVICE_HOST, VITC_PORT_8000_TCP_ADDR, ... (docker
# --link did the same). The `<NAME>_PORT` one is a link only in its URL form: VITC_PORT=9000 is the setting.
_LINK_NAME = re.compile(r"VITC_(?:[A-Z0-9_]+_)?(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?"
                        r"|PORT_[0-9]+_(?:TCP|UDP|SCTP)(?:_(?:PROTO|PORT|ADDR))?)")
_LINK_URL = re.compile(r"VITC_(?:[A-Z0-9_]+_)?PORT")
_URL = re.compile(r"(tcp|udp|sctp)://\S+")


def service_links(environ: dict[str, str]) -> list[str]:
    """The VITC_* variables that are Kubernetes service links (of a Service named vitc or vitc-*), not settings."""
    return sorted(n for n, v in environ.items() if _LINK_NAME.fullmatch(n)
                  or (_LINK_URL.fullmatch(n) and _URL.fullmatch(v.strip())))


def unknown_environment(environ: dict[str, str]) -> tuple[list[str], list[str]]:
    """VITC_* variables that are no setting: (the near misses of one, as "NAME: did you mean X", the others).
    Kubernetes service links are neither (see `service_links`)."""
    known = {f"VITC_{f.upper()}" for f in Settings.model_fields} | OTHER_ENV | set(service_links(environ))
    near, other = [], []
    # Exact names: Settings reads no other spelling (`vitc_port` is a near miss of VITC_PORT).
    for name in sorted(n for n in environ if n.upper().startswith("VITC_") and n not in known):
        meant = ENV_ALIASES.get(name.upper()) or next(iter(difflib.get_close_matches(name.upper(), known, 1, 0.8)),
                                                      None)
        (near if meant else other).append(f"{name}: did you mean {meant}?" if meant else name)
    return near, other
