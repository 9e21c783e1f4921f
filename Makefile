# Two commands from a clean clone: `make demo` and `make test`. Both create .venv and install into it.
# `make test` is the fast tier (every op on every backend, every drop-in, the CLI and the loaders; a few
# minutes on 2 cores); `make test-all` is the full suite (CI runs both).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export MAX_JOBS ?= 2

.PHONY: all install test test-all demo bench bench-check bench-pytest cmake-check info clean gpu-artifact test-device-versions \
        test-diffusers-upstream

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

# -n: pytest-xdist workers (TEST_WORKERS=0 runs in one process). -m "not slow": tests/conftest.py and
# pytest.ini say what is slow and why.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))
test: install
	$(PY) -m sgkernels.info
	$(PY) -m pytest -q -m "not slow" $(XDIST)

test-all: install
	$(PY) -m sgkernels.info
	$(PY) -m pytest -q $(XDIST)

# The embedded digits model: a self-guided and a plain MaskGIT grid (same seed) side by side in
# digits_demo.png, and both metric lines. The synthetic kernel demo: $(PY) -m examples.kernel_demo
demo: install
	$(VENV)/bin/sgkernels demo --out digits_demo.png

bench: install
	$(PY) -m benchmarks

# Rerun the rows the README quotes (tools/bench_check.py QUOTED) and compare each ratio with
# benchmarks/RESULTS.md's: fails when one moved by more than 25 % or a row / anchor is missing.
# On a quiet machine. `$(PY) tools/bench_check.py --table` prints the README's table from RESULTS.md.
bench-check: install
	$(PY) tools/bench_check.py

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

# ------------------------------------------------------------------------------------------------
# The GPU machine's versions: Python 3.12, torch 2.11.0+cu130, triton 3.6 (requirements-device.txt),
# in a second venv. PYTHON312: pyenv's 3.12, else a python3.12 on PATH that runs.
PYTHON312 ?= $(shell for p in $(HOME)/.pyenv/versions/3.12*/bin/python $$(command -v python3.12); do \
  "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)
DVENV := .venv-device
DPY   := $(DVENV)/bin/python
GPU_DIST  ?= dist/gpu
GPU_ARCHS ?= 9.0+PTX

$(DVENV)/.deps: requirements-device.txt
	@test -n "$(PYTHON312)" || { echo "no Python 3.12 found: set PYTHON312=/path/to/python3.12"; exit 1; }
	$(PYTHON312) -m venv $(DVENV)
	$(DPY) -m pip install -q --upgrade pip
	$(DPY) -m pip install -q -r requirements-device.txt
	touch $@

# The wheel benchmarks/gpu_suite.sh installs on the GPU machine with no compilation: sm_90 SASS plus
# compute_90 PTX, built here with nvcc (no GPU needed), checked (size < 64 MiB, archs, import), with
# dist/gpu/BUILD_INFO.json. Its own build folder, so the CPU-only builds of the other venvs stay.
# (DIST_EXTRA_CONFIG: setuptools' build folder for this build only; a single pip-driven bdist_wheel
# compiles once, `setup.py build bdist_wheel` would compile twice.)
gpu-artifact: $(DVENV)/.deps
	rm -rf $(GPU_DIST) && mkdir -p build/gpu
	printf '[build]\nbuild_base = build/gpu\n[bdist_wheel]\nbdist_dir = build/gpu/bdist\n' > build/gpu/setup.cfg
	DIST_EXTRA_CONFIG=build/gpu/setup.cfg SGKERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="$(GPU_ARCHS)" \
	  $(DPY) -m pip wheel -q --no-build-isolation --no-deps --no-index -w $(GPU_DIST) .
	TORCH_CUDA_ARCH_LIST="$(GPU_ARCHS)" $(DPY) tools/gpu_artifact.py check $(GPU_DIST)

# CI with the GPU machine's torch and triton (CPU only here): the extension built CPU-only against
# torch 2.11 in place (build/device), then the Triton AOT compile tests, the op tests with the Triton
# interpreter, and the rest of the op tests. DEVICE_TESTS_M / DEVICE_TESTS_K (pytest -m / -k) trim them.
DEVICE_TESTS := tests/test_triton_aot.py tests/test_guided_sample.py tests/test_remask.py \
                tests/test_self_guided_step.py tests/test_vq_lookup.py tests/test_cross_entropy.py \
                tests/test_backend.py tests/test_rng.py
DEVICE_TESTS_M ?= not slow
DEVICE_TESTS_K ?=
test-device-versions: $(DVENV)/.deps
	mkdir -p build/device && printf '[build]\nbuild_base = build/device\n' > build/device/setup.cfg
	DIST_EXTRA_CONFIG=build/device/setup.cfg SGKERNELS_CUDA=0 $(DPY) setup.py -q build_ext --inplace
	$(DPY) -m sgkernels.info
	$(DPY) -m pytest -q -p no:cacheprovider $(DEVICE_TESTS) -m "$(DEVICE_TESTS_M)" $(if $(DEVICE_TESTS_K),-k "$(DEVICE_TESTS_K)")

# diffusers' own tests of BlockRefinementScheduler, EntropyBoundScheduler, LLaDA2Pipeline (and, when the
# checkout has it, DiffusionGemmaPipeline) with the fused
# classes swapped in (tools/diffusers_swap.py). UPSTREAM: a folder holding diffusers' tests/ (read from the
# huggingface/diffusers repository, never committed here); skipped when unset or absent.
UPSTREAM ?=
UPSTREAM_TESTS := tests/schedulers/test_scheduler_block_refinement.py tests/schedulers/test_scheduler_entropy_bound.py \
                  tests/pipelines/llada2/test_llada2.py \
                  $(if $(wildcard $(UPSTREAM)/tests/pipelines/diffusion_gemma/test_diffusion_gemma.py),tests/pipelines/diffusion_gemma/test_diffusion_gemma.py)
test-diffusers-upstream: install
	@if [ -z "$(UPSTREAM)" ] || [ ! -f "$(UPSTREAM)/tests/pipelines/llada2/test_llada2.py" ]; then \
	  echo "test-diffusers-upstream: skipped (set UPSTREAM=/path/to/diffusers, the folder holding its tests/)"; \
	else \
	  PYTHONPATH="$(CURDIR)/tools$${PYTHONPATH:+:$$PYTHONPATH}" $(PY) -m pytest -q -p diffusers_swap -p no:cacheprovider \
	    --rootdir="$(UPSTREAM)" -c "$(CURDIR)/tools/pytest_upstream.ini" $(addprefix $(UPSTREAM)/,$(UPSTREAM_TESTS)); \
	fi

clean:
	rm -rf build build-cmake dist *.egg-info sgkernels/_C*.so $(VENV) $(DVENV)
