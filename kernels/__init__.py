"""Triton kernels of gim_fast, installed as ``gim_fast.kernels``.

Kernels only: no ``torch.nn``, no transformers. The fused attention and frozen-norm kernels land here;
``gim_fast.ops`` holds the autograd Functions that launch them.
"""
