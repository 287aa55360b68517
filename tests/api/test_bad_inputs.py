"""(g) Bad input gets a clear ValueError/TypeError naming the problem, and the model is left bit-identical."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

import gim_fast
from model_state import assert_same_state, snapshot
from tiny_models import VOCAB, random_ids, tiny_model

IDS = random_ids(11, seed=3)


class NoBaselineTokenizer:
    pad_token_id = None
    unk_token_id = None

    def encode(self, text, add_special_tokens=False):
        return []


BAD_EXPLAIN = {
    "empty": (dict(input_ids=torch.tensor([], dtype=torch.long)), ValueError, "empty"),
    "empty batch": (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), ValueError, "empty"),
    "3-D ids": (dict(input_ids=torch.zeros(1, 2, 3, dtype=torch.long)), ValueError, r"\[seq_len\] or \[batch, seq_len\]"),
    "id too large": (dict(input_ids=torch.tensor([1, VOCAB, 2])), ValueError, "outside the vocabulary"),
    "negative id": (dict(input_ids=torch.tensor([1, -1, 2])), ValueError, "outside the vocabulary"),
    "float ids": (dict(input_ids=IDS.float()), TypeError, "integer token ids"),
    "string ids": (dict(input_ids="The capital"), TypeError, "tensor or a list"),
    "ragged batch": (dict(input_ids=[[1, 2, 3], [4, 5]]), ValueError, "different lengths.*attention_mask"),
    "target position too large": (dict(target_position=11), ValueError, "target_position 11 is out of range"),
    "target position too small": (dict(target_position=-12), ValueError, "out of range"),
    "target position float": (dict(target_position=1.5), TypeError, "target_position must be an integer"),
    "target token too large": (dict(target_token_id=VOCAB), ValueError, "target_token_id .* outside the vocabulary"),
    "target token negative": (dict(target_token_id=-1), ValueError, "outside the vocabulary"),
    "targets per row wrong count": (dict(input_ids=random_ids(5, batch=2), target_token_id=[1, 2, 3]), ValueError,
                                    "3 entries for a batch of 2"),
    "temperature zero": (dict(softmax_temperature=0), ValueError, "softmax_temperature must be a finite number > 0"),
    "temperature negative": (dict(softmax_temperature=-2.0), ValueError, "> 0"),
    "temperature nan": (dict(softmax_temperature=float("nan")), ValueError, "> 0"),
    "temperature string": (dict(softmax_temperature="2"), TypeError, "softmax_temperature must be a number"),
    "negative q_scale": (dict(q_scale=-0.25), ValueError, "q_scale must be a finite number >= 0"),
    "negative gate_scale": (dict(gate_scale=-1), ValueError, "gate_scale"),
    "freeze_norm not bool": (dict(freeze_norm="yes"), TypeError, "freeze_norm must be True or False"),
    "unknown backend": (dict(backend="cuda"), ValueError, "backend must be one of"),
    "mask wrong shape": (dict(attention_mask=torch.ones(10, dtype=torch.long)), ValueError, "shape of input_ids"),
    "mask values": (dict(attention_mask=torch.full((11,), 2)), ValueError, "only 0 .* and 1"),
    "mask row empty": (dict(input_ids=random_ids(5, batch=2),
                            attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])), ValueError,
                       "at least one real token"),
    "baseline out of range": (dict(baseline_token_id=VOCAB), ValueError, "baseline_token_id .* outside"),
    "no baseline": (dict(baseline_token_id=None, tokenizer=NoBaselineTokenizer()), ValueError, "no baseline token"),
    "no baseline, no tokenizer": (dict(baseline_token_id=None), ValueError, "no baseline token"),
}


@pytest.mark.parametrize("case", list(BAD_EXPLAIN))
def test_bad_explain_input(case):
    kwargs, error, message = BAD_EXPLAIN[case]
    kwargs = dict(dict(input_ids=IDS, baseline_token_id=0), **kwargs)
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(error, match=message):
        gim_fast.explain(model, **kwargs)
    assert_same_state(before, snapshot(model))


def test_unsupported_model():
    cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       word_embed_proj_dim=16)
    model = tf.OPTForCausalLM(cfg)
    before = snapshot(model)
    with pytest.raises(ValueError, match="model_type 'opt'.*supported model types: gemma2, gemma3_text, gpt2, llama"):
        gim_fast.explain(model, IDS, baseline_token_id=0)
    with pytest.raises(ValueError, match="supported model types"):
        gim_fast.GIM(model).__enter__()
    assert_same_state(before, snapshot(model))


def test_not_a_hugging_face_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        gim_fast.explain(torch.nn.Linear(3, 3), IDS, baseline_token_id=0)


@pytest.mark.parametrize("family,field", [("llama", "is_causal"), ("gemma2", "use_bidirectional_attention")])
def test_non_causal_model(family, field):
    model = tiny_model(family, **{field: field != "is_causal"})
    before = snapshot(model)
    with pytest.raises(ValueError, match="causal language models"):
        gim_fast.explain(model, IDS, baseline_token_id=0)
    assert_same_state(before, snapshot(model))


def test_nested_gim_refused():
    model = tiny_model("qwen3")
    before = snapshot(model)
    with gim_fast.GIM(model):
        inside = snapshot(model)
        with pytest.raises(ValueError, match="cannot be nested"):
            with gim_fast.GIM(model, softmax_temperature=3.0):
                pass
        with pytest.raises(ValueError, match="cannot be nested"):
            gim_fast.explain(model, IDS, baseline_token_id=0)
        with pytest.raises(ValueError, match="cannot be nested"):
            gim_fast.GIM(model.model).__enter__()
        assert_same_state(inside, snapshot(model))
    assert_same_state(before, snapshot(model))


def test_gim_settings_checked_before_entering():
    model = tiny_model("gemma3")
    before = snapshot(model)
    with pytest.raises(ValueError, match="v_scale"):
        gim_fast.GIM(model, v_scale=-1.0)
    assert_same_state(before, snapshot(model))


def test_attention_outside_gim_is_an_error():
    from gim_fast.integration import hf_attention

    model = tiny_model("llama").eval()
    hf_attention.register()
    model.set_attn_implementation(hf_attention.ATTENTION_NAME)
    with pytest.raises(RuntimeError, match="outside a gim_fast.GIM context"):
        model(IDS[None])


BAD_OPS = {
    "q not 4-D": (lambda q, k, v: dict(q=q[0]), ValueError, "4-D"),
    "heads not a multiple": (lambda q, k, v: dict(k=k[:, :1].expand(-1, 4, -1, -1), v=v[:, :1].expand(-1, 4, -1, -1)),
                             ValueError, "multiple of key/value heads"),
    "int q": (lambda q, k, v: dict(q=q.long()), TypeError, "floating-point"),
    "mixed dtypes": (lambda q, k, v: dict(k=k.double()), TypeError, "share a dtype"),
    "seq mismatch": (lambda q, k, v: dict(k=k[:, :, :3], v=v[:, :, :3]), ValueError, "agree in batch, sequence"),
    "mask dtype": (lambda q, k, v: dict(key_padding_mask=torch.ones(2, 5)), TypeError, "bool"),
    "mask shape": (lambda q, k, v: dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "shape"),
    "window zero": (lambda q, k, v: dict(sliding_window=0), ValueError, "sliding_window"),
    "window non-causal": (lambda q, k, v: dict(sliding_window=3, causal=False), ValueError, "causal"),
    "softcap negative": (lambda q, k, v: dict(softcap=-1.0), ValueError, "softcap"),
    "temperature zero": (lambda q, k, v: dict(temperature=0.0), ValueError, "temperature"),
    "negative k_scale": (lambda q, k, v: dict(k_scale=-0.5), ValueError, "k_scale"),
    "backend": (lambda q, k, v: dict(backend="flash"), ValueError, "backend"),
}


@pytest.mark.parametrize("case", list(BAD_OPS))
def test_bad_ops_input(case):
    make, error, message = BAD_OPS[case]
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    args = dict(q=q, k=k, v=v)
    args.update(make(q, k, v))
    with pytest.raises(error, match=message):
        gim_fast.ops.gim_attention(**args)


def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    model = tiny_model("llama")
    before = snapshot(model)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors"):
        gim_fast.explain(model, IDS, baseline_token_id=0, backend="triton")
    assert_same_state(before, snapshot(model))


def test_triton_backend_refuses_float64():
    model = tiny_model("llama", torch.float64)
    with pytest.raises(ValueError, match="float64"):
        gim_fast.explain(model, IDS, baseline_token_id=0, backend="triton")
