"""What every benchmark shares: timing with quantiles, peak memory, the environment, CSV/JSON rows."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def environment(device: torch.device) -> dict:
    """Device name, versions and date: stamped on every row so a result file explains itself."""
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_quantiles(fn, device: torch.device, *, warmup: int = 2, repeats: int = 10,
                   quantiles=(0.2, 0.5, 0.8)) -> list[float]:
    """Milliseconds at the given quantiles over ``repeats`` timed calls (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    if len(times) == 1:
        return [times[0]] * len(quantiles)
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return [cuts[int(q * 100) - 1] for q in quantiles]


def peak_memory(fn, device: torch.device) -> int | None:
    """Peak bytes allocated by ``fn`` above what was allocated before (CUDA only; None elsewhere)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def proc_status() -> dict[str, int]:
    """Bytes of VmRSS (resident set) and VmHWM (its peak) of this process, from /proc (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def write_rows(rows: list[dict], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``rows`` as ``<stem>.csv`` and ``<stem>.json`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=1))
    return csv_path, json_path
