"""``GIM(model)``: the context manager that makes a Hugging Face model's backward pass follow GIM.

On entry, per instance and nothing global: the model goes to eval mode; its attention implementation becomes
gim_fast's (registered with transformers' ``AttentionInterface``/``AttentionMaskInterface``); every norm's
``forward`` is swapped for the frozen-statistic one; gated MLPs get their own forward with the product
``act(gate) · up`` through ``ops.gated_product`` (same value; a backward that serves a stack of cotangents
cheaply) and a hook that scales the gate and up gradients (on the MLP's input when the two scales are equal).
On exit, also after an exception, all of it is undone: every change goes through one
``integration.state.ModelState``. The forward pass stays the model's own: same modules, same order, same values.

TransformerLens models (a ``TransformerBridge``, or a legacy ``HookedTransformer``) compute attention in their own
code, so for them GIM goes through their hook points instead (``tlens.apply_gim``); TransformerLens is imported
only when such a model is passed.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops.grad_scale import scale_grad
from ..settings import DEFAULTS, GIMSettings
from . import hf_attention, tlens
from .families import Family, family_of
from .norms import frozen_norm_forward
from .state import ModelState


def check_model(model) -> Family | None:
    """Everything GIM needs of a model, checked before anything is touched.

    TransformerLens models (a ``TransformerBridge``, a Hugging Face model a bridge rebuilt, a legacy
    ``HookedTransformer``) are checked by ``tlens.check_model``; TransformerLens is imported only then."""
    from transformers import PreTrainedModel  # transformers' model classes load on first use, not on import

    if tlens.is_transformer_lens_model(model):
        return tlens.check_model(model)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"gim_fast expects a Hugging Face PreTrainedModel (e.g. AutoModelForCausalLM), got {type(model).__name__}")
    family = family_of(model)
    if getattr(model.config, "is_causal", True) is False or getattr(model.config, "use_bidirectional_attention", False):
        raise ValueError("gim_fast explains causal language models; this model is configured for bidirectional "
                         "attention (is_causal=False / use_bidirectional_attention=True)")
    attention = [m for m in model.modules() if isinstance(m, family.attention_type())]
    if not attention:
        raise ValueError(f"found no {family.attention_class} module in {type(model).__name__}")
    if any(getattr(m, "is_causal", True) is False for m in attention):
        raise ValueError(f"gim_fast explains causal language models; {type(model).__name__} has non-causal "
                         "(bidirectional or cross-) attention layers")
    if any(hf_attention.is_active(m) for m in attention):
        raise ValueError("this model is already inside a gim_fast.GIM context; GIM contexts cannot be nested")
    return family


def _attn_configs(model: nn.Module) -> list:
    """Every config whose attention implementation set_attn_implementation may change."""
    from transformers import PreTrainedModel

    seen, todo, out = set(), [m.config for m in model.modules() if isinstance(m, PreTrainedModel)], []
    while todo:
        config = todo.pop()
        if id(config) in seen:
            continue
        seen.add(id(config))
        out.append(config)
        todo.extend(c for key in getattr(config, "sub_configs", {}) if (c := getattr(config, key, None)) is not None)
    return out


def _use_gim_attention(model, state: ModelState) -> None:
    configs = _attn_configs(model)
    saved = [(c, c._attn_implementation_internal) for c in configs]

    def restore():
        for config, value in saved:
            config._attn_implementation_internal = value

    state.callback(restore)
    hf_attention.register()
    model.set_attn_implementation(hf_attention.ATTENTION_NAME)


def _scale_output_grad(scale: float):
    def hook(module, args, output):
        return scale_grad(output, scale)
    return hook


def _activation_vjp(act: nn.Module):
    """``(g, x) -> x ⊙ act'(g)`` from torch's own derivative op for the activations of the supported families
    (SiLU; GELU, exact or tanh), else None (``ops.gated_product`` then uses forward mode)."""
    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return lambda g, x: torch.ops.aten.silu_backward(x, g)
    approximate = {"GELUTanh": "tanh", "PytorchGELUTanh": "tanh", "GELUActivation": "none"}.get(name)
    if isinstance(act, nn.GELU):
        approximate = act.approximate
    if approximate is not None:
        return lambda g, x: torch.ops.aten.gelu_backward(x, g, approximate=approximate)
    return None


def _gated_mlp_forward(mlp: nn.Module):
    """The gated MLP's own forward, ``down(act(gate(x)) · up(x))`` (every gated family's), with the product through
    ``ops.gated_product``: same value, a backward that shares its factors across a stack of cotangents."""
    act_vjp = _activation_vjp(mlp.act_fn)
    return lambda x: mlp.down_proj(ops.gated_product(mlp.act_fn, mlp.gate_proj(x), mlp.up_proj(x), act_vjp))


def _scale_input_grad(scale: float):
    def hook(module, args, kwargs):
        if args:
            return (scale_grad(args[0], scale),) + tuple(args[1:]), kwargs
        name = next(iter(kwargs))  # the MLP's one input, passed by name
        return args, {**kwargs, name: scale_grad(kwargs[name], scale)}
    return hook


def _scale_gate_up(mlp: nn.Module, gate_scale: float | None, up_scale: float | None, state: ModelState) -> None:
    """The gate and up gradient scales of a gated MLP ``down(act(gate(x)) · up(x))``. Equal scales go on the
    MLP's input instead (x feeds only gate and up, so s·dx_gate + s·dx_up = s·dx): one multiplication over the
    hidden size H per backward instead of two over the intermediate size (bit for bit the same for the default
    0.5, a power of two)."""
    if gate_scale is not None and gate_scale == up_scale:
        state.forward_pre_hook(mlp, _scale_input_grad(gate_scale), with_kwargs=True)
        return
    for proj, scale in ((mlp.gate_proj, gate_scale), (mlp.up_proj, up_scale)):
        if scale is not None:
            state.forward_hook(proj, _scale_output_grad(scale))


class GIM:
    """Context manager: inside it, gradients through ``model`` follow GIM.

    ``None`` turns a modification off; with all off the gradients are plain autograd's. The model is put in
    eval mode for the duration (dropout would make attributions random) and restored exactly on exit.

    Example::

        with gim_fast.GIM(model):
            logits = model(input_ids).logits
            logits[0, -1, target].backward()
    """

    def __init__(self, model, *, freeze_norm=DEFAULTS.freeze_norm, softmax_temperature=DEFAULTS.softmax_temperature,
                 q_scale=DEFAULTS.q_scale, k_scale=DEFAULTS.k_scale, v_scale=DEFAULTS.v_scale,
                 gate_scale=DEFAULTS.gate_scale, up_scale=DEFAULTS.up_scale, backend=DEFAULTS.backend):
        self.model = model
        self.settings = GIMSettings(freeze_norm=freeze_norm, softmax_temperature=softmax_temperature,
                                    q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, gate_scale=gate_scale,
                                    up_scale=up_scale, backend=backend)
        self._state: ModelState | None = None

    @classmethod
    def from_settings(cls, model, settings: GIMSettings) -> "GIM":
        """The context for one :class:`~gim_fast.settings.GIMSettings` (what the package's own code uses)."""
        gim = cls.__new__(cls)
        gim.model, gim.settings, gim._state = model, settings, None
        return gim

    def __enter__(self):
        if self._state is not None:
            raise ValueError("this GIM context is already entered; GIM contexts cannot be nested")
        family = check_model(self.model)
        settings = self.settings
        state = ModelState()
        try:
            state.eval(self.model)
            if tlens.is_transformer_lens_model(self.model):
                # the bridge computes attention in its own code: GIM goes through its hook points
                tlens.apply_gim(self.model, settings, state)
            else:
                _apply_gim(self.model, family, settings, state)
        except BaseException:
            state.close()
            raise
        self._state = state
        return self

    def __exit__(self, *exc_info):
        state, self._state = self._state, None
        state.close()
        return False


def _apply_gim(model, family: Family, settings: GIMSettings, state: ModelState) -> None:
    """GIM on a Hugging Face model: its attention function, frozen norms, gated MLPs with scaled gradients."""
    _use_gim_attention(model, state)
    for module in model.modules():
        if isinstance(module, family.attention_type()):
            hf_attention.activate(module, settings)
            state.callback(hf_attention.deactivate, module)

    if settings.freeze_norm:
        for module in model.modules():
            if isinstance(module, family.norm_type()):
                state.swap_forward(module, frozen_norm_forward(module, family, settings.backend))

    mlp_type = family.mlp_type()
    if mlp_type is not None:
        for module in model.modules():
            if isinstance(module, mlp_type):
                state.swap_forward(module, _gated_mlp_forward(module))
                _scale_gate_up(module, settings.gate_scale, settings.up_scale, state)
