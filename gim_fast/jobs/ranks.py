"""Who computes which part of a job, and where: the rank and the number of ranks, and each rank's device.

Three ways to split a job's batches over processes, all with the same plan (every process plans the same batches
and takes the ones ``batching.assign_ranks`` gives its rank):

* ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``/``MASTER_PORT``), or an initialised
  ``torch.distributed``: a process group, used for one barrier at the end;
* ``shard=(K, N)`` (``gim-fast attribute --shard K/N``): shard K of N, an independent process;
* a SLURM job array (``sbatch --array=MIN-MAX[:STEP]``) when neither is given: shard
  ``(SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN) / STEP`` of ``SLURM_ARRAY_TASK_COUNT``.

Shards never talk to each other (no process group, no shared clock): each computes its own batches, writes its own
Parquet files and resumes alone after a requeue; whichever finishes last marks the job complete.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..placement import Placement
from .inputs import InputError

__all__ = ["Ranks", "parse_shard", "resolve_ranks", "check_device", "default_device", "rank_placement",
           "rank_gpus"]

_SLURM = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")


@dataclass(frozen=True)
class Ranks:
    """This process's rank of ``world``, whether it started the process group (and must end it), and how the
    split was given (``"single"``, ``"torchrun"``, ``"shard"``, ``"slurm"``)."""

    rank: int
    world: int
    own_group: bool = False
    source: str = "single"

    @property
    def independent(self) -> bool:
        """Shards of a ``--shard`` or SLURM split: no process group, nothing shared but the output folder."""
        return self.source in ("shard", "slurm")


def parse_shard(value) -> tuple[int, int]:
    """``(K, N)`` from ``"K/N"`` or a pair, 0 ≤ K < N; ValueError (one line) otherwise."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
        if match is None:
            raise ValueError(f"shard {value!r}: expected K/N, shard K (from 0) of N, e.g. 0/3")
        value = (int(match.group(1)), int(match.group(2)))
    try:
        k, n = value
    except (TypeError, ValueError):
        raise ValueError(f"shard must be 'K/N' or a pair (K, N), got {value!r}") from None
    if any(isinstance(x, bool) or not isinstance(x, int) for x in (k, n)) or n < 1 or not 0 <= k < n:
        raise ValueError(f"shard {k}/{n}: expected 0 <= K < N (shards are numbered from 0)")
    return k, n


def _torchrun_env() -> bool:
    return any(os.environ.get(key) for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"))


def _slurm_shard() -> tuple[int, int] | None:
    """The shard of a SLURM job array task, None outside one; InputError for an array that is not a range."""
    if not all(os.environ.get(key) for key in _SLURM):
        return None
    try:
        task, first, count = (int(os.environ[key]) for key in _SLURM)
        step = int(os.environ.get("SLURM_ARRAY_TASK_STEP") or 1)
        last = int(os.environ.get("SLURM_ARRAY_TASK_MAX") or first + step * (count - 1))
    except ValueError:
        raise InputError("SLURM_ARRAY_TASK_ID/MIN/COUNT/STEP are not integers; give --shard K/N") from None
    if step < 1 or (task - first) % step or first + step * (count - 1) != last or not first <= task <= last:
        raise InputError(f"this SLURM array (task {task}, min {first}, max {last}, step {step}, count {count}) is "
                         "not a range MIN-MAX[:STEP]; use --array=0-N or give --shard K/N to each task")
    return (task - first) // step, count


def resolve_ranks(shard=None) -> Ranks:
    """This process's rank: from an initialised ``torch.distributed``, torchrun's environment, ``shard``, or a
    SLURM job array, in that order (``shard`` beside a process group or torchrun is an error)."""
    if dist.is_available() and dist.is_initialized():
        if shard is not None:
            raise InputError("--shard splits rows between independent processes; this one is in a torch.distributed "
                             "process group, which splits them already: drop --shard")
        return Ranks(dist.get_rank(), dist.get_world_size(), False, "torchrun")
    if _torchrun_env():
        if shard is not None:
            raise InputError("--shard splits rows between independent processes; under torchrun the processes split "
                             "them already: drop --shard (or run without torchrun)")
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("RANK", "0") or 0)
        if world > 1 and dist.is_available() and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            # gloo for coordination only (one barrier at the end); the model runs on each rank's own device.
            # Ranks may finish hours apart: the barrier waits long.
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
            return Ranks(dist.get_rank(), dist.get_world_size(), True, "torchrun")
        if not 0 <= rank < world:
            raise InputError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return Ranks(rank, world, False, "torchrun" if world > 1 else "single")
    if shard is not None:
        k, n = parse_shard(shard)
        return Ranks(k, n, False, "shard" if n > 1 else "single")
    slurm = _slurm_shard()
    if slurm is not None:
        return Ranks(slurm[0], slurm[1], False, "slurm" if slurm[1] > 1 else "single")
    return Ranks(0, 1)


# -------------------------------------------------------------------------------------------------- devices


def check_device(device) -> None:
    """``device`` is cpu, cuda or cuda:N of this machine; InputError otherwise."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {device!r} is not a device; accepted: cpu, cuda, cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r}: CUDA is not available here; use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices")
    elif parsed.type != "cpu":
        raise InputError(f"device {device!r}: accepted: cpu, cuda, cuda:N")


def default_device(device, rank: int, world: int) -> torch.device:
    """``device`` if given, else this process's GPU (``LOCAL_RANK`` modulo the GPUs), else the CPU."""
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank if world > 1 else 0))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def rank_gpus(gpus: int, local_rank: int, local_world: int) -> list[int]:
    """The GPUs of a node that local process ``local_rank`` of ``local_world`` spreads its model over: an equal,
    disjoint share (the first ``gpus // local_world`` for rank 0, ...); InputError when there are fewer GPUs than
    processes."""
    share = gpus // local_world
    if share < 1:
        raise InputError(f"a device map over {gpus} GPU{'s' * (gpus != 1)} with {local_world} processes on this node: "
                         "each process needs at least one GPU of its own; start fewer processes per node")
    return list(range(local_rank * share, (local_rank + 1) * share))


def rank_placement(placement: Placement, ranks: Ranks) -> Placement:
    """The placement of this process: under torchrun with several processes on a node, a device-map strategy
    (``auto``, ...) is confined to this process's share of the node's GPUs (:func:`rank_gpus`) through
    ``max_memory``; anything else is used as given."""
    if not placement or ranks.source != "torchrun" or not isinstance(placement.device_map, str) \
            or placement.device_map not in ("auto", "balanced", "balanced_low_0", "sequential") \
            or not torch.cuda.is_available():
        return placement
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world) or ranks.world)
    local_rank = int(os.environ.get("LOCAL_RANK", ranks.rank % local_world) or 0)
    mine = rank_gpus(torch.cuda.device_count(), local_rank, local_world)
    from accelerate.utils import get_max_memory   # the free memory of every device, as accelerate counts it

    given = dict(placement.max_memory or {})
    available = get_max_memory()
    budget = {gpu: given.get(gpu, available[gpu]) for gpu in mine}
    budget["cpu"] = given.get("cpu", available.get("cpu", 0) // local_world)
    if "disk" in given:
        budget["disk"] = given["disk"]
    return Placement(placement.device_map, budget, placement.offload_folder)
