# dsrh-lightning. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATASET ?= cifar10
EXPERIMENT ?= dsrh
# Where the data lives; defaults to ../shared/data/<dataset> when that folder exists.
DATA_DIR ?= $(if $(wildcard ../shared/data/$(DATASET)),../shared/data/$(DATASET),)
# auto (ImageNet weights when they can be loaded, else from scratch with a warning) | imagenet (required) | none
WEIGHTS ?= auto
# Extra overrides, e.g. ARGS="model.bits=12 trainer.max_steps=2000"
ARGS ?=
PYTEST_ARGS ?=
# Sweeps: a file under experiments/sweeps/ (name or path), the W&B sweep id, the number of runs.
SWEEP ?= bits.yaml
SWEEP_ID ?=
COUNT ?=
SWEEP_FILE = $(if $(wildcard $(SWEEP)),$(SWEEP),experiments/sweeps/$(SWEEP))

TRAIN_OVERRIDES := dataset=$(DATASET) experiment=$(EXPERIMENT) \
	$(if $(DATA_DIR),data.root=$(DATA_DIR),) $(if $(WEIGHTS),model.weights=$(WEIGHTS),) $(ARGS)

.PHONY: help venv train test bench bench-eval bench-results bench-report bench-train-speed clean sweep agent sweep-local

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16
	@echo; echo "Variables: DATASET=$(DATASET) EXPERIMENT=$(EXPERIMENT) DATA_DIR=$(DATA_DIR) WEIGHTS=$(WEIGHTS) ARGS=$(ARGS)"

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,sweeps,faiss,pretrained]"
	@touch $@

venv: $(VENV)/.installed ## create/update the virtualenv and install the project

train: venv ## train: make train DATASET=cifar10|synthetic|nuswide|custom EXPERIMENT=dsrh|drh|drh_plus|dsrh_balanced|dsrh_yao|dsrh_zhao|dpsh|dtsh|hashnet|csq [DATA_DIR=..] [WEIGHTS=auto|imagenet|none] [ARGS=..]
	$(VENV)/bin/dsrh train $(TRAIN_OVERRIDES)

sweep: venv ## create a W&B sweep: make sweep SWEEP=bits.yaml (prints the SWEEP_ID for make agent)
	$(VENV)/bin/wandb sweep $(SWEEP_FILE)

agent: venv ## run a W&B agent: make agent SWEEP_ID=entity/project/id [COUNT=n]
	@test -n "$(SWEEP_ID)" || { echo "make agent needs SWEEP_ID=entity/project/id (from make sweep)"; exit 2; }
	$(VENV)/bin/wandb agent $(if $(COUNT),--count $(COUNT),) $(SWEEP_ID)

sweep-local: venv ## run a sweep file offline, no W&B server: make sweep-local SWEEP=bits.yaml COUNT=n [ARGS=..]
	$(VENV)/bin/dsrh sweep-local $(SWEEP_FILE) $(if $(COUNT),--count $(COUNT),) $(ARGS)

test: venv ## run the test suite on CPU
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench-eval: venv ## evaluation-engine benchmark (Hamming ranking + MAP) vs naive argsort and faiss
	$(PY) benchmarks/bench_eval.py

# The CPU protocol: cached EfficientNet-Lite0 features, every method x bits x seed (resumes; see docs/RESULTS.md).
RESULTS_ARGS ?=
bench-results: venv ## CPU protocol: baselines + deep methods on cached features -> docs/RESULTS.md [RESULTS_ARGS=..]
	$(PY) benchmarks/results_cpu.py $(RESULTS_ARGS)

bench-report: venv ## re-write docs/RESULTS.md tables and plots from the measured results
	$(PY) benchmarks/results_cpu.py --report-only

bench-train-speed: venv ## CPU training throughput: explicit triplets vs in-batch mining (images/s, triplets/s)
	$(PY) benchmarks/train_speed.py

bench-scales: venv ## margin and orthogonality normalisation at 12 vs 48 bits (uses bench-results' feature cache)
	$(PY) benchmarks/code_length_scales.py

bench: bench-eval bench-train-speed bench-results bench-scales ## all benchmarks

clean: ## remove caches and runs (keeps the virtualenv)
	rm -rf .pytest_cache runs lightning_logs wandb
