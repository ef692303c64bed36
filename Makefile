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

# Peers benchmark (bench/peers/): Surprise, Spark ALS, a plain PyTorch MF and shardmf on the
# same exported splits. The peers live in their own venv, never in the project's
# dependencies. Extra driver flags: make bench-peers PEERS_ARGS='--big --snapshot-head'
PEERS_VENV ?= bench/.venv-peers
PEERS_ARGS ?=

$(PEERS_VENV)/.installed: bench/peers/requirements.txt
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q -r bench/peers/requirements.txt
	touch $@

.PHONY: bench-peers
bench-peers: install $(PEERS_VENV)/.installed
	$(PEERS_VENV)/bin/python bench/peers/run_peers.py --shardmf $(BIN)/shardmf \
		--torch-python $(BIN)/python --peers-python $(PEERS_VENV)/bin/python $(PEERS_ARGS)

# Ranking peers (bench/ranking_peers.py): shardmf's top-10 lists beside the `implicit`
# library's ALS and BPR and most-popular, scored by the project's own ranking code. The
# peers live in their own venv (bench/peers/ranking-requirements.txt), never the project's.
RANKING_PEERS_VENV ?= bench/.venv-ranking-peers
RANKING_ARGS ?=

$(RANKING_PEERS_VENV)/.installed: bench/peers/ranking-requirements.txt
	test -x $(RANKING_PEERS_VENV)/bin/python || $(PYTHON) -m venv $(RANKING_PEERS_VENV)
	$(RANKING_PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(RANKING_PEERS_VENV)/bin/python -m pip install -q -r bench/peers/ranking-requirements.txt
	touch $@

.PHONY: bench-ranking
bench-ranking: install $(RANKING_PEERS_VENV)/.installed
	$(BIN)/python bench/ranking_peers.py --shardmf $(BIN)/shardmf \
		--peers-python $(RANKING_PEERS_VENV)/bin/python $(RANKING_ARGS)
