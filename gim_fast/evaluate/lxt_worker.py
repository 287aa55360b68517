"""AttnLRP (LXT 2.1, its efficient Input × Gradient rules) in a side process: the worker that gim_fast talks to.

lxt 2.1 imports only with transformers 4.52, while gim_fast runs on transformers 5. ``gim_fast.evaluate.attnlrp``
therefore starts this file as a script with the main environment's Python (and its torch) and the side install
(``.venv/lxt``: transformers 4.52.4, tokenizers 0.21, huggingface-hub 0.33, lxt 2.1; ``make venv`` builds it) first
on ``PYTHONPATH``. It imports nothing of gim_fast. One worker serves a whole run, one model at a time.

Protocol: one JSON request per line on stdin, one JSON answer per line on stdout (whatever the libraries print
goes to stderr). Every answer has ``"ok"``; a failed request answers ``{"ok": false, "error": "..."}`` and the
worker goes on.

``{"op": "load", "path": DIR, "dtype": "float32", "threads": N}``
    Patch the model family's transformers module with LXT's AttnLRP rules (once), then load the Hugging Face model
    folder ``DIR`` (written by transformers 5; its config is translated, see :func:`legacy_config`), replacing any
    model loaded before. Answers the versions, the model type and the attention implementation.
``{"op": "attribute", "input_ids": [[...], ...], "targets": [...] or null}``
    AttnLRP for rows of equal length (no padding), one target token per row (null: each row's top prediction, as
    ``gim_fast.explain`` does by default): one forward from the input embeddings
    ``e``, one backward of the sum of the rows' raw target logits at the last position (rows do not interact, so
    each row gets its own gradient), relevance ``R[i] = Σ_h e[i,h] · grad[i,h]`` (LXT's recipe). Answers
    ``scores``, the ``targets``, their ``logits`` and ``relevance_sums`` (Σ_i R[i]), all summed in float64.
``{"op": "logits", "input_ids": [[...], ...]}``
    The last position's logits of the (patched) model, base64 of the raw values (native byte order: both processes
    run on one machine), with their ``shape`` and ``dtype``: the main environment compares them with its own.
``{"op": "blocks", "input_ids": [[...]], "target": T}``
    For one row: the relevance entering and leaving every attention and MLP block (see :meth:`WorkerServer.blocks`).
``{"op": "exit"}`` (or the end of stdin) ends the worker.

What LXT's rules do (lxt/efficient/patches.py): RMSNorm with the rsqrt statistic detached (identity rule), the
gated MLP's activation given the gradient act(x)/x (identity rule) and its product's gradient halved (uniform rule),
and every attention function of the module wrapped so that the gradients of q and k are divided by 4 and that of v
by 2 (uniform rule on the two matrix products); the softmax keeps its true gradient (its Taylor rule at x). The
forward pass is unchanged (checked by the ``logits`` comparison).
"""
from __future__ import annotations

import base64
import json
import sys
import time
import types
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]   # this folder is gim_fast/evaluate: its modules must not shadow top-level names

# model_type -> the transformers module LXT 2.1 has AttnLRP rules for
LXT_MODULES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3", "gpt2": "gpt2"}


def legacy_config(cfg: dict) -> dict:
    """A transformers-5 ``config.json`` (as a dict) translated for transformers 4.52.

    transformers 5 keeps the rotary settings in ``rope_parameters`` (per layer type for Gemma 3) and Gemma 3's
    local/global layout in ``layer_types``; 4.52 reads ``rope_theta``/``rope_scaling``, Gemma 3's
    ``rope_local_base_freq`` and ``sliding_window_pattern`` (layer i is global iff (i + 1) % pattern == 0), and
    ``torch_dtype``. Anything 4.52 cannot express raises ValueError (the worker then refuses the model)."""
    cfg = dict(cfg)
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    cfg.pop("dtype", None)
    rope = cfg.pop("rope_parameters", None)
    gemma3 = cfg.get("model_type") == "gemma3_text"
    if rope is not None:
        per_type = isinstance(rope.get("full_attention"), dict)
        full = rope["full_attention"] if per_type else rope
        cfg["rope_theta"] = full["rope_theta"]
        scaling = {k: v for k, v in full.items() if k != "rope_theta"}
        cfg["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
        if gemma3:
            local = rope.get("sliding_attention", full) if per_type else full
            if local.get("rope_type", "default") != "default":
                raise ValueError(f"transformers 4.52's Gemma 3 has no rope scaling for local layers: {local}")
            cfg["rope_local_base_freq"] = local["rope_theta"]
        elif per_type:
            raise ValueError(f"per-layer-type rope_parameters for {cfg.get('model_type')!r} have no 4.52 equivalent")
    if gemma3 and cfg.get("layer_types"):
        kinds = list(cfg.pop("layer_types"))
        n = len(kinds)
        for pattern in range(1, n + 2):
            if kinds == ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]:
                cfg["sliding_window_pattern"] = pattern
                break
        else:
            raise ValueError(f"Gemma 3 layer_types {kinds} are not periodic (layer i global iff (i + 1) % p == 0): "
                             "transformers 4.52's sliding_window_pattern cannot express them")
        cfg.pop("_sliding_window_pattern", None)
    return cfg


def _import_lxt():
    """``lxt.efficient`` imports its ViT rules, and with them torchvision, unconditionally (made optional upstream
    after 2.1). torchvision would pull another torch, so it is not installed: a stand-in module that carries only
    the ``nn`` attribute those rules read is registered for the import and removed right after (transformers has
    already recorded torchvision as absent; the ViT rules are never used here)."""
    import torch
    import transformers  # noqa: F401 - import first: it records which optional packages exist

    names = ("torchvision", "torchvision.models", "torchvision.models.vision_transformer")
    stand_ins = {}
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        stand_ins = {name: types.ModuleType(name) for name in names}
        stand_ins["torchvision.models.vision_transformer"].nn = torch.nn
        stand_ins["torchvision.models"].vision_transformer = stand_ins["torchvision.models.vision_transformer"]
        stand_ins["torchvision"].models = stand_ins["torchvision.models"]
        sys.modules.update(stand_ins)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*zennit.*")   # zennit serves only the vision rules
            import lxt.efficient as lxt_efficient
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
    return lxt_efficient


class WorkerServer:
    """The server side, in the side environment: loads the model, answers the requests that
    ``gim_fast.evaluate.attnlrp.WorkerClient`` sends (JSON lines on stdin, answers on stdout)."""

    def __init__(self):
        self.model = None
        self.patched = set()   # the transformers modules LXT has patched (a module is patched once)

    def load(self, path: str, dtype: str = "float32", threads: int | None = None) -> dict:
        import importlib
        import importlib.metadata

        import torch
        import transformers

        self.model = None   # a new load replaces the model
        if threads:
            torch.set_num_threads(int(threads))
        raw = json.loads((Path(path) / "config.json").read_text())
        model_type = raw.get("model_type")
        if model_type not in LXT_MODULES:
            raise ValueError(f"LXT 2.1 has no AttnLRP rules for model_type {model_type!r}; it has them for "
                             f"{', '.join(sorted(LXT_MODULES))}")
        config = transformers.AutoConfig.for_model(**legacy_config(raw))
        family = importlib.import_module(f"transformers.models.{LXT_MODULES[model_type]}.modeling_"
                                         f"{LXT_MODULES[model_type]}")
        if family.__name__ not in self.patched:
            _import_lxt().monkey_patch(family)
            self.patched.add(family.__name__)
        torch_dtype = getattr(torch, dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, config=config, torch_dtype=torch_dtype)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        return {"model_type": model_type, "class": type(model).__name__, "dtype": dtype,
                "attn_implementation": model.config._attn_implementation, "threads": torch.get_num_threads(),
                "transformers": transformers.__version__, "lxt": importlib.metadata.version("lxt"),
                "torch": torch.__version__}

    def _ids(self, rows):
        import torch

        if self.model is None:
            raise RuntimeError("no model loaded (send a 'load' request first)")
        ids = torch.tensor(rows, dtype=torch.long)
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty list of equal-length rows, got shape {list(ids.shape)}")
        vocab = self.model.get_input_embeddings().num_embeddings
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab})")
        return ids

    def attribute(self, input_ids, targets) -> dict:
        import torch

        ids = self._ids(input_ids)
        if targets is not None:
            targets = torch.tensor(targets, dtype=torch.long).reshape(-1)
            if targets.numel() != ids.shape[0]:
                raise ValueError(f"{targets.numel()} targets for {ids.shape[0]} rows")
        started = time.perf_counter()
        embeds = self.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = self.model(inputs_embeds=embeds, use_cache=False, logits_to_keep=1).logits[:, -1]
        if targets is None:
            targets = logits.detach().argmax(-1)
        picked = logits.gather(1, targets[:, None])[:, 0]
        picked.sum().backward()
        relevance = (embeds.detach() * embeds.grad).double()
        scores, sums = relevance.sum(-1), relevance.sum((1, 2))
        return {"scores": scores.tolist(), "targets": targets.tolist(), "logits": picked.detach().double().tolist(),
                "relevance_sums": sums.tolist(), "seconds": time.perf_counter() - started}

    def blocks(self, input_ids, target: int) -> dict:
        """Where relevance is gained or lost: for one row, Σ a · grad at the input and at the output of every
        attention and MLP block (the residual sums, linear maps and norms around them are conservative under these
        rules), with the target logit and Σ_i R[i]."""
        import re

        import torch

        ids = self._ids(input_ids)
        if ids.shape[0] != 1:
            raise ValueError("blocks takes one row")
        seen, handles = [], []

        def hook(module, args, kwargs, out):
            x = kwargs.get("hidden_states", args[0] if args else None)
            y = out[0] if isinstance(out, tuple) else out
            x.retain_grad()
            y.retain_grad()
            seen.append((module._lxt_block, x, y))

        for name, module in self.model.named_modules():
            if re.fullmatch(r".*\.\d+\.(self_attn|attn|mlp)", name):
                module._lxt_block = name
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
        try:
            embeds = self.model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logit = self.model(inputs_embeds=embeds, use_cache=False, logits_to_keep=1).logits[0, -1, int(target)]
            logit.backward()
        finally:
            for h in handles:
                h.remove()
        rel = lambda t: float((t.detach().double() * t.grad.double()).sum())  # noqa: E731
        return {"logit": float(logit), "relevance_sum": rel(embeds),
                "blocks": [{"block": name, "relevance_in": rel(x), "relevance_out": rel(y)} for name, x, y in seen]}

    def logits(self, input_ids) -> dict:
        import torch

        ids = self._ids(input_ids)
        with torch.no_grad():
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].contiguous()
        return {"shape": list(logits.shape), "dtype": str(logits.dtype).removeprefix("torch."),
                "logits": base64.b64encode(logits.numpy().tobytes()).decode("ascii")}


def main() -> int:
    answers = sys.stdout
    sys.stdout = sys.stderr   # only answers go to the real stdout
    worker = WorkerServer()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            op = request.pop("op")
            if op == "exit":
                break
            if op not in ("load", "attribute", "logits", "blocks"):
                raise ValueError(f"unknown op {op!r}")
            answer = {"ok": True, **getattr(worker, op)(**request)}
        except Exception as e:   # noqa: BLE001 - every failure is an answer; the worker stays up
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
