# The README's two commands call these targets.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install install-test demo test lint bench

install:
	$(PIP) install -q -e .

install-test:
	bash deploy/install-system-deps.sh
	$(PIP) install -q -e '.[dev]'

demo: install
	mammo-node demo

test: install-test
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest

# make bench [BENCH_ARGS=--quick]: every benchmark and one summary table (benchmarks/run_all.py)
bench: install-test
	$(PYTHON) benchmarks/run_all.py $(BENCH_ARGS)
