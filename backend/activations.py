"""The torch side of the activation table: for each entry of :mod:`fusedlinear.kernels.activations`,
the PyTorch function that is its reference, the ``nn`` module that computes it, the fused layer's
class name, what :func:`fusedlinear.fuse` recognises as it, and the bounds ``fusedlinear parity``
needs. Everything else (the reference backend, the modules, fuse, parity, bench, the tests) reads
this registry: adding an activation is one line in the kernel table and one entry here.

``torch(z, s)`` is PyTorch's own function where PyTorch has one (``F.gelu``, ``F.mish``, ...),
else the formula written with torch ops as the model libraries write it (``z * sigmoid(1.702 z)``);
its autograd gradient is the oracle the table's g' is tested against, ties and limits included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import activations as _table


@dataclass(frozen=True)
class Parity:
    """What the error bound of ``fusedlinear parity`` needs of g: ``max_slope(z, s)``, a bound on
    |g'| near z (a number for most, a tensor for relu2 whose g' = 2z grows); ``kinks``: the points
    where g' jumps and by how much (``(point, jump(s))``); ``smooth``: whether g' also varies
    continuously (|g''| <= 2 as a function of Z and of A for every entry that does)."""

    max_slope: object
    kinks: tuple = ()
    smooth: bool = True


@dataclass(frozen=True)
class TorchActivation:
    name: str
    torch: object  # (z, s) -> g(z), differentiable torch ops
    module: object  # s -> an nn.Module computing g (unfuse puts it back; bench times it)
    fused_class: str  # the FusedLinear subclass in fusedlinear.torch_ext.modules
    parity: Parity
    modules: dict = field(default_factory=dict)  # nn class -> (module -> s or None: not this entry)
    functions: dict = field(default_factory=dict)  # callable -> (call's args -> s or None)
    methods: tuple = ()  # tensor method names (``h.relu()``), all with s = 0.0


class Formula(nn.Module):
    """An activation of the table that ``torch.nn`` has no module for (``quick_gelu``, ``relu2``,
    ``gelu_fast``): ``forward`` is the registry's torch formula."""

    def __init__(self, name: str):
        super().__init__()
        self.name = REGISTRY[_table.check_activation(name).name].name

    def forward(self, input):
        return REGISTRY[self.name].torch(input, 0.0)

    def extra_repr(self) -> str:
        return self.name


def _slope(negative_slope):
    if isinstance(negative_slope, (int, float)) and not isinstance(negative_slope, bool):
        return float(negative_slope)
    return None


def _softplus_defaults(beta, threshold):
    return 0.0 if (beta, threshold) == (1, 20) else None


_ZERO = lambda *args, **kwargs: 0.0  # noqa: E731  (a match with no parameter)
_CONST = lambda value: (lambda z, s: value)  # noqa: E731

_ENTRIES = (
    TorchActivation("identity", lambda z, s: z, lambda s: nn.Identity(), "FusedLinear",
                    Parity(_CONST(1.0), smooth=False)),
    TorchActivation("relu", lambda z, s: torch.relu(z), lambda s: nn.ReLU(), "FusedLinearReLU",
                    Parity(_CONST(1.0), ((0.0, lambda s: 1.0),), smooth=False),
                    modules={nn.ReLU: _ZERO},
                    functions={F.relu: lambda input, inplace=False: 0.0, F.relu_: _ZERO, torch.relu: _ZERO,
                               torch.relu_: _ZERO},
                    methods=("relu", "relu_")),
    TorchActivation("sigmoid", lambda z, s: torch.sigmoid(z), lambda s: nn.Sigmoid(), "FusedLinearSigmoid",
                    Parity(_CONST(0.25)), modules={nn.Sigmoid: _ZERO},
                    functions={torch.sigmoid: lambda input, *, out=None: 0.0 if out is None else None,
                               torch.sigmoid_: _ZERO, F.sigmoid: _ZERO},
                    methods=("sigmoid", "sigmoid_")),
    TorchActivation("tanh", lambda z, s: torch.tanh(z), lambda s: nn.Tanh(), "FusedLinearTanh",
                    Parity(_CONST(1.0)), modules={nn.Tanh: _ZERO},
                    functions={torch.tanh: lambda input, *, out=None: 0.0 if out is None else None,
                               torch.tanh_: _ZERO, F.tanh: _ZERO},
                    methods=("tanh", "tanh_")),
    TorchActivation("gelu", lambda z, s: F.gelu(z), lambda s: nn.GELU(), "FusedLinearGELU",
                    Parity(_CONST(1.13)),  # sup gelu' = 1.1289
                    modules={nn.GELU: lambda m: 0.0 if m.approximate == "none" else None},
                    functions={F.gelu: lambda input, approximate="none": 0.0 if approximate == "none" else None}),
    TorchActivation("gelu_tanh", lambda z, s: F.gelu(z, approximate="tanh"), lambda s: nn.GELU(approximate="tanh"),
                    "FusedLinearGELU", Parity(_CONST(1.13)),
                    modules={nn.GELU: lambda m: 0.0 if m.approximate == "tanh" else None},
                    functions={F.gelu: lambda input, approximate="none": 0.0 if approximate == "tanh" else None}),
    TorchActivation("silu", lambda z, s: F.silu(z), lambda s: nn.SiLU(), "FusedLinearSiLU",
                    Parity(_CONST(1.1)),  # sup silu' = 1.0998
                    modules={nn.SiLU: _ZERO}, functions={F.silu: lambda input, inplace=False: 0.0}),
    TorchActivation("leaky_relu", lambda z, s: F.leaky_relu(z, s), lambda s: nn.LeakyReLU(s), "FusedLinearLeakyReLU",
                    Parity(lambda z, s: max(1.0, abs(s)), ((0.0, lambda s: abs(1.0 - s)),), smooth=False),
                    modules={nn.LeakyReLU: lambda m: _slope(m.negative_slope)},
                    functions={F.leaky_relu: lambda input, negative_slope=0.01, inplace=False: _slope(negative_slope),
                               F.leaky_relu_: lambda input, negative_slope=0.01: _slope(negative_slope)}),
    TorchActivation("quick_gelu", lambda z, s: z * torch.sigmoid(1.702 * z), lambda s: Formula("quick_gelu"),
                    "FusedLinearQuickGELU", Parity(_CONST(1.1))),  # sup g' = 1.0998 (silu's, rescaled)
    TorchActivation("gelu_fast", lambda z, s: 0.5 * z * (1.0 + torch.tanh(z * 0.7978845608 * (1.0 + 0.044715 * z * z))),
                    lambda s: Formula("gelu_fast"), "FusedLinearFastGELU", Parity(_CONST(1.13))),
    TorchActivation("relu6", lambda z, s: F.relu6(z), lambda s: nn.ReLU6(), "FusedLinearReLU6",
                    Parity(_CONST(1.0), ((0.0, lambda s: 1.0), (6.0, lambda s: 1.0)), smooth=False),
                    modules={nn.ReLU6: _ZERO}, functions={F.relu6: lambda input, inplace=False: 0.0}),
    # g' = 2·relu(z) has no global bound: 2(|z| + 1) covers it near every z the bound meets.
    TorchActivation("relu2", lambda z, s: torch.square(torch.relu(z)), lambda s: Formula("relu2"),
                    "FusedLinearReLU2", Parity(lambda z, s: 2.0 * (z.abs() + 1.0))),
    TorchActivation("hardswish", lambda z, s: F.hardswish(z), lambda s: nn.Hardswish(), "FusedLinearHardswish",
                    Parity(_CONST(1.5), ((-3.0, lambda s: 0.5), (3.0, lambda s: 0.5))),
                    modules={nn.Hardswish: _ZERO}, functions={F.hardswish: lambda input, inplace=False: 0.0}),
    TorchActivation("hardsigmoid", lambda z, s: F.hardsigmoid(z), lambda s: nn.Hardsigmoid(), "FusedLinearHardsigmoid",
                    Parity(_CONST(1 / 6), ((-3.0, lambda s: 1 / 6), (3.0, lambda s: 1 / 6)), smooth=False),
                    modules={nn.Hardsigmoid: _ZERO}, functions={F.hardsigmoid: lambda input, inplace=False: 0.0}),
    TorchActivation("mish", lambda z, s: F.mish(z), lambda s: nn.Mish(), "FusedLinearMish",
                    Parity(_CONST(1.1)),  # sup mish' = 1.0886
                    modules={nn.Mish: _ZERO}, functions={F.mish: lambda input, inplace=False: 0.0}),
    TorchActivation("softplus", lambda z, s: F.softplus(z), lambda s: nn.Softplus(), "FusedLinearSoftplus",
                    Parity(_CONST(1.0)),
                    modules={nn.Softplus: lambda m: _softplus_defaults(m.beta, m.threshold)},
                    functions={F.softplus: lambda input, beta=1.0, threshold=20.0: _softplus_defaults(beta, threshold)}),
)

REGISTRY: dict[str, TorchActivation] = {entry.name: entry for entry in _ENTRIES}
assert tuple(REGISTRY) == _table.NAMES, "the torch registry must list the activation table's entries, in order"


def torch_forward(name: str, z, s=0.0):
    """g(z) for the table entry ``name``, in torch ops (the reference)."""
    return REGISTRY[name].torch(z, s)


def match_module(module: nn.Module):
    """``(name, s)`` when ``module``'s exact class is one of ``torch.nn``'s activation modules that
    computes a table entry with these settings, else None."""
    for entry in _ENTRIES:
        match = entry.modules.get(type(module))
        s = match(module) if match else None
        if s is not None:
            return entry.name, s
    return None


def match_function(fn, args, kwargs):
    """``(name, s)`` when ``fn(*args, **kwargs)`` is a table entry, else None."""
    for entry in _ENTRIES:
        match = entry.functions.get(fn)
        if match is None:
            continue
        try:
            s = match(*args, **kwargs)
        except TypeError:  # arguments this signature does not take
            return None
        if s is not None:
            return entry.name, s
    return None


def match_method(name: str):
    for entry in _ENTRIES:
        if name in entry.methods:
            return entry.name, 0.0
    return None
