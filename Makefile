# `make run` and `make test` set everything up on their own: a virtual
# environment in .venv, created once and reused while setup.cfg and
# constraints.txt are unchanged.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORK ?= runs
export PYTHONPATH := $(CURDIR)

.PHONY: run demo-rollback demo-drift test compile check bench images constraints clean

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

compile: $(STAMP)
	$(PY) compile.py

check: $(STAMP)
	$(PY) compile.py --check

bench: $(STAMP)
	$(PY) -m tests.bench.run

# Needs a Docker engine; tags are the package version.
images:
	$(MAKE) -C images

constraints: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | sed '1i # Exact versions of every transitive dependency, resolved together (pip check clean).\n# Regenerate with: make constraints' > constraints.txt

clean:
	rm -rf $(WORK)
