"""The GPU architectures the Triton kernels are built and screened for, and which one a device is.

Each :class:`Arch` carries the per-block limits a kernel configuration must respect there and the tensor-core
instruction its 16-bit dots should compile to. ``bench/compile_report.py --arch NAME`` compiles every shipped
configuration for ``NAME`` (no GPU needed: Triton compiles for any of these targets on the CPU) and checks them
against these limits; the launchers pick a configuration table by :func:`device_arch`.

Limits, per block (thread block / workgroup):
    shared_bytes   the most shared memory (LDS on AMD) one block may use: the driver's opt-in maximum
    registers      32-bit registers one thread (lane) may use: 255 on NVIDIA; 512 on CDNA 3/4 (256 arch VGPRs
                   + 256 accumulation VGPRs, only at one wave per SIMD; the compiler caps a kernel at
                   512 / waves-per-SIMD)
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["Arch", "ARCHS", "CONSERVATIVE", "KernelCompileError", "device_arch", "arch_name"]


class Arch(NamedTuple):
    name: str           # "sm_90a", "gfx942": the report's and the configuration tables' key
    backend: str        # Triton backend: "cuda" or "hip"
    target: int | str   # what triton.backends.compiler.GPUTarget takes: compute capability (90) or "gfx942"
    warp_size: int      # threads per warp / wavefront
    shared_bytes: int   # shared memory / LDS per block, bytes
    registers: int      # registers per thread / lane
    mma: str            # the tensor-core instruction family of 16-bit dots
    gpus: str           # examples


ARCHS = {a.name: a for a in (
    Arch("sm_80", "cuda", 80, 32, 166912, 255, "mma.sync", "A100, A30"),
    Arch("sm_86", "cuda", 86, 32, 101376, 255, "mma.sync", "RTX A6000, A40, RTX 3090"),
    Arch("sm_89", "cuda", 89, 32, 101376, 255, "mma.sync", "L40S, L4, RTX 4090, RTX 6000 Ada"),
    Arch("sm_90a", "cuda", 90, 32, 232448, 255, "wgmma", "H100, H200, GH200"),
    Arch("sm_100a", "cuda", 100, 32, 232448, 255, "tcgen05.mma", "B200, GB200"),
    Arch("sm_120", "cuda", 120, 32, 101376, 255, "mma.sync", "RTX 5090, RTX PRO 6000 Blackwell"),
    Arch("gfx942", "hip", "gfx942", 64, 65536, 512, "mfma", "MI300X, MI300A, MI325X"),
    Arch("gfx950", "hip", "gfx950", 64, 163840, 512, "mfma", "MI350X, MI355X"),
)}

# The most conservative screened table per vendor: what a device of an architecture without its own table runs
# (smallest shared memory of the screened targets).
CONSERVATIVE = {"cuda": "sm_89", "hip": "gfx942"}


def arch_name(backend: str, target) -> str:
    """The report's name for a Triton target: ``("cuda", 90)`` → ``"sm_90a"``, ``("hip", "gfx942:xnack-")`` →
    ``"gfx942"``. NVIDIA targets from capability 9.0 on have architecture-specific ("a") instructions (wgmma,
    tcgen05) except the consumer Blackwell sm_120, named as its GPUs are sold."""
    if backend == "hip":
        return str(target).split(":")[0]
    capability = int(target)
    return f"sm_{capability}" + ("a" if capability in (90, 100, 101, 103) else "")


def device_arch(device) -> str:
    """The architecture of a CUDA/ROCm ``torch.device`` (see :func:`arch_name`), from the driver."""
    import torch

    props = torch.cuda.get_device_properties(device)
    if getattr(torch.version, "hip", None):
        return arch_name("hip", getattr(props, "gcnArchName", "unknown"))
    return arch_name("cuda", props.major * 10 + props.minor)


class KernelCompileError(RuntimeError):
    """A Triton kernel does not compile for this device (no configuration compiles, or none fits its shared
    memory). ``gim_fast.ops`` catches it under ``backend="auto"`` and runs the torch backend instead."""

    def __init__(self, arch: str | None, kernel: str, detail: str):
        self.arch, self.kernel, self.detail = arch, kernel, detail
        super().__init__(f"the Triton {kernel} kernel does not compile for {arch or 'this GPU'}: {detail}")
