# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
# The CPU build of torch; on a CUDA machine use e.g. `make setup TORCH='torch>=2.11,<2.15'`.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The hub's state folder for `make run` (absolute: the ServerApp runs in the SuperLink's directory).
HUB ?= $(CURDIR)/.fedem/hub
FEDERATION ?= num-supernodes=4 client-resources-num-cpus=1

.PHONY: setup run test test-fast bench clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/fedem run . --federation-config "$(FEDERATION)" \
		--run-config 'config-name="demo" hub="$(HUB)"'
	$(BIN)/fedem --hub "$(HUB)" status
	$(BIN)/fedem --hub "$(HUB)" contributions --limit 8
	$(BIN)/fedem --hub "$(HUB)" report

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
