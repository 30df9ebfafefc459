# The two commands a newcomer runs: `make demo` (the embedded end-to-end demo) and `make test`.
# Each bootstraps its own virtualenv in .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo

.PHONY: demo demo-long ablations test test-fast bench clean

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# torch first, pinned to the CPU build on local disk; then transformers/diffusers see it as satisfied.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# libtpu (the version jax pins) OFF the import path: tools/aot.py compiles for TPU topologies with it,
	# while ordinary jax processes never load it.
	$(PY) -m pip install -q --no-deps --target $(VENV)/libtpu-aot 'libtpu==0.0.42.1'
	# FID references for the Inception / FID parity tests (tests/evals/fid_refs.py): pytorch-fid and clean-fid
	# without deps, torchvision OFF the import path (its PyPI wheel is a CUDA build that breaks transformers).
	$(PY) -m pip install -q --no-deps pytorch-fid==0.3.0 clean-fid==0.1.35
	$(PY) -m pip install -q --no-deps --target $(VENV)/fid_refs torchvision==0.28.0
	touch $@

demo: $(VENV)/.installed
	$(PY) -m unifluid_jax.tools.demo --workdir=$(WORKDIR)

# The same stages, longer (4000 UniFluid steps, ~1.5 h; reaches the caption target, not the VQA or GenEval ones: README).
demo-long: $(VENV)/.installed
	$(PY) -m unifluid_jax.tools.demo --workdir=workdir/demo-long --preset=long

# The paper's ablations at demo scale (configs/ablations.py): tables in workdir/ablations/ablations.md.
ablations: $(VENV)/.installed
	$(PY) -m unifluid_jax.tools.ablations --workdir=workdir/ablations

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 -m "not slow" tests

clean:
	rm -rf $(VENV) workdir
