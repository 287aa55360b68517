"""What GIM costs over the plain gradient on the CPU, side by side in one process.

    python bench/cpu_ratio.py                                   # SmolLM2-135M, 2,048 tokens, 2 threads
    python bench/cpu_ratio.py --config smollm2-135m-arch --layers 1 --seq 32 --repeats 1   # smoke run

Model level: one ``explain`` with GIM (``torch`` backend) against plain gradient × input through the model's
own SDPA attention in the same engine (frozen weights, target logits only: ``bench/explain.py``'s ``plain``) and
against GIM with the ``eager`` backend (the reference: materialised attention), after one warm-up call each, then
``--repeats`` rounds that alternate them (the order flips every round), so that all see the same machine load.
Each call is timed whole (forward + backward) and, separately, the time spent inside ``torch.autograd.grad`` (the
backward alone; the engine's one backward call). Reported per provider: min and median of both; and the ratios of
the medians to plain (and GIM / eager), whole call and backward alone.

Attention level, at the model's own shapes (q ``[1, Hq, S, D]``, k/v ``[1, Hkv, S, D]``, causal, float32),
forward + backward, the same alternation:

    sdpa           torch SDPA, plain gradient (what the plain provider runs in each layer)
    gim            gim_fast's torch backend: fused flash forward, row-tiled GIM backward (the route this
                   model takes)
    gim-T-off      the same route with the GIM settings off (temperature, scales None): the plain gradient
    gim-tiled      the same op forced onto the row-tiled forward (a sliding window as long as the input, which
                   masks nothing): the route of sliding windows and soft-capping

Rows go to ``<out>/cpu_ratio_<model>.json/.csv`` and a markdown summary beside them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import environment, write_rows  # noqa: E402
from explain import _call, _load, add_model_arguments  # noqa: E402


def alternate(calls: dict, repeats: int, clock=time.perf_counter) -> dict:
    """Seconds per call of each entry of ``calls``: one untimed warm-up each, then ``repeats`` rounds in an
    order that flips every round."""
    names = list(calls)
    for name in names:
        calls[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = clock()
            calls[name]()
            times[name].append(clock() - start)
    return times


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def stats(times: list[float]) -> dict:
    return {"min_s": min(times), "median_s": statistics.median(times), "times_s": times}


class _BackwardClock:
    """Adds the time spent inside ``torch.autograd.grad`` to ``seconds`` while active (the engine's backward)."""

    def __init__(self, clock):
        self.clock, self.seconds = clock, 0.0

    def __enter__(self):
        self._grad = torch.autograd.grad

        def timed(*args, **kwargs):
            start = self.clock()
            try:
                return self._grad(*args, **kwargs)
            finally:
                self.seconds += self.clock() - start

        torch.autograd.grad = timed
        return self

    def __exit__(self, *exc):
        torch.autograd.grad = self._grad


MODEL_PROVIDERS = {"gim": "gim-torch", "plain": "plain", "eager": "gim-eager"}


def model_level(args, model, ids) -> dict:
    """Per provider: whole-call and backward-only times; ratios of medians to plain (and GIM / eager)."""
    clock = CLOCKS[args.clock]
    backward = {name: [] for name in MODEL_PROVIDERS}

    def call(name):
        with _BackwardClock(clock) as timer:
            _call(MODEL_PROVIDERS[name], model, ids)
        backward[name].append(timer.seconds)

    providers = [p for p in MODEL_PROVIDERS if p != "eager" or not args.skip_eager]
    whole = alternate({p: (lambda p=p: call(p)) for p in providers}, args.repeats, clock)
    result = {}
    for name in providers:
        bwd = backward[name][1:]  # without the warm-up
        result[name] = {"whole": stats(whole[name]), "backward": stats(bwd)}
    for part in ("whole", "backward"):
        plain = result["plain"][part]["median_s"]
        for name in providers:
            result[name][part]["ratio_to_plain"] = result[name][part]["median_s"] / plain
        if "eager" in result:
            result["gim"][part]["ratio_to_eager"] = (result["gim"][part]["median_s"]
                                                     / result["eager"][part]["median_s"])
    result["gim"]["paired_ratio"] = statistics.median(g / p for g, p in zip(backward["gim"][1:],
                                                                             backward["plain"][1:]))
    return result


def attention_level(args, config, seq) -> dict:
    import gim_fast

    q_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, q_heads, seq, head_dim, generator=gen).requires_grad_(True)
    k = torch.randn(1, kv_heads, seq, head_dim, generator=gen).requires_grad_(True)
    v = torch.randn(1, kv_heads, seq, head_dim, generator=gen).requires_grad_(True)
    grad = torch.randn(1, q_heads, seq, head_dim, generator=gen)
    off = dict(temperature=None, q_scale=None, k_scale=None, v_scale=None)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(), (q, k, v), grad)

    calls = {
        "sdpa": fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                enable_gqa=q_heads != kv_heads)),
        "gim": fwd_bwd(lambda: gim_fast.ops.gim_attention(q, k, v, backend="torch")),
        "gim-T-off": fwd_bwd(lambda: gim_fast.ops.gim_attention(q, k, v, backend="torch", **off)),
        "gim-tiled": fwd_bwd(lambda: gim_fast.ops.gim_attention(q, k, v, backend="torch", sliding_window=seq)),
    }
    times = alternate(calls, args.attention_repeats, CLOCKS[args.clock])
    shape = dict(q=[1, q_heads, seq, head_dim], kv=[1, kv_heads, seq, head_dim])
    base = statistics.median(times["sdpa"])
    return {name: dict(stats(t), ratio_to_sdpa=statistics.median(t) / base, **shape) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the model-level comparison")
    parser.add_argument("--attention-repeats", type=int, default=None, help="rounds per attention route")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="wall: elapsed time (the measurement, on a quiet machine); cpu: this process's CPU time, "
                             "which other processes' load barely moves (with --threads 1: an indicative ratio on a "
                             "shared machine)")
    parser.add_argument("--skip-model", action="store_true", help="attention level only")
    parser.add_argument("--skip-eager", action="store_true", help="model level without the eager reference")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.model = None if args.config else (args.model or "smollm2-135m")
    args.dtype = "fp32"
    args.attention_repeats = args.attention_repeats or max(3, 2 * args.repeats)
    torch.set_num_threads(args.threads)

    model = _load(args, torch.device("cpu"))
    name = (args.config or args.model) + (f" ({args.layers} layers)" if args.layers else "")
    env = environment(torch.device("cpu"))
    base = dict(model=name, seq=args.seq, dtype="fp32", clock=args.clock, **env)
    rows = []
    summary = None
    if not args.skip_model:
        ids = torch.randint(1, model.config.vocab_size, (args.seq,), generator=torch.Generator().manual_seed(0))
        summary = model_level(args, model, ids)
        for provider, m in summary.items():
            for part in ("whole", "backward"):
                rows.append({**base, "level": "model", "route": f"{provider} {part}", "min_s": m[part]["min_s"],
                             "median_s": m[part]["median_s"], "times_s": m[part]["times_s"],
                             "ratio": m[part]["ratio_to_plain"]})
        print(f"model {name}, {args.seq} tokens, {args.threads} threads, {args.repeats} alternating rounds, "
              f"{args.clock} clock (medians; min in brackets):")
        for provider, m in summary.items():
            print(f"  {provider:6} whole call {m['whole']['median_s']:7.3f} s ({m['whole']['min_s']:.3f})  "
                  f"backward {m['backward']['median_s']:7.3f} s ({m['backward']['min_s']:.3f})  "
                  f"× plain: {m['whole']['ratio_to_plain']:.3f} whole, {m['backward']['ratio_to_plain']:.3f} backward")
        gim = summary["gim"]
        print(f"  GIM backward / plain backward: {gim['backward']['ratio_to_plain']:.3f}× (medians; per-round "
              f"{gim['paired_ratio']:.3f}×; target <= 1.2)")
        if "eager" in summary:
            print(f"  GIM / eager reference: {gim['whole']['ratio_to_eager']:.3f}× whole, "
                  f"{gim['backward']['ratio_to_eager']:.3f}× backward")
    att = attention_level(args, model.config, args.seq)
    print(f"attention per layer, q {att['sdpa']['q']}, k/v {att['sdpa']['kv']}, causal, fp32, forward + backward, "
          f"{args.attention_repeats} alternating rounds:")
    for route, r in att.items():
        rows.append({**base, "level": "attention", "route": route, "min_s": r["min_s"], "median_s": r["median_s"],
                     "times_s": r["times_s"], "ratio": r["ratio_to_sdpa"]})
        print(f"  {route:10} min {r['min_s'] * 1e3:8.1f} ms  median {r['median_s'] * 1e3:8.1f} ms  "
              f"{r['ratio_to_sdpa']:.2f}× sdpa")

    stem = "cpu_ratio_" + (args.config or args.model).replace("/", "_") + (f"_{args.layers}l" if args.layers else "")
    paths = write_rows([{**r, "times_s": " ".join(f"{t:.4f}" for t in r["times_s"])} for r in rows], args.out, stem)
    lines = [f"# GIM vs plain gradient on the CPU: {name}, {args.seq} tokens, fp32, batch 1", "",
             f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}; {env['date']}; "
             f"{args.clock} clock", ""]
    if summary:
        gim = summary["gim"]
        lines += [f"Model level, {args.repeats} alternating rounds, medians (min): **GIM backward / plain backward = "
                  f"{gim['backward']['ratio_to_plain']:.3f}×** (per-round {gim['paired_ratio']:.3f}×; whole call "
                  f"{gim['whole']['ratio_to_plain']:.3f}×)", "",
                  "| provider | whole call s | backward s | whole × plain | backward × plain |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {p} | {m['whole']['median_s']:.3f} ({m['whole']['min_s']:.3f}) | "
                  f"{m['backward']['median_s']:.3f} ({m['backward']['min_s']:.3f}) | "
                  f"{m['whole']['ratio_to_plain']:.3f} | {m['backward']['ratio_to_plain']:.3f} |"
                  for p, m in summary.items()]
        if "eager" in summary:
            lines += ["", f"GIM (torch backend) / GIM eager reference: {gim['whole']['ratio_to_eager']:.3f}× whole "
                          f"call, {gim['backward']['ratio_to_eager']:.3f}× backward"]
        lines += [""]
    lines += ["| attention route (per layer, fwd+bwd) | min ms | median ms | × sdpa |", "|---|---:|---:|---:|"]
    lines += [f"| {route} | {r['min_s'] * 1e3:.1f} | {r['median_s'] * 1e3:.1f} | {r['ratio_to_sdpa']:.2f} |"
              for route, r in att.items()]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("wrote", *paths, args.out / f"{stem}.md")


if __name__ == "__main__":
    main()
