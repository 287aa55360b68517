"""Why gim-ablations inverts one held-out conflict example: re-fit its prior (f ≈ b + a·Σ k_j g_j + c·Σ k_j over
the full prompt and 6 ablations, exactly as gim_fast.context_ablation.fit_surrogate does) and print a, c, b.

A diagnostic of the committed runs, not a tuning step: nothing in the package was changed from its output.

    .venv/bin/python bench/context_sign_check.py
"""
import numpy as np
import torch

from gim_fast import models
from gim_fast.sources import PromptFormat, build_prompt
from gim_fast.evaluate.context_tasks import task_examples
from gim_fast.evaluate.context_methods import _gim_scores
from gim_fast.evaluate.ablation import ContextAblations
from gim_fast.context_ablation import surrogate_masks, answer_logprobs, fit_surrogate
from gim_fast.settings import GIMSettings

torch.set_num_threads(1)
model, tok = models.load_pretrained("smollm2-135m")
fmt = PromptFormat.resolve(tok)
for split, task, idx in [("heldout", "conflict", 2), ("heldout", "conflict", 0), ("dev", "entities", 0)]:
    ex = task_examples(task, 3, split=split, seed=0)[idx]
    prompt = build_prompt(tok, list(ex.sources), ex.query, template=fmt.template, separator=fmt.separator,
                          chat=fmt.chat)
    ans = [int(t) for t in tok.encode(ex.response, add_special_tokens=False)]
    abl = ContextAblations(model, tok, prompt, ans)
    g, full = _gim_scores(model, tok, abl, GIMSettings())
    masks = surrogate_masks(abl.n, 6, seed=0)
    vals = answer_logprobs(model, prompt.ablated_ids(tok, masks), ans)
    points = np.concatenate([np.ones((1, g.size)), masks.astype(float)])
    y = np.concatenate([[full], vals])
    feats = np.stack([points @ g, points.sum(1), np.ones(len(points))], 1)
    (a, c, b), *_ = np.linalg.lstsq(feats, y, rcond=None)
    w = fit_surrogate(g, full, masks, vals)
    print(ex.key, "gold", ex.gold, "a=%.3f c=%.3f b=%.3f" % (a, c, b), "gim top", int(np.argmax(g)),
          "surrogate top", int(np.argmax(w)), "gold rank in surrogate", int((w > w[ex.gold]).sum()) + 1, flush=True)
