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

# Three tiers, all always run: unit (in-process, seconds each), integration (subprocesses: the
# CLI, torchrun, wheels, signals; torch.compile; ptxas), then compat: the imports and the model
# tests again under transformers 5.17, the GPU image's version (the code runs on both; the venv
# has the newest). --durations names the slowest of each. pytest runs from its console script,
# so the checkout root is never on sys.path (`python -m pytest` would put it first).
PYTEST := $(BIN)/pytest tests -q -p no:cacheprovider --durations=10
COMPAT_TRANSFORMERS := 5.17.0
COMPAT := $(VENV)/compat-transformers-$(COMPAT_TRANSFORMERS)
COMPAT_TESTS := tests/test_imports.py tests/test_harmon.py tests/test_bagel.py tests/test_showo.py \
	tests/test_openuni.py tests/test_janus.py tests/test_loading.py tests/test_tokenizer.py

# transformers 5.17 and the hub client it pins (< 2), first on PYTHONPATH; the rest from the venv
$(COMPAT)/.installed: | $(VENV)/.installed
	$(PIP) install --no-deps --target $(COMPAT) transformers==$(COMPAT_TRANSFORMERS) "huggingface-hub>=1.5,<2" \
		httpx httpcore h11 anyio certifi idna
	touch $@

test: install $(COMPAT)/.installed
	$(PYTEST) -m "not integration"
	$(PYTEST) -m integration
	RECA_TRANSFORMERS=$(COMPAT_TRANSFORMERS) PYTHONPATH=$(COMPAT) $(BIN)/pytest $(COMPAT_TESTS) -q \
		-p no:cacheprovider -m "not integration"

clean:
	rm -rf $(VENV) runs build *.egg-info
