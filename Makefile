# mlops_ray — `make help` lists the targets.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, pinned: where a local CPU wheel of it is provided (this project's dev and CI
# machines) pip takes that; elsewhere add TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid
# the multi-GB CUDA build, or pick a CUDA index for GPUs (TORCH_INDEX=.../whl/cu128).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# XGBoost likewise: the CPU-only wheel (5 MB); GPU users take XGBOOST_SPEC=xgboost==3.0.5 (its
# manylinux wheel carries the CUDA kernels for scaling=gpu)
XGBOOST_SPEC ?= xgboost-cpu==3.0.5
# every dependency at the version the project is tested with (LOCK= installs the open ranges)
LOCK ?= requirements.lock
EXPERIMENT ?= adult_mlp
PYTEST_ARGS ?=
# extra Hydra overrides of run/train: make run ARGS='serve.keep_alive=false'
ARGS ?=
UNIT := not ray and not slow and not server and not s3 and not multinode and not gpu

.PHONY: help install run stop train tune serve test test-unit test-multinode lint typecheck dashboards bench lock clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-11s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml $(LOCK)
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q $(if $(LOCK),-c $(LOCK)) "$(XGBOOST_SPEC)" -e ".[test,features]"
	touch $@

install: $(VENV)/.installed ## create .venv and install the project (pinned CPU torch)

run: install ## the whole pipeline on the default experiment: train, gates, registry, canary on Serve, smoke test; the model stays served on this checkout's warm Ray
	$(PY) -m jobs.pipeline +experiment=$(EXPERIMENT) $(ARGS)

stop: ## stop this checkout's warm local Ray (and what it serves); other Ray clusters are left alone
	$(PY) -m mlops_ray.warm stop

train: install ## train the default experiment (Adult MLP) on a local Ray cluster
	$(PY) -m jobs.train +experiment=$(EXPERIMENT) $(ARGS)

tune: install ## tune the default experiment (Optuna TPE + ASHA on Ray Tune)
	$(PY) -m jobs.tune +experiment=$(EXPERIMENT)

serve: install ## serve the experiment's production version on 127.0.0.1:8000 (after jobs.promote; stays until make stop)
	$(PY) -m jobs.serve ref=$(EXPERIMENT)

test: install ## every tier: unit, Ray integration, e2e (subprocess jobs), then multi-node (~20 + ~4.5 min on 2 cores)
	$(PY) -m pytest -m "not multinode" --durations=25 $(PYTEST_ARGS)
	$(PY) -m pytest -m multinode --durations=10 $(PYTEST_ARGS)

test-unit: install ## unit tests: no Ray, no subprocess job, no server (~50 s on 2 cores)
	$(PY) -m pytest -m "$(UNIT)" --durations=10 $(PYTEST_ARGS)

test-multinode: install ## node loss, preemption, tuning and elastic scenarios on a local multi-node cluster (~4-5 min)
	$(PY) -m pytest -m multinode --durations=10 $(PYTEST_ARGS)

lint: install ## ruff, the layering as import-linter contracts (pyproject.toml), bandit (new findings vs the reviewed bandit-baseline.json)
	$(PY) -m ruff check mlops_ray jobs tests bench tools
	$(VENV)/bin/lint-imports
	$(VENV)/bin/bandit -q -r mlops_ray jobs -b bandit-baseline.json
	$(PY) tools/gen_observability.py --check

typecheck: install ## mypy on mlops_ray/ and jobs/
	$(PY) -m mypy mlops_ray jobs

dashboards: install ## regenerate the KubeRay monitoring manifests from mlops_ray/observability/; check and unit-test the alert rules (promtool)
	$(PY) tools/gen_observability.py
	promtool check rules mlops_ray/observability/alerts.yml
	promtool test rules mlops_ray/observability/alerts_test.yml

bench: install ## benchmarks (not part of make test): training overhead vs bare PyTorch
	$(PY) bench/train_overhead.py --paired

lock: ## regenerate requirements.lock from a fresh install of pyproject.toml's ranges
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q "$(TORCH_SPEC)" && .lock-venv/bin/pip install -q "$(XGBOOST_SPEC)" -e ".[test,features]"
	{ sed -n '1,3p' requirements.lock; .lock-venv/bin/pip freeze --exclude-editable \
	  | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock && rm -rf .lock-venv

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs .pytest_cache .ruff_cache
