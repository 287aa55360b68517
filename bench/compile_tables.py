"""The "compiled facts" tables of docs/gpus.md, generated from the compile reports' JSON files.

    python bench/compile_tables.py                # print the tables (markdown)
    python bench/compile_tables.py --write        # replace the generated part of docs/gpus.md
    python bench/compile_tables.py --check        # exit 1 when docs/gpus.md's tables differ from the JSON files

Reads ``bench/results/compile_report.json`` (sm_90a) and ``compile_report_<arch>.json`` (the others), in the order
of ``kernels/archs.py``'s ARCHS, and writes one overview table (one row per architecture) and one table per
architecture (one row per kernel and head dim, over the shipped bf16/fp16 configurations and every feature set
compiled). The generated part of docs/gpus.md lies between the two marker lines below; the prose around it is
written by hand.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compile_report import failures, output_stem  # noqa: E402
from gim_fast.kernels.archs import ARCHS  # noqa: E402

BEGIN = "<!-- compiled-facts:begin (bench/compile_tables.py --write) -->"
END = "<!-- compiled-facts:end -->"
DOC = ROOT / "docs" / "gpus.md"
RESULTS = ROOT / "bench" / "results"
KINDS = ("fwd", "dkdv", "dq", "delta")
KIND_NAMES = {"fwd": "forward", "dkdv": "dK/dV", "dq": "dQ", "delta": "Δ_T"}


def load_reports(results: Path = RESULTS) -> dict:
    """{arch: report} for every architecture whose JSON file exists."""
    out = {}
    for arch in ARCHS:
        path = results / f"{output_stem(arch)}.json"
        if path.exists():
            out[arch] = json.loads(path.read_text())
    return out


def _span(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def _cfg(r) -> str:
    c = r["config"]
    blocks = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N") if c.get(k) is not None)
    return f"{blocks} w{c['num_warps']} s{c['num_stages']}" + (f" {c['tiling']}" if c.get("tiling") else "")


def _shipped16(records) -> list:
    return [r for r in records if r["shipped"] and r["dtype"] in ("bf16", "fp16")]


def overview(reports: dict) -> list:
    lines = ["| architecture | GPUs | configuration table | shared memory / block | shipped 16-bit kernels "
             "compiled | failing | dot instructions (D ≤ 128) | spills | report |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arch, rep in reports.items():
        a = ARCHS[arch]
        recs = _shipped16(rep["records"])
        ok = [r for r in recs if r.get("compiled", True)]
        fams = sorted({f for r in ok if r["head_dim"] <= 128 for f in r.get("dots", {})})
        spills = sum(1 for r in ok if r["spills"] or r.get("scratch_bytes"))
        stem = output_stem(arch)
        lines.append(f"| {arch} | {a.gpus} | {rep['meta'].get('table', arch)} | {a.shared_bytes // 1024} KiB | "
                     f"{len(ok)} of {len(recs)} | {len(failures(rep['records'], arch))} | {', '.join(fams) or '–'} | "
                     f"{spills} | `bench/results/{stem}.md` |")
    return lines


def arch_table(arch: str, rep: dict) -> list:
    a = ARCHS[arch]
    nvidia = a.backend == "cuda"
    recs = _shipped16(rep["records"])
    meta = rep["meta"]
    lines = [f"### {arch} — {a.gpus}", "",
             f"Triton {meta['triton']}, {meta['ptxas'] if nvidia else 'AMDGPU LLVM backend'}, compiled "
             f"{meta['date']}; limits {a.shared_bytes} B of {'shared memory' if nvidia else 'LDS'} and "
             f"{a.registers} registers a {'thread' if nvidia else 'lane'} per block; table "
             f"`{meta.get('table', arch)}`.", ""]
    regs = "registers" if nvidia else "VGPRs"
    lines += [f"| kernel | D | shipped configs | {regs} | spills | {'smem' if nvidia else 'LDS'} KiB (max) | "
              + ("" if nvidia else "occupancy | ") + "dots (instruction M×N×K) | inner loop, hot / whole |",
              "|---|---|---|---|---|---|" + ("" if nvidia else "---|") + "---|---|"]
    for kind in KINDS:
        for d in sorted({r["head_dim"] for r in recs if r["kernel"] == kind}):
            rs = [r for r in recs if r["kernel"] == kind and r["head_dim"] == d]
            ok = [r for r in rs if r.get("compiled", True)]
            configs = sorted({_cfg(r) for r in rs})
            failed = len(rs) - len(ok)
            shapes = sorted({s for r in ok for s in r.get("dot_shapes", {})})
            hot = _span([r.get("loop_hot_instructions") for r in ok])
            whole = _span([r.get("loop_instructions") for r in ok])
            spills = _span([r["spills"] for r in ok])
            row = (f"| {KIND_NAMES[kind]} | {d} | {'; '.join(configs)} | {_span([r['registers'] for r in ok])} | "
                   f"{spills}{f' ({failed} do not compile)' if failed else ''} | "
                   f"{max((r['shared_bytes'] for r in ok), default=0) / 1024:.0f} | ")
            if not nvidia:
                row += f"{_span([r.get('occupancy') for r in ok])} | "
            row += f"{', '.join(shapes) or '–'} | {hot if hot == whole else f'{hot} / {whole}'} |"
            lines.append(row)
    return lines


def tables(reports: dict) -> str:
    lines = [BEGIN, "", "#### All architectures", ""] + overview(reports)
    for arch, rep in reports.items():
        lines += [""] + arch_table(arch, rep)
    return "\n".join(lines + ["", END])


def splice(doc: str, generated: str) -> str:
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"compile_tables: {DOC} has no generated section (the marker lines {BEGIN!r} … {END!r})")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + generated + tail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"replace the generated part of {DOC.name}")
    parser.add_argument("--check", action="store_true", help=f"exit 1 when {DOC.name} is out of date")
    args = parser.parse_args(argv)
    generated = tables(load_reports())
    if args.write or args.check:
        doc = DOC.read_text()
        new = splice(doc, generated)
        if args.check:
            if new != doc:
                print(f"{DOC} is out of date: run python bench/compile_tables.py --write", file=sys.stderr)
                return 1
            return 0
        DOC.write_text(new)
        print(f"wrote {DOC}")
        return 0
    print(generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
