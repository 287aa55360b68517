"""The attribution methods the faithfulness evaluation compares.

Every method maps a batch of equal-length sequences ``[B, S]`` (no padding: the evaluation groups sequences by
length), one target token per row and the baseline token to scores ``[B, S]`` (float32, CPU) for the raw target
logit at the last position. All gradient methods use the same baseline: the baseline token at every position.

==========================  ==================================================================================
``gim``                     ``gim_fast.explain`` with its defaults (norms frozen, T = 2, q/k/v × 0.25/0.25/0.5,
                            gate/up × 0.5)
``grad_x_input``            plain gradient × (input − baseline): every modification off
``freeze_norm_only``        GIM with only norm freezing (the paper's ablation: one modification at a time)
``temperature_only``        GIM with only the softmax temperature (T = 2)
``qkv_scaling_only``        GIM with only the q/k/v gradient scaling
``mlp_scaling_only``        GIM with only the gate/up gradient scaling
``integrated_gradients``    captum's ``LayerIntegratedGradients`` on the input-embedding layer, 50 steps,
                            Gauss–Legendre (captum's default), target = the raw logit; also returns its
                            completeness gap Σ scores − (f(x) − f(baseline))
``random``                  |N(0, 1)| per token from a generator seeded per example (the paper's random baseline)
``attnlrp``                 AttnLRP, LXT 2.1's efficient rules, run by a worker process in the side install of
                            transformers 4.52 + lxt 2.1 (``gim_fast.evaluate.attnlrp``) on the same model files:
                            embeddings × modified gradient of the raw logit (zero baseline); also returns its
                            conservation gap Σ scores − f(x)
==========================  ==================================================================================

``gim_t{T}`` (e.g. ``gim_t1.5``) is GIM with every default but the softmax temperature T (the temperature sweep).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from ..explain import explain_with
from ..integration import eval_mode, frozen_parameters
from ..settings import GIMSettings
from . import attnlrp
from .unavailable import MethodUnavailable

__all__ = ["Method", "METHODS", "DEFAULT_METHODS", "get_method", "temperature_method", "attnlrp_unavailable",
           "MethodUnavailable", "IG_STEPS"]

IG_STEPS = 50


@dataclass
class Output:
    scores: torch.Tensor                       # [B, S] float32 on the CPU
    extra: dict = field(default_factory=dict)  # per-row diagnostics, e.g. IG's completeness gap


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    kind: str                              # "gim", "ig", "random" or "attnlrp"
    settings: GIMSettings | None = None    # gim: the GIM settings (the backend is chosen per run)

    def prepare(self, model, batches: list[torch.Tensor]) -> dict:
        """One-time work before the (timed) attributions of ``batches`` (each ``[B, S]``), returning what it
        checked. Only ``attnlrp`` has any: start its worker, compare its model's logits with ``model``'s on
        every row (MethodUnavailable if they differ) and warm it up."""
        if self.kind != "attnlrp":
            return {}
        reason = attnlrp_unavailable()
        if reason:
            raise MethodUnavailable(reason)
        return attnlrp.prepare(model, batches)

    def attribute(self, model, input_ids: torch.Tensor, target_ids, baseline_token_id: int, *,
                  example_keys=None, seed: int = 0, backend: str = "auto") -> Output:
        """Scores ``[B, S]`` for ``input_ids [B, S]`` (no padding) and one target token per row.

        ``example_keys`` (one string per row) seed the random method per example, so a row gets the same random
        scores whatever batch it is in."""
        ids = torch.as_tensor(input_ids).long()
        targets = [int(t) for t in torch.as_tensor(target_ids).reshape(-1).tolist()]
        if self.kind == "gim":
            return Output(_gim(model, ids, targets, baseline_token_id, self.settings.replace(backend=backend)))
        if self.kind == "ig":
            return _integrated_gradients(model, ids, targets, baseline_token_id)
        if self.kind == "random":
            keys = example_keys if example_keys is not None else [str(i) for i in range(ids.shape[0])]
            return Output(_random(ids.shape, keys, seed))
        if self.kind == "attnlrp":
            reason = attnlrp_unavailable()
            if reason:
                raise MethodUnavailable(reason)
            return _attnlrp(model, ids, targets)
        raise ValueError(f"unknown method kind {self.kind!r}")


def _gim_method(name: str, description: str, settings: GIMSettings) -> Method:
    return Method(name, description, "gim", settings)


METHODS: dict[str, Method] = {m.name: m for m in [
    _gim_method("gim", "GIM, gim_fast.explain defaults", GIMSettings()),
    _gim_method("grad_x_input", "gradient × input (every modification off)", GIMSettings.off()),
    # the paper's ablation: one modification at a time (GIMSettings.only)
    _gim_method("freeze_norm_only", "GIM: norm freezing only", GIMSettings.only("freeze_norm")),
    _gim_method("temperature_only", "GIM: softmax temperature T = 2 only", GIMSettings.only("temperature")),
    _gim_method("qkv_scaling_only", "GIM: q/k/v gradient scaling only", GIMSettings.only("qkv_scaling")),
    _gim_method("mlp_scaling_only", "GIM: gate/up gradient scaling only", GIMSettings.only("mlp_scaling")),
    Method("integrated_gradients", f"Integrated Gradients (captum, embeddings, {IG_STEPS} steps)", "ig"),
    Method("random", "random scores |N(0,1)|", "random"),
    Method("attnlrp", "AttnLRP (lxt)", "attnlrp"),
]}
DEFAULT_METHODS = ("gim", "grad_x_input", "freeze_norm_only", "temperature_only", "qkv_scaling_only",
                   "mlp_scaling_only", "integrated_gradients", "random", "attnlrp")


def _format_t(t: float) -> str:
    return f"{t:g}"


def temperature_method(temperature: float) -> Method:
    """GIM with every default but the softmax temperature (``gim_t1``, ``gim_t1.5``, …)."""
    return _gim_method(f"gim_t{_format_t(temperature)}", f"GIM, softmax temperature T = {_format_t(temperature)}",
                       GIMSettings(softmax_temperature=float(temperature)))


def get_method(name: str) -> Method:
    if name in METHODS:
        return METHODS[name]
    if name.startswith("gim_t"):
        try:
            t = float(name[len("gim_t"):])
        except ValueError:
            t = None
        if t is not None and t > 0:
            return temperature_method(t)
    accepted = ", ".join(METHODS) + ", gim_t<T> (e.g. gim_t1.5)"
    raise ValueError(f"unknown method {name!r}; accepted: {accepted}")


# ----------------------------------------------------------------------------------------------- GIM


def _gim(model, ids, targets, baseline, settings: GIMSettings) -> torch.Tensor:
    scores = explain_with(model, ids.to(model.get_input_embeddings().weight.device), settings,
                          target_token_id=targets, baseline_token_id=baseline)
    return scores.detach().float().cpu()


# ----------------------------------------------------------------------------------------------- random


def _random(shape, keys, seed: int) -> torch.Tensor:
    rows = []
    for key in keys:
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
        rows.append(torch.randn(shape[1], generator=g).abs())
    return torch.stack(rows)


# ------------------------------------------------------------------------------------- Integrated Gradients


def _ig_rows_per_chunk(seq_len: int, batch: int) -> int:
    """captum's internal_batch_size: about 2,048 tokens per forward/backward, at least one row per example
    (captum needs internal_batch_size ≥ #examples). Without it 50 steps × a long input exhaust memory."""
    return max(batch, 2048 // max(seq_len, 1))


def _integrated_gradients(model, ids: torch.Tensor, targets: list[int], baseline: int) -> Output:
    try:
        from captum.attr import LayerIntegratedGradients
    except ModuleNotFoundError as e:
        raise MethodUnavailable(f"integrated_gradients needs captum ({e}); install it with: pip install captum "
                                "(or: pip install 'gim-fast[eval]')") from None
    device = model.get_input_embeddings().weight.device
    ids = ids.to(device)
    keep = torch.tensor([ids.shape[1] - 1], device=device)

    def forward(input_ids):
        # the raw logits at the last position (captum's target picks the token), float32
        return model(input_ids=input_ids, use_cache=False, logits_to_keep=keep).logits[:, -1].float()

    ig = LayerIntegratedGradients(forward, model.get_input_embeddings(), multiply_by_inputs=True)
    with eval_mode(model):
        with frozen_parameters(model):
            attributions, delta = ig.attribute(
                ids, baselines=torch.full_like(ids, baseline), target=targets, n_steps=IG_STEPS,
                internal_batch_size=_ig_rows_per_chunk(ids.shape[1], ids.shape[0]), return_convergence_delta=True)
        with torch.no_grad():
            index = torch.tensor(targets, device=device)[:, None]
            difference = (forward(ids).gather(1, index) - forward(torch.full_like(ids, baseline)).gather(1, index))[:, 0]
    scores = attributions.detach().float().sum(-1).cpu()
    return Output(scores, {"ig_completeness_gap": delta.detach().float().cpu().tolist(),
                           "ig_logit_difference": difference.cpu().tolist()})


# ----------------------------------------------------------------------------------------------- AttnLRP


def attnlrp_unavailable() -> str | None:
    """Why AttnLRP cannot run here (no side install of transformers 4.52 + lxt 2.1, see
    ``gim_fast.evaluate.attnlrp``), or None."""
    return attnlrp.unavailable()


def _attnlrp(model, ids, targets) -> Output:
    scores, extra = attnlrp.attribute(model, ids, targets)
    return Output(scores, extra)
