"""What the attention kernels compile to on Hopper, without a GPU: registers, spills, ptxas warnings, tensor-core
instruction shapes and the length of each kernel's steady-state inner loop, for sm_90a.

    python bench/compile_report.py              # every kernel × shipped config × feature set below (~5 min, 2 cores)
    python bench/compile_report.py --quick      # one config per kernel, two feature sets (~30 s)

Writes ``bench/results/compile_report.json`` (one record per compiled kernel) and ``compile_report.md`` beside it,
and exits with status 1 when a *shipped* 16-bit configuration spills registers or draws a ptxas serialisation
warning (C7515 "wgmma ... serialized", or any other "Potential Performance Loss"); 0 otherwise.

How: the launchers of ``gim_fast.kernels.attention`` plan their launches on ``meta`` tensors (shapes and strides
only: B = 1, 32 query heads, 8 key/value heads, S = 8192, contiguous), so the report compiles exactly the argument
types and specialisations a GPU run would see; each planned launch is compiled for every configuration its
autotuner may pick (``Launch.configs()``) through ``JITFunction.warmup`` against a stand-in driver that reports an
sm_90a device. Triton's bundled ptxas (``-v``) gives registers, spills and warnings; its bundled nvdisasm gives the
SASS. The *inner loop* is a loop of the SASS control-flow graph (a backward branch to an earlier label) that
contains no other loop and does tensor-core work; ``loop_instructions`` is the shortest such loop (in the
two-stage kernels: the unmasked stage), ``loops`` lists them all in program order.

Feature sets: T off / T = 2 / T = 1.5 (any other T), key padding, non-causal, soft-capping alone, and everything
at once (sliding window, soft-cap, padding; T = 2 and T = 1.5: the most registers) for bf16 at head dim 128; the
extremes at head dims 64 and 256; fp16 once per head dim (same code as bf16 up to the dot's operand type). Every
flag is a ``tl.constexpr``, so each set is its own binary.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAD_DIMS = (64, 128, 256)
SHAPE = dict(batch=1, q_heads=32, kv_heads=8, seq=8192)
WINDOW, SOFTCAP = 1024, 50.0

# name -> (gim_attention keywords; "padding" = left padding on the keys)
FEATURES = {
    "causal": dict(causal=True, temperature=None),
    "causal-T2": dict(causal=True, temperature=2.0),
    "causal-T1.5": dict(causal=True, temperature=1.5),
    "causal-padding-T2": dict(causal=True, padding=True, temperature=2.0),
    "noncausal-T2": dict(causal=False, temperature=2.0),
    "softcap": dict(causal=True, softcap=SOFTCAP, temperature=None),
    "all-T2": dict(causal=True, window=WINDOW, softcap=SOFTCAP, padding=True, temperature=2.0),
    "all-T1.5": dict(causal=True, window=WINDOW, softcap=SOFTCAP, padding=True, temperature=1.5),
}
# (dtype, feature set) per head dim: the full grid at 128; at 64 and 256 each temperature mode, soft-capping, and
# everything at once.
PLAN = {
    128: [("bf16", f) for f in FEATURES] + [("fp16", "causal-T2")],
    64: [("bf16", f) for f in ("causal", "causal-T2", "causal-T1.5", "softcap", "all-T2", "all-T1.5")]
    + [("fp16", "causal-T2")],
    256: [("bf16", f) for f in ("causal", "causal-T2", "causal-T1.5", "softcap", "all-T2", "all-T1.5")]
    + [("fp16", "causal-T2")],
}
QUICK_PLAN = {128: [("bf16", "causal"), ("bf16", "causal-T2")]}
KINDS = ("fwd", "dkdv", "dq", "delta")
SERIALISATION = re.compile(r"Potential Performance Loss|serializ", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------------------
# planning (both in the parent, to enumerate the work, and in the workers)
# ----------------------------------------------------------------------------------------------------------

def _torch_dtype(name):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def plan_launches(feature: str, dtype: str, head_dim: int) -> dict:
    """{kind: Launch} as the launchers plan one forward (with a backward to follow) and one backward."""
    import torch
    from gim_fast.kernels.attention import backward_plan, forward_plan

    f = dict(FEATURES[feature])
    dt = _torch_dtype(dtype)
    b, hq, hkv, s = SHAPE["batch"], SHAPE["q_heads"], SHAPE["kv_heads"], SHAPE["seq"]
    q = torch.empty(b, hq, s, head_dim, device="meta", dtype=dt)
    k = torch.empty(b, hkv, s, head_dim, device="meta", dtype=dt)
    v = torch.empty_like(k)
    mask = torch.empty(b, s, device="meta", dtype=torch.bool) if f.pop("padding", False) else None
    kw = dict(scale=head_dim ** -0.5, causal=f["causal"], sliding_window=f.get("window"),
              softcap=f.get("softcap"), key_padding_mask=mask, temperature=f["temperature"])
    (out, lse, lse_t, o_t), fwd = forward_plan(q, k, v, need_backward=True, **kw)
    _, bwd = backward_plan(torch.empty_like(q), q, k, v, out, lse, lse_t, o_t, **kw,
                           q_scale=0.25, k_scale=0.25, v_scale=0.5)
    return {launch.kind: launch for launch in fwd + bwd}


def _config_tuple(cfg) -> dict:
    kw = cfg.all_kwargs() if hasattr(cfg, "all_kwargs") else dict(cfg.kwargs, num_warps=cfg.num_warps,
                                                                  num_stages=cfg.num_stages)
    return dict(BLOCK_M=kw.get("BLOCK_M"), BLOCK_N=kw.get("BLOCK_N"), num_warps=kw["num_warps"],
                num_stages=kw["num_stages"])


# ----------------------------------------------------------------------------------------------------------
# compiling (in the workers)
# ----------------------------------------------------------------------------------------------------------

class _Sm90Driver:
    """Stands in for the CUDA driver: Triton asks it only which device to compile for."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _init_worker(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    import triton
    from triton import knobs

    triton.runtime.driver.set_active(_Sm90Driver())
    knobs.nvidia.dump_ptxas_log = True         # ptxas -v output goes to stdout: captured per compile
    knobs.compilation.always_compile = True    # a cached binary would come without its ptxas log


def nvidia_tool(name: str) -> str | None:
    """Path of Triton's bundled ``ptxas`` / ``nvdisasm``, or None when it is missing or does not run."""
    from triton import knobs
    tool = getattr(knobs.nvidia, name)
    return tool.path if tool is not None else None


def compile_one(task: tuple) -> dict:
    """Compile one (feature set, dtype, head dim, kernel, config index) and measure it."""
    feature, dtype, head_dim, kind, index, override = task
    import triton
    from gim_fast.kernels.attention import _KERNELS

    launch = plan_launches(feature, dtype, head_dim)[kind]
    configs = launch.configs() if override is None else [
        triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s) for m, n, w, s in [override]]
    cfg = configs[index]
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = _KERNELS[kind].warmup(*launch.args, grid=(1,), **launch.meta, **cfg.kwargs,
                                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    seconds = time.perf_counter() - start
    ptxas = parse_ptxas_log(log.getvalue())
    sass = disassemble(compiled.asm["cubin"])
    record = dict(
        kernel=kind, config=_config_tuple(cfg), features=feature, feature_flags=FEATURES[feature],
        dtype=dtype, head_dim=head_dim, shipped=override is None,
        registers=ptxas["registers"], spills=ptxas["spill_stores"] + ptxas["spill_loads"],
        spill_stores=ptxas["spill_stores"], spill_loads=ptxas["spill_loads"],
        shared_bytes=compiled.metadata.shared, ptxas_warnings=ptxas["warnings"],
        compile_seconds=round(seconds, 2), **analyse_sass(sass))
    return record


# ----------------------------------------------------------------------------------------------------------
# reading ptxas and SASS
# ----------------------------------------------------------------------------------------------------------

_ROUTINE = re.compile(r"Compiling entry function|Function properties for|bytes stack frame|Used \d+ registers|"
                      r"Compile time =|bytes gmem|^\s*$")


def parse_ptxas_log(text: str) -> dict:
    """Registers, spill bytes and every other ptxas line (warnings, "Potential Performance Loss" notes) verbatim."""
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    warnings = [line.strip() for line in text.splitlines()
                if line.strip() and not _ROUTINE.search(line)]
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_stores=int(spill.group(1)) if spill else 0, spill_loads=int(spill.group(2)) if spill else 0,
                warnings=warnings)


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvidia_tool("nvdisasm"), "-c", f.name], check=True, capture_output=True,
                              text=True).stdout


_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.+?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_HGMMA = re.compile(r"\bHGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA = re.compile(r"\bHMMA\.")


def analyse_sass(sass: str) -> dict:
    """Tensor-core shapes of the whole kernel, and the innermost loops that do tensor-core work."""
    instrs, labels = [], {}
    for line in sass.splitlines():
        if m := _LABEL.match(line.strip()):
            labels[m.group(1)] = len(instrs)
        elif m := _INSTR.search(line):
            instrs.append(m.group(1))
    loops = []
    for end, ins in enumerate(instrs):
        m = _BRANCH.search(ins)
        if m and labels.get(m.group(1), end + 1) <= end:
            loops.append((labels[m.group(1)], end))
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    shapes = collections.Counter("x".join(m.groups()) for ins in instrs if (m := _HGMMA.search(ins)))

    def tensor_core(body):
        return any("HGMMA" in i or "HMMA" in i for i in body)

    bodies = [instrs[a:b + 1] for a, b in sorted(innermost) if tensor_core(instrs[a:b + 1])]
    steady = min(bodies, key=len) if bodies else []
    return dict(
        hgmma_shapes=dict(sorted(shapes.items())),
        hgmma_min_n=min((int(s.split("x")[1]) for s in shapes), default=None),
        hmma=sum(bool(_HMMA.search(i)) for i in instrs),      # Ampere-style mma.sync: tiles too small for wgmma
        loop_instructions=len(steady) if bodies else None,
        loops=[len(b) for b in bodies],
        loop_exp2=sum("MUFU.EX2" in i for i in steady),
        loop_depbar=sum("WARPGROUP.DEPBAR" in i for i in steady),
        sass_instructions=len(instrs),
    )


# ----------------------------------------------------------------------------------------------------------
# verdicts and output
# ----------------------------------------------------------------------------------------------------------

def failures(records: list) -> list:
    """Shipped 16-bit configurations that spill or draw a serialisation warning (the report's exit status)."""
    bad = []
    for r in records:
        if not r["shipped"] or r["dtype"] not in ("bf16", "fp16"):
            continue
        serial = [w for w in r["ptxas_warnings"] if SERIALISATION.search(w)]
        if r["spills"] or serial:
            bad.append(f"{r['kernel']} {_cfg(r)} {r['dtype']} D={r['head_dim']} {r['features']}: "
                       f"spills {r['spills']} B" + (f", {serial[0]}" if serial else ""))
    return bad


def _cfg(r) -> str:
    c = r["config"]
    return "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N") if c[k] is not None) + f" w{c['num_warps']} " \
        f"s{c['num_stages']}"


def targets(records: list) -> list:
    """The issue's compiled targets, each as (target, value, met)."""
    shipped16 = [r for r in records if r["shipped"] and r["dtype"] in ("bf16", "fp16")]
    out = [("zero spills and serialisation warnings, shipped bf16/fp16 configs",
            f"{len(failures(records))} of {len(shipped16)} compiled kernels fail", not failures(records))]

    def fwd_loop(feature):
        return [r for r in records if r["kernel"] == "fwd" and r["features"] == feature and r["head_dim"] == 128
                and r["dtype"] == "bf16" and (r["config"]["BLOCK_M"], r["config"]["BLOCK_N"]) == (128, 64)
                and r["loop_instructions"]]
    off, t2 = fwd_loop("causal"), fwd_loop("causal-T2")
    if off:
        n_off = min(r["loop_instructions"] for r in off)
        out.append(("forward inner loop, T off, 128x64, D = 128, bf16: <= 400 SASS instructions",
                    f"{n_off}", n_off <= 400))
        if t2:
            n_t2 = min(r["loop_instructions"] for r in t2)
            out.append(("same loop with T = 2: <= 1.35x the T-off loop", f"{n_t2} ({n_t2 / n_off:.2f}x)",
                        n_t2 <= 1.35 * n_off))
    else:
        out.append(("forward inner loop, T off, 128x64, D = 128, bf16", "no 128x64 forward config compiled", False))
    for kind in ("dkdv", "dq"):
        for head_dim in HEAD_DIMS:
            rs = [r for r in records if r["kernel"] == kind and r["dtype"] in ("bf16", "fp16") and r["shipped"]
                  and r["head_dim"] == head_dim]
            if rs:
                low = min(r["hgmma_min_n"] or 0 for r in rs)
                sync = sum(1 for r in rs if r["hmma"])
                value = f"narrowest n = {low}" if low else "no warpgroup MMA (mma.sync) in some configs"
                value += f"; {sync} of {len(rs)} kernels use mma.sync" if sync else ""
                out.append((f"{kind}, D = {head_dim}: every S/dP GEMM a warpgroup MMA at least 64 wide "
                            "(n of HGMMA m x n x k), shipped 16-bit configs", value, low >= 64 and not sync))
    return out


def markdown(records: list, meta: dict) -> str:
    lines = ["# Attention kernels compiled for sm_90a (no GPU: compiled facts, not timings)", "",
             f"{meta['command']} — Triton {meta['triton']}, ptxas {meta['ptxas']}, {meta['date']}, "
             f"{len(records)} kernels in {meta['seconds']:.0f} s. Shape: B = {SHAPE['batch']}, "
             f"Hq = {SHAPE['q_heads']}, Hkv = {SHAPE['kv_heads']}, S = {SHAPE['seq']}. Generated by "
             "`bench/compile_report.py`; the JSON beside this file has every field.", "", "## Targets", "",
             "| target | value | met |", "|---|---|---|"]
    lines += [f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in targets(records)]
    bad = failures(records)
    lines += ["", f"Failures (shipped 16-bit configs with spills or serialisation warnings): {len(bad)}", ""]
    lines += [f"- {b}" for b in bad]
    for kind in KINDS:
        rows = [r for r in records if r["kernel"] == kind]
        if not rows:
            continue
        lines += ["", f"## {kind}", "", "| D | dtype | features | config | shipped | regs | spills | smem KiB | "
                  "HGMMA shapes (×count) | HMMA | inner loop (all loops) | EX2 / DEPBAR in loop | ptxas notes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            shapes = ", ".join(f"{s}×{n}" for s, n in r["hgmma_shapes"].items()) or "–"
            notes = "; ".join(sorted({re.sub(r".*?\((C\d+)\).*", r"\1", w) for w in r["ptxas_warnings"]})) or "–"
            loops = f"{r['loop_instructions']} ({', '.join(map(str, r['loops']))})" if r["loops"] else "–"
            lines.append(f"| {r['head_dim']} | {r['dtype']} | {r['features']} | {_cfg(r)} | "
                         f"{'yes' if r['shipped'] else 'no'} | {r['registers']} | {r['spills']} | "
                         f"{r['shared_bytes'] / 1024:.0f} | {shapes} | {r['hmma']} | {loops} | {r['loop_exp2']} / "
                         f"{r['loop_depbar']} | {notes} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one config per kernel, two feature sets, D = 128")
    parser.add_argument("--kernels", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--head-dims", type=int, nargs="+", choices=HEAD_DIMS, default=None)
    parser.add_argument("--features", nargs="+", choices=list(FEATURES), default=None,
                        help="only these feature sets (bf16 and fp16 as planned)")
    parser.add_argument("--config", type=lambda s: tuple(int(x) for x in s.split(",")), action="append",
                        metavar="M,N,WARPS,STAGES", help="compile this candidate instead of the shipped configs "
                        "(repeatable; recorded with shipped=false, never fails the run)")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes (default 2)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="compile_report", help="output file stem")
    args = parser.parse_args(argv)

    os.environ.pop("TRITON_INTERPRET", None)
    if nvidia_tool("ptxas") is None or nvidia_tool("nvdisasm") is None:
        print("compile_report: Triton's bundled ptxas/nvdisasm are missing; nothing compiled", file=sys.stderr)
        return 2
    plan = QUICK_PLAN if args.quick else PLAN
    tasks = []
    for head_dim in args.head_dims or plan:
        for dtype, feature in plan.get(head_dim, PLAN[head_dim]):
            if args.features and feature not in args.features:
                continue
            launches = plan_launches(feature, dtype, head_dim)
            for kind in args.kernels:
                if kind not in launches or (kind == "delta" and feature != "causal-T2"):
                    continue   # Δ_T does not depend on the features: compiled once per head dim and dtype
                if args.config:
                    tasks += [(feature, dtype, head_dim, kind, 0, c) for c in args.config if kind != "delta"]
                    continue
                n = 1 if args.quick else len(launches[kind].configs())
                tasks += [(feature, dtype, head_dim, kind, i, None) for i in range(n)]

    import triton
    start = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory() as cache_dir, cf.ProcessPoolExecutor(
            max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(cache_dir,)) as pool:
        for i, record in enumerate(pool.map(compile_one, tasks), 1):
            records.append(record)
            print(f"[{i}/{len(tasks)}] {record['kernel']:5} D={record['head_dim']:3} {record['dtype']} "
                  f"{record['features']:18} {_cfg(record):16} regs {record['registers']:3} "
                  f"spills {record['spills']:4} loop {record['loop_instructions']} "
                  f"{'WARN ' + str(len(record['ptxas_warnings'])) if record['ptxas_warnings'] else ''}",
                  flush=True)
    seconds = time.perf_counter() - start
    ptxas_version = subprocess.run([nvidia_tool("ptxas"), "--version"], capture_output=True,
                                   text=True).stdout.strip().splitlines()[-1]
    meta = dict(command="python bench/compile_report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                triton=triton.__version__, ptxas=ptxas_version, date=time.strftime("%Y-%m-%d"), seconds=seconds,
                target="sm_90a", shape=SHAPE)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(records, meta))
    for t, v, ok in targets(records):
        print(f"{'ok  ' if ok else 'MISS'} {t}: {v}")
    bad = failures(records)
    print(f"{len(records)} kernels compiled in {seconds:.0f} s; {len(bad)} failing; wrote "
          f"{args.out / (args.name + '.json')} and .md")
    for b in bad:
        print("  FAIL", b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
