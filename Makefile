# make run   set up .venv (if absent), install, train on configs/hotdog.yaml
# make test  set up .venv (if absent), install, run the test suite
# make lint  ruff's formatter and linter in check mode (installs ruff into .venv if needed)
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CONFIG  ?= configs/hotdog.yaml
# the releases that lie on this machine's disk (torch 2.14.1 / torchvision 0.29.1)
TORCH   ?= torch==2.14.1 torchvision==0.29.1
RUFF    ?= ruff==0.17.6

.PHONY: run test lint install tensorboard clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,app,export,heif]'
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/python -m hotdog_torch.train --config $(CONFIG)

test: install
	$(BIN)/python -m pytest -q

$(BIN)/ruff: | $(BIN)/python
	$(BIN)/pip install -q $(RUFF)

lint: $(BIN)/ruff
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

tensorboard: install
	$(BIN)/tensorboard --logdir runs --host 127.0.0.1 --port 6006

clean:
	rm -rf runs/*/ .pytest_cache
