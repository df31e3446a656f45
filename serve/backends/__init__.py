"""Inference backends behind one Protocol: onnxruntime, OpenVINO, TensorRT and torch, each imported lazily."""

from serve.backends.base import Backend, BackendError, BackendOptions, load_backend

__all__ = ["Backend", "BackendError", "BackendOptions", "load_backend"]
