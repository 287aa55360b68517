"""Minimal reproducer, ready to report to Triton: a reduction of a rank-1 tensor to a scalar, downstream of a
tensor-memory load, breaks the compile for sm_100a.

    python bench/results/triton_tmem_reduce_repro.py          # compiles for sm_100a on any machine, no GPU
    python bench/results/triton_tmem_reduce_repro.py --fixed  # the same kernel with the workaround: compiles

Triton 3.7.1 (its bundled LLVM), compiled for GPUTarget("cuda", 100, 32), prints

    <unknown>:0: error: parent layout must have at least rank >= 2
    python: .../mlir/IR/StorageUniquerSupport.h:180: static ConcreteT mlir::detail::StorageUserBase<
        mlir::triton::gpu::SliceEncodingAttr, ...>::get(...): Assertion `succeeded(ConcreteT::verifyInvariants(
        getDefaultDiagnosticEmitFn(ctx), args...))' failed.
    ... note: Pipeline failed while executing [`TritonNvidiaGPUOptimizeTMemLayoutsPass` on 'builtin.module'
        operation]

and raises ``RuntimeError: PassManager::run failed`` (checked in the main thread, a thread and a spawned
process: MLIR's crash recovery, which Triton's pass manager turns on, catches the assertion). Where that recovery
is not in place the failed assertion aborts the Python process, which is how gim_fast's forward kernel was first
reported to fail on sm_100a. Expected: the kernel compiles, as it does for sm_90a and sm_80.

Cause, as far as the pass's source shows: ``TMemToSharedMemPattern`` (lib/Dialect/TritonNvidiaGPU/Transforms/
OptimizeTMemLayouts.cpp) follows a ``ttng.tmem_load``'s users with ``inferDstEncoding``; for ``tt.reduce`` that
returns ``SliceEncodingAttr::get(axis, encoding)`` also when the reduce's operand is already rank 1 (its
encoding a slice layout) and its result is a scalar, and the slice layout's verifier rejects a rank-1 parent.
The walk stops at ops whose encoding it cannot infer (``tt.scan`` of a non-blocked layout, control flow), so any
such op between the load and the scalar reduction avoids it.

Workaround used in ``kernels/attention.py`` (``_block_max``, only when compiling for the sm_100 family): pass the
rank-1 vector through ``tl.associative_scan`` along a length-1 axis (``v[:, None]``, a no-op on the values)
before the scalar reduction.
"""
import sys

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget


class Sm100Target:
    """Compile for sm_100a without a GPU (Triton asks the driver only for the target)."""

    def get_current_target(self):
        return GPUTarget("cuda", 100, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def kernel(A, B, Out, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, FIXED: tl.constexpr):
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, K)
    a = tl.load(A + rm[:, None] * K + rk[None, :])
    b = tl.load(B + rk[:, None] * N + rn[None, :])
    s = tl.dot(a, b)                  # tcgen05.mma: the accumulator lives in tensor memory (tmem_load)
    row_max = tl.max(s, 1)            # [M], a slice layout of the load's layout
    if FIXED:                         # the workaround: a scan the layout pass cannot see through
        row_max = tl.max(tl.associative_scan(row_max[:, None], 1, _max), 1)
    tl.store(Out, tl.max(row_max, 0))   # rank 1 -> scalar: the assertion


def main() -> int:
    triton.runtime.driver.set_active(Sm100Target())
    a = torch.empty(128, 64, dtype=torch.bfloat16, device="meta")
    b = torch.empty(64, 64, dtype=torch.bfloat16, device="meta")
    out = torch.empty(1, dtype=torch.float32, device="meta")
    kernel.warmup(a, b, out, M=128, N=64, K=64, FIXED="--fixed" in sys.argv, grid=(1,), num_warps=4)
    print(f"compiled for sm_100a with Triton {triton.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
