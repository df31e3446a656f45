"""TensorRT engines from the ONNX hub (full builder in progress); without TensorRT the CLI exits 2."""

from __future__ import annotations

from export.context import ExportError

RUNTIME = "tensorrt"


def require():  # noqa: ANN201 - the tensorrt module
    """Import TensorRT or raise ExportError with one line saying why it is needed."""
    try:
        import tensorrt
    except ImportError:
        raise ExportError("TensorRT is not installed (pip install tensorrt; needs an NVIDIA GPU)") from None
    return tensorrt


if __name__ == "__main__":
    from export.cli import main

    raise SystemExit(main(family="tensorrt"))
