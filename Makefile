# make run   - create .venv if missing, install, train + evaluate the default job
# make test  - create .venv if missing, install, run the default test suite
# make lint  - ruff, and mypy on metarl, envs and cli (strict on the engine), as CI runs them
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN    ?= runs/navigation2d-maml
ITERS  ?= 60

.PHONY: run test test-slow lint bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,mujoco,metaworld,sb3,video,tensorboard]"
	touch $(STAMP)

install: $(STAMP)

# the main job: a few minutes of MAML-TRPO on 2D navigation, then meta-testing on
# 40 new goals against a random-init policy, a jointly pretrained one and the oracle
run: $(STAMP)
	$(VENV)/bin/metarl train --family navigation2d --algo maml --outer trpo \
		--iterations $(ITERS) --out $(RUN) --overwrite --threads 1
	$(VENV)/bin/metarl evaluate $(RUN) --pretrain-iterations 20 --threads 1 \
		--plot $(RUN)/adaptation.png --json $(RUN)/eval.json

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check metarl envs cli tests examples
	$(VENV)/bin/mypy metarl envs cli  # settings per module in pyproject.toml

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(VENV)/bin/metarl bench --json bench.json

clean:
	rm -rf $(VENV) runs .pytest_cache

# make gpu-wheels - (with the package index) download what gpu-check installs, into
#                   $(GPU_WHEELS): Python $(GPU_PY_VERSION), manylinux x86-64, no torch
# make gpu-check  - on a CUDA machine (offline once the wheels are there): install from this
#                   tree into $(GPU_PYTHON) keeping its torch, run the gpu tests and the quick
#                   bench, print a table, write gpu-check.json (README, "GPU")
GPU_PYTHON     ?= python3
GPU_WHEELS     ?= .gpu-wheels
GPU_PY_VERSION ?= 3.12
GPU_EXTRAS     ?= mujoco

.PHONY: gpu-wheels gpu-check

gpu-wheels:
	PYTHON=$(PYTHON) GPU_WHEELS=$(GPU_WHEELS) GPU_PY_VERSION=$(GPU_PY_VERSION) \
		GPU_EXTRAS="$(GPU_EXTRAS)" bash scripts/gpu_check.sh wheels

gpu-check:
	PYTHON=$(GPU_PYTHON) GPU_WHEELS=$(GPU_WHEELS) GPU_EXTRAS="$(GPU_EXTRAS)" \
		bash scripts/gpu_check.sh
