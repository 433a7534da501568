PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: ## create .venv and install hsqformer with its dev extras
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'

demo: ## audit, cross-validate and compare two models on the embedded sample (a few minutes on 2 CPU cores)
	$(BIN)/hsqformer demo --out runs/demo --overwrite

test: ## run the test suite
	$(BIN)/python -m pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
