# vitc: `make demo` (install, train, export, benchmark) and `make test` (install, lint, tests) on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
STAMP := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1

.PHONY: install lint test test-all demo serve load-test paper paper-quick bench gpu-check gpu-probe clean

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

# Two pytest runs: training tests fork DataLoader workers, which must not inherit the thread pools that the
# export/serve tests leave loaded (onnxruntime, OpenVINO) in the same process. Each run spreads its files over
# TEST_WORKERS processes (pytest-xdist; a file stays on one worker, so its fixtures are built once): much of the
# suite waits on subprocesses, servers and deadlines, and 2 workers on 2 cores took the main run from 13 to 8.5
# minutes. TEST_WORKERS=0 runs each in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile)
test: install lint
	$(BIN)/pytest -q $(XDIST) -m "$(MARKS)" --durations=15 $(addprefix --ignore=,$(TRAIN_TESTS))
	$(BIN)/pytest -q $(XDIST) -m "$(MARKS)" --durations=10 $(TRAIN_TESTS)

test-all: install lint
	$(BIN)/pytest -q

# NVIDIA machines: a second environment with the GPU runtimes (onnxruntime-gpu, TensorRT; never beside the CPU
# onnxruntime), then the whole GPU path within its default budget (15 minutes, enough for a cold machine: see
# benchmarks/gpu_check.py); results land in benchmarks/results/. More flags: make gpu-check GPU_CHECK_ARGS='--budget
# 1200 --device cuda:1'.
GPU_VENV := .venv-gpu
GPU_CHECK_ARGS ?=
# A machine without an NVIDIA GPU and driver is told so in one line (exit 2) before the install, which is several
# GB (CUDA torch, onnxruntime-gpu, TensorRT) and could only end in "no CUDA GPU here". Either probe will do: a
# container may have the driver's /proc entries without nvidia-smi, or the reverse.
NVIDIA_SMI ?= nvidia-smi
NVIDIA_PROC ?= /proc/driver/nvidia/gpus
GPU_FOUND = $(shell { $(NVIDIA_SMI) -L 2>/dev/null | grep -q '^GPU ' || ls -A '$(NVIDIA_PROC)' 2>/dev/null | grep -q .; } && echo yes)

NO_GPU := no NVIDIA GPU here ($(NVIDIA_SMI) -L lists none, $(NVIDIA_PROC) is empty or missing): nothing installed; \
	the same steps on the CPU: python -m benchmarks.gpu_check --device cpu --smoke

# $(error) rather than a failing command: one line and exit 2, without make's own "Error" line after it.
gpu-probe:
	$(if $(GPU_FOUND),@:,$(error $(NO_GPU)))

# pip's output goes to $(GPU_VENV)/install.log: a failed install ends with one line saying why and where the rest is,
# not with pip's traceback (TensorRT's PyPI wheels are stubs that download the real ones from pypi.nvidia.com).
GPU_LOG := $(GPU_VENV)/install.log
$(GPU_VENV)/.installed-stamp: pyproject.toml constraints.txt | gpu-probe
	test -x $(GPU_VENV)/bin/python || $(PY) -m venv $(GPU_VENV)
	@echo "installing the GPU environment into $(GPU_VENV) (several GB; pip's output: $(GPU_LOG))"
	@{ $(GPU_VENV)/bin/python -m pip install -q --disable-pip-version-check --upgrade pip==26.3 \
		&& $(GPU_VENV)/bin/python -m pip install -q -c constraints.txt -e '.[train,convert,gpu]'; \
	} >$(GPU_LOG) 2>&1 || { \
		if grep -q 'pypi\.nvidia\.com' $(GPU_LOG); then \
			why="NVIDIA's wheels (TensorRT) download from https://pypi.nvidia.com/, which this machine could not reach"; \
		else why=$$(grep -E '^(ERROR|error):' $(GPU_LOG) | tail -n 1); fi; \
		echo "make gpu-check: installing the GPU environment failed: $${why:-see the log} (pip's output: $(GPU_LOG))" >&2; \
		exit 1; }
	touch $@

gpu-check: gpu-probe $(GPU_VENV)/.installed-stamp
	$(GPU_VENV)/bin/python -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

DEMO_EPOCHS ?= 2

demo: install
	$(PYTHON) -m models list
	$(PYTHON) -m train --model vit_c_mini --dataset animals --epochs $(DEMO_EPOCHS) --out runs/animals-vit_c --overwrite
	$(PYTHON) -m train --model vit_p_mini --dataset animals --epochs $(DEMO_EPOCHS) --out runs/animals-vit_p --overwrite
	$(PYTHON) -m export --checkpoint runs/animals-vit_c --out exports/animals-vit_c
	$(PYTHON) -m export --checkpoint runs/animals-vit_p --out exports/animals-vit_p
	$(PYTHON) -m export.report exports/animals-vit_c exports/animals-vit_p --png exports/demo-parity.png --overwrite
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

# A study resumes from what its directory holds: results/paper-reduced ships finished, so there `make paper-quick`
# only rebuilds the report; PAPER_QUICK_OUT=results/paper-reduced-rerun trains the whole study again.
PAPER_OUT ?= results/paper-full
PAPER_QUICK_OUT ?= results/paper-reduced

paper: install
	$(PYTHON) -m train.sweep --preset full --out $(PAPER_OUT) --workers 2

paper-quick: install
	$(PYTHON) -m train.sweep --preset reduced --out $(PAPER_QUICK_OUT) --workers 2

clean:
	rm -rf $(VENV) $(GPU_VENV) .pytest_cache .ruff_cache
