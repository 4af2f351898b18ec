# Two commands do all the set-up on a fresh machine:
#   make demo   install, then run the pipeline on the embedded default (configs/tiny.yaml)
#   make test   install, then run the test suite
# Both run inside a loopback-only network namespace (scripts/offline): nothing leaves the machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: an unpinned torch pulls several GB of CUDA wheels on a CPU machine.
# On a GPU machine, set TORCH_SPEC to the build you want (e.g. TORCH_SPEC=torch==2.13.0).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install toy demo test test-all coverage check
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e '.[test]'
	touch $@

demo: install
	scripts/offline $(BIN)/crossray run configs/tiny.yaml

# The toy family the tests read, built (about a minute) or found in $CROSSRAY_CACHE before pytest
# starts: data the suite reads, like the installed packages, not part of its time budget.
toy: install
	@scripts/offline $(BIN)/crossray toy build >/dev/null

test: toy   # prints its total against the suite's budget (tests/conftest.py) and the 15 slowest
	scripts/offline $(BIN)/python -m pytest -q --durations=15

test-all: toy   # with the tests marked slow (their substance is covered by faster ones)
	scripts/offline $(BIN)/python -m pytest -q -m "slow or not slow"

coverage: toy   # the same suite under coverage.py: line coverage of crossray/, jobs/ and serve/
	scripts/offline $(BIN)/python -m coverage run -m pytest -q --durations=15
	$(BIN)/python -m coverage report | grep TOTAL

check: install
	$(BIN)/ruff check .
