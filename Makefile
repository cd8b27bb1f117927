# `make run` and `make test` set everything up on their own: a virtual
# environment in .venv, created once and reused while setup.cfg and
# constraints.txt are unchanged.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORK ?= runs
export PYTHONPATH := $(CURDIR)

.PHONY: run demo-rollback demo-drift test chaos compile check bench images images-check constraints clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade-strategy only-if-needed -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m defectkit demo --work $(WORK)

# Ships a deliberately broken candidate against the champion of `make run`.
demo-rollback: $(STAMP)
	test -f $(WORK)/mlflow.db || $(PY) -m defectkit demo --work $(WORK)
	$(PY) -m defectkit demo rollback --work $(WORK)

# Serves the champion, sends it brighter images, detects the drift, retrains and canaries the result.
demo-drift: $(STAMP)
	test -f $(WORK)/mlflow.db || $(PY) -m defectkit demo --work $(WORK)
	$(PY) -m defectkit demo drift --work $(WORK)

test: $(STAMP)
	mkdir -p $(WORK)/tmp
	TMPDIR=$(CURDIR)/$(WORK)/tmp $(PY) -m pytest -q --timeout=900 tests

# Fault scenarios against the real local stack; prints one table and fails when a scenario misses its goal.
# CHAOS_FLAGS=--short is CI's form; --only NAME,... picks scenarios.
CHAOS_FLAGS ?=
chaos: $(STAMP)
	mkdir -p $(WORK)/tmp
	TMPDIR=$(CURDIR)/$(WORK)/tmp $(PY) -m tests.chaos $(CHAOS_FLAGS)

compile: $(STAMP)
	$(PY) compile.py

check: $(STAMP)
	$(PY) compile.py --check

bench: $(STAMP)
	$(PY) -m tests.bench.run

# Tags are the package version. Any Docker-compatible engine: DOCKER=podman.
# Where Docker Hub cannot be reached, pass BASE_IMAGE (images/base-image.sh builds
# one); BUILD_FLAGS reach the engine's `build` (see images/Makefile).
DOCKER ?= docker
CHECK_IMAGES ?= data train deploy serve monitor

images:
	$(MAKE) -C images DOCKER=$(DOCKER)

# Builds CHECK_IMAGES, then runs every executor of the compiled pipelines in its
# image (tests/images). Keeps going past an image that fails to build, so the
# others are still checked, and fails in the end; the tests fail rather than skip
# for an image of CHECK_IMAGES that is missing.
images-check: $(STAMP)
	mkdir -p $(WORK)/tmp
	$(MAKE) -k -C images $(CHECK_IMAGES) DOCKER=$(DOCKER); built=$$?; \
	DOCKER=$(DOCKER) REQUIRED_IMAGES="$(CHECK_IMAGES)" TMPDIR=$(CURDIR)/$(WORK)/tmp \
	  $(PY) -m pytest -q --timeout=1800 tests/images && test $$built -eq 0

constraints: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | sed '1i # Exact versions of every transitive dependency, resolved together (pip check clean).\n# Regenerate with: make constraints' > constraints.txt

clean:
	rm -rf $(WORK)
