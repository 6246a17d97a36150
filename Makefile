# make demo : .venv + a tiny SAT checkpoint loaded by 4 ranks (TP=2 x DP=2) under torchrun
# make test : .venv + the whole test suite
PY       ?= python3
VENV     := .venv
STAMP    := $(VENV)/.installed
# deepspeed's ops are JIT-only here; torch is pinned in the same command so no CUDA wheel is pulled.
PIP_PKGS := torch==2.13.0 numpy omegaconf safetensors deepspeed mpi4py tqdm pytest

.PHONY: venv demo test clean
venv: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	DS_BUILD_OPS=0 $(VENV)/bin/pip install -q $(PIP_PKGS)
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=4 -m sat_dist demo --tp 2

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-* .cache
