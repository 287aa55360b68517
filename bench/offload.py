"""A model that does not fit in memory, explained with its layers offloaded to disk by accelerate.

    python bench/offload.py                       # write the weights once, run both layouts, compare, report
    python bench/offload.py --write-only          # only write the weights
    python bench/offload.py --delete              # remove the weights folder
    python bench/offload.py --multi-gpu           # several GPUs: Llama-3.1-8B in bf16 spread over all of them

Llama-3.1-8B's published config with random float32 weights (≈32 GB, seeded) is written once as safetensors, one
file per decoder layer plus one each for the embedding and the output head, streamed: one file's tensors are in
memory at a time, never the whole model. A tokenizer is saved beside them (the explained ids are random; it is there
so that ``gim_fast.models.load_pretrained`` takes the folder like any model directory). Then two child processes,
one per layout, each load the folder with ``load_pretrained(device_map=..., max_memory=..., offload_folder=...)``
and explain the same 1,024 random tokens (``gim_fast.explain``, default GIM settings, baseline token 0):

* ``max-memory``: ``device_map="auto"`` with ``max_memory={"cpu": --cpu-memory}``: what fits stays in memory, the
  rest of the layers is read from disk when it runs;
* ``disk``: every decoder layer on disk, the embedding, final norm and head in memory.

``--multi-gpu`` (``bench/gpu_suite.sh multi``) needs no weights on disk: Llama-3.1-8B's config is built on the
meta device, spread over every GPU with ``device_map="auto"`` (accelerate's ``infer_auto_device_map`` over
balanced memory), its weights drawn on their GPUs (bfloat16, seeded), and 8,192 random tokens are explained with
the Triton backend: the time, each GPU's peak (``max_memory_allocated``) and the estimate for it go to
``<out>/multi_gpu.json``.

Each child reports its peak resident memory (``VmHWM`` of the whole process: weights, activations, allocator and
framework), the time of the call, the layout and the memory estimate (the resident weights plus
``gim_fast.memory.model_estimates``); the parent compares the two score vectors (equal within 1e-5 is the check)
and writes ``bench/results/offload.md``/``.json``. Run it under ``flock /tmp/gim_heavy.lock`` on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import environment, proc_status  # noqa: E402
from configs import CONFIGS  # noqa: E402

DEFAULT_FOLDER = Path("/work/scratch/offload/llama-3.1-8b-fp32")
SEED = 20
STD = 0.02          # the initializer range of Llama's config: activations stay in a normal range over 32 layers
TOKENS = 1024
TOLERANCE = 1e-5
MARKER = "written.json"


# ------------------------------------------------------------------------------------------------- the weights
def _config(name: str = "llama-3.1-8b", layers: int | None = None, vocab: int | None = None):
    """A published config of ``bench/configs.py`` (fewer layers or a smaller vocabulary only to try the script)."""
    from transformers import AutoConfig

    model_type, kwargs = CONFIGS[name]
    kwargs = dict(kwargs)
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    if vocab is not None:
        kwargs["vocab_size"] = vocab
    return AutoConfig.for_model(model_type, **kwargs, dtype="float32")


def _shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model's state dict and its shape, from a model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _files(shapes: dict) -> dict[str, list[str]]:
    """Tensor names per file: the embedding, one file per decoder layer, then the final norm and the head."""
    files: dict[str, list[str]] = {}
    for name in shapes:
        if name.startswith("model.layers."):
            key = f"layer-{int(name.split('.')[2]):02d}"
        elif name.startswith("model.embed_tokens"):
            key = "embed"
        else:
            key = "head"
        files.setdefault(key, []).append(name)
    return {f"model-{key}.safetensors": names for key, names in sorted(files.items())}


def _tokenizer():
    """A byte-level tokenizer (256 byte tokens): the folder then loads like any model directory."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab["<|pad|>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return tf.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>")


def write_weights(folder: Path, config) -> dict:
    """Write the model once (skipped when the marker says it is complete); returns the marker."""
    from safetensors.torch import save_file

    marker_path = folder / MARKER
    if marker_path.exists():
        marker = json.loads(marker_path.read_text())
        if marker.get("seed") == SEED and marker.get("config") == config.to_diff_dict() \
                and all((folder / f).exists() for f in marker["files"]):
            print(f"weights already written in {folder}", file=sys.stderr)
            return marker
    folder.mkdir(parents=True, exist_ok=True)
    shapes = _shapes(config)
    files = _files(shapes)
    started = time.perf_counter()
    total = 0
    for index, (file, names) in enumerate(files.items()):
        generator = torch.Generator().manual_seed(SEED * 1000 + index)   # each file reproducible on its own
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name])
            else:
                tensors[name] = torch.randn(shapes[name], generator=generator).mul_(STD)
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        del tensors
        print(f"{file}: {total / 2**30:.1f} GiB written, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    index = {"metadata": {"total_size": total},
             "weight_map": {name: file for file, names in files.items() for name in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    marker = {"seed": SEED, "std": STD, "bytes": total, "files": list(files), "config": config.to_diff_dict(),
              "seconds": round(time.perf_counter() - started, 1)}
    marker_path.write_text(json.dumps(marker, indent=1))
    return marker


# ------------------------------------------------------------------------------------------------ child: one run
def _device_map(layout: str, config, cpu_memory: str):
    """``(device_map, max_memory)`` of a layout."""
    if layout == "max-memory":
        return "auto", {"cpu": cpu_memory}
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" for i in range(config.num_hidden_layers)})
    return device_map, None


def child(args) -> dict:
    import gim_fast
    from gim_fast.integration import decoder_layers, is_offloaded
    from gim_fast.memory import model_estimates, plan_checkpointing
    from gim_fast.models import load_pretrained

    torch.manual_seed(0)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.folder)
    device_map, max_memory = _device_map(args.layout, config, args.cpu_memory)
    offload_folder = tempfile.mkdtemp(prefix="gim-offload-", dir=args.folder.parent)
    started = time.perf_counter()
    model, _ = load_pretrained(args.folder, device_map=device_map, max_memory=max_memory,
                               offload_folder=offload_folder)
    load_seconds = time.perf_counter() - started
    layers = decoder_layers(model)
    on_disk = sum(is_offloaded(layer) for layer in layers)
    resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                   if t.device.type != "meta")
    with torch.no_grad():   # page in the resident weights (mapped from their files): counted before the call
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type != "meta":
                t.sum()
    ids = torch.randint(1, config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(SEED))
    checkpointing = plan_checkpointing(model, args.tokens, 1, backend="torch", num_targets=1)
    estimate = model_estimates(model, args.tokens, 1, backend="torch", checkpointing=checkpointing)
    estimate = estimate[torch.device("cpu")]
    before = proc_status()
    started = time.perf_counter()
    scores = gim_fast.explain(model, ids, baseline_token_id=0)
    seconds = time.perf_counter() - started
    after = proc_status()
    torch.save(scores, args.scores)
    shutil.rmtree(offload_folder, ignore_errors=True)
    return {"layout": args.layout, "device_map": device_map if isinstance(device_map, str) else "every layer on disk",
            "max_memory": max_memory, "layers_on_disk": on_disk, "layers": len(layers),
            "resident_weight_bytes": resident, "load_seconds": round(load_seconds, 1),
            "checkpointing": checkpointing, "seconds": round(seconds, 1), "rss_before_bytes": before["VmRSS"],
            "peak_bytes": after["VmHWM"], "estimate_bytes": estimate.total,
            "estimate_parts": {k: int(v) for k, v in estimate.parts.items()},
            "finite": bool(torch.isfinite(scores).all()), "tokens": args.tokens}


# ------------------------------------------------------------------------------------------------ several GPUs
def multi_gpu(args) -> int:
    """Llama-3.1-8B (random bf16 weights) spread over every GPU with a balanced device map; one explain."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory, set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    import gim_fast
    from gim_fast.memory import model_estimates

    gpus = torch.cuda.device_count()
    if gpus < 2:
        print(f"--multi-gpu: needs at least 2 GPUs, this machine has {gpus}", file=sys.stderr)
        return 2
    config = _config(args.config, args.layers, args.vocab)
    dtype = torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    no_split = model._no_split_modules
    budget = get_balanced_memory(model, dtype=dtype, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    generator = torch.Generator().manual_seed(SEED)
    started = time.perf_counter()
    for name, param in list(model.named_parameters()):
        owner = next(key for key in sorted(device_map, key=len, reverse=True)
                     if key == "" or name == key or name.startswith(key + "."))
        device = device_map[owner]
        if name.endswith("norm.weight"):
            value = torch.ones(param.shape, dtype=dtype, device=device)
        else:
            value = torch.randn(param.shape, generator=generator, dtype=torch.float32).to(device, dtype).mul_(STD)
        set_module_tensor_to_device(model, name, device, value=value)
    rotary = model.model.rotary_emb          # its inv_freq buffer was computed on the meta device: build it again
    model.model.rotary_emb = type(rotary)(config=config).to(f"cuda:{device_map.get('model.rotary_emb', 0)}")
    model = dispatch_model(model, device_map=device_map)
    build_seconds = time.perf_counter() - started
    ids = torch.randint(1, config.vocab_size, (args.multi_tokens,), generator=generator)
    estimates = model_estimates(model, args.multi_tokens, 1, backend="triton", checkpointing=False)
    for gpu in range(gpus):
        torch.cuda.reset_peak_memory_stats(gpu)
    base = {gpu: torch.cuda.memory_allocated(gpu) for gpu in range(gpus)}
    started = time.perf_counter()
    scores = gim_fast.explain(model, ids, baseline_token_id=0)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    row = {"model": "llama-3.1-8b, random bf16 weights", "gpus": gpus,
           "devices": [torch.cuda.get_device_name(g) for g in range(gpus)], "tokens": args.multi_tokens,
           "layers_per_gpu": {str(g): sum(1 for k, v in device_map.items() if v == g and ".layers." in f".{k}.")
                              for g in range(gpus)},
           "build_seconds": round(build_seconds, 1), "explain_seconds": round(seconds, 2),
           "peak_above_weights_bytes": {str(g): torch.cuda.max_memory_allocated(g) - base[g] for g in range(gpus)},
           "estimate_bytes": {str(d): e.total for d, e in estimates.items()},
           "finite": bool(torch.isfinite(scores).all()), "environment": environment(torch.device("cuda", 0))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multi_gpu.json").write_text(json.dumps(row, indent=1))
    print(json.dumps(row, indent=1))
    return 0 if row["finite"] else 1


# ------------------------------------------------------------------------------------------------------ parent
def _others() -> list[str]:
    """Other heavy processes on the machine (python or compilers using > 10 % CPU), for the record."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout
    except OSError:
        return []
    me = {os.getpid()}
    rows = []
    for line in out.splitlines()[1:]:
        pid, cpu, comm = line.split(None, 2)
        if int(pid) not in me and float(cpu) > 10:
            rows.append(f"{comm.strip()} ({cpu} % CPU)")
    return rows


def run(args) -> int:
    marker = write_weights(args.folder, _config(args.config, args.layers, args.vocab))
    env = environment(torch.device("cpu"))
    env.update({name: version(name) for name in ("accelerate", "safetensors")})
    rows, scores = [], {}
    for layout in ("max-memory", "disk"):
        path = Path(tempfile.mkdtemp()) / "scores.pt"
        others = _others()
        cmd = [sys.executable, __file__, "--child", "--layout", layout, "--folder", str(args.folder),
               "--cpu-memory", args.cpu_memory, "--tokens", str(args.tokens), "--scores", str(path)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            row = {"layout": layout, "status": "killed" if proc.returncode in (-9, 137) else "error",
                   "returncode": proc.returncode}
        else:
            row = {**json.loads(lines[-1]), "status": "ok"}
            scores[layout] = torch.load(path)
        row["others_running_at_start"] = others
        rows.append(row)
        print(json.dumps(row), flush=True)
    difference = None
    if len(scores) == 2:
        difference = float((scores["max-memory"] - scores["disk"]).abs().max())
    weights = {"folder": str(args.folder), **{k: v for k, v in marker.items() if k != "config"},
               "model": args.config + (f", {args.layers} layers" if args.layers else "")
               + (f", vocabulary {args.vocab}" if args.vocab else "")}
    result = {"environment": env, "machine": {"cpus": os.cpu_count(), "memory_bytes": _mem_total(),
                                              "platform": platform.platform()},
              "weights": weights, "runs": rows, "max_abs_difference": difference, "tolerance": TOLERANCE}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "offload.json").write_text(json.dumps(result, indent=1))
    (args.out / "offload.md").write_text(_markdown(result))
    print((args.out / "offload.md").read_text())
    ok = (difference is not None and difference <= TOLERANCE
          and all(r.get("peak_bytes", 1 << 62) < 20 * 2**30 for r in rows))
    return 0 if ok else 1


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024


def _markdown(result: dict) -> str:
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    env, machine = result["environment"], result["machine"]
    lines = [f"# A {result['weights']['bytes'] / 1e9:.0f} GB model explained with its layers on disk", "",
             f"{result['weights']['model']}: the published config, random float32 weights "
             f"({gib(result['weights']['bytes'])}, seed "
             f"{result['weights']['seed']}), `gim_fast.explain` of {result['runs'][0].get('tokens', TOKENS)} "
             "random tokens, default GIM settings, torch backend.", "",
             f"{env['device']}, {gib(machine['memory_bytes'])} of memory, {machine['cpus']} CPUs; torch "
             f"{env['torch']}, transformers {env['transformers']}, accelerate {env.get('accelerate', '?')}, "
             f"safetensors {env.get('safetensors', '?')}; {env['date']}.", "",
             "| layout | layers on disk | resident weights | checkpointing | explain (s) | peak resident (VmHWM) | "
             "estimate | others running |", "|---|---:|---:|---|---:|---:|---:|---|"]
    for r in result["runs"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['layout']} | {r['status']} | | | | | | |")
            continue
        estimate = r["estimate_bytes"] + r["rss_before_bytes"]
        mm = f" (max_memory {r['max_memory']})" if r.get("max_memory") else ""
        lines.append(f"| {r['layout']}{mm} | {r['layers_on_disk']} of {r['layers']} | "
                     f"{gib(r['resident_weight_bytes'])} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r['seconds']} | {gib(r['peak_bytes'])} | {gib(estimate)} | "
                     f"{', '.join(r['others_running_at_start']) or 'none'} |")
    diff = result["max_abs_difference"]
    lines += ["", f"Scores of the two layouts: max |difference| = {diff if diff is not None else 'n/a'} "
                  f"(tolerance {result['tolerance']}).", "",
              "The estimate column is the resident memory before the call plus `gim_fast.memory.model_estimates` "
              "for the layout (what the attribution and the loaded offloaded weights add)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help=f"the weights (default {DEFAULT_FOLDER})")
    parser.add_argument("--cpu-memory", default="10GiB", help="max_memory for the CPU in the max-memory layout")
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--config", default="llama-3.1-8b", choices=sorted(CONFIGS), help="the model's config")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (only to try the script out)")
    parser.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary (only to try the script out)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--write-only", action="store_true")
    parser.add_argument("--delete", action="store_true", help="remove the weights folder")
    parser.add_argument("--multi-gpu", action="store_true", help="Llama-3.1-8B (bf16) over every GPU instead")
    parser.add_argument("--multi-tokens", type=int, default=8192, help="tokens of the --multi-gpu explain")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=("max-memory", "disk"), help=argparse.SUPPRESS)
    parser.add_argument("--scores", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.multi_gpu:
        return multi_gpu(args)
    if args.delete:
        shutil.rmtree(args.folder, ignore_errors=True)
        return 0
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    if args.write_only:
        write_weights(args.folder, _config(args.config, args.layers, args.vocab))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
