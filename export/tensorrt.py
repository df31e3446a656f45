"""`python -m export.tensorrt --checkpoint runs/x --out exports/x`: TensorRT engines built on this GPU (fp16 default).

A thin entry point: the runtime itself lives in runtimes/, the export in export/bundle.py.
"""

import models.cli  # noqa: F401 - first: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143)

# isort: split
from export.cli import main

if __name__ == "__main__":
    from models import cli

    cli.run(lambda: main(family="tensorrt"), "python -m export.tensorrt")
