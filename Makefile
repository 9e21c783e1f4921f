# Two commands from a clean clone: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export MAX_JOBS ?= 2

.PHONY: all install test demo bench bench-pytest cmake-check info clean

all: install

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# --no-build-isolation: build against the torch already in the venv (isolation would pull a second one).
$(VENV)/.installed: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m sgkernels.info
	$(PY) -m pytest -q

# The embedded digits model: a self-guided and a plain MaskGIT grid (same seed) side by side in
# digits_demo.png, and both metric lines. The synthetic kernel demo: $(PY) -m examples.kernel_demo
demo: install
	$(VENV)/bin/sgkernels demo --out digits_demo.png

bench: install
	$(PY) -m benchmarks

# pytest-benchmark, one file per op (benchmarks/test_bench_<op>.py)
bench-pytest: install
	$(PY) -m pytest benchmarks/ -q

info: install
	$(PY) -m sgkernels.info

# Build the same extension through CMake's find_package(Torch) (CPU target), and load it.
cmake-check: $(VENV)/.deps
	cmake -S . -B build-cmake -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build-cmake -j $(MAX_JOBS)
	$(PY) -c "import glob, importlib.util, torch; p = glob.glob('build-cmake/sgkernels/_C*.so')[0]; \
	  s = importlib.util.spec_from_file_location('sgkernels._C', p); m = importlib.util.module_from_spec(s); \
	  s.loader.exec_module(m); assert hasattr(torch.ops.sgkernels, 'guided_sample'); print('cmake build OK:', p)"

clean:
	rm -rf build build-cmake *.egg-info sgkernels/_C*.so $(VENV)
