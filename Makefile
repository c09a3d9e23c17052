# Two commands do all setup on a fresh machine with only Python:
#   make demo   -- create .venv, install, run the smoke sweep (Ray Tune + Optuna + ASHA on synthetic data, tiny
#                  model, CPU; ~2.5 min on 2 cores) and print its leaderboard (results/leaderboard.md, plots)
#   make test   -- create .venv if needed, install with test extras, run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned for this workplace (served from local disk); any matching pair works elsewhere.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install install-test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# --resume: a second `make demo` reuses the finished sweep instead of refusing to overwrite it.
demo: install
	$(PY) -m harness.sweep sweeps/smoke.yaml --resume
	$(PY) -m harness.leaderboard results/smoke

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
