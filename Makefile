# Worldsmith: two commands on a fresh machine.
#   make demo   runs the main job on the embedded default (synthetic world)
#   make test   runs the test suite
# Each creates .venv and installs the project when it is missing or stale.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= dev,vizdoom
DEMO_OUT ?= outputs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-slurm slurm-local venv clean

venv: $(STAMP)

# Reinstall when the dependency declarations change.
$(STAMP): pyproject.toml constraints-cpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[$(EXTRAS)]"
	@# lpips' pip metadata requires torchvision (CUDA-only for torch 2.13, and it breaks peft and
	@# diffusers); we only need the trained linear-layer weights it ships, so install it alone.
	$(PY) -m pip install -q --no-deps lpips==0.1.4
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m train.demo out=$(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# Install slurm-wlm + munge (root, apt) so the SLURM tests run against a real local SLURM.
slurm-local: $(STAMP)
	$(PY) -m launch.minicluster install

test-slurm: $(STAMP)
	$(PY) -m pytest -q -m slurm tests/test_slurm.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs
