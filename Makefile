# One-command entry points. `make demo` and `make test` work on a machine where nothing is installed:
# they create .venv, install torch 2.13.0 (CPU) FIRST, then the package with its dependencies.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.adatsq-installed

.PHONY: setup demo test test-slow lint bench-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]' -c constraints.txt
	touch $(STAMP)

demo: setup
	$(BIN)/adatsq quantize reference --recipe recipes/reference/gptq-w4a8.yaml --out out/demo-gptq-w4a8 --overwrite
	$(BIN)/adatsq inspect out/demo-gptq-w4a8 | tail -n 1
	$(BIN)/adatsq eval out/demo-gptq-w4a8 --samples 100

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The kernel benchmark's own venv: peer libraries (torchao, optimum-quanto) never enter the project's.
bench-venv: .bench-venv/.installed

.bench-venv/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv .bench-venv
	.bench-venv/bin/python -m pip install --quiet torch==2.13.0
	.bench-venv/bin/python -m pip install --quiet torchao==0.18.0 optimum-quanto==0.2.7 -e . -c constraints.txt
	touch .bench-venv/.installed
