# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint clean

$(BIN)/fedfactory: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 resolves to the CPU wheel on this machine; users may have any torch >= 2.4.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q "torch>=2.4"
	$(BIN)/pip install -q -e ".[test,flower]"
	touch $@

install: $(BIN)/fedfactory

demo: install
	$(BIN)/fedfactory compare --config digits --methods factory-server,fedavg,centralized run.out=runs/demo

test: install
	$(BIN)/python -m pytest

# The inner loop: everything but the tests that train a run or start Flower (marked slow in tests/conftest.py).
test-fast: install
	$(BIN)/python -m pytest -m "not slow" --durations=5

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf runs/demo .pytest_cache
