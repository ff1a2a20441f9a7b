# Two commands do everything (see README):  make setup report   |   make test
SHELL := /bin/bash
PROFILE ?= default
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
STAGES := $(basename $(notdir $(NOTEBOOKS)))
REPORT_DIR := report/$(PROFILE)
RUN_DIR := $(shell sed -n 's/^run_dir: *//p' params/$(PROFILE).yaml 2>/dev/null)

.PHONY: setup test report html check-profile bench clean
.DELETE_ON_ERROR:

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

check-profile: $(STAMP)
	@$(PY) report.py $(PROFILE)

# A stage is done when its JSON exists under the profile's run_dir (git-ignored); it re-runs when
# that JSON is missing (a clean clone) or older than its notebook, the profile, helpers.py or the
# previous stage. The executed notebook goes to report/<profile>/, then its HTML and JSON.
report: check-profile
	@if [ -z "$(NOTEBOOKS)" ]; then echo "make report: no notebooks under notebooks/ yet; nothing to run"; \
	else $(MAKE) --no-print-directory html PROFILE=$(PROFILE) && $(PY) report.py readme; fi

html: $(addprefix $(REPORT_DIR)/,$(addsuffix .html,$(STAGES)))

$(REPORT_DIR)/%.html: $(RUN_DIR)/%.json
	$(PY) report.py html $(REPORT_DIR)/$*.ipynb

define stage
$(RUN_DIR)/$(basename $(notdir $(1))).json: $(1) params/$(PROFILE).yaml helpers.py $(2)
	@mkdir -p $(REPORT_DIR)
	$(PY) report.py $(PROFILE) $(1) $(REPORT_DIR)/$(notdir $(1))
	cp $$@ $(REPORT_DIR)/
endef
# stage i also waits for stage i-1
$(foreach i,$(shell seq 1 $(words $(STAGES))),$(eval $(call stage,$(word $(i),$(NOTEBOOKS)),\
  $(if $(filter 1,$(i)),,$(RUN_DIR)/$(word $(shell echo $$(($(i)-1))),$(STAGES)).json))))

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_cache.py

clean:
	rm -rf runs/ .pytest_cache __pycache__ tests/__pycache__
