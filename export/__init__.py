"""Checkpoint -> deployable bundle (ONNX, OpenVINO, TensorRT, torch), each artifact parity-checked against torch.

Entry points: `python -m export` (several targets), `python -m export.onnx|openvino|tensorrt`,
`python -m export.report BUNDLE`; library: `export.bundle.build_bundle`.
"""
