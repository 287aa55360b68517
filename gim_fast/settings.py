"""The GIM settings, defined once: their defaults, validation and command-line options.

Everything that lists the settings reads them from here: the public functions' keyword arguments
(``explain``, ``explain_answer``, ``explain_generation``, ``attribute_context``, ``GIM``) take their defaults from
:data:`DEFAULTS`, the command line builds its options from :func:`cli_options`, the evaluation's ablations come
from :meth:`GIMSettings.only`, and a job's manifest records :meth:`GIMSettings.as_dict`. Inside the package a
function that applies GIM takes one :class:`GIMSettings`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

BACKENDS = ("auto", "eager", "torch", "triton")
# what an answer attribution explains for each answer token: its raw logit or its log-probability
TARGETS = ("logit", "logprob")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_temperature(value):
    """``None`` (off) or a finite number > 0; 1.0 is the plain gradient."""
    if value is None:
        return None
    if not _is_number(value):
        raise TypeError(f"softmax_temperature must be a number > 0 or None (off), got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"softmax_temperature must be a finite number > 0 or None (off), got {value!r}")
    return float(value)


def tempered(temperature: float | None) -> float | None:
    """The temperature the backward applies: ``None`` when the rule is the plain softmax gradient.

    With P_T = softmax(S / T) the rule is ``dS = P_T ⊙ (dP − rowsum(dP ⊙ P_T))``; at T = 1, P_T = P and this is
    exactly the softmax's own gradient, so T = 1 and ``None`` (off) are the same rule. Every backend and the
    TransformerLens hooks decide "is the temperature on" through this one function.
    """
    if temperature is None or float(temperature) == 1.0:
        return None
    return float(temperature)


def check_scale(name: str, value):
    """``None`` (off) or a finite number >= 0."""
    if value is None:
        return None
    if not _is_number(value):
        raise TypeError(f"{name} must be a number >= 0 or None (off), got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 or None (off), got {value!r}")
    return float(value)


def check_backend(value) -> str:
    if value not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}, got {value!r}")
    return value


def _setting(default, kind: str, option: str, help: str, modification: str | None):
    """A field of :class:`GIMSettings` with what the command line and the ablations need to know of it.

    kind: ``"switch"`` (a bool, on by default: the option turns it off), ``"temperature"`` (a number > 0 or
    none), ``"scale"`` (a number >= 0 or none), ``"choice"`` (one of :data:`BACKENDS`). modification: the
    group of the paper's ablation the setting belongs to (None: not a modification).
    """
    return field(default=default, metadata={"kind": kind, "option": option, "help": help,
                                            "modification": modification})


@dataclass(frozen=True)
class GIMSettings:
    """Every GIM knob; ``None`` turns a modification off. With all off the backward is plain autograd.

    Validated on construction (a ``TypeError``/``ValueError`` naming the setting and what is accepted) and
    immutable: ``settings.replace(q_scale=None)`` makes a changed copy.
    """

    freeze_norm: bool = _setting(True, "switch", "--no-freeze-norm",
                                 "let gradients flow through the normalisation statistics (default: frozen)",
                                 "freeze_norm")
    softmax_temperature: float | None = _setting(2.0, "temperature", "--temperature",
                                                 "softmax temperature of the attention backward", "temperature")
    q_scale: float | None = _setting(0.25, "scale", "--q-scale", "gradient scale", "qkv_scaling")
    k_scale: float | None = _setting(0.25, "scale", "--k-scale", "gradient scale", "qkv_scaling")
    v_scale: float | None = _setting(0.5, "scale", "--v-scale", "gradient scale", "qkv_scaling")
    gate_scale: float | None = _setting(0.5, "scale", "--gate-scale", "gradient scale", "mlp_scaling")
    up_scale: float | None = _setting(0.5, "scale", "--up-scale", "gradient scale", "mlp_scaling")
    backend: str = _setting("auto", "choice", "--backend", "attention backend", None)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            kind, value = f.metadata["kind"], getattr(self, f.name)
            if kind == "switch" and not isinstance(value, bool):
                raise TypeError(f"{f.name} must be True or False, got {value!r}")
            if kind == "temperature":
                object.__setattr__(self, f.name, check_temperature(value))
            elif kind == "scale":
                object.__setattr__(self, f.name, check_scale(f.name, value))
            elif kind == "choice":
                check_backend(value)

    @classmethod
    def off(cls, *, backend: str = "auto") -> "GIMSettings":
        """Every modification off: the backward is plain autograd's."""
        return cls(**{f.name: False if f.metadata["kind"] == "switch" else None
                      for f in dataclasses.fields(cls) if f.metadata["modification"]}, backend=backend)

    @classmethod
    def only(cls, modification: str, *, backend: str = "auto") -> "GIMSettings":
        """One modification of the paper at its default (one of :data:`MODIFICATIONS`), every other one off."""
        if modification not in MODIFICATIONS:
            raise ValueError(f"unknown modification {modification!r}; accepted: {', '.join(MODIFICATIONS)}")
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.metadata["modification"] == modification}
        return cls.off(backend=backend).replace(**defaults)

    @property
    def temperature(self) -> float | None:
        """The temperature the backward applies (``None`` when it is the plain softmax gradient; see
        :func:`tempered`)."""
        return tempered(self.softmax_temperature)

    def replace(self, **changes) -> "GIMSettings":
        """A copy with ``changes`` (checked like the constructor's arguments)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """``{name: value}`` in field order: the keyword arguments of ``gim_fast.explain`` and friends."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings' names, in field order."""
        return tuple(f.name for f in dataclasses.fields(cls))


DEFAULTS = GIMSettings()
# the paper's modifications, each a group of settings switched on and off together in its ablation
MODIFICATIONS = tuple(dict.fromkeys(f.metadata["modification"] for f in dataclasses.fields(GIMSettings)
                                    if f.metadata["modification"]))


@dataclass(frozen=True)
class CliOption:
    """One command-line option of a GIM setting, as :func:`cli_options` describes it."""

    name: str          # the GIMSettings field (and argparse dest)
    flag: str          # e.g. "--q-scale"
    kind: str          # "switch", "temperature", "scale" or "choice"
    default: object    # the setting's default
    help: str


def cli_options() -> list[CliOption]:
    """The command-line option of every GIM setting, in field order."""
    return [CliOption(f.name, f.metadata["option"], f.metadata["kind"], f.default, f.metadata["help"])
            for f in dataclasses.fields(GIMSettings)]
