# Two commands do everything (see README):  make setup report   |   make test
SHELL := /bin/bash
PROFILE ?= default
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# notebook 05 (robustness) is a stage of its own: `make robustness`, after the report
ROBUSTNESS := notebooks/05_robustness.ipynb
NOTEBOOKS := $(filter-out $(ROBUSTNESS),$(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb)))
STAGES := $(basename $(notdir $(NOTEBOOKS)))
RUN_DIR := runs/$(PROFILE)
COMMITTED := default smollm2 authors authors-smollm2 teach
# where the stages run, which changes neither what they compute nor where it is written, e.g.
# make report PROFILE=paper DEVICE=cuda SCHEDULER=tcp://10.0.0.5:8786
PLACE := $(if $(DEVICE),-p device $(DEVICE)) $(if $(SCHEDULER),-p scheduler $(SCHEDULER)) \
         $(if $(WORKERS),-p workers $(WORKERS))
# FRESH=1 retrains every cell of stages 02 and 05 even where a committed record matches
FRESH_02_train_saes := $(if $(FRESH),-p fresh true)
FRESH_05_robustness := $(if $(FRESH),-p fresh true)
# what each stage writes besides its JSON: a stage re-runs (and verifies, rebuilding what is
# corrupt) when any of these changed after it finished
ARTIFACTS_00_language_model := $(wildcard $(RUN_DIR)/model/*)
ARTIFACTS_01_cache_activations := $(wildcard $(RUN_DIR)/acts_*)
ARTIFACTS_02_train_saes := $(wildcard report/$(PROFILE)/cells/*.json)
ARTIFACTS_05_robustness := $(wildcard report/$(PROFILE)/robustness/*/cells/*.json)

.PHONY: setup test test-fast report robustness verify exercises lab bench precision-study clean
.DELETE_ON_ERROR:

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# the suite's notebooks and pipeline runs are mostly single-threaded, so one test process per
# core (pytest-xdist), each test file on one of them (a file's tests share its fixtures)
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# A stage is done when its JSON exists under runs/<profile>/ (git-ignored); it re-runs when that
# JSON is missing (a clean clone), older than its notebook, the profile, the code it calls, the
# previous stage or one of its own artifacts. `report.py run` checks every parameter of the profile before
# anything runs, and writes the executed notebook, its HTML and JSON to report/<profile>/.
report: $(foreach s,$(STAGES),$(RUN_DIR)/$(s).json) README.md TEACHING.md

# each stage depends on the modules whose functions it calls, and on theirs (ablation/deps.py)
define stage
$(RUN_DIR)/$(basename $(notdir $(1))).json: $(1) params/$(PROFILE).yaml report.py $(2) \
    $(shell $(PYTHON) -m ablation.deps $(1)) $(ARTIFACTS_$(basename $(notdir $(1)))) | $(STAMP)
	$(PY) report.py run $(PROFILE) $(1) $(PLACE) $(FRESH_$(basename $(notdir $(1))))
endef
# stage i also waits for stage i-1, except where it reads an earlier one only: the galaxy (03)
# reads the activation cache, so a new grid does not re-run it, nor a new galaxy the ablation (04)
AFTER_03_galaxy_far_away := 01_cache_activations
AFTER_04_initialization_ablation := 02_train_saes
$(foreach i,$(shell seq 1 $(words $(STAGES))),$(eval $(call stage,$(word $(i),$(NOTEBOOKS)),\
  $(if $(filter 1,$(i)),,$(RUN_DIR)/$(or $(AFTER_$(word $(i),$(STAGES))),\
  $(word $(shell echo $$(($(i)-1))),$(STAGES))).json))))

# the verdict under every variant of the protocol (ablation/variants.py), from the report's cache
robustness: $(RUN_DIR)/05_robustness.json
$(eval $(call stage,$(ROBUSTNESS),$(RUN_DIR)/$(lastword $(STAGES)).json))

# retrain CELLS (configuration__preprocessing; none: the cheapest pair that decides a verdict) from
# scratch in a temporary folder and print each budget's distance beside its committed record
verify: $(RUN_DIR)/01_cache_activations.json | $(STAMP)
	$(PY) report.py verify $(PROFILE) $(CELLS)

# an unknown profile: the runner says which profiles exist
params/%.yaml:
	@$(PY) report.py check $*

# The README and TEACHING.md are templates filled from the committed profiles' report JSON and
# records only (a smoke run never changes them).
README.md: readme.py templates/README.md.j2 ablation/labels.py ablation/configs.py params/smollm2.yaml \
    $(wildcard report/precision_study.json) $(foreach p,$(COMMITTED),$(wildcard report/$(p)/*.json report/$(p)/cells/*.json)) | $(STAMP)
	$(PY) readme.py

TEACHING.md: teaching.py templates/TEACHING.md.j2 $(wildcard report/teach/*.json report/teach/exercises/*.json) | $(STAMP)
	$(PY) teaching.py

# the teach profile's exercises, each run as a student types it, timed (after make report PROFILE=teach)
exercises: runs/teach/04_initialization_ablation.json | $(STAMP)
	$(PY) teaching.py run

lab: $(STAMP)
	REPORT_PROFILE=$(if $(filter file,$(origin PROFILE)),teach,$(PROFILE)) \
	  $(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_cache.py
	$(PY) benchmarks/bench_scheduler.py --profile default
	$(PY) benchmarks/bench_scheduler.py --profile smollm2 --d 576 --steps 60

# bfloat16 against float32 on the default profile's cache (after `make report`): report/precision_study.json
precision-study: runs/default/01_cache_activations.json | $(STAMP)
	$(PY) benchmarks/precision_study.py

clean:
	rm -rf runs/ report/smoke/ .pytest_cache __pycache__ tests/__pycache__
