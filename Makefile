# Two commands on a fresh machine: `make demo` and `make test`. Both set everything up themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.inc' 2>/dev/null) setup.py pyproject.toml

.PHONY: all venv build demo test test-fast bench gpu-check wheel clean

all: build

$(VENV)/.deps: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

# Editable install: builds fastddpm._C (and fastddpm._C_cuda when nvcc is found) into src/fastddpm.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

demo: build
	$(PY) -m fastddpm.demo

test: build
	$(PY) -m fastddpm.info
	$(PY) -m pytest -q tests

test-fast: build
	$(PY) -m pytest -q -m "not slow" tests

bench: build
	$(PY) -m pytest -q benchmarks --benchmark-json=benchmarks/results/latest-$(shell hostname).json
	$(PY) benchmarks/report.py benchmarks/results/latest-$(shell hostname).json

gpu-check:
	bash benchmarks/gpu_check.sh

# sdist, then a wheel built from it (so the sdist is proven complete), the C++ core only (the CUDA
# extension stays a source build), repaired to a manylinux tag with the OpenMP runtime vendored.
wheel: $(VENV)/.deps
	rm -rf dist wheelhouse
	FASTDDPM_CUDA=0 FASTDDPM_REQUIRE_NATIVE=1 FASTDDPM_DIST=wheel $(PY) -m build --no-isolation --outdir dist .
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m auditwheel repair --wheel-dir wheelhouse dist/*.whl
	ls -l dist wheelhouse

clean:
	rm -rf build dist wheelhouse $(VENV) src/*.egg-info src/fastddpm/*.so src/fastddpm/_build_info.json
