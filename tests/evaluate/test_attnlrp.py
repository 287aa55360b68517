"""AttnLRP (LXT 2.1) through the side-install worker (``gim_fast.evaluate.attnlrp``).

Without the side install (``make venv`` puts transformers 4.52 + lxt 2.1 in ``.venv/lxt``) only the parts that need
no worker run: the config translation, the pins, the refusal message. With it, tiny random Llama and Gemma 3 models
are saved, loaded in both environments and explained by the worker; the independent reference is gim_fast's own GIM
with the settings that *are* LXT's rules (frozen norms, q/k/v gradients × 1/4, 1/4, 1/2, gate/up × 1/2, true
softmax gradient) on a model whose activation is the identity (so LXT's identity rule equals the true derivative)
and whose baseline token embeds to zero (LXT's implied baseline): the two must agree to float64 rounding. The
end-to-end run on SmolLM2 is in tests/evaluate/test_evaluate_cli.py.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

import gim_fast
from gim_fast.evaluate import attnlrp
from gim_fast.evaluate.lxt_worker import legacy_config
from gim_fast.evaluate.methods import METHODS, MethodUnavailable, attnlrp_unavailable
from tiny_models import config_of, random_ids, tiny_model

ROOT = Path(__file__).resolve().parents[2]
SIDE_MISSING = attnlrp.unavailable()
needs_side = pytest.mark.skipif(SIDE_MISSING is not None, reason=f"AttnLRP side install missing: {SIDE_MISSING}")
LXT_AS_GIM = dict(freeze_norm=True, softmax_temperature=None, q_scale=0.25, k_scale=0.25, v_scale=0.5,
                  gate_scale=0.5, up_scale=0.5)


# ------------------------------------------------------------------------------------------- without the worker


def test_side_packages_are_the_locked_ones():
    """`make venv` installs the side folder from requirements/side-lxt.txt: the same pins as SIDE_PACKAGES."""
    locked = [line.split()[0] for line in (ROOT / "requirements" / "side-lxt.txt").read_text().splitlines()
              if "==" in line]
    assert tuple(locked) == attnlrp.SIDE_PACKAGES


def test_legacy_config_translation():
    llama = legacy_config({**config_of("llama").to_dict(), "dtype": "float32"})
    assert llama["rope_theta"] == 10000.0 and llama["rope_scaling"] is None and llama["torch_dtype"] == "float32"
    assert "rope_parameters" not in llama and "dtype" not in llama
    scaled = legacy_config({"model_type": "llama", "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": 5e5}})
    assert scaled["rope_theta"] == 5e5 and scaled["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    kinds = ["sliding_attention"] * 5 + ["full_attention"]
    gemma = {"model_type": "gemma3_text", "layer_types": kinds * 3, "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    out = legacy_config(gemma)
    assert (out["sliding_window_pattern"], out["rope_theta"], out["rope_local_base_freq"]) == (6, 1e6, 1e4)
    assert legacy_config({**gemma, "layer_types": ["sliding_attention"] * 3})["sliding_window_pattern"] == 4
    with pytest.raises(ValueError, match="not periodic"):
        legacy_config({**gemma, "layer_types": ["full_attention", "sliding_attention"]})


def test_refuses_clearly_without_side_install(monkeypatch, tmp_path):
    llama = tiny_model("llama").eval()
    monkeypatch.setenv(attnlrp.SIDE_ENV_VAR, str(tmp_path / "missing"))
    reason = attnlrp_unavailable()
    assert "no AttnLRP side install" in reason and "make venv" in reason and "lxt==2.1" in reason
    with pytest.raises(MethodUnavailable, match="side install"):
        METHODS["attnlrp"].attribute(llama, random_ids(4, batch=1), [1], 0)
    monkeypatch.setenv(attnlrp.SIDE_ENV_VAR, str(tmp_path))   # exists, holds nothing
    assert "incomplete" in attnlrp_unavailable() and "transformers missing (want 4.52.4)" in attnlrp_unavailable()


def test_refuses_a_model_without_files():
    with pytest.raises(MethodUnavailable, match="save_pretrained"):
        attnlrp.model_dir(tiny_model("llama"))


# ---------------------------------------------------------------------------------------------- with the worker


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def linear_model(request, tmp_path_factory):
    """A tiny model with the identity as its MLP activation and token 0 embedding to zero, saved by this
    transformers and loaded back in float64 (so it knows its folder). One worker serves all of them (and the
    session's other AttnLRP tests): it reloads when the model changes."""
    act = {"hidden_activation": "linear"} if request.param == "gemma3" else {"hidden_act": "linear"}
    model = tiny_model(request.param, **act).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[0].zero_()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()


@needs_side
def test_attnlrp_equals_its_rules_written_as_gim(linear_model):
    ids = random_ids(13, batch=2, seed=4)   # longer than the tiny Gemma 3's sliding window (6)
    with torch.no_grad():
        targets = linear_model(ids).logits[:, -1].argmax(-1).tolist()
    check = attnlrp.check_logits(linear_model, [ids])
    assert check["attnlrp_logit_max_rel_diff"] <= 1e-12 and check["attnlrp_prompts_checked"] == 2
    assert check["attnlrp_side"]["transformers"] == "4.52.4" and check["attnlrp_side"]["lxt"] == "2.1"
    answer = attnlrp.worker_for(linear_model).attribute(ids, targets)
    scores = torch.tensor(answer["scores"], dtype=torch.float64)
    reference = gim_fast.explain(linear_model, ids, target_token_id=targets, baseline_token_id=0, **LXT_AS_GIM)
    # LXT's RMSNorm (like transformers') computes in float32 even in a float64 model, so its backward rounds the
    # gradient to float32 at every norm; gim_fast's frozen norm stays in float64: float32 rounding, not float64
    torch.testing.assert_close(scores, reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))
    plain = gim_fast.explain(linear_model, ids, target_token_id=targets, baseline_token_id=0, freeze_norm=False,
                             softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None, gate_scale=None,
                             up_scale=None)
    assert (scores - plain).abs().max() > 1e-3 * plain.abs().max(), "LXT's rules should change the gradient"
    with torch.no_grad():
        f = linear_model(ids).logits[:, -1].gather(1, torch.tensor(targets)[:, None])[:, 0]
    assert answer["logits"] == pytest.approx(f.tolist(), rel=1e-12)
    assert answer["relevance_sums"] == pytest.approx(scores.sum(-1).tolist(), rel=1e-9)


@needs_side
def test_method_batches_rows_and_reports_the_gap(linear_model):
    ids = random_ids(9, batch=3, seed=5)
    with torch.no_grad():
        targets = linear_model(ids).logits[:, -1].argmax(-1).tolist()
    out = METHODS["attnlrp"].attribute(linear_model, ids, targets, 0)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (3, 9)
    for row in range(3):
        alone = METHODS["attnlrp"].attribute(linear_model, ids[row:row + 1], targets[row:row + 1], 0)
        torch.testing.assert_close(alone.scores[0], out.scores[row], rtol=1e-6, atol=1e-9)
        gap = out.extra["attnlrp_conservation_gap"][row]
        assert gap == pytest.approx(float(out.scores[row].double().sum()) - out.extra["attnlrp_logit"][row], abs=1e-5)
    # the whole gap arises in the attention blocks (the softmax); MLPs, norms and residual sums conserve (up to
    # the float32 rounding of LXT's norms, see above)
    report = attnlrp.conservation_by_block(linear_model, ids[0], targets[0])
    assert report["gap"] == pytest.approx(out.extra["attnlrp_conservation_gap"][0], rel=1e-5)
    assert abs(report["mlp_blocks"]) <= 1e-6 * abs(report["logit"])
    assert report["attention_blocks"] == pytest.approx(report["gap"], rel=1e-6)
    assert abs(report["gap"]) > 1e-6, "the softmax rule is not conservative: a zero gap would mean it was skipped"
    assert report["blocks"] == 2 * linear_model.config.num_hidden_layers


@needs_side
def test_refuses_when_the_side_model_differs(linear_model):
    ids = random_ids(7, batch=1, seed=6)
    changed = copy.deepcopy(linear_model)   # same files, other weights in memory
    with torch.no_grad():
        weight = next(p for n, p in changed.named_parameters() if re.search(r"layers\.0\..*v_proj", n))
        weight.add_(0.01 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0), dtype=weight.dtype))
    with pytest.raises(MethodUnavailable, match=r"refusing to report AttnLRP.*> 0.0001"):
        METHODS["attnlrp"].attribute(changed, ids, [1], 0)
    METHODS["attnlrp"].attribute(linear_model, ids, [1], 0)   # the worker is still serving


@needs_side
def test_worker_errors_are_clear(linear_model):
    worker = attnlrp.worker_for(linear_model)
    with pytest.raises(MethodUnavailable, match=r"token ids must lie in \[0, 101\)"):
        worker.attribute(torch.tensor([[1, 500]]), [1])
    with pytest.raises(MethodUnavailable, match="2 targets for 1 rows"):
        worker.attribute(torch.tensor([[1, 2]]), [1, 2])
    assert worker.attribute(torch.tensor([[1, 2]]), [1])["scores"]   # still serving after the errors


@needs_side
def test_a_family_without_lxt_rules_is_refused(tmp_path):
    model = tiny_model("mistral").eval()
    model.save_pretrained(tmp_path)
    model.config._name_or_path = str(tmp_path)
    with pytest.raises(MethodUnavailable, match="no AttnLRP rules for model_type 'mistral'.*gemma3_text.*llama"):
        METHODS["attnlrp"].attribute(model, random_ids(5, batch=1), [1], 0)
