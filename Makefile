# resnet-lab: `make setup`, then `make report`. See README.md.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Which params files `make report` uses (columns of params/report.yaml): default | full | smoke
PROFILE ?= default
# `make report FORCE=1` executes every notebook, even those whose report is up to date
FORCE ?=

.PHONY: setup test report bench lab clean

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,postgres]"
	$(PY) -m ipykernel install --sys-prefix --name resnet-lab --display-name "Python (resnet-lab)"
	touch $@

test: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

report: setup
	$(PY) -m resnet_lab report --profile $(PROFILE) $(if $(FORCE),--force)

bench: setup
	$(PY) -m resnet_lab bench

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -f reports/*.html reports/*.ipynb reports/*.json reports/.build.json
