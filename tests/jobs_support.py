"""Helpers for the dataset-job tests: a tiny model of tests/tiny_models.py saved with a tokenizer, offline.

The tokenizer is character level (the 95 printable ASCII characters, 4 special tokens, 2 spare ids: 101 ids,
the tiny models' vocabulary), built with ``tokenizers`` and wrapped in ``PreTrainedTokenizerFast``, so that a
saved tiny model loads with ``AutoTokenizer``/``AutoModelForCausalLM`` like any Hugging Face model directory.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import tiny_models

ROOT = Path(__file__).resolve().parents[1]


def char_tokenizer():
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])}
    while len(vocab) < tiny_models.VOCAB:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))   # no merges: one token per char
    core.decoder = decoders.Fuse()
    return tf.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                      bos_token="<s>", eos_token="</s>")


def save_tiny(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    """A tiny random ``family`` model and the char tokenizer, saved as a Hugging Face model directory."""
    model = tiny_models.tiny_model(family, seed=seed)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def random_records(seed: int, count: int) -> list[dict]:
    """``count`` job rows ``{"id": "r<i>", "text": ..., "target": ...}`` drawn from ``random.Random(seed)``: texts of
    1-40 characters of the tiny tokenizer's alphabet, targets absent, a character or a token id."""
    import random

    rng = random.Random(seed)
    return [{"id": f"r{i}", "text": "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 40))),
             "target": rng.choice([None, "a", "b", 17])} for i in range(count)]


def run_cli(args, env=None, timeout=300):
    """``python -m gim_fast ARGS`` in a fresh process (so that it can be killed like a real job)."""
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "gim_fast", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=full_env, timeout=timeout)


def table_rows(out: Path) -> list[dict]:
    """All rows of a job directory, sorted by line; scores as lists."""
    from gim_fast.jobs import read_results

    table = read_results(out)
    return [] if table is None else table.to_pylist()
