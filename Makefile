# panther's front door: `make demo` (the main job) and `make test`. Both work on a fresh machine
# with nothing but python3: they create .venv, install torch and the deps, build the native ops.
# `make docs` builds the documentation site into docs/_build/html (warnings are errors).
#
# Overrides:  TORCH_SPEC=torch==2.11.0   (which torch to install when none is importable in the venv)
#             VENV_ARGS=--system-site-packages   (reuse a preinstalled torch, e.g. on a GPU box)
#             PYTEST_ARGS="-k linear"
PYTHON      ?= python3
VENV        ?= .venv
VENV_ARGS   ?=
TORCH_SPEC  ?= torch==2.13.0
PYTEST_ARGS ?=
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.panther-built
SETUP_INPUTS := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py pyproject.toml Makefile

.PHONY: setup test demo bench docs clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)

$(STAMP): $(PY) $(SETUP_INPUTS)
	$(PY) -m pip install -q "setuptools>=70.1" wheel ninja
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q numpy triton networkx tabulate tqdm matplotlib pytest hypothesis  # matplotlib: the [plot] extra, tested
	$(PY) -m pip install -q transformers  # test-only: GPT-2 / BERT built from configs (no downloads)
	$(PY) -m pip install -q sphinx myst-parser  # the test suite builds the docs (tests/test_docs.py)
	MAX_JOBS=$${MAX_JOBS:-4} $(PY) -m pip install -q -e . --no-build-isolation --no-deps
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m panther demo

bench: setup
	$(PY) -m panther bench linear

docs: setup
	$(PY) -m pip install -q sphinx myst-parser
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf build *.egg-info panther/_C*.so $(STAMP)
