"""The GIM settings are defined once (gim_fast/settings.py): the public signatures, the command line, the
evaluation's ablations and the temperature rule all read them from there."""
import argparse
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch

import gim_fast
from gim_fast.cli_args import add_settings_args, settings_from_args
from gim_fast.settings import DEFAULTS, MODIFICATIONS, GIMSettings, cli_options, tempered

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
PUBLIC = [gim_fast.explain, gim_fast.explain_answer, gim_fast.explain_generation, gim_fast.attribute_context,
          gim_fast.GIM.__init__]


@pytest.mark.parametrize("fn", PUBLIC, ids=lambda f: f.__qualname__)
def test_public_signatures_list_every_setting_with_its_default(fn):
    params = inspect.signature(fn).parameters
    for f in dataclasses.fields(GIMSettings):
        assert f.name in params, f"{fn.__qualname__} lacks {f.name}"
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[f.name].default == f.default, f.name


def test_defaults_are_the_papers():
    assert DEFAULTS.as_dict() == dict(freeze_norm=True, softmax_temperature=2.0, q_scale=0.25, k_scale=0.25,
                                      v_scale=0.5, gate_scale=0.5, up_scale=0.5, backend="auto")


def test_off_and_only():
    off = GIMSettings.off()
    assert off.freeze_norm is False and off.backend == "auto"
    assert all(v is None for k, v in off.as_dict().items() if k not in ("freeze_norm", "backend"))
    assert GIMSettings.off(backend="eager").backend == "eager"
    assert MODIFICATIONS == ("freeze_norm", "temperature", "qkv_scaling", "mlp_scaling")
    expected = {"freeze_norm": dict(freeze_norm=True), "temperature": dict(softmax_temperature=2.0),
                "qkv_scaling": dict(q_scale=0.25, k_scale=0.25, v_scale=0.5),
                "mlp_scaling": dict(gate_scale=0.5, up_scale=0.5)}
    for modification, on in expected.items():
        assert GIMSettings.only(modification) == off.replace(**on), modification
    with pytest.raises(ValueError, match="unknown modification 'norms'; accepted: freeze_norm, temperature"):
        GIMSettings.only("norms")


def test_settings_are_checked_and_immutable():
    with pytest.raises(ValueError, match="q_scale must be a finite number >= 0"):
        GIMSettings(q_scale=-1)
    with pytest.raises(TypeError, match="freeze_norm must be True or False"):
        GIMSettings(freeze_norm=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        DEFAULTS.replace(backend="cuda")
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS.q_scale = 1.0
    assert GIMSettings(q_scale=1).q_scale == 1.0 and isinstance(GIMSettings(q_scale=1).q_scale, float)


def test_temperature_one_is_the_plain_softmax_gradient():
    """tempered(1) is None: the GIM rule dS = P_T ⊙ (dP − rowsum(dP ⊙ P_T)) at T = 1 is the softmax's own
    gradient. Checked in float64 against autograd of softmax (the independent reference)."""
    assert tempered(None) is None and tempered(1) is None and tempered(1.0) is None
    assert tempered(2) == 2.0 and tempered(0.5) == 0.5
    assert GIMSettings(softmax_temperature=1.0).temperature is None
    assert GIMSettings(softmax_temperature=1.0).softmax_temperature == 1.0   # the recorded value is as given
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 7, 7, generator=g, dtype=torch.float64, requires_grad=True)
    grad_p = torch.randn(3, 7, 7, generator=g, dtype=torch.float64)
    (reference,) = torch.autograd.grad(torch.softmax(scores, -1), scores, grad_p)
    for t in (1.0, 2.0):
        p_t = torch.softmax(scores.detach() / t, -1)
        rule = p_t * (grad_p - (grad_p * p_t).sum(-1, keepdim=True))
        if t == 1.0:
            torch.testing.assert_close(rule, reference, rtol=1e-12, atol=1e-12)
        else:
            assert not torch.allclose(rule, reference)


def test_command_line_options_come_from_the_settings():
    parser = argparse.ArgumentParser()
    add_settings_args(parser)
    flags = {a.dest: a.option_strings for a in parser._actions if a.dest != "help"}
    assert flags == {o.name: [o.flag] for o in cli_options()}
    assert settings_from_args(parser.parse_args([])) == DEFAULTS
    args = parser.parse_args(["--temperature", "none", "--q-scale", "1", "--no-freeze-norm", "--backend", "eager"])
    assert settings_from_args(args) == DEFAULTS.replace(softmax_temperature=None, q_scale=1.0, freeze_norm=False,
                                                        backend="eager")


SETTING_NAMES = [f.name for f in dataclasses.fields(GIMSettings) if f.name not in ("backend",)]
# Where a new setting must not need an edit: the command line, the jobs, the circuits and the evaluation read the
# settings as one GIMSettings (the temperature sweep of the evaluation names the temperature on purpose).
# The names that remain are not a list of the settings: the temperature sweep (its subject), the ablation named
# after its modification, and the circuits' own patching, which applies norm freezing to the post-norms it splits.
ALLOWED = {("gim_fast/evaluate/methods.py", "softmax_temperature"), ("gim_fast/evaluate/run.py", "softmax_temperature"),
           ("gim_fast/evaluate/methods.py", "freeze_norm"), ("gim_fast/circuits/attribution.py", "freeze_norm")}


def test_a_new_setting_needs_no_edit_in_the_command_line_jobs_circuits_or_evaluation():
    files = [ROOT / "gim_fast/cli.py", ROOT / "gim_fast/cli_args.py"]
    for folder in ("jobs", "circuits", "evaluate"):
        files += sorted((ROOT / "gim_fast" / folder).rglob("*.py"))
    found = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT).as_posix()
        for name in SETTING_NAMES:
            if re.search(rf"\b{name}\b", text) and (rel, name) not in ALLOWED:
                found.append(f"{rel}: {name}")
    assert not found
