"""A complete snapshot of a model's state, for checking that gim_fast leaves models exactly as it found them."""
from __future__ import annotations

import torch

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_state_dict_hooks", "_load_state_dict_pre_hooks")


def _configs(model):
    from transformers import PreTrainedModel
    return {id(m.config): m.config for m in model.modules() if isinstance(m, PreTrainedModel)}.values()


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "params": {n: (p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "modules": {n: (type(m), m.training, sorted(m.__dict__), {h: len(getattr(m, h, {})) for h in _HOOK_DICTS},
                        m.__dict__.get("forward"))
                    for n, m in model.named_modules()},
        "attn": [c._attn_implementation for c in _configs(model)],
        "config": [c.to_json_string() for c in _configs(model)],
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["params"].keys() == after["params"].keys()
    for name, (value, requires_grad, grad) in before["params"].items():
        value2, requires_grad2, grad2 = after["params"][name]
        assert torch.equal(value, value2), f"parameter {name} changed"
        assert requires_grad == requires_grad2, f"requires_grad of {name} changed"
        assert (grad is None) == (grad2 is None), f".grad of {name} changed"
    for name, value in before["buffers"].items():
        assert torch.equal(value, after["buffers"][name]), f"buffer {name} changed"
    assert before["modules"] == after["modules"], "modules changed (type, training flag, attributes or hooks)"
    assert before["attn"] == after["attn"]
    assert before["config"] == after["config"]
