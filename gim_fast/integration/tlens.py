"""GIM on TransformerLens models: the 4.x ``TransformerBridge`` and the legacy ``HookedTransformer`` (2.x/3.x).

Nothing of TransformerLens is imported here at module level: ``kind_of`` recognises its models by the module
names of their classes, and the TransformerLens classes are imported only once such a model was passed.

**The bridge** (``TransformerBridge.boot_transformers(..., hf_model=model)``) rebuilds the Hugging Face model in
place: its submodules become bridge components, and the model's own forward still runs (decoder layers, the mask
function), but each component decides what actually computes (checked with transformer-lens 4.3.0):

* attention is recomputed by the bridge from the HF weights (matmul, mask, softmax, matmul in
  ``PositionEmbeddingsAttentionBridge`` / ``JointQKVAttentionBridge``): transformers' attention interface is never
  called, so gim_fast's attention function cannot be used; GIM goes through the hook points instead;
* RMSNorm bridges call the wrapped HF norm module: its ``forward`` is swapped for gim_fast's frozen norm, as on a
  plain HF model; LayerNorm bridges (GPT-2) compute the norm in TransformerLens code, with ``hook_scale`` on σ;
* gated MLPs call the wrapped HF MLP, whose ``gate_proj``/``up_proj`` are now bridge components with hook points.

**The legacy HookedTransformer** computes everything in its own components, all with hook points.

One mechanism per modification (every hook a plain torch forward hook on a ``HookPoint`` module — not
TransformerLens's ``add_hook``, so ``reset_hooks()`` never removes them — and every hook and swap undone on exit):

=====================  ========================================================================================
softmax temperature    ``hook_attn_scores`` keeps S (as the softmax sees it: scaled, soft-capped, masked);
                       ``hook_pattern`` returns ``PatternWithGIMGradient(P, S)``: value P, backward the GIM rule
                       ``dS = P_T ⊙ (dP − rowsum(dP ⊙ P_T))`` on S; P's own softmax backward is cut
Q/K/V scaling          the projection outputs (bridge ``attn.{q,k,v}.hook_out``, legacy ``attn.hook_{q,k,v}``;
                       K/V before GQA repetition) → ``scale_grad``
gate/up scaling        bridge ``mlp.gate.hook_out`` / ``mlp.in.hook_out``, legacy ``mlp.hook_pre`` /
                       ``mlp.hook_pre_linear`` → ``scale_grad``
frozen norms           where TransformerLens computes the norm, ``hook_scale`` returns ``scale.detach()``: σ (or
                       the RMS) is a constant while the mean still carries gradient — the frozen LayerNorm/RMSNorm
                       rule exactly; where the bridge calls the wrapped HF norm, that module's forward is swapped
=====================  ========================================================================================
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from ..ops.cotangents import unbatched_forward_only
from ..ops.grad_scale import scale_grad
from ..settings import GIMSettings
from .families import Family, family_of
from .hf_io import ModelIO, hf_model_io
from .norms import frozen_norm_forward

BRIDGE = "bridge"      # transformer_lens.model_bridge.TransformerBridge
WRAPPED = "wrapped"    # a Hugging Face model that a TransformerBridge has rebuilt in place
LEGACY = "legacy"      # transformer_lens.HookedTransformer (2.x / 3.x)
OTHER = "other"        # any other TransformerLens class: refused with a clear error

_SUPPORTED = ("TransformerBridge (TransformerLens 4.x, booted with TransformerBridge.boot_transformers over a "
              "Hugging Face model of a supported family) and HookedTransformer (TransformerLens 2.x/3.x)")

# the attention modules of models inside a GIM context (nesting is refused)
_ACTIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _is_tl_class(obj) -> bool:
    return any(c.__module__.split(".", 1)[0] == "transformer_lens" for c in type(obj).__mro__)


def kind_of(model) -> str | None:
    """BRIDGE, WRAPPED, LEGACY or OTHER for a TransformerLens model; None for anything else (no import)."""
    if _is_tl_class(model):
        names = {c.__name__ for c in type(model).__mro__}
        if "TransformerBridge" in names:
            return BRIDGE
        if "HookedTransformer" in names:
            return LEGACY
        return OTHER
    if isinstance(model, nn.Module) and any(_is_tl_class(m) for m in model.modules()):
        return WRAPPED
    return None


def is_transformer_lens_model(model) -> bool:
    return kind_of(model) is not None


def underlying_model(model) -> nn.Module | None:
    """The Hugging Face model a bridge wraps (the model itself when WRAPPED); None for a HookedTransformer."""
    kind = kind_of(model)
    if kind == BRIDGE:
        try:
            return model.original_model
        except AttributeError as err:
            raise ValueError(f"this TransformerBridge exposes no local PyTorch model ({err}); gim_fast needs one "
                             "(a bridge booted with TransformerBridge.boot_transformers)") from None
    return model if kind == WRAPPED else None


def module_trees(model) -> list[nn.Module]:
    """Every module whose state GIM may touch: the bridge's and the wrapped model's (which a bridge does not
    register as a child), each once."""
    seen, out = set(), []
    roots = [model]
    hf = underlying_model(model) if kind_of(model) == BRIDGE else None
    if hf is not None:
        roots.append(hf)
    for root in roots:
        for m in root.modules():
            if id(m) not in seen:
                seen.add(id(m))
                out.append(m)
    return out


# --------------------------------------------------------------------------------------------------------------
# The softmax rule on a pattern the model already computed

class PatternWithGIMGradient(torch.autograd.Function):
    """Value: the attention pattern P the model computed from scores S. Backward: the GIM softmax rule on S.

    With P_T = softmax(S / T):  dS = P_T ⊙ (dP − rowsum(dP ⊙ P_T))  (no 1/T factor), in float32 (float64 for
    float64 scores). No gradient flows through P's own softmax backward. Entries masked with −inf or the dtype's
    minimum get P_T = 0; a row with every key masked by −inf (left padding) passes no gradient.
    """

    vmap = staticmethod(unbatched_forward_only)

    @staticmethod
    def forward(pattern: torch.Tensor, scores: torch.Tensor, temperature: float) -> torch.Tensor:
        return pattern.view_as(pattern)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, scores, ctx.temperature = inputs
        ctx.save_for_backward(scores)

    @staticmethod
    def backward(ctx, grad_p: torch.Tensor):
        (scores,) = ctx.saved_tensors
        ct = torch.float64 if scores.dtype == torch.float64 else torch.float32
        p_t = torch.softmax(scores.to(ct) / ctx.temperature, dim=-1).nan_to_num(0.0)
        grad = grad_p.to(ct)
        grad_s = p_t * (grad - (grad * p_t).sum(dim=-1, keepdim=True))
        return None, grad_s.to(scores.dtype), None


def _temper(scores_hp: nn.Module, pattern_hp: nn.Module, temperature: float, where: str, state) -> None:
    """hook_attn_scores keeps S; the following hook_pattern of the same attention call turns P into
    ``PatternWithGIMGradient(P, S)``."""
    kept: dict[str, torch.Tensor] = {}

    def keep_scores(module, args, scores):
        kept["scores"] = scores

    def temper(module, args, pattern):
        scores = kept.pop("scores", None)
        if scores is None or scores.shape != pattern.shape:
            raise RuntimeError(
                f"gim_fast: {where}.hook_pattern fired without the matching hook_attn_scores (got "
                f"{None if scores is None else tuple(scores.shape)} for a pattern {tuple(pattern.shape)}); this "
                "TransformerLens attention does not compute softmax(hook_attn_scores) the way gim_fast expects")
        return PatternWithGIMGradient.apply(pattern, scores, temperature)

    state.forward_hook(scores_hp, keep_scores)
    state.forward_hook(pattern_hp, temper)
    state.callback(kept.clear)


def _scale_output(scale: float):
    return lambda module, args, output: scale_grad(output, scale)


def _freeze_scale(module, args, scale):
    return scale.detach()


def _freeze_scale_on_fallback(norm_bridge: nn.Module):
    """For a bridge that normally calls the wrapped HF norm (swapped for the frozen one): TransformerLens falls back
    to its own norm code while backward hooks sit on hook_scale/hook_normalized (``run_with_cache(incl_bwd=True)``
    puts them there), and then σ must be frozen at hook_scale. Without such hooks nothing is returned: an edit would
    itself switch the bridge to that fallback."""
    def hook(module, args, scale):
        if norm_bridge.hook_scale.bwd_hooks or norm_bridge.hook_normalized.bwd_hooks:
            return scale.detach()
        return None
    return hook


# --------------------------------------------------------------------------------------------------------------
# What GIM needs of a TransformerLens model, checked before anything is touched

class _Plan:
    """The components one GIM context acts on."""

    def __init__(self, kind, family, attention, norm_hooks, norm_swaps, mlps):
        self.kind = kind
        self.family: Family | None = family
        self.attention = attention    # [(name, module, q_hp, k_hp, v_hp, scores_hp, pattern_hp)]
        self.norm_hooks = norm_hooks  # [hook_scale HookPoint] of norms TransformerLens computes itself
        self.norm_swaps = norm_swaps  # [HF norm module] whose forward the bridge calls
        self.native_norms = []        # [norm bridge] that calls the wrapped HF norm unless hooks force its own code
        self.mlps = mlps              # [(gate_hp, up_hp)]


def _unsupported(model) -> TypeError:
    return TypeError(f"gim_fast does not support the TransformerLens model {type(model).__name__} "
                     f"({type(model).__module__}); supported: {_SUPPORTED}")


def _bridge_plan(model, kind: str) -> _Plan:
    from transformer_lens.model_bridge.generalized_components import (
        AttentionBridge, GatedMLPBridge, JointQKVAttentionBridge, MLPBridge, NormalizationBridge,
        PositionEmbeddingsAttentionBridge)
    from transformers import PreTrainedModel

    hf = underlying_model(model)
    if not isinstance(hf, PreTrainedModel):
        raise ValueError(
            f"this TransformerBridge wraps a {type(hf).__name__}, not a Hugging Face model; gim_fast supports bridges "
            "booted over a Hugging Face model (TransformerBridge.boot_transformers), not TransformerLens-native ones")
    try:
        family = family_of(hf)
    except ValueError as err:
        raise ValueError(f"the Hugging Face model inside this TransformerLens bridge: {err}") from None
    modules = module_trees(model)

    attention = []
    for m in modules:
        if not isinstance(m, AttentionBridge):
            continue
        name = getattr(m, "name", None) or type(m).__name__
        if type(m) not in (PositionEmbeddingsAttentionBridge, JointQKVAttentionBridge):
            raise ValueError(
                f"gim_fast cannot apply GIM to the TransformerLens attention {type(m).__name__} ({name}): it supports "
                "PositionEmbeddingsAttentionBridge and JointQKVAttentionBridge, which compute "
                "softmax(hook_attn_scores) -> hook_pattern themselves")
        if getattr(m.original_component, "sinks", None) is not None:
            raise ValueError(f"gim_fast does not support attention sinks ({name})")
        projections = [getattr(getattr(m, p, None), "hook_out", None) for p in ("q", "k", "v")]
        if any(hp is None for hp in projections):
            raise ValueError(f"the TransformerLens attention {name} has no q/k/v projection hook points")
        attention.append((name, m, *projections, m.hook_attn_scores, m.hook_pattern))
    if not attention:
        raise ValueError(f"found no TransformerLens attention component in {type(model).__name__}")

    norm_hooks, python_norms = [], set()
    native_norms = []
    for m in modules:
        if not isinstance(m, NormalizationBridge):
            continue
        original = m.original_component
        native = m.use_native_layernorm_autograd or getattr(m.config, "layer_norm_folding", False)
        if not native:  # TransformerLens's own norm code: x (− mean) / hook_scale(σ) · w (+ b)
            norm_hooks.append(m.hook_scale)
            python_norms.add(id(original))
        elif not isinstance(original, nn.Identity):
            native_norms.append((getattr(m, "name", None), original, m))
    norm_type = family.norm_type()
    for name, original, _ in native_norms:
        if not isinstance(original, norm_type):
            raise ValueError(f"gim_fast cannot freeze the norm {name} ({type(original).__name__}) that the "
                             f"TransformerLens bridge calls; expected {norm_type.__name__}")
    norm_swaps = [m for m in modules if isinstance(m, norm_type) and id(m) not in python_norms]

    mlps = []
    if family.gated_mlp_class is not None:
        mlp_type = family.mlp_type()
        wrapped = {id(m.original_component) for m in modules if isinstance(m, GatedMLPBridge)}
        for m in modules:
            if isinstance(m, MLPBridge) and not isinstance(m, GatedMLPBridge):
                raise ValueError(f"gim_fast expects gated MLP bridges in a {family.gated_mlp_class} model, "
                                 f"got {type(m).__name__}")
            if isinstance(m, GatedMLPBridge):
                gate, up = getattr(m, "gate", None), getattr(m, "in", None)
                if gate is None or up is None:
                    raise ValueError(f"the TransformerLens gated MLP {m.name} has no gate/in projection hook points")
                mlps.append((gate.hook_out, up.hook_out))
            elif isinstance(m, mlp_type) and id(m) not in wrapped:
                raise ValueError(f"the {family.gated_mlp_class} {m} is not wrapped by a TransformerLens GatedMLPBridge")
    p = _Plan(kind, family, attention, norm_hooks, norm_swaps, mlps)
    p.native_norms = [m for _, _, m in native_norms]
    return p


def _legacy_plan(model) -> _Plan:
    from transformer_lens.components import (AbstractAttention, LayerNorm, LayerNormPre, RMSNorm, RMSNormPre)
    try:
        from transformer_lens.components.mlps.gated_mlp import GatedMLP
        from transformer_lens.components.mlps.mlp import MLP
    except ImportError:  # TransformerLens 2.x keeps the MLPs in transformer_lens.components
        from transformer_lens.components import MLP, GatedMLP
    gated_types = (GatedMLP,)
    try:
        from transformer_lens.components.mlps.gated_mlp_4bit import GatedMLP4Bit
        gated_types += (GatedMLP4Bit,)
    except ImportError:
        pass

    cfg = model.cfg
    if getattr(cfg, "attention_dir", "causal") != "causal":
        raise ValueError("gim_fast explains causal language models; this HookedTransformer has bidirectional attention")
    if getattr(cfg, "use_attention_sinks", False):
        raise ValueError("gim_fast does not support attention sinks")
    attention, norm_hooks, mlps = [], [], []
    for name, m in model.named_modules():
        if isinstance(m, AbstractAttention):
            attention.append((name, m, m.hook_q, m.hook_k, m.hook_v, m.hook_attn_scores, m.hook_pattern))
        elif isinstance(m, (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre)):
            norm_hooks.append(m.hook_scale)
        elif isinstance(m, gated_types):
            mlps.append((m.hook_pre, m.hook_pre_linear))
        elif name.endswith(".mlp") and not isinstance(m, MLP):
            raise ValueError(f"gim_fast supports HookedTransformer MLPs MLP and GatedMLP, got {type(m).__name__} "
                             f"({name}; mixture-of-experts layers are not supported)")
    if not attention:
        raise ValueError("found no attention component in this HookedTransformer")
    return _Plan(LEGACY, None, attention, norm_hooks, [], mlps)


def plan(model) -> _Plan:
    """Everything GIM needs of a TransformerLens model, checked before anything is touched."""
    kind = kind_of(model)
    if kind in (BRIDGE, WRAPPED):
        p = _bridge_plan(model, kind)
    elif kind == LEGACY:
        p = _legacy_plan(model)
    else:
        raise _unsupported(model)
    if any(m in _ACTIVE for _, m, *_ in p.attention):
        raise ValueError("this model is already inside a gim_fast.GIM context; GIM contexts cannot be nested")
    return p


def check_model(model) -> Family | None:
    """The family of the wrapped Hugging Face model (None for a HookedTransformer), or a clear error."""
    return plan(model).family


# --------------------------------------------------------------------------------------------------------------
# Entering GIM

def apply_gim(model, settings: GIMSettings, state) -> None:
    """Hook GIM into a TransformerLens model through ``state`` (the ``integration.state.ModelState`` of the GIM
    context), which undoes every hook and swap on exit."""
    p = plan(model)
    for name, module, q_hp, k_hp, v_hp, scores_hp, pattern_hp in p.attention:
        _ACTIVE.add(module)
        state.callback(_ACTIVE.discard, module)
        for hp, scale in ((q_hp, settings.q_scale), (k_hp, settings.k_scale), (v_hp, settings.v_scale)):
            if scale is not None:
                state.forward_hook(hp, _scale_output(scale))
        if settings.temperature is not None:
            _temper(scores_hp, pattern_hp, settings.temperature, name, state)
    if settings.freeze_norm:
        for hp in p.norm_hooks:
            state.forward_hook(hp, _freeze_scale)
        for module in p.norm_swaps:
            state.swap_forward(module, frozen_norm_forward(module, p.family, settings.backend))
        for norm_bridge in p.native_norms:
            state.forward_hook(norm_bridge.hook_scale, _freeze_scale_on_fallback(norm_bridge))
    for gate_hp, up_hp in p.mlps:
        for hp, scale in ((gate_hp, settings.gate_scale), (up_hp, settings.up_scale)):
            if scale is not None:
                state.forward_hook(hp, _scale_output(scale))


# --------------------------------------------------------------------------------------------------------------
# How the engine feeds input embeddings and reads target logits

def model_io(model):
    """The engine's view of a TransformerLens model (see ``gim_fast.integration.model_io.ModelIO``)."""
    kind = kind_of(model)
    if kind == WRAPPED:  # the HF model's own forward, with the bridge components inside it
        return hf_model_io(model, attention="eager")
    if kind == BRIDGE:
        hf = underlying_model(model)
        base = hf_model_io(hf, attention="eager")

        def forward(inputs, attention_mask, position_ids, keep, input_ids):
            # a floating-point input is taken as inputs_embeds; the rest goes to the wrapped model's forward
            return model(inputs, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                         logits_to_keep=keep)

        base.forward = forward
        return base
    if kind == LEGACY:
        return _legacy_io(model)
    raise _unsupported(model)


def _legacy_io(model):
    def forward(inputs, attention_mask, position_ids, keep, input_ids):
        # HookedTransformer takes tokens only: its hook_embed output is replaced by the leaf embeddings. Positions
        # come from the attention mask (left padding included), as HookedTransformer derives them.
        handle = model.hook_embed.register_forward_hook(lambda module, args, output: inputs)
        try:
            logits = model(input_ids, attention_mask=attention_mask)
        finally:
            handle.remove()
        return logits[:, keep]

    embed = model.embed
    return ModelIO(embed=embed, weight=embed.W_E, vocab_in=embed.W_E.shape[0], vocab_out=model.cfg.d_vocab_out,
                   forward=forward, hf_model=None, attention="eager")


__all__ = ["kind_of", "is_transformer_lens_model", "underlying_model", "module_trees", "check_model", "apply_gim",
           "model_io", "PatternWithGIMGradient"]
