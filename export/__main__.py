"""`python -m export --checkpoint runs/x --out exports/x [--targets onnx,openvino,tensorrt]`."""

from export.cli import main
from models import cli

cli.run(main, "python -m export")
