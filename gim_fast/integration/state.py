"""Reversible model state: every change gim_fast makes to a model, made through one object that undoes it.

A :class:`ModelState` is a context manager in the manner of TransformerLens's hooks context: everything added
through it — eval mode, frozen parameters, swapped forwards, forward hooks, any other callback — is removed on
exit, in reverse order, also after an exception. ``GIM``, layer checkpointing, heap release, the circuits'
recording and patching and the evaluation's methods all change models through it, so that "what does gim_fast
touch, and is it restored?" has one answer.

:meth:`ModelState.swap_forward` is the one place where a module's ``forward`` is replaced. A module dispatched by
accelerate (``device_map``, offload to CPU or disk) keeps its weight-loading hook in the ``forward`` it wrapped;
whatever has to preserve such hooks when a forward is swapped belongs there.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

from torch import nn

from . import tlens

__all__ = ["ModelState", "eval_mode", "frozen_parameters"]


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
        """``requires_grad_(False)`` on every parameter until exit; each flag is restored exactly."""
        flags = [(p, p.requires_grad) for p in model.parameters()]

        def restore():
            for p, flag in flags:
                p.requires_grad_(flag)

        self.callback(restore)
        for p, _ in flags:
            p.requires_grad_(False)

    def swap_forward(self, module: nn.Module, forward: Callable) -> None:
        """``module.forward = forward`` (an instance attribute) until exit; the module's own ``forward`` — its
        class's, or an instance attribute it already had — is back afterwards."""
        had_own = "forward" in module.__dict__
        old = module.__dict__.get("forward")

        def restore():
            if had_own:
                module.forward = old
            else:
                module.__dict__.pop("forward", None)

        self.callback(restore)
        module.forward = forward

    def forward_hook(self, module: nn.Module, hook: Callable, **kwargs) -> None:
        """``module.register_forward_hook(hook, **kwargs)`` until exit."""
        self.callback(module.register_forward_hook(hook, **kwargs).remove)

    def forward_pre_hook(self, module: nn.Module, hook: Callable, **kwargs) -> None:
        """``module.register_forward_pre_hook(hook, **kwargs)`` until exit."""
        self.callback(module.register_forward_pre_hook(hook, **kwargs).remove)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` for the duration; every module's own training flag is restored on exit."""
    with ModelState() as state:
        state.eval(model)
        yield


@contextlib.contextmanager
def frozen_parameters(model: nn.Module):
    """``requires_grad_(False)`` on every parameter for the duration; the flags are restored exactly."""
    with ModelState() as state:
        state.freeze_parameters(model)
        yield


