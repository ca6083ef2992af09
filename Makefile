# Two commands for a fresh clone (Python 3.11 and nothing else):
#   make quickstart   prepare -> train -> evaluate -> serve -> one request, on bundled MovieLens-100K
#   make test         the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test venv lint clean

venv: $(STAMP)

# torch first: 2.13.0 is a CPU wheel on local disk; the project then asks for a range it satisfies
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/p5ray quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check p5ray tests bench

clean:
	rm -rf $(VENV) .pytest_cache runs .quickstart
