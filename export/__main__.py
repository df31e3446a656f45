"""`python -m export --checkpoint runs/x --out exports/x [--targets onnx,openvino,tensorrt]`."""

import models.cli  # noqa: F401 - first: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143)

# isort: split
from export.cli import main
from models import cli

cli.run(main, "python -m export")
