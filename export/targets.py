"""Export targets: a runtime's target family at one precision ("onnx-fp32", "openvino-int8", ...), from the registry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from models.extras import installed
from runtimes import ExportError, Runtime, by_target, runtimes
from runtimes.registry import load_failures, shadowed


@dataclass(frozen=True)
class Target:
    """One artifact to build: a runtime at one precision."""

    runtime: Runtime
    precision: str

    @property
    def id(self) -> str:
        """The artifact id in the manifest, e.g. "onnx-fp16"."""
        return f"{self.runtime.target}-{self.precision}"


def known_targets() -> list[str]:
    """Every accepted target name, for error messages and --help."""
    names = []
    for rt in runtimes():
        names += [rt.target] + [f"{rt.target}-{p}" for p in rt.precisions]
    return names


def _runtime_hint(family: str) -> str:
    """Where `family` names a runtime rather than its target ("onnxruntime-fp32", as the benchmark names it), the
    target that runtime's artifacts take."""
    rt = next((r for r in runtimes() if r.name == family and r.target != family), None)
    return f" ({family} is a runtime: its artifacts are the target {rt.target!r})" if rt else ""


def parse_targets(names: Sequence[str]) -> list[Target]:
    """Target names ("openvino", "openvino-int8", ...) -> de-duplicated Targets; raises ExportError."""
    out: list[Target] = []
    for raw in names:
        name = raw.strip().lower()
        family, _, precision = name.partition("-")
        rt = by_target(family)
        if rt is None or (precision and precision not in rt.precisions):
            raise ExportError(f"unknown target {raw!r}{_runtime_hint(family)}; known: {', '.join(known_targets())}"
                              f"{load_failures()}")
        if why := shadowed("target", family):  # a plugin meant to be this target did not load: the other would run
            raise ExportError(f"target {raw!r}: {why}")
        for p in (precision,) if precision else rt.default_precisions:
            if Target(rt, p) not in out:
                out.append(Target(rt, p))
    if not out:
        raise ExportError(f"no targets given; known: {', '.join(known_targets())}")
    return out


GRAPH_PACKAGES = ("onnx", "onnxscript")  # torch.onnx's exporter: every artifact but torch's own is built from ONNX
QUANTIZER = "nncf"  # every int8 artifact's calibration and Q/DQ graph


def missing_converters(targets: Sequence[Target]) -> list[str]:
    """The conversion packages `targets` need and this environment lacks (checked before any work starts: an int8
    artifact would otherwise be refused with an import error in its manifest, the export exiting 0)."""
    graph = [t for t in targets if t.runtime.target != "torch"]
    wanted = [*(GRAPH_PACKAGES if graph else ()), *((QUANTIZER,) if any(t.precision == "int8" for t in graph) else ())]
    return [m for m in wanted if not installed(m)]
