# One-command set-up and runs. Each target creates (or reuses) a virtual
# environment, installs the pinned requirements, builds the extension against
# the installed torch (no build isolation) and runs.
#
#   make demo        the main job: train a small DANet on synthetic data, then compare backends
#   make test        the test suite, then cmake-test
#   make test-cuda-emulated   the CUDA kernels run on the CPU by the CUDA emulation
#                    (tests/cuda_emulation), sanitizer builds, static checks of the device code
#   make bench       CPU benchmarks -> bench-out/
#   make cmake-test  the C++ library (CPU kernels) and its ctest, build/cmake-torch-<version>/
#   make gpu-suite   on a machine with a GPU and torch preinstalled (no internet)
#
# Variables: VENV (.venv), TORCH_SPEC (torch==2.14.1; torch==2.13.0 is a CPU-only build),
# TORCH_CUDA_ARCH_LIST (8.0;9.0), MAX_JOBS (2), PYTEST_ARGS.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
PYTEST_ARGS ?=
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2
# The CUDA kernels are compiled when the torch is a CUDA build and nvcc is found.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

BIN := $(VENV)/bin

.PHONY: env build test test-cuda-emulated demo bench cmake-test gpu-suite clean

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" -r requirements.txt
	touch $@

env: $(BIN)/.installed

build: env
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	$(BIN)/python -c "import danet_ext, json; print('danet_ext build:', json.dumps(danet_ext.build_info()))"

test: build
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	$(MAKE) cmake-test

test-cuda-emulated: build
	DANET_EXT_CUDA_EMULATION=1 $(BIN)/python -m pytest -q tests/cuda_emulation $(PYTEST_ARGS)

demo: build
	$(BIN)/danet-ext demo

bench: build
	$(BIN)/danet-ext bench --out bench-out

# One build folder per torch version, so switching TORCH_SPEC never reuses a stale
# CMake cache; TORCH_ROOT is passed every time, so another VENV is picked up too.
cmake-test: env
	@set -e; \
	root="$$($(BIN)/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"; \
	dir="build/cmake-torch-$$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	echo "cmake: libtorch in $$root, build folder $$dir"; \
	cmake -S . -B "$$dir" -DTORCH_ROOT="$$root"; \
	cmake --build "$$dir" -j$(MAX_JOBS); \
	ctest --test-dir "$$dir" --output-on-failure

gpu-suite:
	bash benchmarks/gpu_suite.sh

clean:
	rm -rf build danet_ext/_C*.so *.egg-info
