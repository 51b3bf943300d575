# make run   set up .venv (if absent), install, train on configs/hotdog.yaml
# make test  set up .venv (if absent), install, run the test suite
# make lint  ruff's formatter and linter in check mode (installs ruff into .venv if needed)
# make app   the hot-dog app on http://127.0.0.1:8000/: trains configs/photos.yaml into runs/photos once, then serves it
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CONFIG  ?= configs/hotdog.yaml
# the releases that lie on this machine's disk (torch 2.14.1 / torchvision 0.29.1)
TORCH   ?= torch==2.14.1 torchvision==0.29.1
RUFF    ?= ruff==0.17.6

.PHONY: run test lint install tensorboard clean app photos

$(BIN)/python:
	$(PY) -m venv $(VENV)

# One pip command: one resolution.  --no-compile: pip byte-compiles the 9,500 files it installs on one core (43 s
# here); compileall does it on every core (33 s), and writes the bytecode even where PYTHONDONTWRITEBYTECODE is set, as
# on this machine (torch, torchvision and the trainer import in 20 s of CPU without it, 6 with it).  Left out: torch's
# one file for Python 3.12 only.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --no-compile $(TORCH) -e '.[test,app,export,heif,tune]'
	$(BIN)/python -m compileall -q -j 0 -x py312_intrinsics $(VENV)/lib >/dev/null
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/python -m hotdog_torch.train --config $(CONFIG)

# a test process a core (pytest-xdist); bytecode kept (gitignored) even where PYTHONDONTWRITEBYTECODE is set: else
# every test process rewrites the asserts of hypothesis' 73 modules again (~4 s each)
test: install
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q -n logical --dist worksteal

$(BIN)/ruff: | $(BIN)/python
	$(BIN)/pip install -q $(RUFF)

lint: $(BIN)/ruff
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# the photos recipe's network (runs/photos): trained if it is not there yet, resumed if a training was interrupted
PHOTOS  ?= runs/photos
PHOTOS_CONFIG ?= configs/photos.yaml
app: photos
	$(BIN)/python -m hotdog_torch.serve --checkpoint $(PHOTOS)/checkpoints/best.pt

# keyed on metrics.json, which a run writes at its very end: a folder without it (a training stopped, killed or crashed,
# even before its first checkpoint) is resumed in place, where the app looks
photos: install
	@if [ -f $(PHOTOS)/metrics.json ]; then :; \
	elif [ -f $(PHOTOS)/config.yaml ]; then \
	  $(BIN)/python -m hotdog_torch.train --resume $(PHOTOS); \
	else \
	  $(BIN)/python -m hotdog_torch.train --config $(PHOTOS_CONFIG) log.dir=$(patsubst %/,%,$(dir $(PHOTOS))) \
	    log.run_name=$(notdir $(PHOTOS)); \
	fi

tensorboard: install
	$(BIN)/tensorboard --logdir runs --host 127.0.0.1 --port 6006

clean:
	rm -rf runs/*/ .pytest_cache
