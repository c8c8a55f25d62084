# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed first so that resolving the project does not pull a
# multi-GB CUDA build. Override with `make TORCH_SPEC='torch' demo` on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
DEMO_ARGS ?= --rounds 5
PYTEST_ARGS ?=

.PHONY: demo test venv lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The demo also installs the hub extra: with no local WikiText it downloads WikiText-2 (tests never do).
$(VENV)/.hub-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[hub]'
	touch $@

demo: venv $(VENV)/.hub-installed
	$(VENV)/bin/fedjet up $(DEMO_ARGS)

test: venv
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# mypy --strict on the pure parts: codecs, the aggregation algebra, config, privacy accounting and
# randomness, the secure-aggregation protocol and the topology generator; import-linter holds the
# layers (the contract is in pyproject.toml).
MYPY_STRICT := fedjet/codecs fedjet/coordinator/aggregate.py fedjet/config fedjet/privacy/accounting.py \
	fedjet/privacy/secure_random.py fedjet/secagg fedjet/deploy fedjet/weights.py

lint: venv
	$(VENV)/bin/ruff check fedjet tests
	$(VENV)/bin/mypy --strict $(MYPY_STRICT)
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
