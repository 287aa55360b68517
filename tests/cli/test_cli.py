"""The gim-fast command line, on the real SmolLM2-135M (loaded from the cache the smollm2 fixture fills)."""
import subprocess
import sys

from gim_fast.cli import main

PROMPT = "The capital of France is"


def test_explain_prints_target_and_one_line_per_token(smollm2, capsys):
    assert main(["explain", PROMPT, "--color", "never"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("target: ' Paris' (id 7042, the model's top prediction)")
    rows = [line for line in out if line[:1].isdigit()]
    assert [row.split()[1] for row in rows] == ["The", "·capital", "·of", "·France", "·is"]


def test_explain_with_settings_and_a_target(smollm2, capsys):
    argv = ["explain", PROMPT, "--target", " London", "--temperature", "none", "--q-scale", "0.5",
            "--no-freeze-norm", "--backend", "eager", "--color", "never"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "target: ' London'" in out
    assert "softmax_temperature=None" in out and "q_scale=0.5" in out and "freeze_norm=False" in out


def test_target_that_is_not_one_token_is_a_usage_error(smollm2, capsys):
    assert main(["explain", PROMPT, "--target", " Paris is lovely"]) == 2
    err = capsys.readouterr().err
    assert "not a single token" in err and "Traceback" not in err


def test_unknown_model_is_a_usage_error(capsys):
    assert main(["explain", PROMPT, "--model", "no-such-model"]) == 2
    assert "smollm2-135m" in capsys.readouterr().err


def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "gim_fast", "explain", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--gate-scale" in done.stdout
    done = subprocess.run([sys.executable, "-m", "gim_fast", "explain", "x", "--q-scale", "-1"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--q-scale" in done.stderr
