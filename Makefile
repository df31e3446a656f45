# vitc: `make demo` (install, train, export, benchmark) and `make test` (install, lint, tests) on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
STAMP := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1

.PHONY: install lint test test-all demo serve load-test paper paper-quick bench gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check --upgrade pip==26.3
	$(PYTHON) -m pip install -q -c constraints.txt -e '.[train,export,serve,dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	@if [ -f Dockerfile ]; then $(BIN)/hadolint Dockerfile; fi
	@if [ -f Dockerfile.gpu ]; then $(BIN)/hadolint Dockerfile.gpu; fi

MARKS ?= not slow and not gpu and not tensorrt
TRAIN_TESTS := tests/test_train.py tests/test_train_ddp.py tests/test_train_folder.py tests/test_train_resume.py \
	tests/test_sweep.py tests/test_train_cli_safety.py tests/test_train_data_checks.py \
	tests/test_train_corrupt_consumers.py tests/test_sweep_hardening.py

# Two pytest processes: training tests fork DataLoader workers, which must not inherit the thread pools that the
# export/serve tests leave loaded (onnxruntime, OpenVINO) in the same process.
test: install lint
	$(BIN)/pytest -q -m "$(MARKS)" $(addprefix --ignore=,$(TRAIN_TESTS))
	$(BIN)/pytest -q -m "$(MARKS)" $(TRAIN_TESTS)

test-all: install lint
	$(BIN)/pytest -q

# NVIDIA machines: a second environment with the GPU runtimes (onnxruntime-gpu, TensorRT; never beside the CPU
# onnxruntime), then the whole GPU path within a 5-minute budget (--budget); results land in benchmarks/results/.
GPU_VENV := .venv-gpu
$(GPU_VENV)/.installed-stamp: pyproject.toml constraints.txt
	test -x $(GPU_VENV)/bin/python || $(PY) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --disable-pip-version-check --upgrade pip==26.3
	$(GPU_VENV)/bin/python -m pip install -q -c constraints.txt -e '.[train,convert,gpu]'
	touch $@

gpu-check: $(GPU_VENV)/.installed-stamp
	$(GPU_VENV)/bin/python -m benchmarks.gpu_check

DEMO_EPOCHS ?= 2

demo: install
	$(PYTHON) -m models list
	$(PYTHON) -m train --model vit_c_mini --dataset animals --epochs $(DEMO_EPOCHS) --out runs/animals-vit_c --overwrite
	$(PYTHON) -m train --model vit_p_mini --dataset animals --epochs $(DEMO_EPOCHS) --out runs/animals-vit_p --overwrite
	$(PYTHON) -m export --checkpoint runs/animals-vit_c --out exports/animals-vit_c --parity-samples 1000
	$(PYTHON) -m export --checkpoint runs/animals-vit_p --out exports/animals-vit_p --parity-samples 1000
	$(PYTHON) -m export.report exports/animals-vit_c exports/animals-vit_p --png exports/demo-parity.png
	$(PYTHON) benchmarks/latency.py --pairs mini --batch-sizes 1,8 --cell-seconds 3 --out exports/demo-bench
	@echo
	@echo "Serve the trained pair:  make serve   (http://127.0.0.1:8000/docs)"
	@echo "  $(PYTHON) -m serve.sample --dataset animals --out sample.png"
	@echo "  curl -s -H 'content-type: image/png' --data-binary @sample.png http://127.0.0.1:8000/v1/models/animals-vit_c/classify"

serve: install
	$(PYTHON) -m serve --model exports/animals-vit_c --model exports/animals-vit_p --backend onnxruntime

load-test: install
	$(PYTHON) -m benchmarks.load --start --model exports/animals-vit_c --model exports/animals-vit_p \
		--out benchmarks/results/load-demo-onnxruntime.json

bench: install
	$(PYTHON) benchmarks/latency.py

paper: install
	$(PYTHON) -m train.sweep --preset full --out results/paper-full --workers 2

paper-quick: install
	$(PYTHON) -m train.sweep --preset reduced --out results/paper-reduced --workers 2

clean:
	rm -rf $(VENV) $(GPU_VENV) .pytest_cache .ruff_cache
