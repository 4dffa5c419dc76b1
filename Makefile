# Everything runs in a project virtualenv (.venv by default). `make test` and `make demo` work on
# a fresh clone with no GPU and no model hub: the fixtures come from PyPI wheels.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# The CPU build of torch goes in first so nothing pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export BENTOML_DO_NOT_TRACK := True
export DO_NOT_TRACK := true
# mlflow models serve (--env-manager local) and bentoml serve find their tools on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install lint test test-fast demo demo-promote demo-finetune bench fixtures postgres java chromium clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
# setuptools >= 77 (SPDX license): whisper_bento.build and the wheel test build without isolation.
	$(PY) -m pip install -q --upgrade pip "setuptools>=77"
	$(PY) -m pip install -q "$(TORCH_SPEC)" || $(PY) -m pip install -q --index-url https://download.pytorch.org/whl/cpu "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[convert,serve,finetune,spark,dev]"
	$(PY) -m pip check
	touch $(STAMP)

fixtures: install
	$(PY) -m devkit

postgres:
	bash .ci/postgres.sh

java:
	bash .ci/java.sh

chromium:
	bash .ci/chromium.sh

# ruff and mypy on the shipped packages, before any test runs (settings in pyproject.toml).
lint: install
	$(BIN)/ruff check plugin registry bento
	$(BIN)/ruff format --check plugin registry bento
	$(BIN)/mypy

test: install lint postgres java chromium
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not real_weights and not server and not cuda_libs and not spark"

demo: install
	$(PY) -m demo.serve

demo-promote: install
	$(PY) -m demo.promote

demo-finetune: install
	$(PY) -m demo.finetune

bench: install
	$(PY) -m bench

clean:
	rm -rf .demo .demo-promote .bench mlflow.db mlartifacts
