"""Attention benchmark: gim_fast's GIM attention against torch SDPA (plain gradient) and the eager reference.

For each provider, sequence length and head dim: time (p20/p50/p80 ms), TFLOP/s at the median, peak memory and the
time relative to SDPA, per mode. GQA 4:1, causal, GIM's default settings (T = 2, q/k/v scales 0.25/0.25/0.5). Rows
go to CSV and JSON with the device, versions and date.

Modes:
    fwd         the forward as it runs before a backward (inputs require grad): for GIM with T = 2 this is the
                forward GIM actually runs — it also accumulates O_T = P_T V (a third GEMM) and LSE_T
    fwd-nograd  the forward under ``torch.no_grad`` (inference; GIM then skips the temperature statistics)
    bwd         the backward alone (the GIM backward: Δ_T, dK/dV, dQ)
    fwd+bwd     both, what one attribution costs per attention layer

    python bench/attention.py                       # GPU: S = 1k … 32k, head dim 64 and 128, bf16
    python bench/attention.py --quick               # CPU-sized smoke run (tiny shapes), so it cannot rot

Providers: ``gim-triton`` (CUDA), ``gim-torch`` (row-chunked), ``gim-eager`` (materialised reference),
``sdpa`` (torch SDPA — the flash backend on CUDA — with the plain gradient: the speed of light for a stock
kernel), ``flash-attn`` (``flash_attn_func``, when the optional package imports).
FLOP convention (the same for every provider, so TFLOP/s compare times): standard causal attention's work, as
FlashAttention counts it — 7 GEMMs per visible score (forward 2: QKᵀ, PV; backward 5: QKᵀ, dO Vᵀ, Pᵀ dO, dS K,
dSᵀ Q), 2·D FLOPs each: forward 4·B·Hq·S²·D/2, backward 2.5× that. GIM with T = 2 executes 10 GEMMs per visible
score (forward 3: + P_T V; backward 7: the dK/dV and the dQ kernel each recompute QKᵀ and dO Vᵀ), so its hardware
rate is 10/7 (fwd+bwd; 3/2 forward, 7/5 backward) of the TFLOP/s shown. ``vs_sdpa`` = p50 time / SDPA's p50 time
for the same shape and mode (lower is faster; the targets are ≤ 1/0.85 forward and ≤ 1/0.75 backward).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gim_fast  # noqa: E402
from common import environment, is_oom, peak_memory, time_quantiles, write_rows  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sdpa(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    with sdpa_kernel(backends):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _flash_attn(q, k, v):
    from flash_attn import flash_attn_func  # [B, S, H, D] layout

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)


def providers(device: torch.device) -> dict:
    out = {
        "gim-torch": lambda q, k, v: gim_fast.ops.gim_attention(q, k, v, backend="torch"),
        "gim-eager": lambda q, k, v: gim_fast.ops.gim_attention(q, k, v, backend="eager"),
        "sdpa": _sdpa,
    }
    if device.type == "cuda":
        out = {"gim-triton": lambda q, k, v: gim_fast.ops.gim_attention(q, k, v, backend="triton"), **out}
        with contextlib.suppress(ImportError):
            import flash_attn  # noqa: F401
            out["flash-attn"] = _flash_attn
    return out


def bench_one(fn, batch, q_heads, kv_heads, seq, head_dim, dtype, device, repeats):
    q = torch.randn(batch, q_heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(batch, q_heads, seq, head_dim, device=device, dtype=dtype)
    fwd_flops = 4 * batch * q_heads * seq * seq * head_dim / 2
    results = {}

    def forward():                      # records the graph: the forward a backward will follow
        fn(q, k, v)

    def forward_nograd():
        with torch.no_grad():
            fn(q, k, v)

    out = fn(q, k, v)

    def backward():
        torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

    def both():
        torch.autograd.grad(fn(q, k, v), (q, k, v), grad)

    for mode, call, flops in (("fwd", forward, fwd_flops), ("fwd-nograd", forward_nograd, fwd_flops),
                              ("bwd", backward, 2.5 * fwd_flops), ("fwd+bwd", both, 3.5 * fwd_flops)):
        p20, p50, p80 = time_quantiles(call, device, repeats=repeats)
        results[mode] = dict(p20_ms=p20, p50_ms=p50, p80_ms=p80, tflops=flops / (p50 * 1e-3) / 1e12,
                             peak_mem_bytes=peak_memory(call, device))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes for a CPU smoke run")
    parser.add_argument("--seqlens", type=int, nargs="+", default=None)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--providers", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        seqlens, args.q_heads, args.kv_heads, args.head_dims = args.seqlens or [64, 130], 4, 1, [64]
    else:
        seqlens = args.seqlens or [1024, 2048, 4096, 8192, 16384, 32768]
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    repeats = args.repeats or (10 if device.type == "cuda" else 3)
    env = environment(device)
    available = providers(device)
    chosen = args.providers or list(available)
    unknown = [p for p in chosen if p not in available]
    if unknown:
        parser.error(f"providers {unknown} are not available here; available: {list(available)}")

    rows = []
    for head_dim in args.head_dims:
        for seq in seqlens:
            sdpa_p50 = {}
            for name in sorted(chosen, key=lambda n: n != "sdpa"):     # SDPA first: the others' reference
                base = dict(provider=name, seq=seq, head_dim=head_dim, batch=args.batch, q_heads=args.q_heads,
                            kv_heads=args.kv_heads, dtype=str(dtype).removeprefix("torch."), causal=True)
                try:
                    measured = bench_one(available[name], args.batch, args.q_heads, args.kv_heads, seq, head_dim,
                                         dtype, device, repeats)
                except Exception as err:  # noqa: BLE001 - an OOM is a result, anything else is re-raised
                    if not is_oom(err):
                        raise
                    torch.cuda.empty_cache()
                    rows.append({**base, "mode": "fwd+bwd", "status": "oom", **env})
                    print(f"{name:11} D={head_dim:3} S={seq:6}  out of memory", flush=True)
                    continue
                for mode, m in measured.items():
                    if name == "sdpa":
                        sdpa_p50[mode] = m["p50_ms"]
                    ratio = m["p50_ms"] / sdpa_p50[mode] if mode in sdpa_p50 else None
                    rows.append({**base, "mode": mode, "status": "ok", **m, "vs_sdpa": ratio, **env})
                    mem = "" if m["peak_mem_bytes"] is None else f"  {m['peak_mem_bytes'] / 2**20:9.1f} MiB"
                    rel = "" if ratio is None else f"  {ratio:5.2f}x SDPA"
                    print(f"{name:11} D={head_dim:3} S={seq:6} {mode:10} p50 {m['p50_ms']:9.3f} ms "
                          f"{m['tflops']:7.2f} TFLOP/s{mem}{rel}", flush=True)
    stem = "attention_quick" if args.quick else "attention"
    tag = env["device"].split("(")[0].strip().replace(" ", "_").lower()
    paths = write_rows(rows, args.out, f"{stem}_{tag}")
    print("wrote", *paths)


if __name__ == "__main__":
    main()
