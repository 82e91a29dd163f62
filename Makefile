# Two commands do everything on a fresh machine (offline apart from the package registries):
#   make demo   install, then run the main job on the built-in defaults
#   make test   install, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test install bench

# pip -qq: errors only (its notices about the package indexes and setuptools' about editable installs are not the
# user's to act on). The CPU wheel of torch lies on local disk; an unpinned torch would pull a multi-GB CUDA build.
$(BIN)/hf-ches: pyproject.toml
	@echo "Installing hf-ches into $(VENV) (1-2 minutes)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -qq --upgrade pip
	@$(BIN)/pip install -qq torch==2.13.0
	@$(BIN)/pip install -qq -e ".[test]"
	@touch $(BIN)/hf-ches

install: $(BIN)/hf-ches

demo: install
	@$(BIN)/hf-ches demo --overwrite

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: install
	$(BIN)/python benchmarks/bench_ches.py
