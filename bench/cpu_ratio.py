"""What GIM costs over the plain gradient on the CPU, side by side in one process.

    python bench/cpu_ratio.py                                   # SmolLM2-135M, 2,048 tokens, 2 threads
    python bench/cpu_ratio.py --config smollm2-135m-arch --layers 1 --seq 32 --repeats 1   # smoke run

Model level: one ``explain`` with GIM (``torch`` backend) against plain gradient × input through the model's
own SDPA attention in the same engine (frozen weights, target logits only: ``bench/explain.py``'s ``plain``),
after one warm-up call each, then ``--repeats`` rounds that alternate the two (the order flips every round),
so that both see the same machine load. Reported: min and median of each, the ratio of the medians, of the
minima, and the median of the per-round ratios.

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


def model_level(args, model, ids) -> dict:
    times = alternate({p: (lambda p=p: _call(p, model, ids)) for p in ("gim-torch", "plain")}, args.repeats,
                      CLOCKS[args.clock])
    gim, plain = times["gim-torch"], times["plain"]
    return {"gim": stats(gim), "plain": stats(plain),
            "ratio_median": statistics.median(gim) / statistics.median(plain),
            "ratio_min": min(gim) / min(plain),
            "ratio_paired_median": statistics.median(g / p for g, p in zip(gim, plain))}


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
    if not args.skip_model:
        ids = torch.randint(1, model.config.vocab_size, (args.seq,), generator=torch.Generator().manual_seed(0))
        m = model_level(args, model, ids)
        for provider in ("gim", "plain"):
            rows.append({**base, "level": "model", "route": provider, "min_s": m[provider]["min_s"],
                         "median_s": m[provider]["median_s"], "times_s": m[provider]["times_s"],
                         "ratio": m["ratio_median"] if provider == "gim" else 1.0})
        print(f"model {name}, {args.seq} tokens, {args.threads} threads, {args.repeats} alternating rounds, "
              f"{args.clock} clock:")
        for provider in ("gim", "plain"):
            print(f"  {provider:6} min {m[provider]['min_s']:.3f} s  median {m[provider]['median_s']:.3f} s")
        print(f"  GIM / plain: {m['ratio_median']:.3f}× (medians), {m['ratio_min']:.3f}× (minima), "
              f"{m['ratio_paired_median']:.3f}× (median of per-round ratios)")
        summary = m
    else:
        summary = None
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
        lines += [f"Model level, {args.repeats} alternating rounds: GIM median {summary['gim']['median_s']:.3f} s "
                  f"(min {summary['gim']['min_s']:.3f}), plain median {summary['plain']['median_s']:.3f} s "
                  f"(min {summary['plain']['min_s']:.3f}): **GIM / plain = {summary['ratio_median']:.3f}×** "
                  f"(minima {summary['ratio_min']:.3f}×, per-round {summary['ratio_paired_median']:.3f}×)", ""]
    lines += ["| attention route (per layer, fwd+bwd) | min ms | median ms | × sdpa |", "|---|---:|---:|---:|"]
    lines += [f"| {route} | {r['min_s'] * 1e3:.1f} | {r['median_s'] * 1e3:.1f} | {r['ratio_to_sdpa']:.2f} |"
              for route, r in att.items()]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("wrote", *paths, args.out / f"{stem}.md")


if __name__ == "__main__":
    main()
