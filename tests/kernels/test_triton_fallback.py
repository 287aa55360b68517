"""``backend="auto"`` never crashes on a GPU whose compiler rejects a kernel: the launcher turns a compile failure
into ``KernelCompileError`` (``kernels.attention._ready``: no configuration compiles or fits the device's shared
memory), and ``gim_fast.ops`` then runs the torch backend, with one warning naming the architecture and the error.

On the CPU the kernels run under the Triton interpreter, which compiles nothing: the failure is forced by making
the planned launch of one kernel raise what ``_ready`` raises, with ``auto`` resolved as on a CUDA device; the
screening itself (``screen_configs``, ``_ready``) is checked with a stand-in kernel whose compiler raises.
"""
import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import gim_fast.ops as ops  # noqa: E402
from gim_fast.kernels import attention  # noqa: E402
from gim_fast.kernels.archs import KernelCompileError  # noqa: E402
from gim_fast.ops import attention_triton  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or the Triton interpreter")

KW = dict(causal=True, temperature=2.0, q_scale=0.25, k_scale=0.25, v_scale=0.5)
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((1, 4, 37, 64), (1, 2, 37, 64), (1, 2, 37, 64), (1, 4, 37, 64))
    return tuple(torch.randn(*shape, generator=g).to(DEVICE) for shape in shapes)


def _grads(backend, q, k, v, do, **kw):
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = ops.gim_attention(*leaves, backend=backend, **kw)
    out.backward(do)
    return out.detach(), [t.grad for t in leaves]


@pytest.fixture
def gpu_like(monkeypatch):
    """``auto`` resolves to ``triton`` as on a CUDA device; the fallback's warnings start afresh."""
    real = ops.resolve_backend
    monkeypatch.setattr(ops, "resolve_backend",
                        lambda backend, device, dtype=None: "triton" if backend == "auto" else real(backend, device, dtype))
    monkeypatch.setattr(attention_triton, "_WARNED", set())


def _failing(monkeypatch, kind, arch="sm_89"):
    """Make the launch of kernel ``kind`` raise as a compiler failure does; count its attempts."""
    real, calls = attention._run, []

    def run(launch):
        if launch.kind == kind:
            calls.append(kind)
            raise KernelCompileError(arch, f"attention {kind}",
                                     "128x64 w8 s2: RuntimeError: PassManager::run failed")
        return real(launch)

    monkeypatch.setattr(attention, "_run", run)
    return calls


def test_forward_compile_failure_falls_back_to_torch_with_one_warning(gpu_like, monkeypatch):
    q, k, v, do = _inputs()
    calls = _failing(monkeypatch, "fwd")
    want_out, want_grads = _grads("torch", q, k, v, do, **KW)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out, grads = _grads("auto", q, k, v, do, **KW)
            # the torch backend ran, whole: bit for bit its forward and its backward
            assert torch.equal(out, want_out)
            for got, want in zip(grads, want_grads):
                assert torch.equal(got, want)
    ours = [w for w in caught if "gim_fast" in str(w.message)]
    assert len(ours) == 1 and len(calls) == 2
    message = str(ours[0].message)
    assert "sm_89" in message and "PassManager::run failed" in message and "torch backend" in message


def test_backward_compile_failure_falls_back_for_the_backward(gpu_like, monkeypatch):
    """The forward ran on the kernels; the dQ kernel does not compile: the backward is the torch backend's,
    from the saved inputs (P from its own tiles), equal to the torch backend's backward up to rounding."""
    q, k, v, do = _inputs(1)
    _failing(monkeypatch, "dq")
    want_out, want_grads = _grads("torch", q, k, v, do, **KW)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, grads = _grads("auto", q, k, v, do, **KW)
    assert len([w for w in caught if "attention dq" in str(w.message)]) == 1
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-5)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_explicit_triton_backend_raises_the_compile_error(monkeypatch):
    q, k, v, do = _inputs()
    _failing(monkeypatch, "fwd")
    with pytest.raises(KernelCompileError, match="does not compile for sm_89"):
        ops.gim_attention(q, k, v, backend="triton", **KW)


class _Compiled:
    def __init__(self, shared):
        self.metadata = type("Metadata", (), {"shared": shared})()


def test_screen_keeps_configs_that_compile_and_fit():
    import triton

    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=64), num_warps=8, num_stages=s) for m, s in
               ((128, 2), (128, 3), (64, 2))]

    def compile_config(cfg):
        if cfg.num_stages == 3:
            return _Compiled(140_000)              # more than the device's shared memory
        if cfg.kwargs["BLOCK_M"] == 64:
            raise RuntimeError("PassManager::run failed")
        return _Compiled(98_000)

    kept, rejected = attention.screen_configs(configs, compile_config, shared_limit=101_376)
    assert kept == configs[:1]
    assert rejected == ["128x64 w8 s3: needs 140000 B of shared memory, the device has 101376 B",
                        "64x64 w8 s2: RuntimeError: PassManager::run failed"]


def test_ready_raises_once_compiled_and_remembers(monkeypatch):
    """No configuration compiles: ``_ready`` raises KernelCompileError naming the arch and each config's error,
    and a second launch with the same flags raises the same error without compiling again."""
    attempts = []

    class Kernel:
        def warmup(self, *args, grid, **kw):
            attempts.append(kw["BLOCK_M"])
            raise RuntimeError("error: parent layout must have at least rank >= 2")

    monkeypatch.setattr(attention, "_KERNELS", dict(attention._KERNELS, fwd=Kernel()))
    monkeypatch.setattr(attention, "_shared_limit", lambda arch: 232_448)
    monkeypatch.setattr(attention, "_FAILED", {})
    q = torch.empty(1, 32, 8192, 128, device="meta", dtype=torch.bfloat16)
    k = torch.empty(1, 8, 8192, 128, device="meta", dtype=torch.bfloat16)
    _, (launch,) = attention.forward_plan(q, k, k, scale=0.1, causal=True, temperature=2.0, arch="sm_100a")
    n = len(launch.configs())
    for _ in range(2):
        with pytest.raises(KernelCompileError, match="sm_100a") as info:
            attention._ready(launch, ("key",))
        assert "parent layout must have at least rank >= 2" in str(info.value)
    assert len(attempts) == n and n >= 1
