"""GIM's settings one at a time on one example of the context evaluation (``gim-fast evaluate --task context``).

    python bench/context_settings.py                              # Gemma-3-270M, 100 documents, the question on VUT
    python bench/context_settings.py --model smollm2-135m --documents 10 --key BOL

Rebuilds the example exactly as the evaluation does (``gim_fast.data.context_examples(documents, seed)``, the same
prompt format, the model's greedy answer cut at the first line break), then attributes the answer's
log-probability with ``explain_answer(target="logprob", total=True)`` under each setting below and scores every
variant with the evaluation's own metrics: the gold document's rank, top-1 drop and LDS (the evaluation's 32 masks
for this example). Variants: GIM's defaults; the defaults with one modification removed (temperature 1 and no
temperature are the same gradient); plain gradient × input; plain with one modification added. Prints a markdown
table and writes ``<out>/settings_<model>_<documents>_<key>.csv/.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import environment, write_rows  # noqa: E402

_OFF = dict(freeze_norm=False, softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None, gate_scale=None,
            up_scale=None)
_QKV = dict(q_scale=0.25, k_scale=0.25, v_scale=0.5)
_GATE_UP = dict(gate_scale=0.5, up_scale=0.5)
VARIANTS = {
    "GIM (defaults)": {},
    "defaults, softmax temperature 1": dict(softmax_temperature=1.0),
    "defaults, no norm freezing": dict(freeze_norm=False),
    "defaults, no q/k/v scaling": dict(q_scale=None, k_scale=None, v_scale=None),
    "defaults, no gate/up scaling": dict(gate_scale=None, up_scale=None),
    "plain gradient x input": _OFF,
    "plain + temperature 2": {**_OFF, "softmax_temperature": 2.0},
    "plain + norm freezing": {**_OFF, "freeze_norm": True},
    "plain + q/k/v scaling": {**_OFF, **_QKV},
    "plain + gate/up scaling": {**_OFF, **_GATE_UP},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--documents", type=int, default=100)
    p.add_argument("--key", default="VUT", help="the country code of the question (default VUT)")
    p.add_argument("--seed", type=int, default=0, help="the evaluation's seed (default 0)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "context"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import gim_fast
    from gim_fast.data import context_examples
    from gim_fast.evaluate.ablation import LDS_ABLATIONS, ContextAblations, lds, random_masks, top_k_drop
    from gim_fast.evaluate.context_run import _cut_at_newline, gold_rank
    from gim_fast.context import generate_answers
    from gim_fast.models import load_pretrained
    from gim_fast.sources import PromptFormat, build_prompt

    examples = {ex.key: ex for ex in context_examples(args.documents, seed=args.seed)}
    if args.key not in examples:
        p.error(f"--key {args.key!r}: no such country code; accepted: {', '.join(sorted(examples))}")
    ex = examples[args.key]
    model, tokenizer = load_pretrained(args.model)
    fmt = PromptFormat.resolve(tokenizer)
    prompt = build_prompt(tokenizer, ex.sources, ex.query, template=fmt.template, separator=fmt.separator,
                          chat=fmt.chat)
    answer = _cut_at_newline(tokenizer, generate_answers(model, tokenizer, [prompt.input_ids], 16)[0])
    if not answer:
        raise SystemExit(f"{args.model} generated no answer to {ex.query!r} (its first token ends the answer)")
    print(f"{args.model}, {args.documents} documents, {ex.query!r}: answer {tokenizer.decode(answer)!r}, prompt "
          f"{len(prompt.input_ids)} tokens, gold document {ex.gold} ({ex.sources[ex.gold]!r})", flush=True)
    ablations = ContextAblations(model, tokenizer, prompt, answer)
    masks = random_masks(ablations.n, LDS_ABLATIONS, seed=f"{args.seed}:lds:{ex.key}:{ablations.n}")
    env = environment(torch.device("cpu"))
    rows = []
    print("\n| settings | gold rank | top document | top-1 drop | LDS | s |\n|---|---:|---:|---:|---:|---:|")
    for name, settings in VARIANTS.items():
        started = time.perf_counter()
        result = gim_fast.explain_answer(model, prompt.input_ids, answer, tokenizer=tokenizer, target="logprob",
                                         total=True, **settings)
        seconds = time.perf_counter() - started
        tokens = result.scores[0, :len(prompt.input_ids)].detach().double().cpu().numpy()
        scores = tokens @ prompt.weights()[:, :ablations.n]
        row = {"model": args.model, "documents": args.documents, "key": ex.key, "settings": name,
               "gold_rank": gold_rank(scores, ex.gold), "top_document": int(scores.argmax()),
               "drop1": top_k_drop(ablations, scores, (1,))[1], "lds": lds(ablations, scores, masks),
               "seconds": seconds, **env}
        rows.append(row)
        print(f"| {name} | {row['gold_rank']:g} | {row['top_document']} | {row['drop1']:.2f} | {row['lds']:.2f} | "
              f"{seconds:.1f} |", flush=True)
    paths = write_rows(rows, Path(args.out), f"settings_{Path(args.model).name}_{args.documents}_{ex.key}")
    print("\nwrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
