"""AttnLRP (LXT 2.1) for the faithfulness evaluation, computed by a worker process in a side environment.

lxt 2.1 fails to import with transformers 5 (it needs ``transformers.pytorch_utils.find_pruneable_heads_and_indices``)
and works with transformers 4.52. So AttnLRP runs in ``lxt_worker.py``, a process started with this Python
(the same torch) on an isolated path: the side install ``.venv/lxt`` (``sys.prefix/lxt``; ``$GIM_FAST_LXT``
overrides it), which ``make venv`` fills with :data:`SIDE_PACKAGES` using ``pip install --no-deps --target``, then
a folder of links to exactly the main environment's distributions that the side packages require (their declared
requirements, followed transitively; see :func:`shared_folder`), then the standard library. Nothing else of this
environment is visible to the worker (it runs with ``python -S``): a package that transformers 5 adds to the main
environment (Hugging Face's ``kernels``, which transformers 4.52 would import if it saw it) cannot reach the side
install. One worker serves the whole run (closed at exit, or by :func:`close_all`); it
loads the *same model files* as the model it explains (the folder that model was loaded from),
gets the same token ids and explains the same target (the raw logit at the last position); requests and answers are
JSON lines over its stdin/stdout, one request per batch.

Before a prompt's AttnLRP scores are used, the side model's last-position logits for that prompt are compared with
this environment's model's: a relative difference max|Δ| / max|logits| above :data:`LOGIT_RTOL` refuses the method
(:class:`MethodUnavailable`) instead of reporting scores of a different model.

What the scores are: LXT's relevance ``R[i] = Σ_h e[i,h] · g[i,h]``, the input embeddings ``e`` times the
AttnLRP-modified gradient ``g`` of the target logit ``f(x)``. The rules are conservative (relevance in = relevance
out) at every linear map, residual sum, normalisation (identity rule), activation (identity rule) and product
(uniform rule), but not at the softmax, whose rule is its first-order Taylor expansion at x and drops a bias term.
So ``Σ_i R[i] = f(x)`` minus what the softmaxes absorb: the conservation gap ``Σ_i R[i] − f(x)`` is reported per
example. The implied baseline is the zero embedding (no reference input); gradient methods here use the baseline
token's embedding instead.
"""
from __future__ import annotations

import atexit
import base64
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .unavailable import MethodUnavailable

__all__ = ["SIDE_PACKAGES", "LOGIT_RTOL", "side_dir", "unavailable", "shared_distributions", "shared_folder",
           "model_dir", "WorkerClient", "worker_for",
           "check_logits", "prepare", "attribute", "conservation_by_block", "close_all"]

# What `make venv` installs into the side folder with --no-deps: everything else transformers 4.52 needs (numpy,
# safetensors, regex, requests, tqdm, pyyaml, filelock, packaging, accelerate) is taken from the main environment
# in versions 4.52 accepts; tokenizers and huggingface-hub are pinned here because the main ones (0.23, 1.x) are
# outside its ranges (<0.22, <1.0). lxt's own install_requires (torchvision via open_clip_torch, bitsandbytes,
# zennit, matplotlib...) serve its vision and quantisation code only.
SIDE_PACKAGES = ("transformers==4.52.4", "tokenizers==0.21.1", "huggingface-hub==0.33.0", "lxt==2.1")
SIDE_ENV_VAR = "GIM_FAST_LXT"
LOGIT_RTOL = 1e-4
WORKER = Path(__file__).with_name("lxt_worker.py")


def side_dir() -> Path:
    """The side install: ``$GIM_FAST_LXT``, else ``<this environment's prefix>/lxt`` (``.venv/lxt``)."""
    return Path(os.environ.get(SIDE_ENV_VAR) or Path(sys.prefix) / "lxt")


def install_command(side: Path | None = None) -> str:
    side = side or side_dir()
    return f"{sys.executable} -m pip install --no-deps --target {side} " + " ".join(SIDE_PACKAGES)


def unavailable() -> str | None:
    """Why AttnLRP cannot run here (no side install, or the wrong versions in it); None if it can."""
    side = side_dir()
    fix = f"`make venv` builds it, or: {install_command(side)} (${SIDE_ENV_VAR} points elsewhere)"
    if not side.is_dir():
        return f"no AttnLRP side install at {side}: {fix}"
    found = {d.metadata["Name"].lower(): d.version for d in importlib.metadata.distributions(path=[str(side)])}
    wanted = dict(p.lower().split("==") for p in SIDE_PACKAGES)
    wrong = [f"{name} {found.get(name, 'missing')} (want {version})" for name, version in wanted.items()
             if found.get(name) != version]
    if wrong:
        return f"the AttnLRP side install at {side} is incomplete: {', '.join(wrong)}; {fix}"
    return None


def _requirements(dist: importlib.metadata.Distribution) -> list[str]:
    """The names of the distributions ``dist`` requires unconditionally (no extra) on this machine."""
    names = []
    for line in dist.requires or ():
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(canonicalize_name(req.name))
    return names


def shared_distributions(side: Path) -> list[importlib.metadata.Distribution]:
    """The main environment's distributions that the side packages require, directly or through one another:
    start from the requirements of every distribution in ``side``, take those that ``side`` does not hold from the
    main environment (where installed: lxt lists packages of its vision and quantisation code that are not), and
    follow their requirements in turn."""
    local = {canonicalize_name(d.metadata["Name"]): d for d in importlib.metadata.distributions(path=[str(side)])}
    todo = [name for dist in local.values() for name in _requirements(dist)]
    shared: dict[str, importlib.metadata.Distribution] = {}
    while todo:
        name = todo.pop()
        if name in local or name in shared:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        shared[name] = dist
        todo.extend(_requirements(dist))
    return sorted(shared.values(), key=lambda d: canonicalize_name(d.metadata["Name"]))


def shared_folder(side: Path, folder: Path) -> Path:
    """Fill ``folder`` with links to the top-level entries (packages, modules, ``.dist-info``) of
    :func:`shared_distributions`, so that the worker sees those distributions and nothing else of this
    environment. Returns ``folder``."""
    for dist in shared_distributions(side):
        site = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or () if not str(f).startswith("..")}
        for top in sorted(tops - {"__pycache__"}):
            link = folder / top
            if (site / top).exists() and not link.exists():
                link.symlink_to(site / top, target_is_directory=(site / top).is_dir())
    return folder


def model_dir(model) -> Path:
    """The Hugging Face folder the model was loaded from (the worker loads the same files)."""
    name = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    path = Path(name) if name else None
    if path is None or not (path / "config.json").is_file():
        raise MethodUnavailable(f"attnlrp runs LXT on the model's files in a side process, but this model was not "
                                f"loaded from a Hugging Face folder (name_or_path {name!r}); save it with "
                                "save_pretrained() and load it from there")
    return path.resolve()


class WorkerClient:
    """The client side: starts one ``lxt_worker.py`` process (CPU, this process's thread count), which serves one
    model at a time (its ``WorkerServer``), and sends it requests as JSON lines."""

    def __init__(self, threads: int | None = None, side: Path | None = None):
        reason = unavailable() if side is None else None
        if reason:
            raise MethodUnavailable(reason)
        self.side = Path(side or side_dir())
        self.threads = threads or torch.get_num_threads()
        self._shared = shared_folder(self.side, Path(tempfile.mkdtemp(prefix="gim_fast_lxt_shared_")))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(self.side), str(self._shared)]), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self._stderr = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
        # -S: no site-packages (and no .pth files) of this environment; the path is PYTHONPATH + the standard library
        self._proc = subprocess.Popen([sys.executable, "-S", str(WORKER)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, env=env, text=True, bufsize=1)
        self.loaded: tuple | None = None   # (folder, dtype) of the model the worker holds
        self.info: dict = {}
        self.checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> prompts whose logits agree

    def use(self, path: Path, dtype: str = "float32") -> dict:
        """Make the worker hold the model in ``path`` (loaded as ``dtype``), loading it unless it already does."""
        if self.loaded != (str(path), dtype):
            self.loaded, self.checked = None, weakref.WeakKeyDictionary()
            self.info = self.request(op="load", path=str(path), dtype=dtype, threads=self.threads)
            self.loaded = (str(path), dtype)
        return self.info

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _stderr_tail(self, lines: int = 15) -> str:
        self._stderr.seek(0)
        return "\n".join(self._stderr.read().strip().splitlines()[-lines:])

    def request(self, **payload) -> dict:
        if self._proc.poll() is not None:
            raise MethodUnavailable(f"the AttnLRP worker has exited (code {self._proc.returncode}):\n"
                                    f"{self._stderr_tail()}")
        try:
            self._proc.stdin.write(json.dumps(payload) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self._proc.wait(timeout=30)
            raise MethodUnavailable(f"the AttnLRP worker died (code {self._proc.returncode}) during "
                                    f"{payload.get('op')!r}:\n{self._stderr_tail()}")
        answer = json.loads(line)
        if not answer.pop("ok"):
            raise MethodUnavailable(f"AttnLRP worker ({self.side}): {payload.get('op')} failed: {answer['error']}")
        return answer

    def attribute(self, input_ids: torch.Tensor, targets: list[int] | None = None) -> dict:
        """The worker's answer for rows ``[B, S]``; ``targets`` None: each row's top prediction."""
        return self.request(op="attribute", input_ids=input_ids.tolist(),
                            targets=None if targets is None else [int(t) for t in targets])

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        answer = self.request(op="logits", input_ids=input_ids.tolist())
        raw = bytearray(base64.b64decode(answer["logits"]))
        return torch.frombuffer(raw, dtype=getattr(torch, answer["dtype"])).reshape(answer["shape"])

    def blocks(self, input_ids: torch.Tensor, target: int) -> dict:
        return self.request(op="blocks", input_ids=input_ids.reshape(1, -1).tolist(), target=int(target))

    def close(self) -> None:
        """Stop the worker. It holds no state worth a graceful exit (which costs seconds of interpreter teardown)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            stream.close()
        self._stderr.close()
        shutil.rmtree(self._shared, ignore_errors=True)


_WORKERS: dict[tuple, WorkerClient] = {}


def _dtype_name(model) -> str:
    return str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")


def worker_for(model) -> WorkerClient:
    """The worker, started on first use (one per side install and thread count; another one is closed first),
    holding this model's files in its dtype."""
    key = (str(side_dir()), torch.get_num_threads())
    if key not in _WORKERS:
        close_all()
        _WORKERS[key] = WorkerClient(key[1])
    worker = _WORKERS[key]
    worker.use(model_dir(model), _dtype_name(model))
    return worker


def close_all() -> None:
    while _WORKERS:
        _WORKERS.popitem()[1].close()


atexit.register(close_all)


def _key(row: torch.Tensor) -> bytes:
    return row.cpu().numpy().tobytes()


@torch.no_grad()
def check_logits(model, batches: list[torch.Tensor]) -> dict:
    """Compare the side model's last-position logits with ``model``'s on every row of ``batches`` (each
    ``[B, S]``); refuse (MethodUnavailable) above :data:`LOGIT_RTOL`. Returns the worst relative difference,
    the number of prompts checked and the worker's versions."""
    worker = worker_for(model)
    device = model.get_input_embeddings().weight.device
    checked = worker.checked.setdefault(model, set())
    worst, n = 0.0, 0
    for ids in batches:
        ids = torch.as_tensor(ids).long().cpu()
        ours = model(input_ids=ids.to(device), use_cache=False, logits_to_keep=1).logits[:, -1].double().cpu()
        theirs = worker.logits(ids).double()
        rel = ((ours - theirs).abs().amax(-1) / ours.abs().amax(-1)).tolist()
        for row, r in zip(ids, rel):
            n += 1
            worst = max(worst, r)
            if not r <= LOGIT_RTOL:
                raise MethodUnavailable(
                    f"refusing to report AttnLRP: the side install's model ({worker.info['transformers']}) gives "
                    f"other logits than this environment's on a {row.numel()}-token prompt: max |Δ| / max |logit| = "
                    f"{r:.2e} > {LOGIT_RTOL:g} ({worker.loaded[0]})")
            checked.add(_key(row))
    return {"attnlrp_logit_max_rel_diff": worst, "attnlrp_prompts_checked": n,
            "attnlrp_side": {k: worker.info[k] for k in ("transformers", "lxt", "torch", "attn_implementation")}}


def attribute(model, input_ids: torch.Tensor, targets: list[int]) -> tuple[torch.Tensor, dict]:
    """AttnLRP scores ``[B, S]`` (float32, CPU) for equal-length rows and one target token per row, and per-row
    diagnostics: the target logit f(x), Σ_i R[i] and the conservation gap Σ_i R[i] − f(x). Rows whose logits were
    not compared with the side model's yet are compared first (see :func:`check_logits`)."""
    worker = worker_for(model)
    ids = torch.as_tensor(input_ids).long().cpu()
    done = worker.checked.get(model, set())
    fresh = [i for i in range(ids.shape[0]) if _key(ids[i]) not in done]
    if fresh:
        check_logits(model, [ids[fresh]])
    answer = worker.attribute(ids, targets)
    logits, sums = answer["logits"], answer["relevance_sums"]
    return torch.tensor(answer["scores"], dtype=torch.float32), {
        "attnlrp_logit": logits, "attnlrp_relevance_sum": sums,
        "attnlrp_conservation_gap": [s - f for s, f in zip(sums, logits)]}


def conservation_by_block(model, input_ids: torch.Tensor, target: int) -> dict:
    """Where AttnLRP's conservation gap arises, for one prompt ``[S]`` and target token: the target logit f(x),
    Σ_i R[i], their gap, and the relevance the attention blocks and the MLP blocks each add in total
    (Σ over blocks of relevance in − relevance out). The residual sums, linear maps and norms between blocks are
    conservative, so the gap Σ_i R[i] − f(x) equals the sum of the two."""
    answer = worker_for(model).blocks(torch.as_tensor(input_ids).long().cpu(), target)
    added = {"attention": 0.0, "mlp": 0.0}
    for block in answer["blocks"]:
        kind = "mlp" if block["block"].endswith(".mlp") else "attention"
        added[kind] += block["relevance_in"] - block["relevance_out"]
    return {"logit": answer["logit"], "relevance_sum": answer["relevance_sum"],
            "gap": answer["relevance_sum"] - answer["logit"], "attention_blocks": added["attention"],
            "mlp_blocks": added["mlp"], "blocks": len(answer["blocks"])}


def prepare(model, batches: list[torch.Tensor]) -> dict:
    """Before timed attributions of ``batches``: start the worker, load the model, compare the logits of every
    row (:func:`check_logits`) and attribute every batch once as a warm-up (first-call and first-shape costs stay
    out of the timings, as the evaluation does for the gradient methods)."""
    checks = check_logits(model, batches)
    worker = worker_for(model)
    for ids in batches:
        worker.attribute(torch.as_tensor(ids).long().cpu())
    return checks
