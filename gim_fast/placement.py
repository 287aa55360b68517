"""Where a model's weights go when it is loaded: accelerate's ``device_map``, ``max_memory`` and
``offload_folder``, parsed and checked before any weight is read.

A ``device_map`` is a strategy (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``), one device
for the whole model, or a dict from module names to devices; a device is ``"cpu"``, ``"disk"`` (read from the
offload folder, or from the model's own safetensors files, when the layer runs), a CUDA index ``N`` or
``"cuda:N"``. ``max_memory`` maps devices to sizes (bytes, or a number with a unit: ``"12GiB"``, ``"500MB"``).
A bad value is a ``ValueError`` of one line saying what was wrong and what is accepted.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Placement", "STRATEGIES", "parse_size", "parse_max_memory", "parse_device_map", "check_device"]

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_ACCEPTED_DEVICES = "cpu, disk, a CUDA index N or cuda:N"
_ACCEPTED_SIZES = "bytes, or a number with a unit: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. 12GiB)"


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(device, *, disk: bool = True) -> str | int:
    """A device of a device map or of ``max_memory``, normalised: ``"cpu"``, ``"disk"`` (unless ``disk=False``)
    or a CUDA index; ValueError for anything else, or for a CUDA device this machine does not have."""
    accepted = _ACCEPTED_DEVICES if disk else "cpu, a CUDA index N or cuda:N"
    if isinstance(device, bool) or not isinstance(device, (int, str)):
        raise ValueError(f"unknown device {device!r}; accepted: {accepted}")
    if isinstance(device, int):
        index = device
    else:
        text = device.strip().lower()
        if text == "cpu" or (disk and text == "disk"):
            return text
        match = re.fullmatch(r"(?:cuda:)?(\d+)|cuda", text)
        if match is None:
            raise ValueError(f"unknown device {device!r}; accepted: {accepted}")
        index = int(match.group(1) or 0)
    count = _cuda_count()
    if not 0 <= index < count:
        have = f"this machine has {count} CUDA device{'s' * (count != 1)}" if count else "CUDA is not available here"
        raise ValueError(f"unknown device {device!r}: {have}")
    return index


def parse_size(value) -> int:
    """Bytes of a size: an int, or a string such as ``"12GiB"``, ``"500 MB"``, ``"1024"``."""
    if isinstance(value, bool):
        raise ValueError(f"unparsable size {value!r}; expected {_ACCEPTED_SIZES}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size is >= 0 bytes, got {value}")
        return value
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or (unit and unit not in _UNITS):
        raise ValueError(f"unparsable size {value!r}; expected {_ACCEPTED_SIZES}")
    return int(float(match.group(1)) * _UNITS[unit or "b"])


def parse_max_memory(value) -> dict[str | int, int] | None:
    """``max_memory`` from a dict ``{device: size}`` or the command line's ``"cpu=12GiB,0=70GiB"``; devices
    normalised (CUDA devices as indices, as accelerate wants them), sizes in bytes."""
    if value is None:
        return None
    if isinstance(value, str):
        pairs = []
        for item in value.split(","):
            device, sep, size = item.partition("=")
            if not sep or not device.strip() or not size.strip():
                raise ValueError(f"unparsable max_memory {value!r}; expected DEVICE=SIZE pairs separated by commas, "
                                 "e.g. cpu=12GiB,0=70GiB")
            pairs.append((device.strip(), size.strip()))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise ValueError(f"max_memory must be a dict {{device: size}} or 'DEVICE=SIZE,...', got {value!r}")
    if not pairs:
        raise ValueError("max_memory is empty; give at least one DEVICE=SIZE")
    out = {}
    for device, size in pairs:
        out[check_device(device)] = parse_size(size)
    return out


def parse_device_map(value):
    """A device map: None, a strategy, one device, a dict ``{module name: device}``, or (from the command line) a
    JSON object or the path of a JSON file holding one; the devices checked and normalised."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text in STRATEGIES:
            return text
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except ValueError as e:
                raise ValueError(f"device_map {value!r} is not valid JSON ({e})") from None
        elif text.lower().endswith(".json") or os.sep in text:
            try:
                value = json.loads(Path(text).expanduser().read_text(encoding="utf-8"))
            except OSError as e:
                raise ValueError(f"device_map {value!r}: cannot read it ({e.strerror or e})") from None
            except ValueError as e:
                raise ValueError(f"device_map {value!r}: not a JSON file ({e})") from None
        else:
            if not re.fullmatch(r"cpu|cuda|(cuda:)?\d+", text.lower()):
                raise ValueError(f"unknown device_map {value!r}; accepted: {', '.join(STRATEGIES)}, one device "
                                 f"(cpu, N, cuda:N), or a JSON object (or .json file) of module names to devices "
                                 f"({_ACCEPTED_DEVICES})")
            device = check_device(text, disk=False)
            return "cpu" if device == "cpu" else f"cuda:{device}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"cuda:{check_device(value, disk=False)}"
    if not isinstance(value, dict) or not value:
        raise ValueError(f"device_map must be a strategy ({', '.join(STRATEGIES)}), a device, or a non-empty dict of "
                         f"module names to devices, got {value!r}")
    out = {}
    for name, device in value.items():
        if not isinstance(name, str):
            raise ValueError(f"device_map keys are module names (strings), got {name!r}")
        try:
            out[name] = check_device(device)
        except ValueError as e:
            raise ValueError(f"device_map[{name!r}]: {e}") from None
    return out


@dataclass(frozen=True)
class Placement:
    """How a model is spread when it loads: ``device_map``, ``max_memory``, ``offload_folder`` (all optional)."""

    device_map: object = None
    max_memory: dict | None = None
    offload_folder: str | None = None

    @classmethod
    def of(cls, device_map=None, max_memory=None, offload_folder=None, *, options: bool = False) -> "Placement":
        """Parse and check everything, before any weight is read: ValueError (one line) for an unknown device,
        an unparsable size, a folder that cannot be written, or an option that needs another. ``max_memory``
        without a ``device_map`` means ``device_map="auto"``. ``options``: name them as the command line does
        (``--device-map``, ...) in the messages."""
        from .outputs import check_output_dir

        name = {k: (f"--{k.replace('_', '-')}" if options else k)
                for k in ("device_map", "max_memory", "offload_folder")}
        try:
            device_map = parse_device_map(device_map)
        except ValueError as e:
            raise ValueError(f"{name['device_map']}: {e}") from None
        try:
            max_memory = parse_max_memory(max_memory)
        except ValueError as e:
            raise ValueError(f"{name['max_memory']}: {e}") from None
        if max_memory is not None and device_map is None:
            device_map = "auto"
        if max_memory is not None and isinstance(device_map, dict):
            raise ValueError(f"{name['max_memory']} sizes the devices of a device map strategy ('auto', ...); a "
                             f"{name['device_map']} that names each module's device takes no {name['max_memory']}")
        if offload_folder is not None:
            offload_folder = os.fspath(check_output_dir(offload_folder, name["offload_folder"]))
            if device_map is None:
                raise ValueError(f"{name['offload_folder']} holds the weights a device map offloads to disk; give "
                                 f"{name['device_map']} (e.g. auto) too")
        return cls(device_map, max_memory, offload_folder)

    def __bool__(self) -> bool:
        return self.device_map is not None

    def kwargs(self) -> dict:
        """The keywords for ``from_pretrained`` (none when nothing was asked for)."""
        out = {}
        if self.device_map is not None:
            out["device_map"] = self.device_map
        if self.max_memory is not None:
            out["max_memory"] = dict(self.max_memory)
        if self.offload_folder is not None:
            out["offload_folder"] = self.offload_folder
        return out
