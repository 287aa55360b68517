"""What accelerate's dispatch did to a model, read without changing it: the hook on a module, where a module
computes, whether its weights are offloaded, and an offloaded weight's value.

accelerate's ``add_hook_to_module`` (used by ``dispatch_model``, ``from_pretrained(device_map=...)``,
``cpu_offload``, ``disk_offload``) keeps a module's own forward as ``module._old_forward`` and puts a wrapper in
``module.forward`` that calls ``module._hf_hook.pre_forward`` (moves the inputs to the execution device and, for
a module offloaded to CPU memory or disk, loads its weights in place of ``meta`` placeholders), then
``_old_forward``, then ``post_forward`` (the placeholders back). Every change gim_fast makes to such a model goes
through ``integration.state.ModelState``, which keeps those hooks working; the memory plan asks
:func:`load_sizes` what loading an offloaded module costs.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["dispatch_hook", "own_forward", "execution_device", "is_offloaded", "module_tensor", "loaded_weights",
           "input_device", "load_sizes", "offload_hook", "has_dispatch_hooks"]


def dispatch_hook(module: nn.Module):
    """accelerate's hook on ``module`` (``add_hook_to_module`` wrapped its forward), or None."""
    if "_old_forward" in module.__dict__ and "forward" in module.__dict__:
        return getattr(module, "_hf_hook", None)
    return None


def _hook_parts(module: nn.Module) -> list:
    """The hooks in ``module``'s accelerate hook (a ``SequentialHook`` holds several)."""
    hook = dispatch_hook(module)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def has_dispatch_hooks(module: nn.Module) -> bool:
    """Whether ``module`` or any of its submodules carries an accelerate hook."""
    return any(dispatch_hook(m) is not None for m in module.modules())


def own_forward(module: nn.Module) -> Callable:
    """The forward :meth:`ModelState.swap_forward` replaces: under an accelerate hook its ``_old_forward``
    (called from the swapped-in forward, it runs with the weights the hook loaded), else ``module.forward``."""
    return module._old_forward if dispatch_hook(module) is not None else module.forward


def is_offloaded(module: nn.Module) -> bool:
    """Whether any tensor of ``module`` or its submodules is a ``meta`` placeholder that accelerate loads from CPU
    memory or disk for the duration of a forward."""
    return any(t.device.type == "meta" for t in itertools.chain(module.parameters(), module.buffers()))


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: the execution device of the first accelerate hook in it (offloaded weights are
    loaded there), else the device of its first tensor that is not a placeholder, else the CPU."""
    for m in module.modules():
        for part in _hook_parts(m):
            device = getattr(part, "execution_device", None)
            if device is not None:
                return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def offload_hook(module: nn.Module):
    """The part of ``module``'s own accelerate hook that loads offloaded weights (``offload`` and a
    ``weights_map``), or None."""
    return next((p for p in _hook_parts(module) if getattr(p, "offload", False)
                 and getattr(p, "weights_map", None) is not None), None)


def module_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module``'s parameter or buffer ``name`` (a direct one, e.g. ``"weight"``) as its forward sees it: the
    tensor itself, or for a placeholder of an offloaded module its stored value on the execution device (read
    again on every call; the module is not changed)."""
    value = getattr(module, name)
    if value is None or value.device.type != "meta":
        return value
    hook = offload_hook(module)
    if hook is None:
        raise ValueError(f"{type(module).__name__}.{name} is on the meta device and no accelerate hook loads it")
    stored = hook.weights_map[name]
    return stored.to(device=execution_device(module), dtype=value.dtype)


@contextlib.contextmanager
def loaded_weights(module: nn.Module):
    """For the duration, ``module``'s offloaded weights loaded as for its forward (its accelerate hook's
    ``pre_forward``), then the placeholders back (``post_forward``); a no-op for a module without such a hook."""
    hook = dispatch_hook(module)
    if hook is None or offload_hook(module) is None:
        yield
        return
    hook.pre_forward(module)
    try:
        yield
    finally:
        hook.post_forward(module, None)


def input_device(model: nn.Module) -> torch.device:
    """Where ``model``'s input ids go: its input embedding's execution device (any model with
    ``get_input_embeddings``), else where its first tensor lives."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get is not None else None
    return execution_device(embedding if embedding is not None else model)


def _stored_value(hook, name: str) -> torch.Tensor | None:
    """The value accelerate keeps in memory for ``name`` of a hook's module, or None when it is read from disk (or
    kept where this cannot tell)."""
    mapping, key = hook.weights_map, name
    while hasattr(mapping, "dataset") and hasattr(mapping, "prefix"):   # accelerate's PrefixedDataset
        mapping, key = mapping.dataset, f"{mapping.prefix}{key}"
    if isinstance(mapping, dict):
        return mapping.get(key)
    in_memory = getattr(mapping, "state_dict", None)                    # accelerate's OffloadedWeightsLoader
    return in_memory.get(key) if isinstance(in_memory, dict) else None


def load_sizes(module: nn.Module) -> list[int]:
    """The bytes of each tensor that loading the offloaded tensors of ``module`` and its submodules allocates where
    they compute: every ``meta`` placeholder, except values accelerate already keeps in memory on that device with
    that dtype (``cpu_offload`` on the CPU loads them without a copy). Empty for a module without offloaded
    tensors."""
    sizes = []
    for m in module.modules():
        hook = offload_hook(m)
        if hook is None:
            continue
        device = execution_device(m)
        recurse = bool(getattr(hook, "place_submodules", False))
        for name, t in itertools.chain(m.named_parameters(recurse=recurse), m.named_buffers(recurse=recurse)):
            if t.device.type != "meta":
                continue
            stored = _stored_value(hook, name)
            if stored is not None and stored.device == device and stored.dtype == t.dtype:
                continue
            sizes.append(t.numel() * t.element_size())
    return sizes
