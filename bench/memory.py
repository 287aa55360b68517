"""gim_fast's memory estimate against the measured peak of one attribution, over a grid of cases.

    python bench/memory.py                      # the CPU grid (indicative on a shared machine), ~30 min
    python bench/memory.py --gpu                # the same grid on CUDA: torch.cuda.max_memory_allocated
    python bench/memory.py --quick              # a few points, a minute
    python bench/memory.py --llama8b            # Llama-3.1-8B, random bf16, explain of 2,048 tokens (needs ~17 GB)

Each case (model, tokens, batch, dtype, backend, checkpointing) runs in a fresh child process, so that its peak
is its own: the model is built, then

* CPU: freed heap memory is handed back to the system (``malloc_trim``), the kernel's peak-RSS counter is reset
  (``/proc/self/clear_refs``), and the peak is ``VmHWM`` after the call minus ``VmRSS`` before it: the
  resident memory the call added at its worst moment, allocator and framework included (one first call, as a
  user makes it).
* CUDA: ``max_memory_allocated`` minus ``memory_allocated`` before the call (also ``max_memory_reserved``, the
  caching allocator's share, for the record).

With ``--tensors`` the child also tracks every tensor storage created during the call (a dispatch mode) and
reports the peak of live tensor bytes: the measured peak minus that is what the allocator and framework added.
The estimate is ``gim_fast.estimate_memory`` for the same case; a case passes when measured ≤ estimate ≤ 1.3 ×
measured. Rows go to ``<out>/memory_<grid>_<device>.csv/.json/.md``. Cases whose estimate exceeds ``--max-gib``
are skipped (the shared development machine has 24 GB).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import resource
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import environment, is_oom, write_rows  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BOUND = 1.3  # an estimate may over-estimate the measured peak by at most this factor

# (model spec, lengths, dtypes, backends, checkpointing, batches) of the default grid. A model spec is either a
# shipped model name or "config:<name>:<layers>:<vocab>" (bench/configs.py, random weights, fewer layers and a
# smaller vocabulary than published: per-layer costs are what matter, and the vocabulary only sizes the
# embedding tables — the logits are computed at the target position only). The Llama-3.1-8B rows check the
# shapes of a big model (tensors above glibc's mmap threshold); the Triton backend is left out: on the CPU it
# runs under the interpreter, far too slow at these lengths.
LENGTHS = (512, 1024, 2048, 4096, 8192)
GRID = [
    ("smollm2-135m", LENGTHS, ("fp32", "bf16"), ("torch",), (False, True), (1,)),
    ("smollm2-135m", LENGTHS[:4], ("fp32", "bf16"), ("eager",), (False, True), (1,)),
    ("gemma3-270m", LENGTHS, ("fp32", "bf16"), ("torch",), (False, True), (1,)),
    ("gemma3-270m", LENGTHS[:4], ("fp32", "bf16"), ("eager",), (False, True), (1,)),
    ("config:llama-3.1-8b:2:32768", LENGTHS, ("bf16",), ("torch",), (False, True), (1,)),
    ("smollm2-135m", (1024,), ("fp32",), ("torch",), (False,), (4,)),
]
QUICK = [
    ("smollm2-135m", (512,), ("fp32", "bf16"), ("torch",), (False, True), (1,)),
    ("smollm2-135m", (512,), ("fp32",), ("eager",), (False,), (1,)),
]


# ----------------------------------------------------------------------------------------------- child process
def build_model(spec: str, dtype: torch.dtype, device: str):
    if spec.startswith("config:"):
        from configs import build

        _, name, layers, vocab = spec.split(":")
        return build(name, dtype=dtype, device=device, layers=int(layers), vocab_size=int(vocab))
    from gim_fast.models import load_pretrained

    model, _ = load_pretrained(spec, dtype=dtype)
    return model.to(device)


def _proc_status() -> dict[str, int]:
    """Bytes of VmRSS and VmHWM (peak resident set) of this process."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_cpu_peak() -> int:
    """Hand freed heap memory back to the system, reset the peak-RSS counter; return the resident bytes."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to VmRSS (Linux ≥ 4.0)
    return _proc_status()["VmRSS"]


class LiveTensors:
    """Peak bytes of tensor storages created inside the block and still alive (a dispatch mode; diagnostics)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor)}
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                        tracker._add(t.untyped_storage())
                return out

        self._mode = Mode()

    def _add(self, storage):
        key, n = storage.data_ptr(), storage.nbytes()
        if n == 0 or key in self._sizes:
            return
        self._sizes[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._drop, key)  # storages keep their Python object until they die

    def _drop(self, key):
        self.live -= self._sizes.pop(key, 0)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def child(args) -> dict:
    """Measure one case in this process and return its row."""
    import gim_fast

    device = "cuda" if args.gpu else "cpu"
    dtype = DTYPES[args.dtype]
    model = build_model(args.model, dtype, device)
    with torch.no_grad():  # page in weights that are still mapped from their file (safetensors loads lazily)
        for t in itertools.chain(model.parameters(), model.buffers()):
            t.sum()
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    ckpt = {"auto": "auto", "on": True, "off": False}[args.checkpointing]
    est = gim_fast.estimate_memory(model.config, args.seq, args.batch, dtype=dtype, backend=args.backend,
                                   checkpointing=ckpt is True, device=device)
    row = {"estimate_bytes": est.total, "estimate_tensor_bytes": est.tensors,
           "estimate_parts": {k: int(v) for k, v in est.parts.items()}}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    else:
        base = _reset_cpu_peak()
    tracker = LiveTensors() if args.tensors else None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    try:
        with tracker or _Nothing():
            gim_fast.explain(model, ids, baseline_token_id=0, backend=args.backend, checkpointing=ckpt)
    except gim_fast.InsufficientMemoryError as err:
        return {**row, "status": "refused", "detail": str(err).splitlines()[0]}
    except Exception as err:  # noqa: BLE001 - an out-of-memory error is a result
        if not is_oom(err):
            raise
        return {**row, "status": "oom", "detail": str(err).splitlines()[0][:200]}
    if device == "cuda":
        torch.cuda.synchronize()
        row["measured_bytes"] = torch.cuda.max_memory_allocated() - base
        row["reserved_bytes"] = torch.cuda.max_memory_reserved() - base_reserved
    else:
        row["measured_bytes"] = _proc_status()["VmHWM"] - base
    if tracker is not None:
        row["tensor_bytes"] = tracker.peak
    after = resource.getrusage(resource.RUSAGE_SELF)
    row.update(status="ok", seconds=round(time.perf_counter() - start, 2),
               cpu_seconds=round(after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime, 2),
               page_faults=after.ru_minflt - usage.ru_minflt)
    return row


def llama8b_child(args) -> dict:
    """Llama-3.1-8B's published config with random bf16 weights explains ``--seq`` tokens, in this process."""
    import gim_fast
    from configs import build
    from gim_fast.memory import available_memory, format_bytes, plan_checkpointing

    device = "cuda" if args.gpu else "cpu"
    row = {"model": "llama-3.1-8b (random bf16 weights)", "seq": args.seq, "batch": 1, "dtype": "bf16",
           "available_before_load_bytes": available_memory(torch.device(device))}
    start = time.perf_counter()
    model = build("llama-3.1-8b", dtype=torch.bfloat16, device=device)
    row["load_seconds"] = round(time.perf_counter() - start, 1)
    row["resident_after_load_bytes"] = _proc_status()["VmRSS"]
    row["available_after_load_bytes"] = available_memory(torch.device(device))
    backend = "triton" if device == "cuda" else "torch"
    for ckpt in (False, True):
        est = gim_fast.estimate_memory(model.config, args.seq, 1, dtype=torch.bfloat16, backend=backend,
                                       checkpointing=ckpt, device=device)
        row[f"estimate_{'with' if ckpt else 'without'}_checkpointing_bytes"] = est.total
        print(est, file=sys.stderr)
    ids = torch.randint(1, model.config.vocab_size, (args.seq,), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    try:
        row["checkpointing"] = plan_checkpointing(model, args.seq, 1, backend=backend, num_targets=1)
        base = _reset_cpu_peak() if device == "cpu" else torch.cuda.memory_allocated()
        start = time.perf_counter()
        scores = gim_fast.explain(model, ids, baseline_token_id=0, backend=backend)
    except gim_fast.InsufficientMemoryError as err:
        row.update(status="refused", detail=str(err).splitlines()[0])
        return row
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["measured_bytes"] = (_proc_status()["VmHWM"] if device == "cpu" else torch.cuda.max_memory_allocated()) - base
    row["finite_scores"] = bool(torch.isfinite(scores).all())
    row["status"] = "finished"
    print(f"peak above the model {format_bytes(row['measured_bytes'])}", file=sys.stderr)
    return row


def run_llama8b(args) -> dict:
    """Run ``llama8b_child`` in a child process (so that a kill is seen) and write its row."""
    env = environment(torch.device("cuda" if args.gpu else "cpu"))
    cmd = [sys.executable, __file__, "--child", "--llama8b", "--seq", str(args.seq)] + ["--gpu"] * args.gpu
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        killed = proc.returncode in (-9, 137)
        row = {"status": "killed" if killed else "error",
               "detail": "the process was killed (out of memory)" if killed else f"exit status {proc.returncode}"}
    else:
        row = json.loads(lines[-1])
    row.update(env)
    tag = env["device"].split("(")[0].strip().replace(" ", "_").lower()
    paths = write_rows([row], args.out, f"memory_llama8b_{args.seq}_{tag}")
    gib = lambda key: f"{row[key] / 2**30:.2f} GiB" if key in row else "?"  # noqa: E731
    text = (f"Llama-3.1-8B, random bf16 weights, explain of {args.seq} tokens: **{row['status']}**"
            + (f" ({'with' if row.get('checkpointing') else 'without'} checkpointing, {row.get('seconds')} s, "
               f"peak above the model {gib('measured_bytes')})" if row["status"] == "finished" else
               f": {row.get('detail', '')}")
            + f"\n\nresident after loading {gib('resident_after_load_bytes')}; available before loading "
              f"{gib('available_before_load_bytes')}, after {gib('available_after_load_bytes')}; estimate "
              f"without checkpointing {gib('estimate_without_checkpointing_bytes')}, with "
              f"{gib('estimate_with_checkpointing_bytes')}\n\n{env['device']}; torch {env['torch']}, transformers "
              f"{env['transformers']}; {env['date']}\n")
    (args.out / f"memory_llama8b_{args.seq}_{tag}.md").write_text(text)
    print(text)
    print("wrote", *paths)
    return row


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------- parent process
def cases(grid):
    for spec, seqs, dtypes, backends, ckpts, batches in grid:
        for seq, dtype, backend, ckpt, batch in itertools.product(seqs, dtypes, backends, ckpts, batches):
            yield dict(model=spec, seq=seq, batch=batch, dtype=dtype, backend=backend, checkpointing=ckpt)


def config_of(spec: str):
    """The config of a model spec, without building the model (for skipping cases that would not fit)."""
    if spec.startswith("config:"):
        from transformers import AutoConfig

        from configs import CONFIGS

        _, name, layers, vocab = spec.split(":")
        model_type, kwargs = CONFIGS[name]
        return AutoConfig.for_model(model_type, **{**kwargs, "num_hidden_layers": int(layers),
                                                   "vocab_size": int(vocab)})
    from transformers import AutoConfig

    from gim_fast.models import cache_path

    return AutoConfig.from_pretrained(cache_path(spec))


def measure(case: dict, *, gpu: bool, tensors: bool, lock: str | None = None) -> dict:
    cmd = ["flock", lock] if lock else []
    cmd += [sys.executable, __file__, "--child", "--model", case["model"], "--seq", str(case["seq"]), "--batch",
           str(case["batch"]), "--dtype", case["dtype"], "--backend", case["backend"], "--checkpointing",
           "on" if case["checkpointing"] else "off"]
    cmd += ["--gpu"] * gpu + ["--tensors"] * tensors
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        if proc.returncode in (-9, 137):
            return {"status": "killed", "detail": "the process was killed (out of memory)"}
        return {"status": "error", "detail": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(lines[-1])


def judge(row: dict) -> dict:
    if row.get("status") == "ok" and row.get("measured_bytes"):
        row["ratio"] = round(row["estimate_bytes"] / row["measured_bytes"], 3)
        row["within_bound"] = row["measured_bytes"] <= row["estimate_bytes"] <= BOUND * row["measured_bytes"]
    return row


def summary(rows) -> str:
    mib = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
    lines = ["| model | tokens | batch | dtype | backend | ckpt | estimate MiB | measured MiB | tensors MiB | "
             "estimate / measured |", "|---|---:|---:|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("status") == "ok":
            cells = [mib(r["estimate_bytes"]), mib(r["measured_bytes"]),
                     mib(r["tensor_bytes"]) if r.get("tensor_bytes") else "",
                     f"{r['ratio']:.2f}" + ("" if r["within_bound"] else " ✗")]
        else:
            cells = [mib(r["estimate_bytes"]) if r.get("estimate_bytes") else "", r.get("status", "?"), "", ""]
        lines.append(f"| {r['model']} | {r['seq']} | {r['batch']} | {r['dtype']} | {r['backend']} | "
                     f"{'on' if r['checkpointing'] else 'off'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_grid(args, grid, name: str) -> list[dict]:
    import gim_fast

    device = "cuda" if args.gpu else "cpu"
    env = environment(torch.device(device))
    rows = []
    for case in cases(grid):
        if (args.models and not any(m in case["model"] for m in args.models)) or \
                (args.seqlens and case["seq"] not in args.seqlens):
            continue
        est = gim_fast.estimate_memory(config_of(case["model"]), case["seq"], case["batch"],
                                       dtype=DTYPES[case["dtype"]], backend=case["backend"],
                                       checkpointing=case["checkpointing"], device=device)
        if est.total > args.max_gib * 2**30:
            row = {**case, "status": "skipped", "estimate_bytes": est.total}
        else:
            lock = args.heavy_lock if est.total > 4 * 2**30 else None
            row = judge({**case, **measure(case, gpu=args.gpu, tensors=args.tensors, lock=lock)})
        rows.append({**row, **env})
        shown = (f"estimate {row['estimate_bytes'] / 2**20:8.0f} MiB  measured {row['measured_bytes'] / 2**20:8.0f}"
                 f" MiB  ratio {row['ratio']:.2f}{'' if row['within_bound'] else '  OUT OF BOUND'}"
                 if row["status"] == "ok" else f"{row['status']} {row.get('detail', '')}")
        print(f"{case['model']:30} {case['seq']:6} ×{case['batch']} {case['dtype']:4} {case['backend']:6} "
              f"ckpt {'on ' if case['checkpointing'] else 'off'}  {shown}", flush=True)
    tag = env["device"].split("(")[0].strip().replace(" ", "_").lower()
    stem = f"memory_{name}_{tag}"
    flat = [{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rows]
    paths = write_rows(flat, args.out, stem)
    ok = [r for r in rows if r["status"] == "ok"]
    verdict = (f"{sum(r['within_bound'] for r in ok)} of {len(ok)} measured cases within measured ≤ estimate ≤ "
               f"{BOUND} × measured")
    (args.out / f"{stem}.md").write_text(
        f"# gim_fast memory estimate vs measured peak ({name} grid)\n\n{env['device']}; torch {env['torch']}, "
        f"transformers {env['transformers']}; {env['date']}\n\n{verdict}\n\n{summary(rows)}\n")
    print(verdict)
    print("wrote", *paths, args.out / f"{stem}.md")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="measure on CUDA (max_memory_allocated)")
    parser.add_argument("--quick", action="store_true", help="a few small points instead of the full grid")
    parser.add_argument("--llama8b", action="store_true", help="the Llama-3.1-8B case (see the module docstring)")
    parser.add_argument("--tensors", action="store_true", help="also track the peak of live tensor bytes")
    parser.add_argument("--max-gib", type=float, default=6.0, help="skip cases whose estimate exceeds this")
    parser.add_argument("--models", nargs="+", help="only the grid's models whose spec contains one of these")
    parser.add_argument("--seqlens", type=int, nargs="+", help="only these lengths of the grid")
    parser.add_argument("--heavy-lock", help="run cases estimated above 4 GiB under `flock` on this file")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=2048, help="tokens of the --llama8b case (default 2048)")
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: CUDA is not available")
    if args.child:
        print(json.dumps(llama8b_child(args) if args.llama8b else child(args)), flush=True)
        return
    if args.llama8b:
        row = run_llama8b(args)
        sys.exit(0 if row["status"] in ("finished", "refused") else 1)
    run_grid(args, QUICK if args.quick else GRID, "quick" if args.quick else "grid")


if __name__ == "__main__":
    main()
