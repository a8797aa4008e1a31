# gpurec: `make demo` and `make test` are the whole quickstart; both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q
STAMP := $(VENV)/.gpurec-setup
REQUIREMENTS := pyproject.toml requirements/cpu.txt requirements/torchrec.txt requirements/data.txt requirements/dev.txt
DEMO := runs/demo

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# Rebuilt only when a requirements file changes: a no-op `make setup` takes well under a second.
$(STAMP): $(REQUIREMENTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "setup: installing the pinned CPU stack into $(VENV) (about a minute the first time)"
	$(PIP) install -r requirements/cpu.txt -r requirements/dev.txt
	$(PIP) install --no-deps -r requirements/torchrec.txt -r requirements/data.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: setup
	$(BIN)/gpurec generate --out $(DEMO)/raw --users 2000 --items 5000 --days 7 --seed 7
	$(BIN)/gpurec preprocess --input $(DEMO)/raw --out $(DEMO)/features
	@echo "demo: outputs under $(DEMO)/ (raw logs, features + manifest.json)"

lint: setup
	$(BIN)/ruff check gpurec tests bench kernels

test: setup lint
	$(BIN)/pytest

bench: setup
	$(BIN)/python bench/preprocess.py

clean:
	rm -rf runs .pytest_cache .ruff_cache .hypothesis
