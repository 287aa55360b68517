"""gim_fast's memory estimate against the measured peak of one attribution, over a grid of cases.

    python bench/memory.py                      # the CPU grid, SmolLM2-135M, Gemma-3-270M, Llama-8B layers (~2 h)
    python bench/memory.py --gpu                # the same grid on CUDA: torch.cuda.max_memory_allocated
    python bench/memory.py --quick              # a few points, a few minutes
    python bench/memory.py --llama8b            # Llama-3.1-8B, random bf16: explain of 256, then 2,048 tokens
    python bench/memory.py --offload-grid       # SmolLM2-135M with its layers on disk (accelerate), ~10 min

``--llama8b`` builds the whole model (16 GB of weights) once in a child process and explains each length in turn:
each must either finish (with checkpointing where the estimate says so) or be refused with
``InsufficientMemoryError`` before anything runs; a kill (the kernel's OOM killer) is a failure, exit status 1.
Rows go to ``<out>/memory_llama8b_<device>.csv/.json/.md``.

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
are skipped (the shared development machine has 24 GB). The peak is never read from ``getrusage``: an exec'd child's
``ru_maxrss`` starts at its parent's peak at fork time.
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
from common import environment, is_oom, proc_status, write_rows  # noqa: E402

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
# Layers offloaded to disk by accelerate (every one, or every other one), checkpointing on and off: the estimate
# of the loaded model (``gim_fast.memory.model_estimates``, which counts the weights the forward and the backward
# load) against the measured peak. The 7th entry is the offload layouts.
OFFLOAD = [
    ("smollm2-135m", (512, 1024, 2048), ("fp32",), ("torch",), (True, False), (1,), ("disk", "half")),
]
QUICK = [
    ("smollm2-135m", (512,), ("fp32", "bf16"), ("torch",), (False, True), (1,)),
    ("smollm2-135m", (512,), ("fp32",), ("eager",), (False,), (1,)),
]


# ----------------------------------------------------------------------------------------------- child process
def disk_layers_map(config, every: int = 1) -> dict:
    """A device map that puts every ``every``-th decoder layer of a Llama-like model on "disk", the rest on the CPU."""
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    for i in range(config.num_hidden_layers):
        device_map[f"model.layers.{i}"] = "disk" if i % every == 0 else "cpu"
    return device_map


def build_model(spec: str, dtype: torch.dtype, device: str, offload: str = "none", offload_folder: str | None = None):
    if offload != "none":   # a shipped model's safetensors, its decoder layers read from there by accelerate
        from transformers import AutoConfig

        from gim_fast.models import cache_path, load_pretrained

        config = AutoConfig.from_pretrained(cache_path(spec))
        every = {"disk": 1, "half": 2}[offload]
        model, _ = load_pretrained(spec, dtype=dtype, device_map=disk_layers_map(config, every),
                                   offload_folder=offload_folder)
        return model
    if spec.startswith("config:"):
        from configs import build

        _, name, layers, vocab = spec.split(":")
        return build(name, dtype=dtype, device=device, layers=int(layers), vocab_size=int(vocab))
    from gim_fast.models import load_pretrained

    model, _ = load_pretrained(spec, dtype=dtype)
    return model.to(device)


def _reset_cpu_peak() -> int:
    """Hand freed heap memory back to the system, reset the peak-RSS counter; return the resident bytes."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to VmRSS (Linux ≥ 4.0)
    return proc_status()["VmRSS"]


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

    import tempfile

    from gim_fast.memory import model_estimates

    device = "cuda" if args.gpu else "cpu"
    dtype = DTYPES[args.dtype]
    folder = tempfile.TemporaryDirectory()
    model = build_model(args.model, dtype, device, args.offload, folder.name)
    with torch.no_grad():  # page in weights that are still mapped from their file (safetensors loads lazily)
        for t in itertools.chain(model.parameters(), model.buffers()):
            t.sum()
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    ckpt = {"auto": "auto", "on": True, "off": False}[args.checkpointing]
    if args.offload != "none":   # the estimate of the loaded model: what loading its offloaded layers costs
        est = model_estimates(model, args.seq, args.batch, backend=args.backend, checkpointing=ckpt is True)
        est = est[torch.device(device)]
    else:
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
        row["measured_bytes"] = proc_status()["VmHWM"] - base
    if tracker is not None:
        row["tensor_bytes"] = tracker.peak
    after = resource.getrusage(resource.RUSAGE_SELF)
    row.update(status="ok", seconds=round(time.perf_counter() - start, 2),
               cpu_seconds=round(after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime, 2),
               page_faults=after.ru_minflt - usage.ru_minflt)
    return row


def llama8b_child(args) -> None:
    """Llama-3.1-8B's published config with random bf16 weights explains each of ``--llama8b-lengths`` in turn, in
    this process; one JSON row per length is printed as soon as it is known (so a kill is seen by the parent)."""
    import gim_fast
    from configs import build
    from gim_fast.memory import available_memory, format_bytes, plan_checkpointing

    device = "cuda" if args.gpu else "cpu"
    before = available_memory(torch.device(device))
    start = time.perf_counter()
    model = build("llama-3.1-8b", dtype=torch.bfloat16, device=device, layers=args.llama8b_layers)
    loaded = {"model": f"llama-3.1-8b, {model.config.num_hidden_layers} layers (random bf16 weights)", "batch": 1,
              "dtype": "bf16",
              "available_before_load_bytes": before, "load_seconds": round(time.perf_counter() - start, 1),
              "resident_after_load_bytes": proc_status()["VmRSS"]}
    backend = "triton" if device == "cuda" else "torch"
    for seq in args.llama8b_lengths:
        row = {**loaded, "seq": seq, "available_bytes": available_memory(torch.device(device))}
        for ckpt in (False, True):
            est = gim_fast.estimate_memory(model.config, seq, 1, dtype=torch.bfloat16, backend=backend,
                                           checkpointing=ckpt, device=device)
            row[f"estimate_{'with' if ckpt else 'without'}_checkpointing_bytes"] = est.total
            print(est, file=sys.stderr)
        ids = torch.randint(1, model.config.vocab_size, (seq,), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
        try:
            row["checkpointing"] = plan_checkpointing(model, seq, 1, backend=backend, num_targets=1)
            print(f"{seq} tokens: {'with' if row['checkpointing'] else 'without'} checkpointing", file=sys.stderr)
            print(json.dumps({**row, "status": "started"}), flush=True)
            base = _reset_cpu_peak() if device == "cpu" else torch.cuda.memory_allocated()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            scores = gim_fast.explain(model, ids, baseline_token_id=0, backend=backend)
        except gim_fast.InsufficientMemoryError as err:
            print(json.dumps({**row, "status": "refused", "detail": str(err).splitlines()[0]}), flush=True)
            continue
        row["seconds"] = round(time.perf_counter() - start, 1)
        peak = proc_status()["VmHWM"] if device == "cpu" else torch.cuda.max_memory_allocated()
        row["measured_bytes"] = peak - base
        row["estimate_bytes"] = row[f"estimate_{'with' if row['checkpointing'] else 'without'}_checkpointing_bytes"]
        row["finite_scores"] = bool(torch.isfinite(scores).all())
        print(f"peak above the model {format_bytes(row['measured_bytes'])}", file=sys.stderr)
        print(json.dumps({**row, "status": "finished"}), flush=True)
        del scores


def run_llama8b(args) -> list[dict]:
    """Run ``llama8b_child`` in a child process (so that a kill is seen), write its rows and a summary."""
    env = environment(torch.device("cuda" if args.gpu else "cpu"))
    cmd = [sys.executable, __file__, "--child", "--llama8b", "--llama8b-lengths", *map(str, args.llama8b_lengths),
           "--llama8b-layers", str(args.llama8b_layers)] + ["--gpu"] * args.gpu
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    latest = {}  # the last row printed for each length
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            latest[row["seq"]] = row
    killed = proc.returncode in (-9, 137)
    rows = []
    for seq in args.llama8b_lengths:
        row = latest.get(seq, {"model": "llama-3.1-8b (random bf16 weights)", "seq": seq})
        if row.get("status") in (None, "started"):  # the process ended inside this length (or before it)
            row["status"] = "killed" if killed else "error"
            row["detail"] = ("the process was killed (out of memory?)" if killed else
                             f"exit status {proc.returncode}")
        rows.append({**row, **env})
    tag = env["device"].split("(")[0].strip().replace(" ", "_").lower()
    stem = f"memory_llama8b_{tag}" + ("" if args.llama8b_layers == 32 else f"_{args.llama8b_layers}layers")
    paths = write_rows(rows, args.out, stem)
    gib = lambda row, key: f"{row[key] / 2**30:.2f} GiB" if key in row else "?"  # noqa: E731
    lines = [f"# {rows[0].get('model', 'llama-3.1-8b')}: explain on {env['device']}\n",
             f"torch {env['torch']}, transformers {env['transformers']}; {env['date']}; resident after loading "
             f"{gib(rows[0], 'resident_after_load_bytes')}, available before loading "
             f"{gib(rows[0], 'available_before_load_bytes')}\n",
             "| tokens | result | checkpointing | seconds | available | estimate without / with ckpt | "
             "measured peak above the model |", "|---:|---|---|---:|---:|---|---:|"]
    for r in rows:
        ckpt = "" if "checkpointing" not in r else ("on" if r["checkpointing"] else "off")
        lines.append(f"| {r['seq']} | {r['status']} {r.get('detail', '')} | {ckpt} | {r.get('seconds', '')} | "
                     f"{gib(r, 'available_bytes')} | {gib(r, 'estimate_without_checkpointing_bytes')} / "
                     f"{gib(r, 'estimate_with_checkpointing_bytes')} | {gib(r, 'measured_bytes')} |")
    text = "\n".join(lines) + "\n"
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    print("wrote", *paths, args.out / f"{stem}.md")
    return rows


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------- parent process
def cases(grid):
    for spec, seqs, dtypes, backends, ckpts, batches, *offloads in grid:
        for seq, dtype, backend, ckpt, batch, offload in itertools.product(seqs, dtypes, backends, ckpts, batches,
                                                                            *(offloads or [("none",)])):
            case = dict(model=spec, seq=seq, batch=batch, dtype=dtype, backend=backend, checkpointing=ckpt)
            if offload != "none":
                case["offload"] = offload
            yield case


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
    cmd += ["--offload", case["offload"]] if "offload" in case else []
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
            cells = [mib(r["estimate_bytes"]) if r.get("estimate_bytes") else "", r.get("status", "?"), "",
                     r.get("detail", "")]
        model = f"{r['model']}, layers on disk: {'all' if r['offload'] == 'disk' else 'every other'}" \
            if r.get("offload") else r["model"]
        lines.append(f"| {model} | {r['seq']} | {r['batch']} | {r['dtype']} | {r['backend']} | "
                     f"{'on' if r['checkpointing'] else 'off'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def estimate_case(case: dict, device: str):
    import gim_fast

    return gim_fast.estimate_memory(config_of(case["model"]), case["seq"], case["batch"],
                                    dtype=DTYPES[case["dtype"]], backend=case["backend"],
                                    checkpointing=case["checkpointing"], device=device)


def show(row: dict) -> str:
    shown = (f"estimate {row['estimate_bytes'] / 2**20:8.0f} MiB  measured {row['measured_bytes'] / 2**20:8.0f}"
             f" MiB  ratio {row['ratio']:.2f}{'' if row['within_bound'] else '  OUT OF BOUND'}"
             if row["status"] == "ok" else f"{row['status']} {row.get('detail', '')}")
    model = row["model"] + (f" ({row['offload']})" if row.get("offload") else "")
    return (f"{model:30} {row['seq']:6} ×{row['batch']} {row['dtype']:4} {row['backend']:6} "
            f"ckpt {'on ' if row['checkpointing'] else 'off'}  {shown}")


def report(rows: list[dict], out: Path, name: str, quiet: bool = False, note: str = "") -> None:
    """Write the rows as ``memory_<name>_<device>.csv/.json/.md`` with the verdict and the table."""
    env = rows[0]
    tag = env["device"].split("(")[0].strip().replace(" ", "_").lower()
    stem = f"memory_{name}_{tag}"
    flat = [{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rows]
    paths = write_rows(flat, out, stem)
    ok = [r for r in rows if r["status"] == "ok"]
    verdict = (f"{sum(r['within_bound'] for r in ok)} of {len(ok)} measured cases within measured ≤ estimate ≤ "
               f"{BOUND} × measured")
    (out / f"{stem}.md").write_text(
        f"# gim_fast memory estimate vs measured peak ({name})\n\n{env['device']}; torch {env['torch']}, "
        f"transformers {env['transformers']}; {env['date']}\n\n{note}{verdict}\n\n{summary(rows)}\n")
    if not quiet:
        print(verdict)
        print("wrote", *paths, out / f"{stem}.md")


def run_grid(args, grid, name: str) -> list[dict]:
    device = "cuda" if args.gpu else "cpu"
    env = environment(torch.device(device))
    rows = []
    for case in cases(grid):
        if (args.models and not any(m in case["model"] for m in args.models)) or \
                (args.seqlens and case["seq"] not in args.seqlens) or \
                (args.dtypes and case["dtype"] not in args.dtypes) or \
                (args.backends and case["backend"] not in args.backends):
            continue
        est = estimate_case(case, device)
        if est.total > args.max_gib * 2**30:
            row = {**case, "status": "skipped", "estimate_bytes": est.total,
                   "detail": f"estimate {est.total / 2**30:.1f} GiB > --max-gib {args.max_gib:g}"}
        else:
            lock = args.heavy_lock if est.total > 4 * 2**30 else None
            row = judge({**case, **measure(case, gpu=args.gpu, tensors=args.tensors, lock=lock)})
        rows.append({**row, **env})
        print(show(row), flush=True)
        report(rows, args.out, name, quiet=True)  # after every case: an interrupted grid keeps what it measured
    report(rows, args.out, name)
    return rows


def rejudge(paths: list[Path], out: Path, name: str) -> list[dict]:
    """Re-estimate the rows of earlier result files with the current estimate (the measured peaks do not depend
    on it) and write them as one report: for a change of the estimate, without measuring again."""
    rows = []
    for path in paths:
        for row in json.loads(path.read_text()):
            device = "cpu" if "cpu" in row["device"].lower() else "cuda"
            if row.get("offload"):    # estimated from the loaded model in its child: kept as measured
                rows.append(judge(row))
                continue
            est = estimate_case(row, device)
            row.update(estimate_bytes=est.total, estimate_tensor_bytes=est.tensors,
                       estimate_parts={k: int(v) for k, v in est.parts.items()})
            if row["status"] == "skipped":
                row["detail"] = f"estimate {est.total / 2**30:.1f} GiB > --max-gib"
            row = judge(row)
            rows.append(row)
            print(show(row))
    dates = sorted(row["date"] for row in rows)
    report(rows, out, name, note=f"Measured {dates[0]} to {dates[-1]} in {len(paths)} runs, re-estimated with the "
                                 "current estimate (`--rejudge`).\n\n")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="measure on CUDA (max_memory_allocated)")
    parser.add_argument("--quick", action="store_true", help="a few small points instead of the full grid")
    parser.add_argument("--offload-grid", action="store_true",
                        help="SmolLM2-135M with its layers offloaded to disk (all, every other), 512-2,048 tokens")
    parser.add_argument("--llama8b", action="store_true", help="the Llama-3.1-8B case (see the module docstring)")
    parser.add_argument("--tensors", action="store_true", help="also track the peak of live tensor bytes")
    parser.add_argument("--max-gib", type=float, default=6.0, help="skip cases whose estimate exceeds this")
    parser.add_argument("--models", nargs="+", help="only the grid's models whose spec contains one of these")
    parser.add_argument("--seqlens", type=int, nargs="+", help="only these lengths of the grid")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, help="only these dtypes of the grid")
    parser.add_argument("--backends", nargs="+", choices=("torch", "eager"), help="only these backends of the grid")
    parser.add_argument("--heavy-lock", help="run cases estimated above 4 GiB under `flock` on this file")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory")
    parser.add_argument("--rejudge", type=Path, nargs="+", metavar="JSON",
                        help="re-estimate the rows of these result files with the current estimate (no measuring)")
    parser.add_argument("--name", help="the report's name (default: grid, quick, or rejudged)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--llama8b-lengths", type=int, nargs="+", default=[256, 2048],
                        help="tokens of the --llama8b case (default 256 2048)")
    parser.add_argument("--llama8b-layers", type=int, default=32,
                        help="decoder layers of the --llama8b model (default 32, the published config; fewer only "
                             "to try the command out)")
    parser.add_argument("--seq", type=int, default=2048, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--offload", choices=("none", "disk", "half"), default="none",
                        help="with --child: load the shipped model with every decoder layer (disk) or every other "
                             "one (half) offloaded to disk by accelerate")
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: CUDA is not available")
    if args.child:
        if args.llama8b:
            llama8b_child(args)
        else:
            print(json.dumps(child(args)), flush=True)
        return
    if args.llama8b:
        rows = run_llama8b(args)
        sys.exit(0 if all(row["status"] in ("finished", "refused") for row in rows) else 1)
    if args.rejudge:
        rejudge(args.rejudge, args.out, args.name or "rejudged")
        return
    if args.offload_grid:
        run_grid(args, OFFLOAD, args.name or "offload")
        return
    run_grid(args, QUICK if args.quick else GRID, args.name or ("quick" if args.quick else "grid"))


if __name__ == "__main__":
    main()
