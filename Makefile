# dsrh-lightning. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATASET ?= cifar10
EXPERIMENT ?= dsrh
# Where the data lives; defaults to ../shared/data/<dataset> when that folder exists.
# cifar10_multilabel is built from CIFAR-10.
DATA_SET_DIR = $(if $(filter cifar10_multilabel,$(DATASET)),cifar10,$(DATASET))
DATA_DIR ?= $(if $(wildcard ../shared/data/$(DATA_SET_DIR)),../shared/data/$(DATA_SET_DIR),)
# auto (ImageNet weights when they can be loaded, else from scratch with a warning) | imagenet (required) | none.
# Unset = what the dataset config asks for (synthetic: none, nuswide/custom: imagenet); cifar10 defaults to auto.
WEIGHTS ?= $(if $(filter cifar10 cifar10_multilabel,$(DATASET)),auto,)
# Extra overrides, e.g. ARGS="model.bits=12 trainer.max_steps=2000"
ARGS ?=
# Extra flags for the bench-* scripts, e.g. BENCH_ARGS="--cases vgg19:32 --precision fp32 bf16"
BENCH_ARGS ?=
PYTEST_ARGS ?=
# Sweeps: a file under experiments/sweeps/ (name or path), the W&B sweep id, the number of runs.
SWEEP ?= bits.yaml
SWEEP_ID ?=
COUNT ?=
SWEEP_FILE = $(if $(wildcard $(SWEEP)),$(SWEEP),experiments/sweeps/$(SWEEP))

TRAIN_OVERRIDES := dataset=$(DATASET) experiment=$(EXPERIMENT) \
	$(if $(DATA_DIR),data.root=$(DATA_DIR),) $(if $(WEIGHTS),model.weights=$(WEIGHTS),) $(ARGS)

.PHONY: help venv train test bench bench-eval bench-tune bench-results bench-report bench-train-speed bench-scales \
	bench-throughput bench-head bench-mining bench-finetune bench-finetune-speed bench-tune-finetune bench-multilabel clean clean-runs sweep agent sweep-local wandb-login-check

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16
	@echo; echo "Variables: DATASET=$(DATASET) EXPERIMENT=$(EXPERIMENT) DATA_DIR=$(DATA_DIR) WEIGHTS=$(WEIGHTS) ARGS=$(ARGS)"

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,sweeps,faiss,pretrained,export]"
	@touch $@

venv: $(VENV)/.installed ## create/update the virtualenv and install the project

train: venv ## train: make train DATASET=cifar10|synthetic|nuswide|custom EXPERIMENT=dsrh|dsrh_yao|dsrh_finetune|dsrh_tuned|drh|drh_plus|dsrh_balanced|dsrh_zhao|dpsh|dtsh|hashnet|csq|greedyhash|orthohash|dsh|dhn [DATA_DIR=..] [WEIGHTS=auto|imagenet|none] [ARGS=..]
	$(VENV)/bin/dsrh train $(TRAIN_OVERRIDES)

# W&B sweeps need an account: fail at once (never wait at wandb's login prompt; CI has no stdin).
WANDB_CHECK = $(PY) -c 'import os, sys; from dsrh_lightning.lightning.loggers import wandb_key_available; \
	mode = os.environ.get("WANDB_MODE", ""); \
	why = [] if wandb_key_available() else ["no W&B API key found (WANDB_API_KEY, or run wandb login)"]; \
	why += ["WANDB_MODE=" + mode] if mode in ("offline", "disabled", "dryrun") else []; \
	why and print("$(1) needs a W&B account and server: " + " and ".join(why) + ". Without one, run the sweep " \
	"here with W&B'"'"'s sweep engine and offline runs: make sweep-local SWEEP=$(SWEEP) COUNT=n", file=sys.stderr); \
	sys.exit(2 if why else 0)'

sweep: venv ## create a W&B sweep: make sweep SWEEP=bits.yaml (prints the SWEEP_ID for make agent)
	@$(call WANDB_CHECK,make sweep)
	$(VENV)/bin/wandb sweep $(SWEEP_FILE) </dev/null

agent: venv ## run a W&B agent: make agent SWEEP_ID=entity/project/id [COUNT=n]
	@test -n "$(SWEEP_ID)" || { echo "make agent needs SWEEP_ID=entity/project/id (from make sweep)"; exit 2; }
	@$(call WANDB_CHECK,make agent)
	# The sweep files' command is `$${env} dsrh train ...`: the agent finds dsrh on PATH.
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/wandb agent $(if $(COUNT),--count $(COUNT),) $(SWEEP_ID) </dev/null

sweep-local: venv ## run a sweep file offline, no W&B server: make sweep-local SWEEP=bits.yaml COUNT=n [ARGS=..]
	$(VENV)/bin/dsrh sweep-local $(SWEEP_FILE) $(if $(COUNT),--count $(COUNT),) $(ARGS)

# The search page is tested in a real headless browser: Debian's chromium + chromium-driver, installed here when
# missing (apt-get; as root, else through sudo).
BROWSER_BIN := /usr/bin/chromium /usr/bin/chromedriver
test: venv ## run the test suite on CPU (installs chromium + chromium-driver for the search-page test when missing)
	@for f in $(BROWSER_BIN); do test -x $$f || missing=1; done; \
	if [ -n "$$missing" ]; then \
		command -v apt-get >/dev/null || { echo "make test: the search-page test needs $(BROWSER_BIN) (Debian packages chromium, chromium-driver)" >&2; exit 2; }; \
		sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		echo "make test: installing chromium and chromium-driver (apt-get) for the search-page test"; \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium chromium-driver; \
	fi
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench-eval: venv ## evaluation-engine benchmark (Hamming ranking + MAP) vs naive argsort and faiss
	$(PY) -m benchmarks.bench_eval

# The CPU protocol (docs/RESULTS.md): cached EfficientNet-Lite0 features at 128 px; first a recipe search on
# validation (same budget for every tuned method), then every method x bits x seed with its tuned settings.
# Both resume where they stopped.
TUNED := benchmarks/results/tuned_cpu.json
TUNED_RESULTS := benchmarks/results/results_cpu_tuned.jsonl
TUNED_METHODS := ITQ DRH DRH+ DSRH HashNet CSQ GreedyHash OrthoHash DSH DHN
TUNE_ARGS ?=
RESULTS_ARGS ?=
bench-tune: venv ## CPU protocol, step 1: Bayesian search on validation per method and code length -> $(TUNED) [TUNE_ARGS=..]
	$(PY) -m benchmarks.tune_cpu --out $(TUNED) $(TUNE_ARGS)

bench-results: venv ## CPU protocol, step 2: tuned methods, 3 seeds x 12/24/32/48 bits -> docs/RESULTS.md [RESULTS_ARGS=..]
	$(PY) -m benchmarks.results_cpu --tuned $(TUNED) --results $(TUNED_RESULTS) --methods $(TUNED_METHODS) $(RESULTS_ARGS)

# End to end: the top 3 blocks of EfficientNet-Lite0 fine-tune at 96 px on cached lower-block outputs (mirrored
# maps: data.cache_flip); DSRH takes the loss recipe in $(FINETUNE_TUNED) (a validation search on frozen features
# without the shared layer), the ablations the same recipe without their terms.
FINETUNE_TUNED ?= benchmarks/results/finetune_cpu_recipe.json
FINETUNE_RESULTS := benchmarks/results/finetune_cpu.jsonl
FINETUNE_METHODS ?= DRH DRH+ DSRH
bench-finetune: venv ## end-to-end fine-tune on CPU: EfficientNet-Lite0 top 3 blocks at 96 px, 48 bits [FINETUNE_METHODS=..] [FINETUNE_ARGS=..]
	$(PY) -m benchmarks.finetune_cpu --tuned $(FINETUNE_TUNED) --results $(FINETUNE_RESULTS) \
		--methods $(FINETUNE_METHODS) --override data.cache_flip=true $(FINETUNE_ARGS)

# Multi-label (CIFAR-10 mosaics): the lr search on validation, then 3 seeds x 12/48 bits -> docs/RESULTS.md
MULTILABEL_METHODS ?= "DSRH (triplet)" "DSRH (Zhao)" HashNet DPSH CSQ GreedyHash OrthoHash DSH DHN
# End to end, every method's own search on validation (its loss knobs, dropout, lr, backbone lr multiplier;
# 6 trials per method and length, plus the method's untuned run in $(FINETUNE_RESULTS) as a candidate): each
# searched method's entry in $(FINETUNE_TUNED), which bench-finetune then runs with. Each search's trials are
# kept in benchmarks/results/finetune_search/, so a search stopped with its checkout continues on a fresh one.
bench-tune-finetune: venv ## end to end, step 1: the same validation search for every method -> $(FINETUNE_TUNED) [TUNE_ARGS=..]
	$(PY) -m benchmarks.tune_cpu --protocol finetune --count 6 --out $(FINETUNE_TUNED) $(TUNE_ARGS)

bench-multilabel: venv ## multi-label protocol on CIFAR-10 mosaics: tune the lr on validation, then 3 seeds x 12/48 bits [MULTILABEL_ARGS=..]
	$(PY) -m benchmarks.multilabel_cpu --tune --methods $(MULTILABEL_METHODS) $(MULTILABEL_ARGS)
	$(PY) -m benchmarks.multilabel_cpu --methods $(MULTILABEL_METHODS) ITQ $(MULTILABEL_ARGS)

bench-report: venv ## re-write docs/RESULTS.md's generated tables and plots from the canonical results files
	$(PY) -m benchmarks.results_cpu --tuned $(TUNED) --results $(TUNED_RESULTS) --report-only
	$(PY) -m benchmarks.finetune_cpu --tuned $(FINETUNE_TUNED) --results $(FINETUNE_RESULTS) --report-only
	$(PY) -m benchmarks.multilabel_cpu --report-only

bench-train-speed: venv ## CPU training throughput: explicit triplets vs in-batch mining (images/s, triplets/s)
	$(PY) -m benchmarks.train_speed

bench-scales: venv ## margin and orthogonality normalisation at 12 vs 48 bits (uses bench-results' feature cache)
	$(PY) -m benchmarks.code_length_scales

bench-throughput: venv ## training loop vs the model-only ceiling (images/s, MFU), fp32 vs bf16 on a GPU; small on CPU [BENCH_ARGS=..]
	$(PY) -m benchmarks.throughput $(if $(DATA_DIR),--data-root $(DATA_DIR),) $(BENCH_ARGS)

bench-head: venv ## head training speed on cached features [BENCH_ARGS="--experiment dsrh_tuned"]
	$(PY) -m benchmarks.head_speed $(BENCH_ARGS)

bench-mining: venv ## in-batch triplet mining: pairwise-distance hinge vs gathered triplets
	$(PY) -m benchmarks.bench_mining

bench-finetune-speed: venv ## partial fine-tuning: ms per step, project loop vs plain PyTorch loop (tiny unless BENCH_ARGS=..)
	$(PY) -m benchmarks.finetune_speed $(BENCH_ARGS)

bench: bench-eval bench-train-speed bench-tune bench-results bench-scales ## all benchmarks

clean: ## remove caches (.pytest_cache, lightning_logs, ./wandb); runs/ is kept (make clean-runs)
	rm -rf .pytest_cache lightning_logs wandb
	@test ! -d runs || echo "runs/ kept (checkpoints, metrics, sweeps): delete it with make clean-runs"

clean-runs: ## delete runs/ (every checkpoint and result) after a confirmation; YES=1 skips the question
	@test -d runs || { echo "no runs/ folder"; exit 0; }; \
	if [ "$(YES)" != 1 ]; then \
		if [ ! -t 0 ]; then echo "make clean-runs: not a terminal; run make clean-runs YES=1 to delete runs/" >&2; exit 2; fi; \
		read -r -p "Delete runs/ ($$(du -sh runs | cut -f1); every checkpoint and result)? [y/N] " answer; \
		case "$$answer" in y|Y|yes) ;; *) echo "kept runs/"; exit 0;; esac; \
	fi; \
	rm -rf runs && echo "deleted runs/"
