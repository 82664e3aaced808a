# `make demo` and `make test` set up .venv on first use (the stack of requirements/, CPU or GPU), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test gpu-smoke clean

setup: $(VENV)/.installed

# The stack: gpu where nvidia-smi lists a GPU, else cpu (make setup STACK=cpu chooses). Versions
# live in requirements/ only. torchrec goes in with --no-deps: its declared dependency is the CUDA
# fbgemm-gpu build, which would replace fbgemm-gpu-cpu and fail to load on a CPU machine.
STACK ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# PyTorch's own index for the torch and fbgemm builds of each stack (only these two packages are
# looked up there)
TORCH_INDEX_cpu := https://download.pytorch.org/whl/cpu
TORCH_INDEX_gpu := https://download.pytorch.org/whl/cu130

$(VENV)/.installed: pyproject.toml requirements/$(STACK).txt requirements/torchrec-$(STACK).txt requirements/common.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --no-deps --extra-index-url $(TORCH_INDEX_$(STACK)) -r requirements/$(STACK).txt
	$(PIP) -r requirements/$(STACK).txt  # their dependencies, from the default index
	$(PIP) --no-deps -r requirements/torchrec-$(STACK).txt
	$(PIP) -r requirements/common.txt
	$(PIP) --no-deps torchjd==0.18.0  # test-only: independent reference implementations
	$(PIP) --no-deps -e .
	echo $(STACK) > $@

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/mbrec demo

test: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q

# On a GPU machine: the GPU checks of tests/gpu (stack, deferred Gram prefetch, 1-GPU training
# in fp32/bf16/tf32 vs CPU, resume) and the throughput benchmark at h100.toml sizes.
gpu-smoke: setup
	@nvidia-smi -L >/dev/null 2>&1 || { echo "gpu-smoke: no GPU visible (nvidia-smi -L); nothing run"; exit 2; }
	mkdir -p runs/gpu-smoke
	$(PY) -m pytest -q -rA tests/gpu 2>&1 | tee runs/gpu-smoke/tests.txt
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/mbrec bench launch/configs/h100.toml -j 1x1 --gpu 1 \
	    --out runs/gpu-smoke/bench.json

clean:
	rm -rf runs datasets
