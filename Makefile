# Two commands from a fresh clone: `make run` and `make test` (each installs first if needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser run test test-fast lint load-check space-check bench clean

install: $(INSTALLED)

$(INSTALLED): requirements.txt requirements-bundled.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-bundled.txt
	touch $(INSTALLED)

# The browser tests drive Debian's chromium with Playwright (Playwright's own browser download
# needs the internet).
browser: $(CHROMIUM)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

# http://127.0.0.1:7860; GRADIO_SERVER_NAME / GRADIO_SERVER_PORT change host and port.
run: install
	$(PY) app.py

test: install browser
	$(PY) -m pytest tests

test-fast: install
	$(PY) -m pytest tests -m "not e2e"

# While a run trains, 4 clients send 50 Playground requests each; prints median and p95 latency.
load-check: install
	$(PY) scripts/load_check.py

# A fresh virtual environment with requirements.txt alone (what a Hugging Face Space installs) starts
# the app with the Hub unreachable and answers the named API; prints each phase's time.
space-check: install
	$(PY) scripts/space_check.py

# The results suite: every method on both tasks under equal budgets, into assets/results/
# (about an hour on 2 CPU cores; completed cells in runs/bench-suite are reused by a rerun).
bench: install
	$(PY) -m training bench --suite full --offline

lint: install
	$(PY) -m ruff check app.py ui lora_methods training tests scripts
	$(PY) -m ruff format --check app.py ui lora_methods training tests scripts

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
