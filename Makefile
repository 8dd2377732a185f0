# Two commands work from a fresh clone; each sets up its own virtualenv in .venv.
#   make test   - install and run the test suite (CPU, offline)
#   make demo   - run the whole pipeline on the embedded sandbox world
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test demo clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so pip takes the CPU wheel instead of resolving a CUDA build
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

demo: venv
	PY=$(PY) bash scripts/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache
