"""A runtime plugin written the way README's "Adding a runtime" says (`VITC_RUNTIMES=plugin_faults_rt`), that
misbehaves on purpose for tests/test_runtime_plugin_faults.py and tests/test_runtime_build_contract.py.

Its artifact is a copy of the export's ONNX hub run by onnxruntime: it passes the parity gate, so its bundle has
golden inputs. The fault is $PLUGIN_FAULT, read at every call; the file $PLUGIN_FAULT_FILE, while it exists,
overrides it (a server already running is switched by writing it):
- build: "collide" (writes and returns model.onnx, the onnx artifact's file), "overwrite" (returns its own file
  but rewrites model.onnx too), "scratch" (returns the hub in .scratch), "dup" (returns its file twice), "outside"
  (returns a file beside the bundle), "subdir" (writes and returns SUBDIR/faultrt.onnx: servable), "subdir_str" (the
  same returned as a str), "subdir_rows" (the same failing its gate as "rows" does); what it returns: "built_none",
  "files_item_str" (a list of str), "info_numpy" (an array), "info_nan", "info_scalars" (numpy scalars, an int
  key: converted), "info_core" (keys naming the record's own fields), "info_hint" (an inference_precision that is
  no tag), "info_huge" (17 MiB: a manifest past the reader's bound), "raise_long" (an error of one 128 Ki-character
  line naming a file with an undecodable byte); RUNTIME_HUBLESS (no needs_hub=True) builds
  the same way, asking for the hub, and RUNTIME_IR too, its files in a format that takes other files;
- version(): "version_tuple", "version_lines" (two lines);
- infer: "raise" (an ordinary exception, two lines), "int" (int32 logits), "rows" (one row whatever the batch);
- describe: "describe_raise", "describe_none", "describe_set" (a set in it), "describe_numpy" (numpy scalars),
  "describe_oom" (MemoryError, as a C++ std::bad_alloc surfaces), "describe_threads" (a thread that could not start).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from runtimes import LoadSpec, Runtime, Variant
from runtimes.build import Built, ExportContext

FILE = "faultrt.onnx"
SUBDIR = "faultrt"  # a directory of its own in the bundle, which the "subdir" builds write their file into


def fault() -> str:
    """The fault in force now."""
    switch = os.environ.get("PLUGIN_FAULT_FILE")
    if switch and Path(switch).exists():
        return Path(switch).read_text().strip()
    return os.environ.get("PLUGIN_FAULT", "")


def build(ctx: ExportContext, precision: str) -> Built:
    mode = fault()
    if mode == "scratch":
        return Built([ctx.hub_onnx()], {})
    if mode == "raise_long":
        undecodable = ctx.workdir / os.fsdecode(b"w\xff.bin")
        raise ValueError(f"cannot convert {undecodable}: " + "x" * (1 << 17))
    out = ctx.workdir / ("model.onnx" if mode == "collide" else FILE)
    if mode == "outside":
        out = ctx.workdir.parent / FILE
    if mode.startswith("subdir"):
        out = ctx.workdir / SUBDIR / FILE
        out.parent.mkdir()
    shutil.copyfile(ctx.hub_onnx(), out)
    if mode in ("collide", "overwrite"):  # valid ONNX no longer, and another size than the onnx artifact's
        with open(ctx.workdir / "model.onnx", "ab") as f:
            f.write(b"\0")
    returned: dict[str, Any] = {
        "built_none": None, "files_item_str": Built([str(out)]),  # type: ignore[list-item]
        "subdir_str": Built([str(out)]),  # type: ignore[list-item]
        "info_numpy": Built([out], {"arr": np.arange(3)}), "info_nan": Built([out], {"x": float("nan")}),
        "info_scalars": Built([out], {"threads": np.int64(2), "scale": np.float32(0.5), 7: "seven"}),
        "info_core": Built([out], {"opset": 20, "runtime": "evil", "files": 1}),
        "info_hint": Built([out], {"inference_precision": 3}),
    }
    if mode == "info_huge":
        return Built([out], {"blob": "x" * (17 << 20)})
    return returned.get(mode, Built([out, out] if mode == "dup" else [out], {}))


def version() -> Any:
    return {"version_tuple": (1, 2, 0), "version_lines": "1.0\nbuilt by hand"}.get(fault(), "0.1")


class FaultBackend:
    runtime = "faultrt"

    def __init__(self, spec: LoadSpec) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(spec.file(".onnx")), providers=["CPUExecutionProvider"])
        self.precision, self.device, self.max_batch, self.parallelism = spec.precision, spec.device, spec.max_batch, 1

    def infer(self, batch: np.ndarray) -> Any:
        mode = fault()
        if mode == "raise":
            raise ValueError("plugin kernel failed\nsecond line")
        y = self.session.run(None, {"input": batch})[0]
        return {"int": lambda: y.astype(np.int32), "rows": lambda: y[:1], "subdir_rows": lambda: y[:1]}.get(
            mode, lambda: y)()

    def describe(self) -> Any:
        mode = fault()
        if mode == "describe_raise":
            raise ValueError("describe broke\nsecond line")
        if mode == "describe_oom":
            raise MemoryError("std::bad_alloc")
        if mode == "describe_threads":
            raise RuntimeError("can't start new thread")
        return {"describe_none": None, "describe_set": {"providers": {"cpu"}},
                "describe_numpy": {"threads": np.int64(2), "scale": np.float32(0.5), "fast": np.bool_(True)},
                }.get(mode, {"threads": 1})

    def close(self) -> None:
        self.session = None


RUNTIME = Runtime(
    name="faultrt", target="faultrt", packages=("onnxruntime",), install="pip install onnxruntime", format="onnx",
    triton_platform="faultrt_platform", precisions=("fp32",), default_precisions=("fp32",), devices=("cpu",),
    build=build, load=FaultBackend, version=version, variants=(Variant("fp32"),), needs_hub=True,
)
RUNTIME_HUBLESS = dataclasses.replace(RUNTIME, name="hubless", target="hubless", needs_hub=False)
RUNTIME_IR = dataclasses.replace(RUNTIME, name="irfault", target="irfault", format="openvino-ir")  # one .xml, one .bin
