"""Prompts a model answers right: the capital prompts (or any candidates) kept where the model's top prediction
is the expected answer's first token. The faithfulness evaluation and the circuit tasks both pick their examples
here."""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import torch

from .data import countries

__all__ = ["Example", "Selection", "select_examples", "capital_examples", "DEFAULT_BATCH_ROWS"]

DEFAULT_BATCH_ROWS = 64   # sequences per forward while predicting


@dataclass
class Example:
    key: str                 # a stable id: the country's alpha-3 code, or the JSONL line number
    text: str
    input_ids: torch.Tensor  # [S], int64, CPU
    target_id: int
    target: str              # the target token as text
    answer: str = ""         # the full expected answer (the capital), when known


@dataclass
class Selection:
    examples: list[Example]
    candidates: int          # how many candidates were looked at
    correct: int             # how many of them the model got right
    total: int               # how many the data set has


def _first_token_after(tokenizer, text: str, continuation: str) -> int:
    """The first token of ``continuation`` as the model sees it after ``text`` (tokenized together, so a
    tokenizer that merges across the boundary is handled), else of the continuation alone."""
    prompt = tokenizer(text).input_ids
    full = tokenizer(text + continuation).input_ids
    if len(full) > len(prompt) and full[:len(prompt)] == prompt:
        return int(full[len(prompt)])
    ids = tokenizer.encode(continuation, add_special_tokens=False)
    if not ids:
        raise ValueError(f"{continuation!r} encodes to no token")
    return int(ids[0])


@torch.no_grad()
def _predictions(model, ids_list: list[torch.Tensor], batch_rows: int) -> list[int]:
    """Each sequence's top prediction at its last position (grouped by length: no padding)."""
    out = [0] * len(ids_list)
    groups = defaultdict(list)
    for i, ids in enumerate(ids_list):
        groups[ids.numel()].append(i)
    device = model.get_input_embeddings().weight.device
    for _, idx in sorted(groups.items()):
        for start in range(0, len(idx), batch_rows):
            chunk = idx[start:start + batch_rows]
            rows = torch.stack([ids_list[i] for i in chunk]).to(device)
            logits = model(input_ids=rows, use_cache=False, logits_to_keep=1).logits[:, -1]
            for i, p in zip(chunk, logits.argmax(-1).tolist()):
                out[i] = int(p)
    return out


def select_examples(model, tokenizer, candidates: list[tuple[str, str, str | None, str]], n: int | None,
            batch_rows: int) -> Selection:
    """Walk the (already ordered) candidates (key, text, continuation or None, answer) in chunks and keep those the
    model predicts right, until ``n`` are kept. A candidate without a continuation explains the model's own top
    prediction (always kept)."""
    kept: list[Example] = []
    looked = correct = 0
    chunk_size = 16   # candidates per look: a small n stops after a few forwards
    for start in range(0, len(candidates), chunk_size):
        if n is not None and len(kept) >= n:
            break
        chunk = candidates[start:start + chunk_size]
        ids_list = [torch.tensor(tokenizer(text).input_ids, dtype=torch.long) for _, text, _, _ in chunk]
        preds = _predictions(model, ids_list, batch_rows)
        for (key, text, continuation, answer), ids, pred in zip(chunk, ids_list, preds):
            if n is not None and len(kept) >= n:
                break
            looked += 1
            target = pred if continuation is None else _first_token_after(tokenizer, text, continuation)
            if pred != target:
                continue
            correct += 1
            kept.append(Example(key, text, ids, target, tokenizer.decode([target]), answer))
    return Selection(kept, looked, correct, len(candidates))


def capital_examples(model, tokenizer, n: int | None = None, *, seed: int = 0, shots: int = 0,
                     batch_rows: int = DEFAULT_BATCH_ROWS) -> Selection:
    """'The capital of {country} is' prompts the model completes with the capital's first token.

    The 193 countries are shuffled with ``seed`` (so a subsample is a random one, the same on every machine) and
    taken in that order until ``n`` correct ones are found (``None``: all of them). ``shots`` > 0 puts that many
    solved examples of other countries first ("The capital of Peru is Lima. … The capital of France is"), drawn
    per country with ``seed``: longer prompts, with context tokens that matter less than the country."""
    rows = countries()
    random.Random(seed).shuffle(rows)
    candidates = []
    for c in rows:
        pick = random.Random(f"{seed}:{c.code}")
        others = pick.sample([o for o in rows if o.code != c.code], shots) if shots else []
        context = "".join(f"{o.prompt} {o.capital}. " for o in others)
        candidates.append((c.code, context + c.prompt, " " + c.capital, c.capital))
    return select_examples(model, tokenizer, candidates, n, batch_rows)
