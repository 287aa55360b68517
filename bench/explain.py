"""End-to-end attribution benchmark: time and peak memory of one ``explain`` versus sequence length.

Providers, side by side in one run, on the same model:

    gim-triton   gim_fast.explain, fused Triton kernels (CUDA only)
    gim-torch    gim_fast.explain, row-chunked torch backend
    gim-eager    gim_fast.explain, materialised attention (the eager reference)
    plain        plain gradient × input through the model's own attention (SDPA; eager for Gemma 2) in the same
                 engine — frozen weights, target logits only: the cost floor of any gradient method
    gim-explain  gim-explain 0.1.4 as it is (partial GIM on these models; full logits, weight gradients kept)
    attnlrp      AttnLRP, LXT 2.1's efficient rules, in the side worker of gim_fast.evaluate.attnlrp (transformers
                 4.52, its own copy of the model, this process's thread count); its logits are checked against
                 the model's before timing (a random-weight --config model is saved to a temporary folder first)

    python bench/explain.py --model smollm2-135m --seqlens 256 512 1024 2048            # CPU, real SmolLM2
    python bench/explain.py --config llama-3.1-8b --seqlens 1024 2048 4096 8192 --longest   # GPU, random bf16
    python bench/explain.py --model smollm2-135m --seqlens 512 1024 2048 4096 --providers gim-torch plain attnlrp

Each (provider, length) is measured in a fresh child process so that peak memory is that call's alone: on CUDA
``max_memory_allocated`` above what the loaded model holds; on the CPU the peak resident set sampled every
millisecond during the calls, above the resident set before them (for ``attnlrp``: the worker process's, which has
already run one forward for the logit check). Times are p20/p50/p80 over ``--repeats`` calls after one warm-up call.
``--longest`` then doubles the length per provider until it fails (a refusal by gim_fast's memory estimate, an
out-of-memory error, a killed process or ``--max-seconds``) and records the longest that ran.
Rows go to ``<out>/explain_<model>_<device>.csv/.json``, with a log-log plot of time and memory (matplotlib) and a
markdown summary of the ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import environment, is_oom, write_rows  # noqa: E402

PROVIDERS = ("gim-triton", "gim-torch", "gim-eager", "plain", "gim-explain", "attnlrp")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------- child process
def _load(args, device):
    if args.config:
        from configs import build

        return build(args.config, dtype=DTYPES[args.dtype], device=device, layers=args.layers)
    from gim_fast.models import load_pretrained

    model, _ = load_pretrained(args.model, dtype=DTYPES[args.dtype])
    return model.to(device)


def _call(provider, model, ids):
    import gim_fast

    if provider.startswith("gim-") and provider != "gim-explain":
        return gim_fast.explain(model, ids, baseline_token_id=0, backend=provider.removeprefix("gim-"))
    if provider == "plain":
        from gim_fast.engine import attribute

        mask = torch.ones_like(ids)[None]
        pos = torch.tensor([ids.shape[0] - 1], device=ids.device)
        return attribute(model, ids[None], mask, pos, None, 0, None).scores
    if provider == "gim-explain":
        import gim

        return gim.explain(model, ids, baseline_token_id=0)
    if provider == "attnlrp":
        from gim_fast.evaluate import attnlrp

        return attnlrp.worker_for(model).attribute(ids[None].cpu())["scores"]   # the top prediction, as explain
    raise ValueError(provider)


def _start_attnlrp(model, ids, scratch) -> int:
    """Give the worker the model's files (a random-weight model is saved first), check its logits at this length
    and return its pid (whose memory is the one measured)."""
    from gim_fast.evaluate import attnlrp

    reason = attnlrp.unavailable()
    if reason:
        raise RuntimeError(reason)
    if not (Path(getattr(model.config, "_name_or_path", "") or "nowhere") / "config.json").is_file():
        model.save_pretrained(scratch)
        model.config._name_or_path = str(scratch)
    attnlrp.check_logits(model, [ids[None]])
    return attnlrp.worker_for(model).pid


class _RssSampler:
    """Resident set of a process (this one, or ``pid``) before (``base``) and at its peak (``peak``) while the
    block runs, sampled every millisecond: the CPU's counterpart of CUDA's peak-memory statistics."""

    def __init__(self, pid: int | str = "self"):
        self.base = self.peak = 0
        self._statm = f"/proc/{pid}/statm"
        self._stop = threading.Event()

    def rss(self) -> int:
        with open(self._statm) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def child(args) -> dict:
    """Measure one (provider, length) and return a row (printed as JSON by the child process)."""
    import gim_fast

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _load(args, device)
    ids = torch.randint(1, model.config.vocab_size, (args.seq,), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    row = {}
    measured_pid = "self"
    if args.provider == "attnlrp":   # LXT's own code in the side worker: no checkpointing, the worker's memory
        if device.type != "cpu":
            return {"status": "skipped", "detail": "the AttnLRP worker runs on the CPU only"}
        scratch = tempfile.TemporaryDirectory(prefix="attnlrp-model-")
        try:
            measured_pid = _start_attnlrp(model, ids, scratch.name)
        except Exception as err:  # noqa: BLE001 - no side install, a refused logit check: a result row
            return {"status": "error", "detail": str(err).splitlines()[0][:300]}
    try:
        if args.provider == "attnlrp":
            row["checkpointing"] = False
        else:
            from gim_fast.memory import plan_checkpointing

            row["checkpointing"] = plan_checkpointing(
                model, args.seq, 1, backend="eager" if args.provider == "gim-eager" else "torch", num_targets=1)
    except gim_fast.InsufficientMemoryError as err:
        return {"status": "refused", "detail": str(err).splitlines()[0]}
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        sampler = _RssSampler(measured_pid) if device.type == "cpu" else None
        times = []
        start_all = time.perf_counter()
        with sampler or contextlib.nullcontext():
            for i in range(args.repeats + 1):
                start = time.perf_counter()
                _call(args.provider, model, ids)
                sync()
                if i:  # the first call is a warm-up
                    times.append(time.perf_counter() - start)
                if time.perf_counter() - start_all > args.max_seconds:
                    break
        if not times:
            times = [time.perf_counter() - start]
        times.sort()
        q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
        row.update(status="ok", p20_s=q(0.2), p50_s=q(0.5), p80_s=q(0.8), calls=len(times))
        row["peak_mem_bytes"] = (torch.cuda.max_memory_allocated() - base if device.type == "cuda"
                                 else sampler.peak - sampler.base)
    except gim_fast.InsufficientMemoryError as err:
        return {"status": "refused", "detail": str(err).splitlines()[0]}
    except Exception as err:  # noqa: BLE001 - an OOM is a result
        if args.provider == "attnlrp" and "(code -9)" in str(err):
            return {"status": "killed", "detail": "the AttnLRP worker was killed (out of memory)"}
        if not is_oom(err):
            raise
        return {"status": "oom", "detail": str(err).splitlines()[0][:200]}
    return row


# ---------------------------------------------------------------------------------------------- parent process
def measure(args, provider: str, seq: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--provider", provider, "--seq", str(seq), "--repeats",
           str(args.repeats), "--dtype", args.dtype, "--max-seconds", str(args.max_seconds)]
    cmd += ["--config", args.config] if args.config else ["--model", args.model]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        if proc.returncode in (-9, 137):
            return {"status": "killed", "detail": "the process was killed (out of memory)"}
        return {"status": "error", "detail": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(lines[-1])


def _plot(rows, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'gim-fast[bench]')")
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for provider in dict.fromkeys(r["provider"] for r in rows):
        ok = sorted((r["seq"], r) for r in rows if r["provider"] == provider and r["status"] == "ok")
        if not ok:
            continue
        xs = [s for s, _ in ok]
        ax_t.plot(xs, [r["p50_s"] for _, r in ok], "o-", label=provider)
        mem = [(s, r["peak_mem_bytes"] / 2**30) for s, r in ok if r.get("peak_mem_bytes")]
        if mem:
            ax_m.plot([s for s, _ in mem], [m for _, m in mem], "o-", label=provider)
    for ax, label in ((ax_t, "time per explain (s, p50)"), (ax_m, "peak memory above the model (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def summary(rows) -> str:
    """Markdown: per length, each provider's p50 and memory, and the ratios to ``plain`` and to ``gim-eager`` (and
    AttnLRP's time and memory over GIM's, when it ran)."""
    seqs = sorted({r["seq"] for r in rows})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    by = {(r["provider"], r["seq"]): r for r in rows}
    lrp = "attnlrp" in providers
    lines = ["| tokens | " + " | ".join(providers) + " | GIM / plain | eager / GIM |"
             + (" AttnLRP / GIM |" if lrp else ""),
             "|---:|" + "---|" * (len(providers) + 2 + lrp)]
    for s in seqs:
        cells = []
        for p in providers:
            r = by.get((p, s))
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append(r["status"])
            else:
                mem = f", {r['peak_mem_bytes'] / 2**30:.2f} GiB" if r.get("peak_mem_bytes") else ""
                cells.append(f"{r['p50_s']:.3f} s{mem}")
        best = next((by[(p, s)] for p in ("gim-triton", "gim-torch") if by.get((p, s), {}).get("status") == "ok"),
                    None)
        plain, eager = by.get(("plain", s), {}), by.get(("gim-eager", s), {})
        ratio = f"{best['p50_s'] / plain['p50_s']:.2f}×" if best and plain.get("status") == "ok" else ""
        speed = f"{eager['p50_s'] / best['p50_s']:.1f}×" if best and eager.get("status") == "ok" else ""
        line = f"| {s} | " + " | ".join(cells) + f" | {ratio} | {speed} |"
        if lrp:
            other = by.get(("attnlrp", s), {})
            both = best and other.get("status") == "ok"
            mem = (f", {other['peak_mem_bytes'] / best['peak_mem_bytes']:.2f}× memory"
                   if both and other.get("peak_mem_bytes") and best.get("peak_mem_bytes") else "")
            line += f" {other['p50_s'] / best['p50_s']:.2f}× time{mem} |" if both else " |"
        lines.append(line)
    return "\n".join(lines)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` or ``--config`` (+ ``--layers``): what ``_load`` builds."""
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--model", default=None, help="a shipped model name or a path (default smollm2-135m)")
    what.add_argument("--config", default=None, help="a config of bench/configs.py with random weights")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--providers", nargs="+", default=None, choices=PROVIDERS)
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop repeating a call after this")
    parser.add_argument("--longest", action="store_true", help="also find the longest length each provider runs")
    parser.add_argument("--longest-limit", type=int, default=262144)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if not args.config:
        args.model = args.model or "smollm2-135m"
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return

    # attnlrp (a side install, CPU only) runs when asked for
    providers = args.providers or [p for p in PROVIDERS if (cuda or p != "gim-triton") and p != "attnlrp"]
    name = args.config or args.model
    env = environment(torch.device("cuda" if cuda else "cpu"))
    base = dict(model=name + (f" ({args.layers} layers)" if args.layers else ""), batch=1, dtype=args.dtype)
    rows = []

    def record(provider, seq, kind):
        row = {**base, "provider": provider, "seq": seq, "kind": kind, **measure(args, provider, seq), **env}
        rows.append(row)
        shown = (f"p50 {row['p50_s']:.3f} s" + (f", peak {row['peak_mem_bytes'] / 2**20:.0f} MiB"
                                                if row.get("peak_mem_bytes") else "")
                 if row["status"] == "ok" else f"{row['status']}: {row.get('detail', '')}")
        print(f"{provider:11} {seq:7} {shown}", flush=True)
        return row

    for seq in args.seqlens:
        for provider in providers:
            record(provider, seq, "sweep")
    if args.longest:
        for provider in providers:
            done = [r["seq"] for r in rows if r["provider"] == provider and r["status"] == "ok"]
            seq, longest = (max(done) * 2 if done else args.seqlens[0]), max(done, default=0)
            while seq <= args.longest_limit:
                if record(provider, seq, "longest")["status"] != "ok":
                    break
                longest, seq = seq, seq * 2
            rows.append({**base, "provider": provider, "seq": longest, "kind": "longest-ok", "status": "ok-max",
                         **env})
            print(f"{provider:11} longest that ran: {longest}", flush=True)

    tag = env["device"].split("(")[0].strip().replace(" ", "_").lower()
    stem = f"explain_{name}{'_' + str(args.layers) + 'l' if args.layers else ''}_{tag}"
    paths = write_rows(rows, args.out, stem)
    measured = [r for r in rows if r["kind"] != "longest-ok"]
    table = summary(measured)
    (args.out / f"{stem}.md").write_text(
        f"# explain benchmark: {base['model']}, {args.dtype}, batch 1\n\n{env['device']}; torch {env['torch']}, "
        f"triton {env['triton']}, transformers {env['transformers']}; {env['date']}\n\n{table}\n")
    print(table)
    if _plot(measured, args.out / f"{stem}.png", f"{base['model']} on {env['device']}"):
        print("wrote", args.out / f"{stem}.png")
    print("wrote", *paths)


if __name__ == "__main__":
    main()
