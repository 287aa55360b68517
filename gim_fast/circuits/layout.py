"""Where the circuit graph's nodes and inputs live in a Hugging Face model of each supported family.

Per decoder layer: the norm the attention reads through (``input_norm``), the query/key/value projections (one
fused ``c_attn`` for GPT-2), the output projection (its input is the heads' attention outputs, one ``head_dim``
slice per head), Gemma's norm after the attention (``attn_post_norm``), the norm the MLP reads through
(``mlp_norm``) and the module whose output is the MLP node's output (``mlp_out``: the MLP, or Gemma's norm after
it); then the final norm the logits read through. The per-head weight slices are views, never copies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..integration import family_of, tlens
from ..memory import Dims

__all__ = ["Layout", "LayerParts", "layout_of"]


@dataclass(frozen=True)
class LayerParts:
    input_norm: nn.Module
    projections: tuple[tuple[nn.Module, tuple[str, ...]], ...]   # (module, the kinds its output holds, in order)
    o_proj: nn.Module
    attn_post_norm: nn.Module | None
    mlp_norm: nn.Module
    mlp_out: nn.Module


@dataclass(frozen=True)
class Layout:
    model_type: str
    layers: tuple[LayerParts, ...]
    embedding: nn.Module
    final_norm: nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int

    @property
    def post_norms(self) -> bool:
        """Whether the attention output passes a norm before joining the residual stream (Gemma 2/3)."""
        return self.layers[0].attn_post_norm is not None

    def width(self, kind: str) -> int:
        return (self.heads if kind == "q" else self.kv_heads) * self.head_dim

    # ------------------------------------------------------------------------------------------ weights per head

    def projection_weight(self, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W [n, D, H]`` and ``b [n, D]`` (or None) of the ``kind`` ∈ q/k/v projection of ``layer``: head n's
        output is ``x @ W[n].T + b[n]``."""
        n = self.heads if kind == "q" else self.kv_heads
        module, kinds = self._projection_of(layer, kind)
        if isinstance(module, nn.Linear):
            weight, bias = module.weight, module.bias
        else:  # GPT-2's Conv1D: y = x @ weight + bias, weight [H, 3H] with q, k, v side by side
            offset = sum(self.width(k) for k in kinds[:kinds.index(kind)])
            cols = slice(offset, offset + self.width(kind))
            weight, bias = module.weight[:, cols].T, (None if module.bias is None else module.bias[cols])
        weight = weight.reshape(n, self.head_dim, self.hidden)
        return weight, (None if bias is None else bias.reshape(n, self.head_dim))

    def output_weight(self, layer: int) -> torch.Tensor:
        """``W_O [heads, H, D]``: head h's output is ``z_h @ W_O[h].T`` (the bias, if any, belongs to no head)."""
        module = self.layers[layer].o_proj
        if isinstance(module, nn.Linear):
            return module.weight.reshape(self.hidden, self.heads, self.head_dim).permute(1, 0, 2)
        return module.weight.reshape(self.heads, self.head_dim, self.hidden).transpose(1, 2)

    def _projection_of(self, layer: int, kind: str) -> tuple[nn.Module, tuple[str, ...]]:
        for module, kinds in self.layers[layer].projections:
            if kind in kinds:
                return module, kinds
        raise KeyError(kind)

    def project(self, layer: int, kind: str, x: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """Each head's projection of its own input: ``x [n, B, S, H]`` (input n for the n-th head of ``heads``)
        → ``[B, S, n·D]``."""
        weight, bias = self.projection_weight(layer, kind)
        out = torch.einsum("nbsh,ndh->bsnd", x, weight[heads].to(x.dtype))
        if bias is not None:
            out = out + bias[heads].to(out.dtype)
        return out.reshape(*out.shape[:2], -1)

    def head_outputs(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """Each head's contribution to the residual stream: ``z [B, S, heads·D]`` (the output projection's input) →
        ``[heads, B, S, H]``."""
        z = z.reshape(*z.shape[:2], self.heads, self.head_dim)
        return torch.einsum("bsnd,nhd->nbsh", z, self.output_weight(layer).to(z.dtype))


def _llama_like(layer, post_norms: bool) -> LayerParts:
    attn = layer.self_attn
    return LayerParts(
        input_norm=layer.input_layernorm,
        projections=((attn.q_proj, ("q",)), (attn.k_proj, ("k",)), (attn.v_proj, ("v",))),
        o_proj=attn.o_proj,
        attn_post_norm=layer.post_attention_layernorm if post_norms else None,
        mlp_norm=layer.pre_feedforward_layernorm if post_norms else layer.post_attention_layernorm,
        mlp_out=layer.post_feedforward_layernorm if post_norms else layer.mlp)


def _gpt2(block) -> LayerParts:
    return LayerParts(input_norm=block.ln_1, projections=((block.attn.c_attn, ("q", "k", "v")),),
                      o_proj=block.attn.c_proj, attn_post_norm=None, mlp_norm=block.ln_2, mlp_out=block.mlp)


def layout_of(model) -> Layout:
    """The layout of a Hugging Face causal LM of a supported family; a ValueError/TypeError naming what is
    supported for anything else."""
    from transformers import PreTrainedModel

    if tlens.is_transformer_lens_model(model):
        raise TypeError("gim_fast.circuits works on Hugging Face models directly; pass the Hugging Face model a "
                        "TransformerBridge wraps, not the bridge")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"gim_fast.circuits expects a Hugging Face PreTrainedModel (e.g. AutoModelForCausalLM), "
                        f"got {type(model).__name__}")
    family_of(model)   # raises for an unsupported model_type, naming the supported ones
    model_type = model.config.model_type
    d = Dims.of(model.config)
    if model_type == "gpt2":
        body = model.transformer
        layers = tuple(_gpt2(b) for b in body.h)
        final_norm = body.ln_f
    else:
        body = model.model
        post = model_type in ("gemma2", "gemma3_text")
        layers = tuple(_llama_like(layer, post) for layer in body.layers)
        final_norm = body.norm
    if getattr(model.config, "parallel_attn", False) or getattr(model.config, "parallel_residual", False):
        raise ValueError("gim_fast.circuits supports sequential attention-then-MLP layers only")
    return Layout(model_type=model_type, layers=layers, embedding=model.get_input_embeddings(),
                  final_norm=final_norm, heads=d.q_heads, kv_heads=d.kv_heads, head_dim=d.head_dim,
                  hidden=d.hidden)
