"""Circuit tasks: pairs of clean and corrupt prompts of equal token length, and the metric m that a circuit must
keep (read from the clean run's logits at the last position, or the last two).

Generated offline, deterministic given a seed:

- ``ioi``: indirect-object identification (Wang et al. 2022). "When Mary and John went to the store, John gave a
  drink to" → " Mary". Half the examples put the indirect object first (ABBA), half the subject (BABA); the corrupt
  prompt replaces the three name slots by three other, distinct names (the "ABC" distribution). m = logit(IO) −
  logit(S). Names, places and objects are the lists below, kept when the tokenizer makes each name one token.
- ``greater-than`` (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17", corrupt "...1701...";
  m = the probability mass of the years after YY minus that of the years up to YY. With a tokenizer that writes
  years digit by digit (SmolLM2, Gemma), the prompt is followed by the tens digit of YY and m combines the two
  predicted digits as the MIB benchmark does: P(tens > t) + P(t)·P(units > u) − [P(tens < t) + P(t)·P(units ≤ u)].
- ``capitals``: "The capital of France is" → " Paris", corrupt "The capital of Spain is" (" Madrid"), among the
  countries of ``gim_fast.data`` whose capital the model predicts (its first token); m = logit(answer) −
  logit(corrupt answer).
- a JSON Lines file with ``clean``, ``corrupt``, ``answer`` and ``corrupt_answer`` per line (answers: the text that
  follows the prompt, one token); m = logit(answer) − logit(corrupt answer).
"""
from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..examples import capital_examples
from ..integration import eval_mode
from ..textfiles import iter_lines

__all__ = ["Task", "Metric", "LogitDifference", "YearProbabilityMass", "TaskPerformance", "TaskNotPerformedError",
           "ioi", "greater_than", "capitals", "from_jsonl",
           "read_task_file", "load_task", "performance", "task_metric", "TASKS", "NAMES"]

TASKS = ("ioi", "greater-than", "capitals")

# ----------------------------------------------------------------------------------------------------- word lists

NAMES = ("Mary", "John", "Alice", "Bob", "Tom", "James", "Sarah", "Michael", "David", "Emma", "Daniel", "Laura",
         "Paul", "Anna", "Mark", "Kate", "Peter", "Lisa", "Robert", "Susan", "George", "Linda", "Steven", "Karen",
         "Kevin", "Nancy", "Brian", "Helen", "Jason", "Amy", "Eric", "Rachel", "Adam", "Emily", "Ryan", "Julia",
         "Jack", "Lucy", "Sam", "Grace", "Henry", "Alex", "Jane", "Frank", "Rose", "Carl", "Diana", "Oscar")
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park", "beach",
          "library", "market")
OBJECTS = ("ring", "book", "drink", "snack", "apple", "letter", "gift", "ball", "bottle", "key", "pen", "bag")
# {x} and {y} name the pair, {s} the one who acts; the answer is the other one of the pair; {a_obj} is the object
# with its article ("a ring", "an apple").
IOI_TEMPLATES = (
    "When {x} and {y} went to the {place}, {s} gave {a_obj} to",
    "After {x} and {y} arrived at the {place}, {s} handed {a_obj} to",
    "Then, {x} and {y} were working at the {place}. {s} decided to give {a_obj} to",
    "While {x} and {y} were walking to the {place}, {s} passed {a_obj} to",
    "Today {x} and {y} spent the day at the {place}. Later, {s} gave {a_obj} to",
    "Yesterday {x} and {y} met at the {place}, and {s} offered {a_obj} to",
    "Friends {x} and {y} found {a_obj} at the {place}. {s} gave it to",
    "At the {place}, {x} and {y} had a long talk. Afterwards {s} sent {a_obj} to",
)
EVENTS = ("war", "expedition", "drought", "siege", "journey", "strike", "famine", "dynasty", "reign", "voyage",
          "occupation", "campaign", "revolt", "construction", "trial", "epidemic")
GREATER_THAN_TEMPLATE = "The {event} lasted from the year {century}{yy:02d} to the year {century}"


class TaskNotPerformedError(ValueError):
    """The model does not do the task above chance: its circuit would be meaningless."""


# ----------------------------------------------------------------------------------------------------- metrics


class Metric:
    """m per example from the logits of the last ``positions`` positions ``[B, positions, V]`` and the example's
    ``targets`` row."""

    positions = 1

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class LogitDifference(Metric):
    """logit(answer) − logit(corrupt answer) at the last position; targets ``[B, 2]``."""

    def __call__(self, logits, targets):
        last = logits[:, -1].float()
        return last.gather(1, targets[:, :1]).squeeze(1) - last.gather(1, targets[:, 1:2]).squeeze(1)

    def describe(self) -> str:
        return "logit(answer) - logit(corrupt answer)"


@dataclass
class YearProbabilityMass(Metric):
    """P(year > YY) − P(year ≤ YY) over the model's next-token distribution(s).

    ``digits`` holds the token ids of the years' pieces: 10 single digits (``positions = 2``: the tens digit is
    predicted after the prompt, the units digit after the prompt and the tens digit t of YY; targets ``[B, 2]`` =
    (t, u)), or 100 two-digit tokens "00".."99" (``positions = 1``; targets ``[B, 1]`` = YY)."""

    digits: torch.Tensor

    @property
    def positions(self) -> int:   # type: ignore[override]
        return 2 if self.digits.numel() == 10 else 1

    def __call__(self, logits, targets):
        probs = logits.float().softmax(-1)[..., self.digits.to(logits.device)]   # [B, P, 10 or 100]
        values = torch.arange(probs.shape[-1], device=logits.device)
        if self.positions == 1:
            yy = targets[:, :1]
            p = probs[:, -1]
            return (p * (values > yy)).sum(1) - (p * (values <= yy)).sum(1)
        t, u = targets[:, :1], targets[:, 1:2]
        tens, units = probs[:, -2], probs[:, -1]
        same = tens.gather(1, t)
        good = (tens * (values > t)).sum(1, keepdim=True) + same * (units * (values > u)).sum(1, keepdim=True)
        bad = (tens * (values < t)).sum(1, keepdim=True) + same * (units * (values <= u)).sum(1, keepdim=True)
        return (good - bad).squeeze(1)

    def describe(self) -> str:
        return "P(year > YY) - P(year <= YY)"


# ----------------------------------------------------------------------------------------------------- the task


@dataclass
class Task:
    """Clean and corrupt token ids (equal length per example), the metric's targets, and the texts."""

    name: str
    clean: list[torch.Tensor]          # [S_i] int64 per example
    corrupt: list[torch.Tensor]
    targets: torch.Tensor              # [N, k] int64
    metric: Metric
    texts: list[dict] = field(default_factory=list)   # clean, corrupt, answer, corrupt_answer per example
    notes: list[str] = field(default_factory=list)    # what generating the task skipped, and why

    def __post_init__(self):
        if not self.clean:
            raise ValueError(f"task {self.name!r} has no examples")
        if len(self.clean) != len(self.corrupt) or len(self.clean) != len(self.targets):
            raise ValueError("clean, corrupt and targets must have one entry per example")
        for i, (c, k) in enumerate(zip(self.clean, self.corrupt)):
            if c.shape != k.shape:
                raise ValueError(f"task {self.name!r}, example {i}: the clean and corrupt prompts tokenize to "
                                 f"{c.numel()} and {k.numel()} tokens; circuit patching needs equal lengths")

    def __len__(self) -> int:
        return len(self.clean)

    def batches(self, batch_size: int) -> list[list[int]]:
        """Example indices grouped by token length (no padding), at most ``batch_size`` per batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        by_len = defaultdict(list)
        for i, ids in enumerate(self.clean):
            by_len[ids.numel()].append(i)
        return [idx[s:s + batch_size] for _, idx in sorted(by_len.items()) for s in range(0, len(idx), batch_size)]

    def batch(self, idx: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        clean = torch.stack([self.clean[i] for i in idx]).to(device)
        corrupt = torch.stack([self.corrupt[i] for i in idx]).to(device)
        return clean, corrupt, self.targets[idx].to(device)

    def subset(self, n: int | None) -> "Task":
        if n is None or n >= len(self):
            return self
        return Task(self.name, self.clean[:n], self.corrupt[:n], self.targets[:n], self.metric, self.texts[:n],
                    self.notes)


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text).input_ids, dtype=torch.long)


def answer_token(tokenizer, prompt: str, answer: str, what: str = "answer") -> int:
    """The one token ``answer`` adds after ``prompt`` (tokenized together, so a tokenizer that merges across the
    boundary is handled); a ValueError when it adds none or more than one."""
    if not answer:
        raise ValueError(f"the {what} is empty")
    prompt_ids = tokenizer(prompt).input_ids
    full = tokenizer(prompt + answer).input_ids
    if full[:len(prompt_ids)] == prompt_ids and len(full) == len(prompt_ids) + 1:
        return int(full[-1])
    alone = tokenizer.encode(answer, add_special_tokens=False)
    if len(alone) == 1 and full[:len(prompt_ids)] != prompt_ids:
        return int(alone[0])
    pieces = ", ".join(repr(tokenizer.decode([i])) for i in alone) or "nothing"
    raise ValueError(f"the {what} {answer!r} is not one token after the prompt: it tokenizes to {len(alone)} "
                     f"tokens ({pieces}); give text that is a single token (usually with its leading space)")


# ----------------------------------------------------------------------------------------------------- generators


def single_token_names(tokenizer) -> list[str]:
    """The names of ``NAMES`` that the tokenizer writes as one token after a space."""
    return [n for n in NAMES if len(tokenizer.encode(" " + n, add_special_tokens=False)) == 1]


def ioi(tokenizer, n: int = 32, *, seed: int = 0) -> Task:
    """``n`` IOI examples, ABBA and BABA alternating, each with its ABC corruption (see the module docstring).
    A draw whose corrupt prompt tokenizes to another length than the clean one is drawn again."""
    names = single_token_names(tokenizer)
    if len(names) < 5:
        raise ValueError(f"IOI needs at least 5 names that are one token; this tokenizer has {len(names)} of "
                         f"{len(NAMES)}")
    rng = random.Random(seed)
    clean, corrupt, targets, texts = [], [], [], []
    for i in range(n):
        for _ in range(100):
            template = rng.choice(IOI_TEMPLATES)
            a, b, c, d, e = rng.sample(names, 5)
            place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
            x, y = (a, b) if i % 2 == 0 else (b, a)          # ABBA, then BABA
            a_obj = f"{'an' if obj[0] in 'aeiou' else 'a'} {obj}"
            clean_text = template.format(x=x, y=y, s=b, place=place, a_obj=a_obj)
            corrupt_text = template.format(x=c, y=d, s=e, place=place, a_obj=a_obj)
            ids, bad = _ids(tokenizer, clean_text), _ids(tokenizer, corrupt_text)
            if ids.shape == bad.shape:
                break
        else:
            raise ValueError("IOI: this tokenizer gives the clean and corrupt prompts different lengths")
        io_id = answer_token(tokenizer, clean_text, " " + a)
        s_id = answer_token(tokenizer, clean_text, " " + b)
        clean.append(ids)
        corrupt.append(bad)
        targets.append([io_id, s_id])
        texts.append(dict(clean=clean_text, corrupt=corrupt_text, answer=" " + a, corrupt_answer=" " + b,
                          kind="ABBA" if i % 2 == 0 else "BABA"))
    return Task("ioi", clean, corrupt, torch.tensor(targets), LogitDifference(), texts)


def _year_digits(tokenizer) -> torch.Tensor:
    """The ids of the pieces the tokenizer writes years with after "year 17": 10 digits or 100 two-digit tokens."""
    prompt = GREATER_THAN_TEMPLATE.format(event="war", century=17, yy=32).rsplit(" ", 1)[0] + " 17"
    base = tokenizer(prompt).input_ids
    pieces = []
    for yy in range(100):
        full = tokenizer(prompt + f"{yy:02d}").input_ids
        pieces.append(full[len(base):] if full[:len(base)] == base else None)
    if all(p is not None and len(p) == 1 for p in pieces) and len({p[0] for p in pieces}) == 100:
        return torch.tensor([p[0] for p in pieces])
    if all(p is not None and len(p) == 2 for p in pieces):
        digits = [pieces[d][1] for d in range(10)]            # "0d": the second token is the digit d
        if all(pieces[yy] == [digits[yy // 10], digits[yy % 10]] for yy in range(100)):
            return torch.tensor(digits)
    raise ValueError("greater-than needs a tokenizer that writes the two last digits of a year as one token or as "
                     "two one-digit tokens; this one does neither")


def greater_than(tokenizer, n: int = 32, *, seed: int = 0) -> Task:
    """``n`` greater-than examples: YY uniform in 02..98, centuries 11..17, corrupt start year XX01."""
    digits = _year_digits(tokenizer)
    metric = YearProbabilityMass(digits)
    rng = random.Random(seed)
    clean, corrupt, targets, texts = [], [], [], []
    for _ in range(n):
        event, century, yy = rng.choice(EVENTS), rng.randint(11, 17), rng.randint(2, 98)
        clean_text = GREATER_THAN_TEMPLATE.format(event=event, century=century, yy=yy)
        corrupt_text = GREATER_THAN_TEMPLATE.format(event=event, century=century, yy=1)
        ids, bad = _ids(tokenizer, clean_text), _ids(tokenizer, corrupt_text)
        if metric.positions == 2:   # the tens digit of YY follows (clean), and of 01 (corrupt)
            ids = torch.cat([ids, digits[yy // 10:yy // 10 + 1]])
            bad = torch.cat([bad, digits[:1]])
            targets.append([yy // 10, yy % 10])
        else:
            targets.append([yy])
        clean.append(ids)
        corrupt.append(bad)
        texts.append(dict(clean=clean_text, corrupt=corrupt_text, answer=f"> {century}{yy:02d}",
                          corrupt_answer=f"<= {century}{yy:02d}"))
    return Task("greater-than", clean, corrupt, torch.tensor(targets), metric, texts)


def capitals(model, tokenizer, n: int | None = 32, *, seed: int = 0) -> Task:
    """Pairs of countries whose capital the model predicts (its first token is the top prediction after "The
    capital of {country} is"), with prompts of equal token length and different answer tokens: clean = one,
    corrupt = the other. Countries are taken in a seeded random order, up to 4·n known ones."""
    # four times as many known countries as pairs wanted leaves enough partners of each prompt length
    known = capital_examples(model, tokenizer, None if n is None else 4 * n, seed=seed).examples
    by_len = defaultdict(list)
    for ex in known:
        by_len[ex.input_ids.numel()].append(ex)
    rng = random.Random(seed)
    clean, corrupt, targets, texts, notes = [], [], [], [], []
    for ex in known:
        partners = [o for o in by_len[ex.input_ids.numel()] if o.target_id != ex.target_id]
        if not partners:
            notes.append(f"{ex.key}: no other known country with a prompt of {ex.input_ids.numel()} tokens")
            continue
        other = rng.choice(partners)
        clean.append(ex.input_ids)
        corrupt.append(other.input_ids)
        targets.append([ex.target_id, other.target_id])
        texts.append(dict(clean=ex.text, corrupt=other.text, answer=ex.target, corrupt_answer=other.target))
    if not clean:
        raise TaskNotPerformedError(f"capitals: the model predicts the capital of {len(known)} countries, too few "
                                    "to pair prompts of equal length")
    task = Task("capitals", clean, corrupt, torch.tensor(targets), LogitDifference(), texts, notes)
    return task.subset(n)


_TASK_FIELDS = ("clean", "corrupt", "answer", "corrupt_answer")


def read_task_file(path, n: int | None = None) -> list[tuple[int, dict]]:
    """The rows of a task file as ``(line number, row)``, at most ``n``, checked without a tokenizer (so before a
    model loads): UTF-8 text, one JSON object per non-empty line with the four non-empty strings ``clean``,
    ``corrupt``, ``answer`` and ``corrupt_answer``. Errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such task file: {str(path)!r}")
    rows = []
    for line_no, line in iter_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) or not row[k] for k in _TASK_FIELDS):
            raise ValueError(f"{where}: expected an object with non-empty strings {', '.join(_TASK_FIELDS)}")
        rows.append((line_no, row))
        if n is not None and len(rows) >= n:
            break
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def from_jsonl(path, tokenizer, n: int | None = None) -> Task:
    """A task from a JSON Lines file: ``{"clean", "corrupt", "answer", "corrupt_answer"}`` per line (strings; the
    answers are the one token that follows the prompt, e.g. " Paris"). Errors name the line."""
    path = Path(path)
    clean, corrupt, targets, texts = [], [], [], []
    for line_no, row in read_task_file(path, n):
        where = f"{path}:{line_no}"
        ids, bad = _ids(tokenizer, row["clean"]), _ids(tokenizer, row["corrupt"])
        if ids.shape != bad.shape:
            raise ValueError(f"{where}: the clean and corrupt prompts tokenize to {ids.numel()} and "
                             f"{bad.numel()} tokens; they must have the same length")
        try:
            a = answer_token(tokenizer, row["clean"], row["answer"], "answer")
            b = answer_token(tokenizer, row["clean"], row["corrupt_answer"], "corrupt_answer")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if a == b:
            raise ValueError(f"{where}: answer and corrupt_answer are the same token; the metric would be 0")
        clean.append(ids)
        corrupt.append(bad)
        targets.append([a, b])
        texts.append({k: row[k] for k in _TASK_FIELDS})
    return Task(path.stem, clean, corrupt, torch.tensor(targets), LogitDifference(), texts)


def load_task(name: str, model, tokenizer, n: int | None = 32, *, seed: int = 0) -> Task:
    """``ioi``, ``greater-than``, ``capitals`` or a path to a JSON Lines file."""
    if name == "ioi":
        return ioi(tokenizer, 32 if n is None else n, seed=seed)
    if name == "greater-than":
        return greater_than(tokenizer, 32 if n is None else n, seed=seed)
    if name == "capitals":
        return capitals(model, tokenizer, n, seed=seed)
    if name.endswith((".jsonl", ".json", ".ndjson")) or Path(name).is_file():
        return from_jsonl(name, tokenizer, n)
    raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)} or a .jsonl file")


# ----------------------------------------------------------------------------------------------------- performance


@dataclass
class TaskPerformance:
    """How well the model does the task: on the clean prompts, and on the corrupt ones (with the clean targets)."""

    n: int
    accuracy: float          # share of clean examples with m > 0 (the answer beats the corrupt answer)
    clean_metric: float      # mean m on the clean prompts
    corrupt_metric: float    # mean m on the corrupt prompts (clean targets)
    corrupt_accuracy: float
    chance: float = 0.5

    def check(self, task: str, model: str, min_accuracy: float = 0.6) -> None:
        """Raise ``TaskNotPerformedError`` when the model does not do the task: accuracy below ``min_accuracy``
        or no difference between clean and corrupt runs to explain. ``min_accuracy=0`` checks nothing."""
        if min_accuracy > 0 and (self.accuracy < min_accuracy or self.clean_metric <= self.corrupt_metric):
            raise TaskNotPerformedError(
                f"{model} does not perform {task}: clean accuracy {self.accuracy:.0%} (chance {self.chance:.0%}, "
                f"required {min_accuracy:.0%}), mean metric {self.clean_metric:.3g} clean vs "
                f"{self.corrupt_metric:.3g} corrupt. A circuit for a task the model cannot do means nothing; pick "
                "another task or model")


def task_metric(model, task: Task, prompts: str = "clean", *, batch_size: int = 32) -> torch.Tensor:
    """m per example ``[N]`` from plain forward passes of the clean (or corrupt) prompts, in eval mode."""
    if prompts not in ("clean", "corrupt"):
        raise ValueError(f"prompts must be 'clean' or 'corrupt', got {prompts!r}")
    device = model.get_input_embeddings().weight.device
    out = torch.zeros(len(task))
    with torch.no_grad(), eval_mode(model):
        for idx in task.batches(batch_size):
            clean, corrupt, targets = task.batch(idx, device)
            ids = clean if prompts == "clean" else corrupt
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=task.metric.positions).logits
            out[idx] = task.metric(logits, targets).float().cpu()
    return out


def performance(model, task: Task, batch_size: int = 32) -> TaskPerformance:
    """The metric on plain clean and corrupt forward passes."""
    clean_m = task_metric(model, task, "clean", batch_size=batch_size)
    corrupt_m = task_metric(model, task, "corrupt", batch_size=batch_size)
    return TaskPerformance(len(task), float((clean_m > 0).float().mean()), float(clean_m.mean()),
                           float(corrupt_m.mean()), float((corrupt_m > 0).float().mean()))
