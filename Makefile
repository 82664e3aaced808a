# `make demo` and `make test` set up .venv on first use (CPU stack), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# torchrec goes in with --no-deps: its declared dependency is the CUDA fbgemm-gpu build,
# which would replace fbgemm-gpu-cpu and fail to load on a CPU machine.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) fbgemm-gpu-cpu==1.8.0
	$(PIP) --no-deps torchrec==1.8.0
	$(PIP) tensordict torchmetrics==1.0.3 pyre-extensions tqdm iopath torchx==0.7.0 \
	    pyarrow pytest numpy tensorboard matplotlib
	$(PIP) --no-deps torchjd==0.18.0  # test-only: independent reference implementations
	$(PIP) --no-deps -e .
	touch $@

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/mbrec demo

test: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q

clean:
	rm -rf runs datasets
