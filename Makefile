# make run   - create .venv if missing, install, train + evaluate the default job
# make test  - create .venv if missing, install, run the default test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN    ?= runs/navigation2d-maml
ITERS  ?= 60

.PHONY: run test test-slow bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,mujoco]"
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

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(VENV)/bin/metarl bench --json bench.json

clean:
	rm -rf $(VENV) runs .pytest_cache
