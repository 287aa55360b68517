"""Where gim-explain 0.1.4 applies GIM on Hugging Face models, and where it does not.

For each family (tiny random models, float64) and each attention implementation, every GIM modification is
switched on alone in gim-explain and the result compared with (1) the plain gradient × input and (2) gim_fast
with the same single modification:

    applied   gim-explain = gim_fast within 1e-5 (the modification reached the model)
    IGNORED   gim-explain = plain gradient within 1e-5 (silently not applied)
    WRONG     neither
    CRASH     gim-explain raised

Run:  python examples/compare_gim_explain.py     (needs `pip install gim-explain==0.1.4`)
"""
from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import gim  # noqa: E402  gim-explain
import gim_fast  # noqa: E402
from tiny_models import FAMILIES, random_ids, tiny_model  # noqa: E402

OFF = dict(freeze_norm=False, softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None)
MODS = {
    "norm freezing": dict(OFF, freeze_norm=True),
    "temperature": dict(OFF, softmax_temperature=2.0),
    "q/k/v scaling": dict(OFF, q_scale=0.25, k_scale=0.25, v_scale=0.5),
}


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def verdict(model, ids, settings):
    plain = gim_fast.explain(model, ids, baseline_token_id=0, gate_scale=None, up_scale=None, **OFF)
    ours = gim_fast.explain(model, ids, baseline_token_id=0, gate_scale=None, up_scale=None, **settings)
    try:
        theirs = gim.explain(model.eval(), ids, baseline_token_id=0, **settings)
    except Exception as err:  # noqa: BLE001 - reporting what the other library does
        return f"CRASH ({type(err).__name__})"
    if rel(ours, plain) < 1e-3:
        return "no effect here"
    if rel(theirs, ours) < 1e-5:
        return "applied"
    if rel(theirs, plain) < 1e-5:
        return "IGNORED"
    return f"WRONG ({rel(theirs, ours):.1e})"


def main():
    ids = random_ids(21, seed=0)
    print(f"{'family':8} {'attention':9} " + " ".join(f"{m:>18}" for m in MODS))
    for family in FAMILIES:
        for attn in ("sdpa", "eager"):
            if family == "gemma2" and attn == "sdpa":
                continue  # transformers has no SDPA path for Gemma 2
            model = tiny_model(family, torch.float64, attn_implementation=attn)
            row = [verdict(model, ids, settings) for settings in MODS.values()]
            print(f"{family:8} {attn:9} " + " ".join(f"{v:>18}" for v in row))
    print("\ngim_fast applies all three (and gate/up scaling, which gim-explain lacks) on every row above.")


if __name__ == "__main__":
    main()
