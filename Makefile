# Two commands, each from nothing: `make demo` (RecA on the tiny preset and the bundled photos,
# into runs/demo/) and `make test` (the test suite; what CI runs). Both create or reuse .venv.
#
# Where no NVIDIA GPU is present, torch is pinned to the 2.13.0 CPU build first, so that pip
# never pulls a CUDA build; where one is, the venv sees the machine's own torch
# (--system-site-packages) and pip keeps it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
CPU_TORCH := torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test install clean

$(BIN)/python:
ifeq ($(HAS_GPU),1)
	$(PYTHON) -m venv --system-site-packages $(VENV)
else
	$(PYTHON) -m venv $(VENV)
endif

# Reinstalled only when setup.py changes (the package itself is installed editable).
$(VENV)/.installed: setup.py | $(BIN)/python
ifneq ($(HAS_GPU),1)
	$(PIP) install $(CPU_TORCH)
endif
	$(PIP) install -e ".[test,dali,openuni]"
	touch $@

install: $(VENV)/.installed

# The `demo` preset: the tiny model regenerating the bundled photographs whole; its last line is
# the final reconstruction PSNR from each photo's own visual prompt and from another photo's.
demo: install
	$(BIN)/reca train --preset demo --data demo --out runs/demo --overwrite

# Two tiers, both always run: unit (in-process, seconds each) then integration (subprocesses: the
# CLI, torchrun, wheels, signals; torch.compile; ptxas). --durations names the slowest of each.
PYTEST := $(BIN)/python -m pytest tests -q -p no:cacheprovider --durations=10

test: install
	$(PYTEST) -m "not integration"
	$(PYTEST) -m integration

clean:
	rm -rf $(VENV) runs build *.egg-info
