"""GIM on TransformerLens models (the ``[tlens]`` extra).

A tiny TransformerBridge over a tiny random Hugging Face model (no hub) gives the same attributions as gim_fast on
a copy of the same HF model — with every modification on, off, and each alone, so a modification that did not
reach the bridge's own attention or norm code would show. Everything is restored after use; TransformerLens is
never imported for a plain HF model; TransformerLens models that cannot be handled get a clear error. The legacy
HookedTransformer (TransformerLens 3.x, which cannot share an environment with 4.x) runs in a subprocess against
the side install that ``make venv`` puts in ``.venv/tl-legacy``; without it that test skips.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import gim_fast
from model_state import assert_same_state, snapshot
from tiny_models import VOCAB, random_ids, tiny_model

tl = pytest.importorskip("transformer_lens", reason="TransformerLens is not installed (pip install 'gim-fast[tlens]')")
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402

from gim_fast.integration import tlens  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OFF = dict(freeze_norm=False, softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None, gate_scale=None,
           up_scale=None)
ALONE = {  # each modification alone (GIM's default value), the others off
    "norm": dict(OFF, freeze_norm=True),
    "temperature": dict(OFF, softmax_temperature=2.0),
    "qkv": dict(OFF, q_scale=0.25, k_scale=0.25, v_scale=0.5),
    "gate_up": dict(OFF, gate_scale=0.5, up_scale=0.5),
}
TOL = 1e-4  # relative, float32: well above the rounding of two float32 computations of the same model


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def tiny_tokenizer(directory):
    """A word-level tokenizer over the tiny vocabulary, saved and reloaded (the bridge reads name_or_path)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"t{i}": i for i in range(1, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<pad>").save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def boot(hf_model, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(str(tmp_path), hf_model=hf_model, tokenizer=tiny_tokenizer(tmp_path),
                                                   device="cpu")


@pytest.fixture(params=["llama", "gpt2"])
def pair(request, tmp_path):
    """(bridge, reference): a bridge booted over a tiny HF model, and an untouched deep copy of that model
    (booting switches the HF model to eager attention and rebuilds it in place)."""
    hf = tiny_model(request.param).eval()
    reference = copy.deepcopy(hf)
    return boot(hf, tmp_path), reference


def test_bridge_is_recognised_without_touching_it(pair):
    bridge, reference = pair
    assert tlens.kind_of(bridge) == tlens.BRIDGE
    assert tlens.kind_of(bridge.original_model) == tlens.WRAPPED
    assert tlens.kind_of(reference) is None


@pytest.mark.parametrize("settings", ["gim", "off", *ALONE])
def test_bridge_attributions_equal_hf(pair, settings):
    bridge, reference = pair
    kwargs = {"gim": {}, "off": OFF, **ALONE}[settings]
    ids = random_ids(13, seed=2)
    ours = gim_fast.explain(bridge, ids, baseline_token_id=0, **kwargs)
    ref = gim_fast.explain(reference, ids, baseline_token_id=0, **kwargs)
    assert rel(ours, ref) <= TOL
    if settings != "off" and not (settings == "gate_up" and reference.config.model_type == "gpt2"):  # no gated MLP
        plain = gim_fast.explain(reference, ids, baseline_token_id=0, **OFF)
        assert rel(ref, plain) > 1e-3, "the modification should change the attribution"


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma2", "gemma3"])
def test_bridge_other_families(family, tmp_path):
    """GQA, sliding windows, q_norm/k_norm, (1 + w) norms and Gemma 2's soft-capping through the bridge."""
    hf = tiny_model(family).eval()
    hf.config.architectures = [type(hf).__name__]  # as real checkpoints have it (TransformerLens reads it for Gemma 3)
    reference = copy.deepcopy(hf)
    bridge = boot(hf, tmp_path)
    ids = random_ids(12, seed=6)
    for kwargs in ({}, ALONE["norm"], ALONE["temperature"]):
        ours = gim_fast.explain(bridge, ids, baseline_token_id=0, **kwargs)
        assert rel(ours, gim_fast.explain(reference, ids, baseline_token_id=0, **kwargs)) <= TOL


def test_bridge_padded_batch_and_checkpointing(pair):
    bridge, reference = pair
    ids = random_ids(11, batch=3, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0   # left padding
    mask[2, -3:] = 0  # right padding
    ours = gim_fast.explain(bridge, ids, attention_mask=mask, baseline_token_id=0, target_position=[-1, -2, -1])
    ref = gim_fast.explain(reference, ids, attention_mask=mask, baseline_token_id=0, target_position=[-1, -2, -1])
    assert rel(ours, ref) <= TOL
    ours = gim_fast.explain(bridge, ids[0], baseline_token_id=0, checkpointing=True)
    assert rel(ours, ref[0]) <= TOL


@pytest.mark.parametrize("target", ["logit", "logprob"])
def test_explain_answer_on_a_bridge(pair, target):
    """The answer's cotangents go back batched through the bridge's hook points (and its checkpointed layers)."""
    bridge, reference = pair
    prompt, answer = random_ids(8, seed=7), random_ids(3, seed=8)
    ref = gim_fast.explain_answer(reference, prompt, answer, baseline_token_id=0, target=target)
    before = None
    for kwargs in ({}, dict(chunk=1), dict(checkpointing=True)):
        ours = gim_fast.explain_answer(bridge, prompt, answer, baseline_token_id=0, target=target, **kwargs)
        assert rel(ours.scores, ref.scores) <= TOL, kwargs
        before = before or snapshot(bridge)  # after a first forward, which sets the bridge's per-call flags
    with pytest.raises(TypeError, match="generate the answer yourself and call explain_answer"):
        gim_fast.explain_generation(bridge, None, "t1 t2", max_new_tokens=2)
    assert_same_state(before, snapshot(bridge))


def test_wrapped_hf_model_is_handled_like_the_bridge(pair):
    """The HF model the bridge rebuilt runs the bridge's attention too: it must not silently get plain gradients."""
    bridge, reference = pair
    ids = random_ids(9, seed=7)
    ours = gim_fast.explain(bridge.original_model, ids, baseline_token_id=0)
    assert rel(ours, gim_fast.explain(reference, ids, baseline_token_id=0)) <= TOL


def test_gim_context_around_a_custom_gradient(pair):
    """GIM(bridge) around the user's own gradient (of a hidden state, through a TransformerLens hook) equals
    GIM(model) on the HF model; TransformerLens's reset_hooks() inside the context does not remove GIM's hooks."""
    bridge, reference = pair
    ids = random_ids(10, batch=2, seed=3)

    def hidden_grad(model, get_layer, reset=None):
        store = {}
        handle = get_layer(model).register_forward_hook(lambda m, a, out: store.update(h=out[0] if isinstance(out, tuple) else out))
        try:
            with gim_fast.GIM(model):
                if reset is not None:
                    reset()
                logits = model(ids) if model is bridge else model(ids).logits
                (grad,) = torch.autograd.grad(logits[:, -1, 5].sum(), store["h"])
        finally:
            handle.remove()
        return grad

    hf_layers = (lambda m: m.model.layers[0]) if reference.config.model_type != "gpt2" else (lambda m: m.transformer.h[0])
    ours = hidden_grad(bridge, lambda m: m.blocks[0], reset=bridge.reset_hooks)
    assert rel(ours, hidden_grad(reference, hf_layers)) <= TOL


def test_backward_hooks_on_norm_hook_points(pair):
    """Backward hooks on hook_scale (as run_with_cache(incl_bwd=True) adds them) make an RMSNorm bridge compute the
    norm in TransformerLens code instead of the wrapped (swapped) HF norm: σ must be frozen there too."""
    bridge, reference = pair
    ids = random_ids(11, seed=3)
    for name, hook_point in bridge.hook_dict.items():
        if name.endswith(("hook_scale", "hook_normalized")):
            bridge.add_hook(name, lambda grad, hook: None, dir="bwd")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TransformerLens warns about that fallback on every norm call
        ours = gim_fast.explain(bridge, ids, baseline_token_id=0)
    bridge.reset_hooks(including_permanent=True)
    assert rel(ours, gim_fast.explain(reference, ids, baseline_token_id=0)) <= TOL


def _mixed_state(model):
    params = list(model.parameters())
    params[1].requires_grad_(False)
    model.train()
    next(m for m in model.modules() if len(list(m.children())) == 0).eval()
    return model


class Boom(Exception):
    pass


def test_everything_restored_after_use_and_after_an_exception(pair):
    bridge, _ = pair
    hf = bridge.original_model
    _mixed_state(bridge)
    def logits():  # in training mode, as the user left it: GPT-2's dropout draws from the seeded generator
        torch.manual_seed(0)
        return bridge(random_ids(7, batch=1)).detach()

    logits_before = logits()  # a first forward also sets the bridge's per-call flags
    before = snapshot(bridge), snapshot(hf)

    gim_fast.explain(bridge, random_ids(12, seed=1), baseline_token_id=0)
    with pytest.raises(Boom):
        with gim_fast.GIM(bridge):
            assert not bridge.training and not hf.training
            bridge(random_ids(7, batch=1)).sum().backward()
            raise Boom
    for p in bridge.parameters():
        p.grad = None  # the user's backward inside the block set them; that is theirs to keep
    assert_same_state(before[0], snapshot(bridge))
    assert_same_state(before[1], snapshot(hf))
    assert all(not hp.fwd_hooks and not hp._forward_hooks for hp in bridge.hook_dict.values())
    assert not tlens._ACTIVE
    assert torch.equal(logits(), logits_before)


def test_forward_unchanged_inside_gim(pair):
    bridge, _ = pair
    ids = random_ids(9, batch=2, seed=8)
    bridge.eval()
    outside = bridge(ids)
    with gim_fast.GIM(bridge):
        inside = bridge(ids)
    assert torch.equal(inside, outside)


def test_models_we_cannot_handle_get_a_clear_error(tmp_path):
    import transformers as tf

    opt = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         ffn_dim=48, max_position_embeddings=64, word_embed_proj_dim=32)).eval()
    bridge = boot(opt, tmp_path)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="inside this TransformerLens bridge: gim_fast does not support model_type 'opt'"):
        gim_fast.explain(bridge, random_ids(5), baseline_token_id=0)
    with pytest.raises(ValueError, match="model_type 'opt'"):
        gim_fast.GIM(bridge).__enter__()
    assert_same_state(before, snapshot(opt))

    native = TransformerBridge.boot_native(dict(d_model=32, n_layers=1, n_ctx=16, d_head=8, n_heads=4, d_vocab=50,
                                                act_fn="gelu", d_mlp=64))
    with pytest.raises(ValueError, match="not TransformerLens-native"):
        gim_fast.explain(native, torch.tensor([1, 2, 3]), baseline_token_id=0)

    from transformer_lens.hook_points import HookPoint
    with pytest.raises(TypeError, match="supported: TransformerBridge"):
        gim_fast.explain(HookPoint(), torch.tensor([1, 2, 3]), baseline_token_id=0)


def test_an_attention_component_we_do_not_know_is_refused(tmp_path):
    from transformer_lens.model_bridge.generalized_components import PositionEmbeddingsAttentionBridge

    bridge = boot(tiny_model("llama").eval(), tmp_path)
    attn = bridge.blocks[0].attn
    attn.__class__ = type("CustomAttentionBridge", (PositionEmbeddingsAttentionBridge,), {})
    with pytest.raises(ValueError, match="cannot apply GIM to the TransformerLens attention CustomAttentionBridge"):
        gim_fast.explain(bridge, random_ids(5), baseline_token_id=0)


def test_nested_gim_is_refused(pair):
    bridge, _ = pair
    with gim_fast.GIM(bridge):
        with pytest.raises(ValueError, match="cannot be nested"):
            gim_fast.GIM(bridge.original_model).__enter__()
    assert not tlens._ACTIVE


def test_transformer_lens_is_not_imported_for_hf_models():
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, "tests")
        import gim_fast
        from tiny_models import random_ids, tiny_model
        gim_fast.explain(tiny_model("llama"), random_ids(6), baseline_token_id=0)
        with gim_fast.GIM(tiny_model("gpt2")):
            pass
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "transformer_lens")
        assert not loaded, loaded
    """)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


# --------------------------------------------------------------------------------------------------------------
# The legacy HookedTransformer (TransformerLens 3.x), in a subprocess with the side install on its path

LEGACY_DIR = Path(os.environ.get("GIM_FAST_TL_LEGACY", Path(sys.prefix) / "tl-legacy"))

LEGACY_SCRIPT = textwrap.dedent("""
    import sys, warnings
    warnings.simplefilter("ignore")
    sys.path.insert(0, "tests")
    import torch
    import transformer_lens
    assert transformer_lens.__file__.startswith(sys.argv[1]), transformer_lens.__file__
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights
    import gim_fast
    from model_state import assert_same_state, snapshot
    from tiny_models import random_ids, tiny_model

    OFF = dict(freeze_norm=False, softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None,
               gate_scale=None, up_scale=None)

    def hooked(family, hf):
        c = hf.config
        if family == "llama":
            cfg = HookedTransformerConfig(
                d_model=c.hidden_size, d_head=c.head_dim, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
                n_layers=c.num_hidden_layers, n_ctx=64, eps=c.rms_norm_eps, d_vocab=c.vocab_size, act_fn=c.hidden_act,
                n_key_value_heads=c.num_key_value_heads, normalization_type="RMS", positional_embedding_type="rotary",
                rotary_adjacent_pairs=False, rotary_dim=c.head_dim, rotary_base=c.rope_parameters["rope_theta"],
                final_rms=True, gated_mlp=True, original_architecture="LlamaForCausalLM", device="cpu")
            state = convert_llama_weights(hf, cfg)
        else:
            cfg = HookedTransformerConfig(
                d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=4 * c.n_embd,
                n_layers=c.n_layer, n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size,
                act_fn=c.activation_function, normalization_type="LN", original_architecture="GPT2LMHeadModel",
                device="cpu")
            state = convert_gpt2_weights(hf, cfg)
        model = HookedTransformer(cfg)
        model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                          fold_value_biases=False, refactor_factored_attn_matrices=False)
        return model

    worst = 0.0
    for family in ("llama", "gpt2"):
        hf = tiny_model(family).eval()
        model = hooked(family, hf)
        before = snapshot(model)
        ids = random_ids(12, seed=2)
        for kwargs in ({}, OFF, dict(OFF, freeze_norm=True), dict(OFF, softmax_temperature=2.0),
                       dict(OFF, q_scale=0.25, k_scale=0.25, v_scale=0.5), dict(OFF, gate_scale=0.5, up_scale=0.5)):
            ours = gim_fast.explain(model, ids, baseline_token_id=0, **kwargs)
            ref = gim_fast.explain(hf, ids, baseline_token_id=0, **kwargs)
            worst = max(worst, float((ours - ref).abs().max() / ref.abs().max()))
        batch = random_ids(9, batch=2, seed=4)
        mask = torch.ones_like(batch)
        mask[1, :3] = 0
        ours = gim_fast.explain(model, batch, attention_mask=mask, baseline_token_id=0)
        ref = gim_fast.explain(hf, batch, attention_mask=mask, baseline_token_id=0)
        worst = max(worst, float((ours - ref).abs().max() / ref.abs().max()))
        prompt, answer = random_ids(7, seed=5), random_ids(3, seed=6)
        for target in ("logit", "logprob"):  # explain_answer: the cotangents vmapped through the hook points
            ours = gim_fast.explain_answer(model, prompt, answer, baseline_token_id=0, target=target).scores
            ref = gim_fast.explain_answer(hf, prompt, answer, baseline_token_id=0, target=target).scores
            worst = max(worst, float((ours - ref).abs().max() / ref.abs().max()))
        assert_same_state(before, snapshot(model))
        assert all(not hp._forward_hooks for hp in model.hook_dict.values())
    print("worst relative difference", worst)
    assert worst <= 1e-4, worst
""")


@pytest.mark.skipif(not (LEGACY_DIR / "transformer_lens").is_dir(),
                    reason=f"no TransformerLens 3.x side install at {LEGACY_DIR} (make venv creates it)")
def test_legacy_hooked_transformer_equals_hf():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(LEGACY_DIR), str(ROOT)]))
    subprocess.run([sys.executable, "-c", LEGACY_SCRIPT, str(LEGACY_DIR)], cwd=ROOT, env=env, check=True, timeout=300)
