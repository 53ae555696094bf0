# The two commands of the README, each doing whatever set-up it still needs (idempotent).
#   make demo   set up, then train/validate/test the quickstart on Fashion-MNIST
#   make test   set up, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-all
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m lit fit --config configs/quickstart.yaml

test: setup
	$(PY) -m pytest

# Also the slow tests (GPU tests need a CUDA device and are selected with -m gpu).
test-all: setup
	$(PY) -m pytest -m "not gpu"
