# `make test` and `make bench` each create or reuse .venv and install what they need.
# Without CUDA the tests run the Triton kernels under the interpreter (tests/conftest.py sets it).
# On a machine without CUDA, torch is pinned to the CPU build: the "+cpu" local version matches
# no CUDA build, so pip never resolves it to the multi-GB CUDA build and its NVIDIA libraries. It
# is taken from wherever pip finds it (a local wheel, a configured index); failing that, from
# PyTorch's CPU index (TORCH_CPU_INDEX).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Triton's interpreter needs triton >= 3.7 beside numpy >= 2.4.
TRITON_CPU ?= triton>=3.7

# What each target installs: the tests run the TRL and verl integrations too.
EXTRAS_test  := test,trl,verl
EXTRAS_bench := bench

.PHONY: test bench venv clean

$(VENV)/.ready-%: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q -e ".[$(EXTRAS_$*)]"; \
	else $(PIP) install -q "$(TORCH_CPU)" 2>/dev/null || $(PIP) install -q "$(TORCH_CPU)" --extra-index-url $(TORCH_CPU_INDEX); \
	$(PIP) install -q -e ".[$(EXTRAS_$*)]" "$(TORCH_CPU)" "$(TRITON_CPU)"; fi
	touch $@

venv: $(VENV)/.ready-test

# Two workers (the CPU machines have 2 cores), a test file per worker: the module-scoped fixtures
# (the SASS report, the verl engine set-up) then run once.
test: $(VENV)/.ready-test
	$(PY) -m pytest -q -n 2 --dist loadfile tests

bench: $(VENV)/.ready-bench
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
