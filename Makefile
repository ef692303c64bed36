# The two set-up commands: `make demo` and `make test`. Each creates .venv when
# missing and installs the project into it first.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch by default; for CUDA: make TORCH_SPEC='torch' demo
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint install bench clean

$(BIN)/shardmf: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/shardmf

demo: install
	$(BIN)/shardmf demo --out demo-run

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf demo-run .pytest_cache build *.egg-info
