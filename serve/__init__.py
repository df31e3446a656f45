"""The inference service: `python -m serve --model exports/<bundle> --backend onnxruntime|openvino|tensorrt|torch`.

Nothing heavy is imported here, so `python -m serve` can refuse bad arguments before loading any runtime.
"""

# The package version (pyproject.toml), kept literal so that importing serve stays cheap; a test ties the two.
__version__ = "0.1.0"
