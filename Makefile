# dinolab: the commands the README shows. Everything installs itself on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test lint data install bench quality clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch and torchvision first, pinned to a pair that is known to work together (the package
# itself only asks for ranges); then the package with its dev extras.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST from Debian where apt exists; elsewhere `data.download=true` lets torchvision
# fetch it on first use.
data:
	@if [ ! -d $(FASHION_MNIST) ] && command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist \
		|| echo "apt-get failed: the demo will download Fashion-MNIST with torchvision"; \
	fi

demo: install data
	$(BIN)/dinolab train data.download=true

test: install data
	$(BIN)/python -m pytest tests

# Throughput of the full DINO step on this machine, dinolab against a lightly-built peer
# (docs/benchmarks.md); benchmarks/gpu_suite.sh gives the GPU tables.
bench: install data
	$(BIN)/python benchmarks/throughput.py --steps 10 --warmup 3 --workers 1 --modes model,e2e,data

# What each objective learns on Fashion-MNIST against raw pixels and random weights (the demo
# recipe per objective, full-split k-NN and linear probe; about 35 minutes an objective on 2 CPU
# cores without AVX-512): benchmarks/quality.py
quality: install data
	$(BIN)/python benchmarks/quality.py

lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
