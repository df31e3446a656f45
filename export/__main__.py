"""`python -m export --checkpoint runs/x --out exports/x [--targets onnx,openvino,tensorrt]`."""

from export.cli import main
from models.cli import run

run(main, "python -m export")
