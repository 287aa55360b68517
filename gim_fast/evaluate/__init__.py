"""Faithfulness evaluation: the GIM paper's comprehensiveness and sufficiency, GIM against its peers.

    from gim_fast.evaluate import comprehensiveness, sufficiency
    comp = comprehensiveness(model, input_ids, scores, target_token_id, baseline_token_id)   # higher is better
    suff = sufficiency(model, input_ids, scores, target_token_id, baseline_token_id)         # lower is better

``gim-fast evaluate`` runs the whole comparison (``gim_fast.evaluate.run``; the methods in
``gim_fast.evaluate.methods``).
"""
from .metrics import COMPREHENSIVENESS_STEPS, SUFFICIENCY_RATIOS, comprehensiveness, faithfulness, sufficiency

__all__ = ["comprehensiveness", "sufficiency", "faithfulness", "COMPREHENSIVENESS_STEPS", "SUFFICIENCY_RATIOS"]
