"""Pool a context evaluation's examples over its sets: per method, the mean ± standard error over every example of
LDS (all masks, top kept, top removed) and of the top-3 drop, how often the gold document is ranked first, the
cost, and each method's paired LDS difference to reference methods (default the ContextCite package and gim).

    .venv/bin/python bench/context_pooled.py bench/results/context-tasks/dev bench/results/context-tasks/heldout \\
        --out bench/results/context-tasks/pooled.md
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path


def _mean_se(values):
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def _fmt(pair, digits=3):
    mean, se = pair
    return "–" if math.isnan(mean) else f"{mean:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def pooled(folder: Path, references: list[str]) -> str:
    rows = list(csv.DictReader((folder / "examples.csv").open(encoding="utf-8")))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["key"], r["method"]): r for r in rows}
    keys = list(dict.fromkeys(r["key"] for r in rows))
    sets = list(dict.fromkeys(r["set"] for r in rows))
    counts = {s: len({r["key"] for r in rows if r["set"] == s}) for s in sets}
    out = [f"## {folder.name}", "", f"{len(keys)} examples ({', '.join(f'{s} {c}' for s, c in counts.items())})", "",
           "| method | LDS | LDS, top kept | LDS, top removed | top-3 drop | gold first | F-eq. | s/answer | "
           + " | ".join(f"Δ LDS vs `{r}`" for r in references) + " |",
           "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(references)]
    for m in methods:
        got = [by[(k, m)] for k in keys if (k, m) in by]
        col = lambda name: [float(r[name]) for r in got]                           # noqa: E731
        diffs = {ref: [float(by[(k, m)]["lds"]) - float(by[(k, ref)]["lds"]) for k in keys
                       if (k, m) in by and (k, ref) in by] for ref in references}
        feq = sum(int(r["forwards"]) + int(r["backwards"]) for r in got) / len(got)
        out.append(f"| `{m}` | {_fmt(_mean_se(col('lds')))} | {_fmt(_mean_se(col('lds_top_kept')))} | "
                   f"{_fmt(_mean_se(col('lds_top_removed')))} | {_fmt(_mean_se(col('drop3')), 2)} | "
                   f"{sum(int(r['gold_rank']) == 1 for r in got)} of {len(got)} | {feq:.1f} | "
                   f"{_mean_se(col('seconds'))[0]:.1f} | "
                   + " | ".join("–" if m == ref else _fmt(_mean_se(diffs[ref])) for ref in references) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--reference", nargs="+", default=["contextcite", "gim"],
                   help="methods to take each method's paired LDS difference against")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    text = "\n\n".join(pooled(f, args.reference) for f in args.folders)
    text = ("# Context evaluation pooled over its sets\n\nCommand: `.venv/bin/python bench/context_pooled.py "
            + " ".join(map(str, args.folders)) + " --reference " + " ".join(args.reference)
            + (f" --out {args.out}" if args.out else "") + "`\n\n"
            "Mean ± standard error over every example of the folder (each set weighs by its number of examples); "
            "F-eq.: forward-equivalents per answer (a backward counts as one forward); s/answer on a shared machine. "
            "The runs' own files (context.md per folder) hold the machine, date and versions.\n\n" + text + "\n")
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
