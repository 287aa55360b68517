"""Reversible model state: every change gim_fast makes to a model, made through one object that undoes it.

A :class:`ModelState` is a context manager in the manner of TransformerLens's hooks context: everything added
through it — eval mode, frozen parameters, swapped forwards, forward hooks, any other callback — is removed on
exit, in reverse order, also after an exception. ``GIM``, layer checkpointing, heap release, the circuits'
recording and patching and the evaluation's methods all change models through it, so that "what does gim_fast
touch, and is it restored?" has one answer.

Models dispatched by accelerate (``from_pretrained(device_map=...)``, ``dispatch_model``, ``cpu_offload``,
``disk_offload``) are handled here and only here. accelerate's ``add_hook_to_module`` keeps a module's own
forward as ``module._old_forward`` and puts a wrapper in ``module.forward`` that calls ``module._hf_hook``'s
``pre_forward`` (moves the inputs to the execution device and, for a module offloaded to CPU memory or disk,
loads its weights in place of the ``meta`` placeholders), then ``_old_forward``, then ``post_forward`` (puts the
placeholders back). So:

* :meth:`ModelState.swap_forward` replaces ``_old_forward`` under such a hook, never the wrapper: the new forward
  runs with the weights loaded and the hook, ``forward`` and ``_old_forward`` are the user's again on exit;
  ``around_hooks=True`` replaces the wrapper itself instead, for code that calls the hooked forward (checkpointing:
  the recomputation in the backward must load the weights again); ``dispatch.own_forward`` is what a swap
  replaces (the forward to call from the new one);
* :meth:`ModelState.freeze_parameters` restores ``requires_grad`` by name: accelerate replaces an offloaded
  module's parameter objects on every forward (each new one copies the flag of the one it replaces);
* :meth:`ModelState.keep_placeholders` puts an offloaded module's placeholders back on exit when a forward that
  loaded its weights was interrupted (an exception between accelerate's ``pre_forward`` and ``post_forward``).

``integration.dispatch`` reads a dispatched model (its hooks, where a module computes, an offloaded weight's value)
and changes nothing.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

from torch import nn

from . import tlens
from .dispatch import dispatch_hook, offload_hook

__all__ = ["ModelState", "eval_mode", "frozen_parameters"]


# ------------------------------------------------------------------------------------------------- the state


class ModelState(contextlib.ExitStack):
    """Changes to models that are all undone on exit (an ``ExitStack``: ``callback`` and ``enter_context`` work
    as usual and are undone with the rest, last in first out)."""

    def eval(self, model: nn.Module) -> None:
        """``model.eval()`` until exit; each module's own training flag is restored (for a TransformerLens bridge
        also the wrapped Hugging Face model's, which the bridge does not register as a child)."""
        modules = tlens.module_trees(model) if tlens.is_transformer_lens_model(model) else model.modules()
        training = [(m, m.training) for m in modules]

        def restore():
            for module, flag in training:
                module.training = flag  # per module: .train() would recurse into the children

        self.callback(restore)
        model.eval()

    def freeze_parameters(self, model: nn.Module) -> None:
        """``requires_grad_(False)`` on every parameter until exit; each flag is restored exactly. Flags are kept
        per (module, name), and restored on the parameter the module holds on exit: accelerate swaps an offloaded
        module's placeholders for loaded parameters and back on every forward."""
        flags = [(m, name, p.requires_grad) for m in model.modules() for name, p in m._parameters.items()
                 if p is not None]

        def restore():
            for module, name, flag in flags:
                param = module._parameters.get(name)
                if param is not None:
                    param.requires_grad_(flag)

        self.callback(restore)
        for module, name, _ in flags:
            module._parameters[name].requires_grad_(False)

    def swap_forward(self, module: nn.Module, forward: Callable, *, around_hooks: bool = False) -> None:
        """Replace what ``module`` computes by ``forward`` until exit; the module's own ``forward`` — its
        class's, or an instance attribute it already had — is back afterwards.

        Under an accelerate hook (a dispatched or offloaded model) ``module._old_forward`` is replaced, so that the
        hook still moves the inputs and loads the weights around ``forward``; with ``around_hooks=True``
        ``module.forward`` itself (the hook's wrapper) is replaced, for a ``forward`` that calls the hooked one
        (captured before the swap). Call the replaced forward through :func:`own_forward`."""
        attribute = "_old_forward" if dispatch_hook(module) is not None and not around_hooks else "forward"
        had_own = attribute in module.__dict__
        old = module.__dict__.get(attribute)

        def restore():
            if had_own:
                setattr(module, attribute, old)
            else:
                module.__dict__.pop(attribute, None)

        self.callback(restore)
        setattr(module, attribute, forward)

    def keep_placeholders(self, model: nn.Module) -> None:
        """On exit, every module of ``model`` whose accelerate hook offloads its weights and whose ``meta``
        placeholders were replaced by loaded weights since entry (a forward interrupted by an exception) gets its
        placeholders back, through the hook's own ``post_forward``. Nothing to do for a model without offload."""
        offloaded = [m for m in model.modules() if offload_hook(m) is not None
                     and any(t.device.type == "meta" for t in m.parameters(recurse=False))]

        def restore():
            for module in offloaded:
                if any(t.device.type != "meta" for t in module.parameters(recurse=False)):
                    dispatch_hook(module).post_forward(module, None)

        if offloaded:
            self.callback(restore)

    def forward_hook(self, module: nn.Module, hook: Callable, **kwargs) -> None:
        """``module.register_forward_hook(hook, **kwargs)`` until exit."""
        self.callback(module.register_forward_hook(hook, **kwargs).remove)

    def forward_pre_hook(self, module: nn.Module, hook: Callable, **kwargs) -> None:
        """``module.register_forward_pre_hook(hook, **kwargs)`` until exit."""
        self.callback(module.register_forward_pre_hook(hook, **kwargs).remove)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` for the duration; every module's own training flag is restored on exit (and offloaded
    weights an interrupted forward left loaded are put back: :meth:`ModelState.keep_placeholders`)."""
    with ModelState() as state:
        state.keep_placeholders(model)
        state.eval(model)
        yield


@contextlib.contextmanager
def frozen_parameters(model: nn.Module):
    """``requires_grad_(False)`` on every parameter for the duration; the flags are restored exactly."""
    with ModelState() as state:
        state.freeze_parameters(model)
        yield
