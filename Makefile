PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev,data]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m ruff check tn_hf tests benchmarks recipes
	$(BIN)/python -m mypy tn_hf
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 tests

demo: $(STAMP)
	$(BIN)/tn-hf demo

clean:
	rm -rf $(VENV) outputs
