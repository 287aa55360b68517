"""Answer attribution: the [M, P+M] matrix of ``explain_answer`` against M separate ``explain`` calls and an
Inseq-style loop, side by side in one run on one model.

    python bench/answers.py                   # CPU: SmolLM2-135M (float32), a 1,000-token prompt, a 32-token answer
    python bench/answers.py --gpu             # GPU: the Llama-3.1-8B config (random bf16 weights), 8k prompt, 64 tokens

Modes (every one attributes the same answer after the same prompt):

    explain-calls   M separate ``gim_fast.explain`` calls, call m on (prompt + answer)[: P + m] with answer[m] as
                    target: what a user without ``explain_answer`` writes (M forwards and M backwards)
    inseq-loop      what Inseq does per generated token, written out here (Inseq itself is not installed): the
                    model as loaded (its own attention, no GIM, full logits at every position, parameters left
                    as they are), one forward and one input-gradient backward per answer token on its prefix
    sequential      ``explain_answer(..., chunk=1)``: one forward, then M backward passes one cotangent at a time
    matrix          ``explain_answer(...)`` with the automatic chunk: one forward, the M cotangents batched
    total           ``explain_answer(..., total=True)``: one forward, one backward of Σ_m target_m
    explain-one     one ``gim_fast.explain`` call on prompt + answer (the yardstick of ``total``)

Targets (issue 12): matrix ≤ 0.5 × explain-calls; total ≤ 1.2 × explain-one. Speed does not depend on the token
values, so prompt and answer are random ids (fixed seed). Times are the median of ``--repeats`` runs after one
untimed warm-up run of each mode (``--repeats 1``: one timed run after the warm-up); the process's CPU time is
recorded beside the wall time (on a machine shared with other jobs, CPU-time ratios are the steadier ones). Rows go to
``<out>/answers_<model>_<device>.csv/.json`` with the device, versions and date; the ratios are printed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gim_fast  # noqa: E402
from common import environment, is_oom, write_rows  # noqa: E402

MODES = ("explain-calls", "inseq-loop", "sequential", "matrix", "total", "explain-one")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def inseq_loop(model, prompt: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Per answer token: forward on the prefix (all logits), gradient of the target logit w.r.t. the input
    embeddings, gradient × input — Inseq's ``input_x_gradient`` step by step, with plain gradients."""
    embed = model.get_input_embeddings()
    full = torch.cat([prompt, answer])
    rows = []
    for m in range(len(answer)):
        e = embed(full[None, :len(prompt) + m]).detach().requires_grad_(True)
        logits = model(inputs_embeds=e, use_cache=False).logits[0, -1]
        (grad,) = torch.autograd.grad(logits[answer[m]], e)
        rows.append((grad * e.detach()).sum(-1)[0])
    return rows


def explain_calls(model, prompt, answer, baseline, backend):
    full = torch.cat([prompt, answer])
    return [gim_fast.explain(model, full[:len(prompt) + m], target_token_id=int(answer[m]),
                             baseline_token_id=baseline, backend=backend) for m in range(len(answer))]


def run_mode(mode, model, prompt, answer, baseline, backend, chunk):
    if mode == "explain-calls":
        return explain_calls(model, prompt, answer, baseline, backend)
    if mode == "inseq-loop":
        return inseq_loop(model, prompt, answer)
    if mode == "explain-one":
        return gim_fast.explain(model, torch.cat([prompt, answer]), baseline_token_id=baseline, backend=backend)
    kwargs = dict(baseline_token_id=baseline, backend=backend)
    if mode == "sequential":
        kwargs["chunk"] = 1
    elif mode == "matrix":
        kwargs["chunk"] = chunk
    elif mode == "total":
        kwargs["total"] = True
    return gim_fast.explain_answer(model, prompt, answer, **kwargs)


def load(args, device):
    if args.gpu or args.config:
        from configs import build

        name = args.config or "llama-3.1-8b"
        model = build(name, dtype=DTYPES[args.dtype or "bf16"], device=device, layers=args.layers)
        return model, f"{name}-random{'' if args.layers is None else f'-{args.layers}l'}"
    from gim_fast.models import load_pretrained

    model, _ = load_pretrained(args.model, dtype=DTYPES[args.dtype or "fp32"])
    return model.to(device).eval(), args.model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the GPU configuration: Llama-3.1-8B config, 8k + 64")
    parser.add_argument("--model", default="smollm2-135m", help="a shipped model (CPU default: smollm2-135m)")
    parser.add_argument("--config", default=None, help="a config of bench/configs.py with random weights instead")
    parser.add_argument("--layers", type=int, default=None, help="override the config's number of decoder layers")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default fp32 (CPU model), bf16 (configs)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 1000; 8192 with --gpu)")
    parser.add_argument("--answer", type=int, default=None, help="answer tokens (default 32; 64 with --gpu)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--chunk", type=int, default=None, help="the matrix mode's chunk (default: automatic)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.gpu else "cpu")
    prompt_len = args.prompt or (8192 if args.gpu else 1000)
    answer_len = args.answer or (64 if args.gpu else 32)
    model, name = load(args, device)
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, vocab, (prompt_len,), generator=g).to(device)
    answer = torch.randint(1, vocab, (answer_len,), generator=g).to(device)
    baseline = 0
    env = environment(device)
    print(f"{name} on {env['device']}: prompt {prompt_len} tokens, answer {answer_len} tokens, "
          f"{next(model.parameters()).dtype}", flush=True)

    rows, times, cpu_times = [], {}, {}
    for mode in args.modes:
        row = dict(model=name, mode=mode, prompt=prompt_len, answer=answer_len, backend=args.backend,
                   chunk=args.chunk if mode == "matrix" else None, repeats=args.repeats, **env)
        try:
            run_mode(mode, model, prompt[:8], answer[:2], baseline, args.backend, args.chunk)  # warm-up, small
            samples, cpu = [], []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start, start_cpu = time.perf_counter(), time.process_time()
                out = run_mode(mode, model, prompt, answer, baseline, args.backend, args.chunk)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                samples.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            times[mode] = statistics.median(samples)
            cpu_times[mode] = statistics.median(cpu)
            row.update(status="ok", seconds=times[mode], cpu_seconds=cpu_times[mode])
            if mode == "matrix":
                row["chunk"] = getattr(out, "chunk", None)
        except Exception as err:  # an out-of-memory error or a refusal is a result, not a crash
            if not (is_oom(err) or isinstance(err, gim_fast.InsufficientMemoryError)):
                raise
            row.update(status=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        wall, cpu = row.get("seconds", float("nan")), row.get("cpu_seconds", float("nan"))
        print(f"  {mode:<14} {wall:9.2f} s wall {cpu:9.2f} s CPU  {row['status']}", flush=True)
        rows.append(row)

    ratios = []
    for num, den, target in (("matrix", "explain-calls", 0.5), ("total", "explain-one", 1.2),
                             ("matrix", "sequential", None), ("matrix", "inseq-loop", None),
                             ("sequential", "explain-calls", None)):
        if num in times and den in times:
            ratio = times[num] / times[den]
            goal = "" if target is None else f"   (target ≤ {target}: {'met' if ratio <= target else 'NOT met'})"
            ratios.append(f"{num} / {den} = {ratio:.3f} wall, {cpu_times[num] / cpu_times[den]:.3f} CPU time{goal}")
            for row in rows:
                if row["mode"] == num:
                    row[f"ratio_to_{den}"] = ratio
                    row[f"cpu_ratio_to_{den}"] = cpu_times[num] / cpu_times[den]
    print("\n".join(ratios))
    device_tag = "gpu" if device.type == "cuda" else "cpu"
    csv_path, _ = write_rows(rows, args.out, f"answers_{name}_{device_tag}")
    print(f"rows: {csv_path}")


if __name__ == "__main__":
    main()
