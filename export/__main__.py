"""`python -m export --checkpoint runs/x --out exports/x [--targets onnx,openvino,tensorrt]`."""

from export.cli import main

raise SystemExit(main())
