# Quick start:   make demo    (set up .venv if needed, scan the sample slide with the bundled model)
#                make test    (set up .venv if needed, run the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the build this project is tested with; override for another CUDA/CPU build
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo-out

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) scripts/fetch_sample.py --out $(DEMO_DIR)/cmu-1-small-region.svs
	$(VENV)/bin/wsi-scan info $(DEMO_DIR)/cmu-1-small-region.svs
	$(VENV)/bin/wsi-scan $(DEMO_DIR)/cmu-1-small-region.svs --out $(DEMO_DIR)/cmu-1-small-region.zarr --overlay $(DEMO_DIR)/overlay.png --overwrite
	@echo "heatmap: $(DEMO_DIR)/cmu-1-small-region.zarr  overlay: $(DEMO_DIR)/overlay.png"

# tests in parallel, one worker per core up to 4 (each scan test holds up to ~1 GB)
test: setup
	$(PY) -m pytest -q -n auto --maxprocesses 4

lint: setup
	$(VENV)/bin/ruff check wsi_scan tests scripts
	$(VENV)/bin/ruff format --check wsi_scan tests scripts
	$(VENV)/bin/mypy wsi_scan

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
