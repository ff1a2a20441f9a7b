# Two commands do everything (see README):  make setup report   |   make test
SHELL := /bin/bash
PROFILE ?= default
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
REPORT_DIR := report/$(PROFILE)
RUN_DIR = $(shell sed -n 's/^run_dir: *//p' params/$(PROFILE).yaml 2>/dev/null)
EXECUTED := $(addprefix $(REPORT_DIR)/,$(notdir $(NOTEBOOKS)))

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

# One executed notebook per stage; a stage re-runs when its notebook, the profile, helpers.py or
# an earlier stage changed. The caches under runs/ skip work whose parameters did not change.
report: check-profile
	@if [ -z "$(NOTEBOOKS)" ]; then echo "make report: no notebooks under notebooks/ yet; nothing to run"; \
	else $(MAKE) --no-print-directory html PROFILE=$(PROFILE) && $(PY) report.py readme; fi

html: $(EXECUTED:.ipynb=.html)

$(REPORT_DIR)/%.html: $(REPORT_DIR)/%.ipynb
	$(PY) report.py html $<

define stage
$(REPORT_DIR)/$(notdir $(1)): $(1) params/$(PROFILE).yaml helpers.py $(2)
	@mkdir -p $(REPORT_DIR) $(RUN_DIR)
	$(PY) report.py $(PROFILE) $(1) $$@
	@cp $(RUN_DIR)/$(basename $(notdir $(1))).json $(REPORT_DIR)/ 2>/dev/null || true
endef
# stage i also waits for stage i-1
$(foreach i,$(shell seq 1 $(words $(NOTEBOOKS))),$(eval $(call stage,$(word $(i),$(NOTEBOOKS)),\
  $(if $(filter 1,$(i)),,$(REPORT_DIR)/$(notdir $(word $(shell echo $$(($(i)-1))),$(NOTEBOOKS)))))))

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_cache.py

clean:
	rm -rf runs/ .pytest_cache __pycache__ tests/__pycache__
