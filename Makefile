# Each target creates/uses its venv itself. `make demo` / `make test` install the exact versions in
# requirements/lock.txt (see requirements/README.md); pyproject keeps honest ranges for library users and
# requires torch>=2.3. torch is the CPU build that lies on this machine's disk (pip install torch==2.13.0).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.6.2
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)
LATEST := .venv-latest
PIP_QUIET := --progress-bar off --no-color --disable-pip-version-check

.PHONY: demo test test-slow test-latest bench lock lock-upgrade clean

$(STAMP): pyproject.toml $(LOCK)
	@echo "netdiet: installing into $(VENV) from $(LOCK) (about a minute on a fresh machine)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[1/4] pip $(PIP_VERSION)"
	@$(PY) -m pip install -q $(PIP_QUIET) pip==$(PIP_VERSION)
	@echo "[2/4] torch 2.13.0 (CPU build, 190 MB)"
	@$(PY) -m pip install -q $(PIP_QUIET) torch==2.13.0
	@echo "[3/4] the locked dependencies ($$(grep -c '==' $(LOCK)) packages)"
	@$(PY) -m pip install $(PIP_QUIET) -r $(LOCK) | { grep --line-buffered -E '^(Collecting|Successfully)' | cut -c1-100 || true; }
	@echo "[4/4] netdiet (editable)"
	@$(PY) -m pip install -q $(PIP_QUIET) --no-deps --no-build-isolation -e .
	@$(PY) -m pip check >/dev/null || { $(PY) -m pip check; exit 1; }
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/netdiet demo

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# The newest release of every dependency pyproject admits (torch kept at the CPU file): shows drift early.
test-latest:
	@test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	@$(LATEST)/bin/python -m pip install -q $(PIP_QUIET) --upgrade pip
	@$(LATEST)/bin/python -m pip install -q $(PIP_QUIET) torch==2.13.0
	@$(LATEST)/bin/python -m pip install -q $(PIP_QUIET) --upgrade --upgrade-strategy eager -c requirements/torch-cpu.txt -e '.[data,onnx,dev,hf]'
	@$(LATEST)/bin/python -m pip freeze --exclude-editable | grep -i -E '^(torch|onnx|onnxruntime|onnxscript|numpy|scikit-learn|mlxtend|torch-pruning|safetensors|rich|matplotlib|zstandard|transformers)==' | tr '\n' ' '; echo
	$(LATEST)/bin/python -m pytest

# requirements/lock.txt from pyproject's ranges (see requirements/README.md). `make lock` keeps every pin the
# lock already has and resolves only what is new or no longer fits (a new dependency or extra); `make
# lock-upgrade` re-resolves everything to the newest releases the ranges allow.
LOCK_VENV := .venv-lock/bin/pip-compile
LOCK_ARGS := --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
	--extra data --extra onnx --extra dev --extra hf -c requirements/torch-cpu.txt \
	-o $(LOCK) pyproject.toml requirements/build.in

$(LOCK_VENV):
	$(PYTHON) -m venv .venv-lock && .venv-lock/bin/python -m pip install -q $(PIP_QUIET) pip==$(PIP_VERSION) pip-tools==$(PIP_TOOLS_VERSION)

lock: $(LOCK_VENV)
	$(LOCK_VENV) -q $(LOCK_ARGS)

lock-upgrade: $(LOCK_VENV)
	$(LOCK_VENV) -q --upgrade $(LOCK_ARGS)

bench: $(STAMP)
	$(PY) -m pip install -q $(PIP_QUIET) -e '.[bench]'
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock build *.egg-info src/*.egg-info
