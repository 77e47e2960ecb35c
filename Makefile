# The two commands a new user needs are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_DIR ?= .ccat-demo
PYTEST_ARGS ?=
# make test runs its files on this many pytest-xdist workers (each file on one worker, with its
# own PostgreSQL, Redis and S3 servers); TEST_WORKERS=0 runs them in this process. Three on a
# 2-core machine: the tests spend much of their time waiting for the processes they start
# (measured: 863 s with 3, 940 s with 2).
TEST_WORKERS ?= 3
DEMO_ARGS ?=
E2E_ARGS ?=

.PHONY: help install demo test lint format clean images e2e molecule charts chaos

help:
	@echo "make demo    - the whole data center on this machine: a simulated instrument files data,"
	@echo "               the pipeline archives, stages and cleans up (DEMO_ARGS=\"--files 50\")"
	@echo "make test    - lint + the test suite (starts its own PostgreSQL from a wheel)"
	@echo "make lint    - ruff check + ruff format --check"
	@echo "make format  - ruff format + ruff check --fix"
	@echo "make e2e     - the docker compose stack end to end: build the images, up, a simulated"
	@echo "               instrument files data, archive, verify in S3, down (E2E_ARGS=\"--no-build\")"
	@echo "make images  - build the images of the compose stack (no registry needed)"
	@echo "make molecule - every Ansible role through molecule (docker driver), ansible-lint, yamllint"
	@echo "make charts  - helm lint/template every chart, validate against the Kubernetes schemas, scan"
	@echo "make chaos   - the reliability and security suite (tests/chaos, tests/security)"
	@echo "make clean   - remove the virtualenv and the demo folder"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ needed"' \
	  || { echo "error: $(PYTHON) is older than 3.11; set PYTHON=python3.11"; exit 2; }
	@$(PYTHON) -m venv $(VENV) \
	  || { echo "error: cannot create a virtualenv; on Debian: apt-get install python3-venv"; \
	       rm -rf $(VENV); exit 2; }
	$(BIN)/python -m pip install --quiet --upgrade pip

# Exactly the locked set (versions and hashes), then the project itself: the same packages on
# every machine and every day, whatever PyPI published since (requirements.lock says how to
# regenerate it).
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/ccat-dc demo --home $(DEMO_DIR) $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check src tests bench compose infra
	$(BIN)/ruff format --check src tests bench compose infra

format: install
	$(BIN)/ruff format src tests bench compose infra
	$(BIN)/ruff check --fix src tests bench compose infra

# tests/chaos and tests/security are the long reliability/security suite: `make chaos` runs them.
test: lint
	$(BIN)/pytest --ignore=tests/chaos --ignore=tests/security -n $(TEST_WORKERS) --dist loadfile \
	    $(PYTEST_ARGS)

chaos: install
	$(BIN)/pytest tests/chaos tests/security $(PYTEST_ARGS)

molecule: install
	bash playbooks/molecule.sh

charts: install
	bash charts/check.sh

images:
	bash scripts/build-images.sh

e2e: install
	$(BIN)/python compose/e2e.py $(E2E_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
