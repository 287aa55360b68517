"""(h) Everything GIM and explain() change is restored, after success and after an exception, compared
parameter by parameter and module by module."""
from __future__ import annotations

import pytest
import torch

import gim_fast
from model_state import assert_same_state, snapshot
from tiny_models import FAMILIES, random_ids, tiny_model


def _mixed_state(model):
    """Training mode on (as from_config leaves it), one parameter frozen by the user, one submodule in eval."""
    params = list(model.parameters())
    params[1].requires_grad_(False)
    next(m for m in model.modules() if m is not model and len(list(m.children())) == 0).eval()
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_explain_restores_everything(family):
    model = _mixed_state(tiny_model(family))
    before = snapshot(model)
    gim_fast.explain(model, random_ids(13, seed=1), baseline_token_id=0)
    assert_same_state(before, snapshot(model))


class Boom(Exception):
    pass


@pytest.mark.parametrize("family", FAMILIES)
def test_gim_restores_after_exception(family):
    model = _mixed_state(tiny_model(family))
    before = snapshot(model)
    with pytest.raises(Boom):
        with gim_fast.GIM(model):
            model(random_ids(7, batch=1)).logits.sum().backward()
            raise Boom
    for p in model.parameters():
        p.grad = None  # the user's backward inside the block set them; that is theirs to keep
    assert_same_state(before, snapshot(model))


def test_explain_restores_after_exception_in_the_forward(monkeypatch):
    model = _mixed_state(tiny_model("gemma2"))
    before = snapshot(model)

    def broken(*args, **kwargs):
        raise Boom

    monkeypatch.setattr(gim_fast.ops, "gim_attention", broken)
    with pytest.raises(Boom):
        gim_fast.explain(model, random_ids(9), baseline_token_id=0)
    assert_same_state(before, snapshot(model))


def test_gim_changes_what_it_should_while_inside():
    model = tiny_model("llama")
    with gim_fast.GIM(model):
        assert model.config._attn_implementation == "gim_fast"
        assert not model.training
        norm = model.model.norm
        assert "forward" in norm.__dict__
        mlp = model.model.layers[0].mlp
        assert "forward" in mlp.__dict__  # the product through ops.gated_product
        # equal gate and up scales (the defaults): one input-gradient scale on the MLP, none on the projections
        assert len(mlp._forward_pre_hooks) == 1 and not mlp.gate_proj._forward_hooks
    assert model.config._attn_implementation == "sdpa" and model.training
    assert "forward" not in model.model.norm.__dict__
    mlp = model.model.layers[0].mlp
    assert "forward" not in mlp.__dict__ and not mlp._forward_pre_hooks and not mlp.gate_proj._forward_hooks


def test_gim_around_a_custom_gradient_method():
    """The seed's use: any gradient method inside ``with GIM(model)`` gets GIM's backward. Here the gradient
    of a cross-entropy loss w.r.t. an intermediate activation (as in edge attribution patching)."""
    from reference_gim import reference_gim

    model = tiny_model("qwen2", torch.float64).eval()
    ids = random_ids(17, batch=2, seed=4)
    target = torch.tensor([3, 9])

    def activation_grad(context):
        store = {}
        handle = model.model.layers[0].register_forward_hook(lambda m, a, out: store.update(h=out))
        with context:
            logits = model(ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, -1], target)
            (grad,) = torch.autograd.grad(loss, store["h"])
        handle.remove()
        return grad

    ours = activation_grad(gim_fast.GIM(model))
    ref = activation_grad(reference_gim(model))
    assert float((ours - ref).abs().max() / ref.abs().max()) <= 1e-10
    # Parameter gradients work inside GIM too (weights are not frozen by the context manager).
    with gim_fast.GIM(model):
        model(ids).logits[:, -1, 0].sum().backward()
    assert model.lm_head.weight.grad is not None and model.model.layers[0].input_layernorm.weight.grad is not None
