"""What the attention kernels compile to on each GPU architecture, without a GPU: registers, spills, shared memory,
compiler warnings, tensor-core instructions and shapes, and the length of each kernel's steady-state inner loop.

    python bench/compile_report.py                  # sm_90a: every kernel × shipped config × feature set below
    python bench/compile_report.py --arch sm_80     # any of kernels/archs.py's ARCHS (sm_80 … gfx950), or "all"
    python bench/compile_report.py --quick          # one config per kernel, two feature sets (~30 s)

Writes ``bench/results/compile_report_<arch>.json`` (one record per compiled kernel) and ``.md`` beside it (for
sm_90a: ``compile_report.json`` / ``.md``), and exits with status 1 when a *shipped* 16-bit configuration of that
architecture fails: it does not compile (a compiler error or a compiler process that dies), spills registers,
needs more shared memory (LDS) than a block may have there, draws a ptxas serialisation warning (C7515 "wgmma ...
serialized", or any other "Potential Performance Loss"), or — at head dims up to 128 — has a dot that does not
use the architecture's own tensor-core instruction (mma.sync on sm_80/86/89/120, wgmma on sm_90a, tcgen05.mma on
sm_100a, MFMA on AMD). 0 otherwise; with ``--arch all``, 1 when any architecture fails.

How: the launchers of ``gim_fast.kernels.attention`` plan their launches on ``meta`` tensors for the chosen
architecture (shapes and strides only: B = 1, 32 query heads, 8 key/value heads, S = 8192, contiguous), so the
report compiles exactly the argument types, specialisations and configuration table a GPU of that architecture
would get; each planned launch is compiled for every configuration its autotuner may pick (``Launch.configs()``)
through ``JITFunction.warmup`` against a stand-in driver that reports the target. Every compile runs in a worker
process: a compiler that aborts takes only its worker with it, and the report records the failure with the
compiler's last words and starts a new worker.

NVIDIA facts: Triton's bundled ptxas (``-v``) gives registers, spill bytes and warnings; the PTX the tensor-core
instructions and their shapes (``mma.sync.m16n8k16``, ``wgmma.m64nNk16``; tcgen05 shapes from the TTGIR, where
its operands' shapes are); the final TTGIR which instruction family each dot became (mma.sync, wgmma,
tcgen05.mma, or plain FMA); the bundled nvdisasm the SASS. AMD facts, from the AMDGCN assembly and its metadata:
VGPRs (architectural and accumulation), SGPRs, spilled VGPRs/SGPRs, scratch bytes, LDS bytes, occupancy (waves
per SIMD) and the MFMA instructions. The *inner loop* is a loop of the machine code's control-flow graph (a
backward branch to an earlier label) that contains no other loop and does tensor-core work;
``loop_instructions`` is the whole body of the shortest such loop (in the two-stage kernels: the unmasked stage),
``loops`` lists them all in program order. A loop body may hold a conditional block, jumped over by a predicated
forward branch: in these kernels chiefly the forward's lazy rescale (the unmasked stage rescales its accumulators
only on tiles where a row's running max grew by more than 2^8). ``loop_hot_instructions`` (``loops_hot``) counts
the body without those blocks — the iteration as it runs when the branch is not taken — and the report gives it
beside the whole body, never instead of it.

Feature sets: T off / T = 2 / T = 1.5 (any other T), key padding, non-causal, soft-capping alone, and everything
at once (sliding window, soft-cap, padding; T = 2 and T = 1.5: the most registers), each in bf16 and fp16 at head
dims 64 and 128; at head dim 256 each temperature mode, soft-capping and everything at once in bf16, and fp16
once. Every flag is a ``tl.constexpr``, so each set is its own binary.

``--cache DIR`` keeps each record under a key of the kernel's source (Triton's cache key: the kernel and every
jitted function it calls), its constexpr flags, the Triton version, the target and the configuration, and reuses
it on a later run: a candidate compiled while screening is not compiled again once shipped. The report's meta
says how many records were reused.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # run as a script from anywhere: the checkout's gim_fast first
    sys.path.insert(0, str(ROOT))

from gim_fast.kernels.archs import ARCHS  # noqa: E402  (no triton import: the parent stays light)

HEAD_DIMS = (64, 128, 256)
SHAPE = dict(batch=1, q_heads=32, kv_heads=8, seq=8192)
WINDOW, SOFTCAP = 1024, 50.0
DEFAULT_ARCH = "sm_90a"
TASK_TIMEOUT = 900          # seconds one compile may take before its worker is killed and the compile failed

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
# (dtype, feature set) per head dim: every feature set in both 16-bit types at 64 and 128; at 256 each temperature
# mode, soft-capping and everything at once in bf16, fp16 once (same code up to the dot's operand type).
_D256 = ("causal", "causal-T2", "causal-T1.5", "softcap", "all-T2", "all-T1.5")
PLAN = {
    128: [(dt, f) for f in FEATURES for dt in ("bf16", "fp16")],
    64: [(dt, f) for f in FEATURES for dt in ("bf16", "fp16")],
    256: [("bf16", f) for f in _D256] + [("fp16", "causal-T2")],
}
QUICK_PLAN = {128: [("bf16", "causal"), ("bf16", "causal-T2")]}
KINDS = ("fwd", "dkdv", "dq", "delta")
SERIALISATION = re.compile(r"Potential Performance Loss|serializ", re.IGNORECASE)


def output_stem(arch: str) -> str:
    """File stem of an architecture's report: ``compile_report`` for the default target (sm_90a),
    ``compile_report_<arch>`` for the others."""
    return "compile_report" if arch == DEFAULT_ARCH else f"compile_report_{arch}"


# ----------------------------------------------------------------------------------------------------------
# planning (in the parent, to enumerate the work, and in the workers)
# ----------------------------------------------------------------------------------------------------------

def _torch_dtype(name):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def plan_launches(feature: str, dtype: str, head_dim: int, arch: str = DEFAULT_ARCH) -> dict:
    """{kind: Launch} as the launchers plan one forward (with a backward to follow) and one backward on ``arch``."""
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
              softcap=f.get("softcap"), key_padding_mask=mask, temperature=f["temperature"], arch=arch)
    (out, lse, lse_t, o_t), fwd = forward_plan(q, k, v, need_backward=True, **kw)
    _, bwd = backward_plan(torch.empty_like(q), q, k, v, out, lse, lse_t, o_t, **kw,
                           q_scale=0.25, k_scale=0.25, v_scale=0.5)
    return {launch.kind: launch for launch in fwd + bwd}


def _override_config(kind: str, override: tuple):
    import triton
    m, n, w, s, *tags = override
    return triton.Config(dict(BLOCK_M=m, BLOCK_N=n, **({"ROWS_MAJOR": "rows" in tags} if kind == "dkdv" else {})),
                         num_warps=w, num_stages=s)


def _config_tuple(cfg) -> dict:
    kw = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out = dict(BLOCK_M=kw.get("BLOCK_M"), BLOCK_N=kw.get("BLOCK_N"), num_warps=kw["num_warps"],
               num_stages=kw["num_stages"])
    if "ROWS_MAJOR" in kw:   # the dK/dV tiling: S = Q Kᵀ ("rows") or Sᵀ = K Qᵀ ("keys")
        out["tiling"] = "rows" if kw["ROWS_MAJOR"] else "keys"
    return out


# ----------------------------------------------------------------------------------------------------------
# compiling (in the workers)
# ----------------------------------------------------------------------------------------------------------

class _StandInDriver:
    """Stands in for the GPU driver: Triton asks it only which device to compile for."""

    def __init__(self, arch: str):
        self.arch = ARCHS[arch]

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget(self.arch.backend, self.arch.target, self.arch.warp_size)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _init_worker(arch: str, cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    import triton
    from triton import knobs

    triton.runtime.driver.set_active(_StandInDriver(arch))
    knobs.nvidia.dump_ptxas_log = True         # ptxas -v output goes to stdout: captured per compile
    knobs.compilation.always_compile = True    # a cached binary would come without its ptxas log


def nvidia_tool(name: str) -> str | None:
    """Path of Triton's bundled ``ptxas`` / ``ptxas_blackwell`` / ``nvdisasm``, or None when it is missing."""
    from triton import knobs
    tool = getattr(knobs.nvidia, name, None)
    return tool.path if tool is not None else None


def _base_record(task: dict) -> dict:
    return dict(arch=task["arch"], kernel=task["kind"], config=task["config"], features=task["feature"],
                feature_flags=FEATURES.get(task["feature"], {}), dtype=task["dtype"], head_dim=task["head_dim"],
                shipped=task["override"] is None)


def failed_record(task: dict, error: str) -> dict:
    """The record of a compile that raised or whose process died: ``compiled`` false, the compiler's words."""
    return dict(_base_record(task), compiled=False, error=error)


def compile_one(task: dict) -> dict:
    """Compile one (feature set, dtype, head dim, kernel, config) for ``task["arch"]`` and measure it."""
    from gim_fast.kernels.attention import _KERNELS

    arch = ARCHS[task["arch"]]
    kind = task["kind"]
    launch = plan_launches(task["feature"], task["dtype"], task["head_dim"], arch.name)[kind]
    cfg = (launch.configs()[task["index"]] if task["override"] is None
           else _override_config(kind, task["override"]))
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = _KERNELS[kind].warmup(*launch.args, grid=(1,), **launch.meta, **cfg.kwargs,
                                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    seconds = time.perf_counter() - start
    record = dict(_base_record(task), compiled=True, error=None, shared_bytes=int(compiled.metadata.shared),
                  compile_seconds=round(seconds, 2))
    record.update(analyse_dots(compiled.asm["ttgir"]))
    if arch.backend == "cuda":
        record.update(analyse_nvidia(log.getvalue(), compiled.asm["ptx"], compiled.asm["ttgir"],
                                     disassemble(compiled.asm["cubin"])))
    else:
        record.update(analyse_amd(compiled.asm["amdgcn"]))
    return record


def _worker(conn, arch: str, cache_dir: str, err_path: str) -> None:
    """A compiler process: compiles the tasks it is sent, one at a time, and sends back their records. Its
    stderr (where the compiler's own diagnostics go) is a file the parent reads when the process dies."""
    _init_worker(arch, cache_dir)
    while True:
        task = conn.recv()
        if task is None:
            return
        fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        os.close(fd)
        try:
            record = compile_one(task)
        except Exception as err:  # noqa: BLE001 - a compiler error is a result, not the end of the report
            record = failed_record(task, compiler_error(err, _read_tail(err_path)))
        conn.send(record)


def _read_tail(path: str, limit: int = 20000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


_DIAGNOSTIC = re.compile(r"(error:|Assertion|LLVM ERROR|Aborted|Segmentation|PassManager|Pipeline failed)",
                         re.IGNORECASE)


def compiler_error(err: BaseException | None, stderr: str) -> str:
    """One readable paragraph: the compiler's diagnostic lines from its stderr, then the exception raised."""
    lines = [line.strip() for line in stderr.splitlines() if _DIAGNOSTIC.search(line)]
    lines = [line[:400] for line in dict.fromkeys(lines)][:6]
    if err is not None:
        text = [line for line in str(err).strip().splitlines() if line.strip()] or [""]
        lines.append(f"{type(err).__name__}: {text[-1][:400]}")
    return " | ".join(lines) or "no diagnostic"


# ----------------------------------------------------------------------------------------------------------
# the worker pool: one task at a time per process, a dead process replaced
# ----------------------------------------------------------------------------------------------------------

def run_tasks(tasks: list, arch: str, jobs: int, cache_dir: str, on_record=None, worker=None) -> list:
    """Compile every task in ``jobs`` worker processes (``worker``, default :func:`_worker`); the records in task
    order. A worker that dies (a compiler abort) or overruns ``TASK_TIMEOUT`` yields a failed record for its
    task and is replaced."""
    ctx = multiprocessing.get_context("spawn")
    results: list = [None] * len(tasks)
    pending = list(range(len(tasks)))[::-1]
    done = 0

    def start():
        parent, child = ctx.Pipe()
        fd, err_path = tempfile.mkstemp(prefix="compile_report_", suffix=".stderr")
        os.close(fd)
        proc = ctx.Process(target=worker or _worker, args=(child, arch, cache_dir, err_path), daemon=True)
        proc.start()
        child.close()
        return dict(proc=proc, conn=parent, err=err_path, job=None, since=0.0)

    def feed(w):
        w["job"] = pending.pop() if pending else None
        if w["job"] is not None:
            w["since"] = time.monotonic()
            w["conn"].send(tasks[w["job"]])

    def finish(w, record):
        nonlocal done
        results[w["job"]] = record
        done += 1
        if on_record:
            on_record(done, len(tasks), record)

    def retire(w):
        with contextlib.suppress(OSError):
            os.unlink(w["err"])

    workers = [start() for _ in range(max(1, min(jobs, len(tasks))))]
    for w in workers:
        feed(w)
    try:
        while any(w["job"] is not None for w in workers):
            busy = [w for w in workers if w["job"] is not None]
            multiprocessing.connection.wait([w["conn"] for w in busy] + [w["proc"].sentinel for w in busy],
                                            timeout=5.0)
            for i, w in enumerate(workers):
                if w["job"] is None:
                    continue
                record = None
                if w["conn"].poll():
                    with contextlib.suppress(EOFError, OSError):
                        record = w["conn"].recv()
                if record is not None:
                    finish(w, record)
                    feed(w)
                    continue
                overrun = time.monotonic() - w["since"] > TASK_TIMEOUT
                if w["proc"].is_alive() and not overrun:
                    continue
                if overrun:
                    w["proc"].kill()
                w["proc"].join(10)
                why = (f"compiler process killed after {TASK_TIMEOUT} s" if overrun
                       else f"compiler process died (exit code {w['proc'].exitcode})")
                finish(w, failed_record(tasks[w["job"]], why + " | " + compiler_error(None, _read_tail(w["err"]))))
                retire(w)
                workers[i] = start()
                feed(workers[i])
    finally:
        for w in workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                w["conn"].send(None)
        for w in workers:
            w["proc"].join(10)
            if w["proc"].is_alive():
                w["proc"].kill()
            retire(w)
    return results


# ----------------------------------------------------------------------------------------------------------
# reading the compiler's output
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


_ALIAS = re.compile(r"^(#[\w.]+)\s*=\s*#(ttg|ttng)\.(\w+)<(.*)>\s*$", re.MULTILINE)
_DOT_OP = re.compile(r"(tt\.dot|ttng\.warp_group_dot|ttng\.tc_gen5_mma)\s+[^\n]*")
_OPERAND_SHAPE = re.compile(r"(?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x")
_RESULT_ENC = re.compile(r"->\s*tensor<[^,>]+,\s*(#[\w.]+)")


def analyse_dots(ttgir: str) -> dict:
    """What each dot of the final TTGIR became: ``dots`` {family: count} with family "mma.sync" (NVIDIA MMA v2),
    "wgmma", "tcgen05.mma", "mfma", "wmma" or "fma" (no tensor core), and ``dot_shapes`` {"family MxNxK": count}
    (the dot's whole shape, M×N from its output, K from its operands)."""
    aliases = {name: (kind, body) for name, _dialect, kind, body in _ALIAS.findall(ttgir)}
    dots, shapes = collections.Counter(), collections.Counter()
    for m in _DOT_OP.finditer(ttgir):
        op, line = m.group(1), m.group(0)
        if op == "ttng.warp_group_dot":
            family = "wgmma"
        elif op == "ttng.tc_gen5_mma":
            family = "tcgen05.mma"
        else:
            enc = _RESULT_ENC.search(line)
            kind, body = aliases.get(enc.group(1), ("?", "")) if enc else ("?", "")
            family = {"nvidia_mma": "mma.sync" if "versionMajor = 2" in body else "wgmma",
                      "amd_mfma": "mfma", "amd_wmma": "wmma", "blocked": "fma"}.get(kind, kind)
        dims = _OPERAND_SHAPE.findall(line)
        dots[family] += 1
        if len(dims) >= 2:
            (m_, k_), (_, n_) = dims[0], dims[1]
            shapes[f"{family} {m_}x{n_}x{k_}"] += 1
    return dict(dots=dict(sorted(dots.items())), dot_shapes=dict(sorted(shapes.items())))


_PTX_MMA = re.compile(r"\b(mma\.sync\.aligned\.(m\d+n\d+k\d+)|wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)|"
                      r"tcgen05\.mma\.cta_group::(\d)\.kind::(\w+))")


def ptx_mma(ptx: str) -> dict:
    """Tensor-core instructions of the PTX: {"mma.sync m16n8k16": count, "wgmma m64n128k16": …,
    "tcgen05.mma cta_group::1 kind::f16": …}."""
    out = collections.Counter()
    for m in _PTX_MMA.finditer(ptx):
        if m.group(2):
            out[f"mma.sync {m.group(2)}"] += 1
        elif m.group(3):
            out[f"wgmma {m.group(3)}"] += 1
        else:
            out[f"tcgen05.mma cta_group::{m.group(4)} kind::{m.group(5)}"] += 1
    return dict(sorted(out.items()))


def analyse_nvidia(ptxas_log: str, ptx: str, ttgir: str, sass: str) -> dict:
    ptxas = parse_ptxas_log(ptxas_log)
    tmem = re.search(r"tcgen05\.alloc\S*\s+\[[^\]]*\],\s*(\d+)", ptx)
    return dict(registers=ptxas["registers"], spills=ptxas["spill_stores"] + ptxas["spill_loads"],
                spill_stores=ptxas["spill_stores"], spill_loads=ptxas["spill_loads"],
                ptxas_warnings=ptxas["warnings"], tmem_columns=int(tmem.group(1)) if tmem else 0,
                mma_instructions=ptx_mma(ptx), **analyse_sass(sass))


_AMD_FIELD = {name: re.compile(rf"^\s*{pattern}\s*(\d+)", re.MULTILINE) for name, pattern in (
    ("vgprs", r"; NumVgprs:"), ("agprs", r"; NumAgprs:"), ("total_vgprs", r"; TotalNumVgprs:"),
    ("sgprs", r"; TotalNumSgprs:"), ("scratch_bytes", r"; ScratchSize:"), ("occupancy", r"; Occupancy:"),
    ("lds_bytes", r"\.group_segment_fixed_size:"), ("vgpr_spills", r"\.vgpr_spill_count:"),
    ("sgpr_spills", r"\.sgpr_spill_count:"))}
_MFMA = re.compile(r"\bv_mfma_(\w+)")


def analyse_amd(asm: str) -> dict:
    """Registers, spills, scratch, LDS, occupancy and MFMA instructions of an AMDGCN listing (its ``; Kernel
    info`` comments and the code-object metadata), and its inner loops."""
    values = {}
    for name, pattern in _AMD_FIELD.items():
        m = pattern.search(asm)
        values[name] = int(m.group(1)) if m else None
    spills = (values["vgpr_spills"] or 0) + (values["sgpr_spills"] or 0)
    mfma = collections.Counter(m.group(1) for m in _MFMA.finditer(asm))
    return dict(registers=values["total_vgprs"], spills=spills, **values,
                mma_instructions={f"v_mfma_{k}": n for k, n in sorted(mfma.items())}, **analyse_amdgcn_loops(asm))


# SASS: instructions, labels, branches, tensor-core instructions
_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.+?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_HGMMA = re.compile(r"\bHGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA = re.compile(r"\bHMMA\.")
_SASS_TC = re.compile(r"\b(HMMA|HGMMA|UTC\w*MMA)\b")
_PREDICATED = re.compile(r"^@!?U?P\w*\s")


def _skippable(body: list, labels: dict, start: int, branch=_BRANCH, predicated=_PREDICATED) -> int:
    """Instructions of a loop body (``body`` = instructions start, start+1, …) that a predicated forward branch
    inside the body jumps over: the conditional blocks (in these kernels chiefly the forward's lazy rescale, taken
    when a row's running max grew by more than its bound)."""
    skipped = set()
    for i, ins in enumerate(body):
        m = branch.search(ins)
        if m and predicated.search(ins):
            target = labels.get(m.group(1), -1) - start
            if i < target < len(body):      # inside the body (a jump to its end leaves the loop)
                skipped.update(range(i + 1, target))
    return len(skipped)


def _loops(instrs: list, labels: dict, branch, tensor_core, predicated) -> list:
    """(start, end, hot length) of each innermost loop doing tensor-core work, in program order."""
    loops = []
    for end, ins in enumerate(instrs):
        m = branch.search(ins)
        if m and labels.get(m.group(1), end + 1) <= end:
            loops.append((labels[m.group(1)], end))
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    out = []
    for a, b in sorted(innermost):
        body = instrs[a:b + 1]
        if any(tensor_core.search(i) for i in body):
            out.append((a, b, len(body) - _skippable(body, labels, a, branch, predicated)))
    return out


def _loop_facts(instrs: list, spans: list) -> dict:
    bodies = [instrs[a:b + 1] for a, b, _ in spans]
    steady = min(range(len(bodies)), key=lambda i: len(bodies[i])) if bodies else None
    return dict(loop_instructions=len(bodies[steady]) if bodies else None,      # whole body of the steady loop
                loop_hot_instructions=spans[steady][2] if bodies else None,     # the same less its conditional blocks
                loops=[len(b) for b in bodies], loops_hot=[h for _, _, h in spans],
                body=bodies[steady] if bodies else [])


def analyse_sass(sass: str) -> dict:
    """Tensor-core instructions of the whole kernel, and the innermost loops that do tensor-core work."""
    instrs, labels = [], {}
    for line in sass.splitlines():
        if m := _LABEL.match(line.strip()):
            labels[m.group(1)] = len(instrs)
        elif m := _INSTR.search(line):
            instrs.append(m.group(1))
    shapes = collections.Counter("x".join(m.groups()) for ins in instrs if (m := _HGMMA.search(ins)))
    spans = _loops(instrs, labels, _BRANCH, _SASS_TC, _PREDICATED)
    facts = _loop_facts(instrs, spans)
    body = facts.pop("body")
    return dict(
        hgmma_shapes=dict(sorted(shapes.items())),
        hgmma_min_n=min((int(s.split("x")[1]) for s in shapes), default=None),
        hmma=sum(bool(_HMMA.search(i)) for i in instrs),      # Ampere-style mma.sync instructions
        sass_tensor_core=dict(sorted(collections.Counter(
            m.group(1) for i in instrs if (m := _SASS_TC.search(i))).items())),
        **facts,
        loop_exp2=sum("MUFU.EX2" in i for i in body),
        loop_depbar=sum("WARPGROUP.DEPBAR" in i for i in body),
        loop_bar_sync=sum("BAR.SYNC" in i for i in body),
        sass_instructions=len(instrs),
    )


# AMDGCN: the kernel's instructions between its label and .Lfunc_end
_AMD_LABEL = re.compile(r"^(\.LBB\d+_\d+):")
_AMD_BRANCH = re.compile(r"\bs_c?branch\w*\s+(\.LBB\d+_\d+)")
_AMD_PREDICATED = re.compile(r"^s_cbranch")
_AMD_TC = re.compile(r"\bv_mfma|\bv_wmma")


def analyse_amdgcn_loops(asm: str) -> dict:
    instrs, labels, inside = [], {}, False
    for raw in asm.splitlines():
        line = raw.split(";")[0].rstrip()
        stripped = line.strip()
        if re.match(r"^_\w+:", stripped):
            inside = True
            continue
        if stripped.startswith(".Lfunc_end"):
            inside = False
        if not inside or not stripped:
            continue
        if m := _AMD_LABEL.match(stripped):
            labels[m.group(1)] = len(instrs)
        elif not stripped.startswith(".") and raw.startswith("\t"):
            instrs.append(stripped)
    spans = _loops(instrs, labels, _AMD_BRANCH, _AMD_TC, _AMD_PREDICATED)
    facts = _loop_facts(instrs, spans)
    body = facts.pop("body")
    return dict(**facts, loop_exp2=sum(i.startswith("v_exp_f32") for i in body), asm_instructions=len(instrs))


# ----------------------------------------------------------------------------------------------------------
# verdicts and output
# ----------------------------------------------------------------------------------------------------------

def is_16bit_shipped(r) -> bool:
    return r["shipped"] and r["dtype"] in ("bf16", "fp16")


def wrong_instruction(r, arch: str) -> list:
    """The dot families of a record other than its architecture's own tensor-core instruction (checked at head
    dims up to 128; at 256 register pressure rules, see _HOPPER_CONFIGS)."""
    if r["head_dim"] > 128 or not r.get("dots"):
        return []
    return [f for f in r["dots"] if f != ARCHS[arch].mma]


def failures(records: list, arch: str = DEFAULT_ARCH) -> list:
    """Shipped 16-bit configurations that do not compile, spill, draw a serialisation warning, need more shared
    memory than a block may have on ``arch``, or use another dot instruction than the arch's own (the report's
    exit status)."""
    limit = ARCHS[arch].shared_bytes
    bad = []
    for r in records:
        if not is_16bit_shipped(r):
            continue
        where = f"{r['kernel']} {_cfg(r)} {r['dtype']} D={r['head_dim']} {r['features']}"
        if not r.get("compiled", True):
            bad.append(f"{where}: does not compile: {r.get('error')}")
            continue
        serial = [w for w in r.get("ptxas_warnings", []) if SERIALISATION.search(w)]
        scratch = r.get("scratch_bytes") or 0
        wrong = wrong_instruction(r, arch)
        if r["spills"] or scratch or serial or r["shared_bytes"] > limit or wrong:
            bad.append(f"{where}: spills {r['spills']}" + (" registers" if "vgpr_spills" in r else " B")
                       + (f", scratch {scratch} B" if scratch else "")
                       + f", shared memory {r['shared_bytes']} B (limit {limit})"
                       + (f", {serial[0]}" if serial else "")
                       + (f", dots as {'/'.join(wrong)} instead of {ARCHS[arch].mma}" if wrong else ""))
    return bad


def _cfg(r) -> str:
    c = r["config"]
    return "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N") if c.get(k) is not None) + f" w{c['num_warps']} " \
        f"s{c['num_stages']}" + (f" {c['tiling']}" if c.get("tiling") else "")


def targets(records: list, arch: str = DEFAULT_ARCH) -> list:
    """The compiled targets, each as (target, value, met): no failing shipped config on every architecture; on
    sm_90a also the inner-loop and warpgroup-MMA targets of the Hopper work."""
    shipped16 = [r for r in records if is_16bit_shipped(r)]
    bad = failures(records, arch)
    out = [(f"every shipped bf16/fp16 config compiles for {arch} without spills or serialisation warnings, "
            f"within {ARCHS[arch].shared_bytes} B of shared memory, dots at D <= 128 as {ARCHS[arch].mma}",
            f"{len(bad)} of {len(shipped16)} compiled kernels fail", not bad)]
    if arch != "sm_90a":
        return out

    def fwd_loop(feature):
        return [r for r in records if r["kernel"] == "fwd" and r["features"] == feature and r["head_dim"] == 128
                and r["dtype"] == "bf16" and (r["config"]["BLOCK_M"], r["config"]["BLOCK_N"]) == (128, 64)
                and r.get("loop_instructions")]
    off, t2 = fwd_loop("causal"), fwd_loop("causal-T2")
    if off:
        n_off = min(r["loop_instructions"] for r in off)
        h_off = min(r["loop_hot_instructions"] for r in off)
        out.append(("forward inner loop, T off, 128x64, D = 128, bf16: <= 400 SASS instructions (whole loop body)",
                    f"{n_off} (hot path {h_off})", n_off <= 400))
        if t2:
            n_t2 = min(r["loop_instructions"] for r in t2)
            h_t2 = min(r["loop_hot_instructions"] for r in t2)
            out.append(("same loop with T = 2: <= 1.35x the T-off loop, hot path (the lazy-rescale block, taken "
                        "only when a row's max grew by more than 2^8, left out)",
                        f"{h_t2} vs {h_off} ({h_t2 / h_off:.2f}x)", h_t2 <= 1.35 * h_off))
            out.append(("the same ratio over the whole loop body (rescale block included)",
                        f"{n_t2} vs {n_off} ({n_t2 / n_off:.2f}x)", n_t2 <= 1.35 * n_off))
    else:
        out.append(("forward inner loop, T off, 128x64, D = 128, bf16", "no 128x64 forward config compiled", False))
    for kind in ("dkdv", "dq"):
        for head_dim in HEAD_DIMS:
            rs = [r for r in shipped16 if r["kernel"] == kind and r["head_dim"] == head_dim and r.get("compiled", True)]
            if rs:
                wg = [r["hgmma_min_n"] for r in rs if r.get("hgmma_min_n")]
                sync = sum(1 for r in rs if r.get("hmma"))
                value = f"narrowest n = {min(wg)}" if wg else "no warpgroup MMA"
                value += f"; {sync} of {len(rs)} kernels use mma.sync" if sync else ""
                out.append((f"{kind}, D = {head_dim}: every S/dP GEMM a warpgroup MMA at least 64 wide "
                            "(n of HGMMA m x n x k), shipped 16-bit configs", value,
                            bool(wg) and min(wg) >= 64 and not sync))
    return out


def _loops_cell(r) -> str:
    if not r.get("loops"):
        return "–"
    hot = f"{r['loop_hot_instructions']} / " if r["loop_hot_instructions"] != r["loop_instructions"] else ""
    return f"{hot}{r['loop_instructions']} ({', '.join(map(str, r['loops']))})"


def _dots_cell(r) -> str:
    return ", ".join(f"{s}×{n}" for s, n in r.get("dot_shapes", {}).items()) or "–"


def markdown(records: list, meta: dict) -> str:
    arch = ARCHS[meta["target"]]
    nvidia = arch.backend == "cuda"
    compiler = f"ptxas {meta['ptxas']}" if nvidia else "the AMDGPU LLVM backend bundled with Triton"
    lines = [f"# Attention kernels compiled for {arch.name} ({arch.gpus}) — compiled facts, not timings", "",
             f"`{meta['command']}` — Triton {meta['triton']}, {compiler}, {meta['date']}, "
             f"{len(records)} kernels in {meta['seconds']:.0f} s"
             + (f" ({meta['reused_records']} of them records of earlier compiles, reused from the cache)"
                if meta.get("reused_records") else "")
             + f". Shape: B = {SHAPE['batch']}, "
             f"Hq = {SHAPE['q_heads']}, Hkv = {SHAPE['kv_heads']}, S = {SHAPE['seq']}. Limits per block: "
             f"{arch.shared_bytes} B of {'shared memory' if nvidia else 'LDS'}, {arch.registers} registers a "
             f"{'thread' if nvidia else 'lane'}; tensor-core instruction: {arch.mma}. Configuration table: "
             f"`{meta['table']}`. Generated by `bench/compile_report.py`; the JSON beside this file has every "
             "field.", "", "## Targets", "", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in targets(records, arch.name)]
    bad = failures(records, arch.name)
    lines += ["", "Inner loop: hot path / whole body (all inner loops), in machine instructions; hot path = the "
              "loop body without its conditional blocks (chiefly the forward's lazy rescale, taken only on tiles "
              "where a row's running max grew by more than 2^8); one number = no conditional block. Dots: the "
              "instruction family each dot of the kernel became and its whole M×N×K.", "",
              f"Failures (shipped 16-bit configs that do not compile, spill, draw serialisation warnings, exceed "
              f"{arch.shared_bytes} B of shared memory or use another dot instruction): {len(bad)}", ""]
    lines += [f"- {b}" for b in bad]
    for kind in KINDS:
        rows = [r for r in records if r["kernel"] == kind]
        if not rows:
            continue
        if nvidia:
            head = ("| D | dtype | features | config | shipped | regs | spills B | smem KiB | TMEM cols | dots | "
                    "inner loop | EX2 in loop | ptxas notes |")
        else:
            head = ("| D | dtype | features | config | shipped | VGPRs (arch + acc) | SGPRs | spilled regs | "
                    "scratch B | LDS KiB | occupancy | dots | MFMA instructions | inner loop |")
        lines += ["", f"## {kind}", "", head, "|" + "---|" * head.count(" | ") + "---|"]
        for r in rows:
            lead = (f"| {r['head_dim']} | {r['dtype']} | {r['features']} | {_cfg(r)} | "
                    f"{'yes' if r['shipped'] else 'no'} | ")
            if not r.get("compiled", True):
                cols = head.count(" | ") - 4
                lines.append(lead + f"**does not compile**: {r['error'][:300]} |" + " |" * (cols - 1))
                continue
            if nvidia:
                notes = "; ".join(sorted({re.sub(r".*?\((C\d+)\).*", r"\1", w) for w in r["ptxas_warnings"]}))
                lines.append(lead + f"{r['registers']} | {r['spills']} | {r['shared_bytes'] / 1024:.0f} | "
                             f"{r['tmem_columns'] or '–'} | {_dots_cell(r)} | {_loops_cell(r)} | {r['loop_exp2']} | "
                             f"{notes or '–'} |")
            else:
                mfma = ", ".join(f"{k.removeprefix('v_mfma_')}×{n}" for k, n in r["mma_instructions"].items()) or "–"
                lines.append(lead + f"{r['vgprs']} + {r['agprs']} | {r['sgprs']} | {r['spills']} | "
                             f"{r['scratch_bytes']} | {r['shared_bytes'] / 1024:.0f} | {r['occupancy']} | "
                             f"{_dots_cell(r)} | {mfma} | {_loops_cell(r)} |")
    return "\n".join(lines) + "\n"


def _parse_config(text: str) -> tuple:
    *numbers, last = text.split(",")
    if last in ("rows", "keys"):
        return (*(int(x) for x in numbers), last)
    return tuple(int(x) for x in text.split(","))


def build_tasks(arch: str, plan: dict, head_dims, kernels, features, overrides, quick: bool,
                dtypes=None) -> list:
    """The compile tasks of one architecture (each with its configuration, named in the parent so that a task
    whose compiler dies is still reported by its configuration)."""
    tasks = []
    for head_dim in head_dims or plan:
        for dtype, feature in plan.get(head_dim, PLAN[head_dim]):
            if (features and feature not in features) or (dtypes and dtype not in dtypes):
                continue
            launches = plan_launches(feature, dtype, head_dim, arch)
            for kind in kernels:
                if kind not in launches or (kind == "delta" and feature != "causal-T2"):
                    continue   # Δ_T does not depend on the features: compiled once per head dim and dtype
                base = dict(arch=arch, feature=feature, dtype=dtype, head_dim=head_dim, kind=kind)
                if overrides:
                    tasks += [dict(base, index=0, override=c, config=_config_tuple(_override_config(kind, c)))
                              for c in overrides if kind != "delta"]
                    continue
                configs = launches[kind].configs()
                for i, cfg in enumerate(configs[:1] if quick else configs):
                    tasks.append(dict(base, index=i, override=None, config=_config_tuple(cfg)))
    return tasks


RECORD_VERSION = 1   # bump when compile_one or the analysis changes what a record holds: cached records expire


def _cache_key(task: dict) -> str:
    """The kernel's Triton cache key (its source and every jitted function it calls), the launch's constexpr
    flags, RECORD_VERSION, the Triton version and the task (its configuration, not whether it is shipped)."""
    import triton
    from gim_fast.kernels.attention import _KERNELS

    launch = plan_launches(task["feature"], task["dtype"], task["head_dim"], task["arch"])[task["kind"]]
    h = hashlib.sha256()
    h.update(str(RECORD_VERSION).encode())
    h.update(_KERNELS[task["kind"]].cache_key.encode())
    h.update(json.dumps(launch.meta, sort_keys=True, default=str).encode())
    h.update(triton.__version__.encode())
    same = {k: v for k, v in task.items() if k not in ("index", "override")}   # a candidate and a shipped config alike
    h.update(json.dumps(same, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _toolchain(arch: str) -> str:
    a = ARCHS[arch]
    if a.backend != "cuda":
        return "AMDGPU backend of Triton's LLVM"
    tool = nvidia_tool("ptxas_blackwell" if a.target >= 100 else "ptxas")
    if tool is None:
        return "missing"
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1] if out else "unknown"


def report_arch(arch: str, args, argv) -> int:
    """Compile and write one architecture's report; its exit status."""
    import triton
    from gim_fast.kernels.attention import config_table

    a = ARCHS[arch]
    if a.backend == "cuda" and (nvidia_tool("ptxas") is None or nvidia_tool("nvdisasm") is None):
        print("compile_report: Triton's bundled ptxas/nvdisasm are missing; nothing compiled", file=sys.stderr)
        return 2
    plan = QUICK_PLAN if args.quick else PLAN
    tasks = build_tasks(arch, plan, args.head_dims, args.kernels, args.features, args.config, args.quick,
                        args.dtypes)
    cached, todo = {}, []
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
        for i, task in enumerate(tasks):
            path = args.cache / f"{_cache_key(task)}.json"
            if path.exists():
                cached[i] = dict(json.loads(path.read_text()), shipped=task["override"] is None)
            else:
                todo.append(i)
    else:
        todo = list(range(len(tasks)))

    def show(i, n, record):
        tail = (f"regs {record['registers']} spills {record['spills']} smem {record['shared_bytes']} "
                f"dots {','.join(record['dots']) or '-'} loop {record['loop_instructions']}"
                + (f" WARN {len(record['ptxas_warnings'])}" if record.get("ptxas_warnings") else "")
                if record["compiled"] else "FAILED " + record["error"][:200])
        print(f"[{arch} {i}/{n}] {record['kernel']:5} D={record['head_dim']:3} {record['dtype']} "
              f"{record['features']:18} {_cfg(record):18} {tail}", flush=True)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache_dir:
        fresh = run_tasks([tasks[i] for i in todo], arch, args.jobs, cache_dir, show) if todo else []
    seconds = time.perf_counter() - start
    records = [None] * len(tasks)
    for i, record in cached.items():
        records[i] = record
    for i, record in zip(todo, fresh):
        records[i] = record
        if args.cache and record["compiled"]:
            (args.cache / f"{_cache_key(tasks[i])}.json").write_text(json.dumps(record))
    words = list(argv if argv is not None else sys.argv[1:])
    for i, w in enumerate(words[:-1]):
        if w in ("--cache", "--out"):      # where files go on this machine: not part of what was compiled
            words[i + 1] = "DIR"
    command = "python bench/compile_report.py " + " ".join(words)
    meta = dict(command=command.strip(), triton=triton.__version__, ptxas=_toolchain(arch),
                date=time.strftime("%Y-%m-%d"), seconds=seconds, target=arch, table=config_table(arch),
                limits=a._asdict(), shape=SHAPE, reused_records=len(cached))
    stem = args.name or output_stem(arch)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(records, meta))
    for t, v, ok in targets(records, arch):
        print(f"{'ok  ' if ok else 'MISS'} {arch}: {t}: {v}")
    bad = failures(records, arch)
    print(f"{arch}: {len(records)} kernels ({len(cached)} reused) in {seconds:.0f} s; {len(bad)} failing; wrote "
          f"{args.out / (stem + '.json')} and .md")
    for b in bad:
        print("  FAIL", b)
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=DEFAULT_ARCH, choices=list(ARCHS) + ["all"],
                        help=f"target architecture, or all of them in turn (default {DEFAULT_ARCH})")
    parser.add_argument("--quick", action="store_true", help="one config per kernel, two feature sets, D = 128")
    parser.add_argument("--kernels", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--head-dims", type=int, nargs="+", choices=HEAD_DIMS, default=None)
    parser.add_argument("--features", nargs="+", choices=list(FEATURES), default=None,
                        help="only these feature sets (bf16 and fp16 as planned)")
    parser.add_argument("--dtypes", nargs="+", choices=("bf16", "fp16"), default=None,
                        help="only these operand types (default: as planned)")
    parser.add_argument("--config", type=_parse_config, action="append", metavar="M,N,WARPS,STAGES[,rows]",
                        help="compile this candidate instead of the shipped configs (repeatable; recorded with "
                        "shipped=false, never fails the run); ',rows': the dK/dV kernel's S = Q Kᵀ tiling")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes (default 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default=None, help="output file stem (one architecture only)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="reuse records compiled before from this folder (same sources, Triton, target, task)")
    args = parser.parse_args(argv)
    if args.name and args.arch == "all":
        parser.error("--name names one architecture's files; not with --arch all")

    os.environ.pop("TRITON_INTERPRET", None)
    archs = list(ARCHS) if args.arch == "all" else [args.arch]
    status = 0
    for arch in archs:
        status = max(status, report_arch(arch, args, argv))
    return status


if __name__ == "__main__":
    sys.exit(main())
