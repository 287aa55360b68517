"""Dataset-job throughput: batched attribution (``attribute_dataset``) against one row at a time.

    python bench/throughput.py                 # CPU: SmolLM2-135M on the 193 "The capital of {country} is" prompts
    python bench/throughput.py --gpu           # GPU: the Llama-3.1-8B config (random weights, bf16), 512-token prompts

Modes: ``explain-loop`` (``gim_fast.explain`` on each prompt alone: what a user without batching writes),
``one-row`` (``attribute_dataset(batch_size=1)``), and ``batched`` at each ``--batch-tokens`` budget. Every mode runs
on the same preloaded model and attributes the model's own top prediction; the time is the wall time of the whole
pass (tokenization, planning and decoding included, model loading excluded), the median of ``--repeats`` passes after
one untimed warm-up pass on a few prompts. tokens/s counts real (unpadded) prompt tokens. Rows go to
``bench/results/throughput_<device>.csv/.json`` with the device, versions and date.

The CPU prompts come from the ``country-capitals`` package (``pip install country-capitals``; its 193 ISO-3166
alpha-3 codes are named with pycountry's common name where there is one). Speed does not depend on weight values,
so the GPU run builds the real Llama-3.1-8B config with random weights and a word-level tokenizer over its 128,256
ids, and attributes random 512-token prompts; the target is ≥ 8,000 tokens/s on one H100.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gim_fast  # noqa: E402
from common import environment, is_oom, write_rows  # noqa: E402

LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def capital_prompts() -> list[str]:
    """'The capital of {country} is' for the 193 countries of the country-capitals package (gim_fast.data)."""
    from gim_fast.data import capital_prompts as prompts

    try:
        return prompts()
    except ModuleNotFoundError as e:
        sys.exit(str(e))


def llama_8b(device: torch.device, dtype: torch.dtype):
    """The Llama-3.1-8B architecture with random weights, and a word-level tokenizer 't0' … 't128255'."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = tf.LlamaConfig(**LLAMA_31_8B)
    with torch.device(device):
        model = tf.LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t0", pad_token="t0")
    return model, tokenizer


def random_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (count, length), generator=g)
    return [" ".join(f"t{i}" for i in row.tolist()) for row in ids]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode: str, model, tokenizer, prompts, device, batch_tokens: int | None, backend: str) -> int:
    """One pass over the prompts; returns the number of attributed rows."""
    if mode == "explain-loop":
        for text in prompts:
            ids = tokenizer(text, return_tensors="pt").input_ids[0].to(device)
            gim_fast.explain(model, ids, tokenizer=tokenizer, backend=backend)
        return len(prompts)
    kwargs = dict(batch_size=1) if mode == "one-row" else dict(batch_tokens=batch_tokens)
    run = gim_fast.attribute_dataset(prompts, model, tokenizer=tokenizer, backend=backend, **kwargs)
    return sum(1 for _ in run)


def measure(mode, model, tokenizer, prompts, device, batch_tokens, backend, repeats) -> dict:
    run_mode(mode, model, tokenizer, prompts[:4], device, batch_tokens, backend)        # warm-up
    tokens = sum(len(tokenizer(p).input_ids) for p in prompts)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        rows = run_mode(mode, model, tokenizer, prompts, device, batch_tokens, backend)
        _sync(device)
        times.append(time.perf_counter() - start)
        assert rows == len(prompts)
    seconds = statistics.median(times)
    return {"mode": mode, "batch_tokens": batch_tokens, "rows": len(prompts), "tokens": tokens,
            "seconds_p50": round(seconds, 3), "seconds_min": round(min(times), 3), "repeats": repeats,
            "rows_per_s": round(len(prompts) / seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true",
                        help="the GPU benchmark: Llama-3.1-8B config, bf16, random 512-token prompts")
    parser.add_argument("--model", default="smollm2-135m", help="CPU run: the model (default smollm2-135m)")
    parser.add_argument("--prompts", type=int, default=None,
                        help="GPU run: number of random prompts (default 256); CPU run: use the first N capitals")
    parser.add_argument("--prompt-length", type=int, default=512, help="GPU run: tokens per prompt (default 512)")
    parser.add_argument("--batch-tokens", type=int, nargs="+", default=None,
                        help="budgets to measure (default CPU: 4096; GPU: 8192 16384 32768)")
    parser.add_argument("--modes", nargs="+", default=None, choices=("explain-loop", "one-row", "batched"),
                        help="default: all three on CPU; one-row and batched on GPU")
    parser.add_argument("--backend", default="auto", help="gim_fast attention backend (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA device")
        device, dtype = torch.device("cuda"), torch.bfloat16
        model, tokenizer = llama_8b(device, dtype)
        prompts = random_prompts(args.prompts or 256, args.prompt_length, model.config.vocab_size)
        budgets = args.batch_tokens or [8192, 16384, 32768]
        modes = args.modes or ["one-row", "batched"]
        name = "llama-3.1-8b-config (random weights)"
    else:
        from gim_fast.models import load_pretrained

        device, dtype = torch.device("cpu"), torch.float32
        model, tokenizer = load_pretrained(args.model)
        prompts = capital_prompts()[: args.prompts]
        budgets = args.batch_tokens or [4096]
        modes = args.modes or ["explain-loop", "one-row", "batched"]
        name = args.model

    env = environment(device)
    base = {"model": name, "dtype": str(dtype).removeprefix("torch."), "backend": args.backend,
            "threads": torch.get_num_threads() if device.type == "cpu" else None}
    rows = []
    plan = [(m, None) for m in modes if m != "batched"] + [("batched", b) for b in budgets if "batched" in modes]
    for mode, budget in plan:
        try:
            result = measure(mode, model, tokenizer, prompts, device, budget, args.backend, args.repeats)
            result["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - an OOM is a result, anything else is re-raised
            if not is_oom(err):
                raise
            torch.cuda.empty_cache()
            result = {"mode": mode, "batch_tokens": budget, "status": "oom"}
        rows.append({**base, **result, **env})
        if result["status"] == "ok":
            print(f"{mode:12} budget {budget or '-':>6}  {result['rows']} rows, {result['tokens']} tokens in "
                  f"{result['seconds_p50']:.2f} s: {result['rows_per_s']:8.2f} rows/s {result['tokens_per_s']:10.1f} "
                  "tokens/s", flush=True)
        else:
            print(f"{mode:12} budget {budget or '-':>6}  out of memory", flush=True)
    one_row = next((r for r in rows if r["mode"] == "one-row" and r["status"] == "ok"), None)
    for r in rows:
        if one_row and r["status"] == "ok":
            r["speedup_vs_one_row"] = round(r["tokens_per_s"] / one_row["tokens_per_s"], 2)
    best = max((r for r in rows if r["mode"] == "batched" and r["status"] == "ok"),
               key=lambda r: r["tokens_per_s"], default=None)
    if best and one_row:
        print(f"batched / one-row: {best['speedup_vs_one_row']:.2f}x tokens/s (budget {best['batch_tokens']})")
    tag = env["device"].split("(")[0].strip().replace(" ", "_").lower()
    paths = write_rows(rows, args.out, f"throughput_{'gpu' if args.gpu else 'cpu'}_{tag}")
    print("wrote", *paths)


if __name__ == "__main__":
    main()
