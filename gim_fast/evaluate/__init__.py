"""Faithfulness evaluation: the GIM paper's comprehensiveness and sufficiency, GIM against its peers.

    from gim_fast.evaluate import comprehensiveness, sufficiency
    comp = comprehensiveness(model, input_ids, scores, target_token_id, baseline_token_id)   # higher is better
    suff = sufficiency(model, input_ids, scores, target_token_id, baseline_token_id)         # lower is better

``gim-fast evaluate`` runs the whole comparison (``gim_fast.evaluate.run``; the methods in
``gim_fast.evaluate.methods``).

Context attribution (which documents an answer came from) against ablation, ContextCite's metrics:

    from gim_fast.evaluate import ContextAblations, lds, top_k_drop
    ablations = ContextAblations(model, tokenizer, prompt, answer_ids)   # prompt: gim_fast.sources.build_prompt
    drops = top_k_drop(ablations, source_scores)      # {1: …, 3: …, 5: …}, higher is better
    score = lds(ablations, source_scores)             # Spearman over 32 random half-ablations, higher is better

``gim-fast evaluate --task context`` compares GIM, gradient × input, leave-one-out, ContextCite's surrogate and
random scores (``gim_fast.evaluate.context_run``; the methods in ``gim_fast.evaluate.context_methods``).
"""
from .ablation import ContextAblations, answer_logprobs, lds, top_k_drop
from .metrics import COMPREHENSIVENESS_STEPS, SUFFICIENCY_RATIOS, comprehensiveness, faithfulness, sufficiency

__all__ = ["comprehensiveness", "sufficiency", "faithfulness", "COMPREHENSIVENESS_STEPS", "SUFFICIENCY_RATIOS",
           "ContextAblations", "answer_logprobs", "top_k_drop", "lds"]
