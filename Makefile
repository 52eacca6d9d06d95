# Two commands do all set-up: `make demo` and `make test`. Each creates .venv, installs torch 2.13.0
# (the CPU build on these machines) only when no torch is importable, then the kernels
# (elbokto-kernels) and the package with the extras its job needs, both editable: the demo's
# plots and judge client for `make demo`; the judge, lm-eval, the plots and pytest for `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PY_SOURCES := elbokto_kernels elbokto tests benchmarks examples

.PHONY: install demo test test-fast test-soak test-compat lint gpu-check bench-cpu clean

$(PY):
	$(PYTHON) -m venv $(VENV)

EXTRAS ?= demo

install: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ./elbokto_kernels -e ".[$(EXTRAS)]"

demo: install
	$(PY) -m elbokto.cli demo

test: EXTRAS = test,eval,demo
test: install
	$(PY) -m pytest -q

# The quick lane while working: everything but the slow tests (and the soak trials).
test-fast: EXTRAS = test,eval,demo
test-fast: install
	$(PY) -m pytest -q -m "not slow and not soak"

# The soak trials alone (e.g. a kill at every write point of a training run: ~11 minutes).
test-soak: EXTRAS = test,eval,demo
test-soak: install
	$(PY) -m pytest -q -m soak

# The checkers CI holds the code to (pyproject.toml: [tool.ruff], [tool.mypy]; pinned in the dev
# extra): ruff formats and lints every Python file, mypy checks the packages.
lint: EXTRAS = dev
lint: install
	$(PY) -m ruff format --check $(PY_SOURCES)
	$(PY) -m ruff check $(PY_SOURCES)
	$(PY) -m mypy elbokto_kernels elbokto

# The compat lane on the other stacks of the supported matrix (tests/compat.py: venvs of their own,
# cached under ~/.cache/elbokto/compat); stdlib-only, so no install step.
test-compat:
	$(PYTHON) tests/compat.py

# On a lent GPU machine (its own python3; no install, no network): the CUDA tests, the LLaDA-8B-sized
# step and gpu_check.py in one call, results into $$OUT (benchmarks/gpu_campaign.py; carry .whl,
# filled here by `python benchmarks/fetch_wheels.py`).
gpu-check:
	python3 benchmarks/gpu_campaign.py

bench-cpu: install
	$(PY) -m pytest benchmarks -q --benchmark-enable

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs
