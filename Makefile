# Two commands from a fresh clone: `make run` and `make test` (each installs first if needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install run test test-fast lint clean

install: $(INSTALLED)

$(INSTALLED): requirements.txt requirements-bundled.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-bundled.txt
	touch $(INSTALLED)

# Until the Gradio app lands, `make run` shows the command-line interface.
run: install
	$(PY) -m training --help

test: install
	$(PY) -m pytest tests

test-fast: install
	$(PY) -m pytest tests -m "not e2e"

lint: install
	$(PY) -m ruff check lora_methods training tests
	$(PY) -m ruff format --check lora_methods training tests

clean:
	rm -rf $(VENV) .pytest_cache
