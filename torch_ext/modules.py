"""Drop-in modules: ``FusedLinear``, one subclass per activation, ``FusedSequential``, and the
``FusedActivation`` placeholder :func:`fusedlinear.fuse` leaves where an activation was."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules import module as _module

from ..backend import activations as _registry
from ..kernels import activations as _acts
from .ops import fused_chain, fused_linear


class FusedLinear(nn.Module):
    r"""Applies a linear transformation followed by an activation, fused:
    :math:`y = g(xA^T + b)`.

    Parameters, their initialisation and ``state_dict`` keys (``weight``, ``bias``) are those of
    :class:`torch.nn.Linear`, so checkpoints move between the two with ``strict=True``.

    Args:
        in_features: size of each input sample
        out_features: size of each output sample
        bias: If set to ``False``, the layer will not learn an additive bias. Default: ``True``
        activation: ``g``, a name of the activation table (``fusedlinear.ACTIVATIONS``: identity,
            relu, sigmoid, tanh, gelu, gelu_tanh, silu, leaky_relu, quick_gelu, gelu_fast, relu6,
            relu2, hardswish, hardsigmoid, mish, softplus). Default: ``"relu"``
        negative_slope: slope of ``leaky_relu`` for negative inputs. Default: ``0.01``

    Shape:
        - Input: :math:`(*, H_{in})` where :math:`*` means any number of dimensions including
          none and :math:`H_{in} = \text{in\_features}`.
        - Output: :math:`(*, H_{out})` where all but the last dimension are the same shape as
          the input and :math:`H_{out} = \text{out\_features}`.

    Attributes:
        weight: the learnable weights of the module of shape
            :math:`(\text{out\_features}, \text{in\_features})`, initialised from
            :math:`\mathcal{U}(-\sqrt{k}, \sqrt{k})`, where :math:`k = \frac{1}{\text{in\_features}}`
        bias: the learnable bias of the module of shape :math:`(\text{out\_features})`, initialised
            from :math:`\mathcal{U}(-\sqrt{k}, \sqrt{k})` if :attr:`bias` is ``True``

    Examples::

        >>> m = fusedlinear.FusedLinear(20, 30, activation="gelu")
        >>> input = torch.randn(128, 20)
        >>> output = m(input)
        >>> print(output.size())
        torch.Size([128, 30])
    """

    __constants__ = ["in_features", "out_features", "activation", "negative_slope"]

    def __init__(self, in_features, out_features, bias=True, activation="relu", *, negative_slope=0.01,
                 device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        _acts.check_activation(activation)
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory_kwargs))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Exactly nn.Linear's initialisation (kaiming_uniform_ with a=sqrt(5), see its comments).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        try:  # straight from _parameters: nn.Module.__getattr__ costs ~0.5 us a lookup
            weight, bias = self._parameters["weight"], self._parameters["bias"]
        except KeyError:  # a parametrized or replaced weight (weight_norm, ...): computed per call
            weight, bias = self.weight, self.bias
        return fused_linear(input, weight, bias, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation}{slope}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs):
        """A new fused layer with a copy of ``linear``'s weight and bias (same device and dtype).

        ``kwargs`` are the activation arguments of ``cls``: ``activation``/``negative_slope`` for
        ``FusedLinear``, ``approximate`` for ``FusedLinearGELU``, ``negative_slope`` for
        ``FusedLinearLeakyReLU``, none for the others.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls._build(linear.in_features, linear.out_features, linear.bias is not None,
                           device="meta", dtype=linear.weight.dtype, **kwargs)
        layer.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    @classmethod
    def _build(cls, in_features, out_features, bias, device=None, dtype=None, **kwargs):
        return cls(in_features, out_features, bias, device=device, dtype=dtype, **kwargs)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's parameters (the activation is dropped)."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def activation_module(self) -> nn.Module:
        """The plain PyTorch module for this layer's activation."""
        return _registry.REGISTRY[self.activation].module(self.negative_slope)


def _fixed(name: str, activation: str, doc: str):
    """A subclass of FusedLinear with the activation fixed."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        FusedLinear.__init__(self, in_features, out_features, bias, activation, device=device, dtype=dtype)

    def _build(cls, in_features, out_features, bias, device=None, dtype=None):
        return cls(in_features, out_features, bias, device=device, dtype=dtype)

    return type(name, (FusedLinear,), {
        "__init__": __init__, "_build": classmethod(_build),
        "__doc__": f"{doc}, fused: :math:`y = g(xA^T + b)`. Arguments, shapes and attributes as "
                   f":class:`FusedLinear` with ``activation=\"{activation}\"``.",
        "__module__": __name__,
    })


FusedLinearReLU = _fixed("FusedLinearReLU", "relu", "``nn.Linear`` followed by ``nn.ReLU``")
FusedLinearSigmoid = _fixed("FusedLinearSigmoid", "sigmoid", "``nn.Linear`` followed by ``nn.Sigmoid``")
FusedLinearTanh = _fixed("FusedLinearTanh", "tanh", "``nn.Linear`` followed by ``nn.Tanh``")
FusedLinearSiLU = _fixed("FusedLinearSiLU", "silu", "``nn.Linear`` followed by ``nn.SiLU``")
FusedLinearQuickGELU = _fixed("FusedLinearQuickGELU", "quick_gelu",
                              "``nn.Linear`` followed by ``x * torch.sigmoid(1.702 * x)`` (CLIP's QuickGELU)")
FusedLinearFastGELU = _fixed("FusedLinearFastGELU", "gelu_fast",
                             "``nn.Linear`` followed by Hugging Face's ``FastGELUActivation``")
FusedLinearReLU6 = _fixed("FusedLinearReLU6", "relu6", "``nn.Linear`` followed by ``nn.ReLU6``")
FusedLinearReLU2 = _fixed("FusedLinearReLU2", "relu2", "``nn.Linear`` followed by squared ReLU ``relu(x) ** 2``")
FusedLinearHardswish = _fixed("FusedLinearHardswish", "hardswish", "``nn.Linear`` followed by ``nn.Hardswish``")
FusedLinearHardsigmoid = _fixed("FusedLinearHardsigmoid", "hardsigmoid", "``nn.Linear`` followed by ``nn.Hardsigmoid``")
FusedLinearMish = _fixed("FusedLinearMish", "mish", "``nn.Linear`` followed by ``nn.Mish``")
FusedLinearSoftplus = _fixed("FusedLinearSoftplus", "softplus",
                             "``nn.Linear`` followed by ``nn.Softplus()`` (beta=1, threshold=20)")


def fused_class(activation: str, negative_slope: float = 0.0):
    """``(cls, kwargs)``: the fused layer class for a table entry and the arguments that pick it."""
    cls = _FUSED_CLASSES[_registry.REGISTRY[activation].fused_class]
    if activation in ("gelu", "gelu_tanh"):
        return cls, {"approximate": "none" if activation == "gelu" else "tanh"}
    if activation == "leaky_relu":
        return cls, {"negative_slope": negative_slope}
    if cls is FusedLinear:
        return cls, {"activation": activation}
    return cls, {}


class FusedLinearGELU(FusedLinear):
    """``nn.Linear`` followed by ``nn.GELU(approximate)``, fused. ``approximate``: ``"none"``
    (exact erf form) or ``"tanh"``; otherwise as :class:`FusedLinear`."""

    def __init__(self, in_features, out_features, bias=True, approximate="none", device=None, dtype=None):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        super().__init__(in_features, out_features, bias, "gelu" if approximate == "none" else "gelu_tanh",
                         device=device, dtype=dtype)
        self.approximate = approximate

    @classmethod
    def _build(cls, in_features, out_features, bias, device=None, dtype=None, approximate="none"):
        return cls(in_features, out_features, bias, approximate, device=device, dtype=dtype)


class FusedLinearLeakyReLU(FusedLinear):
    """``nn.Linear`` followed by ``nn.LeakyReLU(negative_slope)``, fused; otherwise as :class:`FusedLinear`."""

    def __init__(self, in_features, out_features, bias=True, negative_slope=0.01, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, "leaky_relu", negative_slope=negative_slope,
                         device=device, dtype=dtype)

    @classmethod
    def _build(cls, in_features, out_features, bias, device=None, dtype=None, negative_slope=0.01):
        return cls(in_features, out_features, bias, negative_slope, device=device, dtype=dtype)


class FusedActivation(nn.Identity):
    """Stands where an activation module was before :func:`fusedlinear.fuse` moved it into the fused
    layer before it: returns its input, has no parameters or ``state_dict`` keys, and keeps the
    original module (not as a submodule) for :func:`fusedlinear.unfuse` to put back."""

    def __init__(self, original: nn.Module):
        super().__init__()
        object.__setattr__(self, "original", original)  # not registered: no keys, not in .modules()

    def extra_repr(self) -> str:
        return f"was {self.original!r}"


def _global_hooks() -> bool:
    """Whether any global module hook is registered (``register_module_forward_hook`` and the
    like): those expect to see every layer called as a module, forward and backward."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def _chainable(module: nn.Module) -> bool:
    """Whether ``module`` is a layer a fused_chain may stand for: ``nn.Linear`` itself or a fused layer
    whose class keeps ``FusedLinear.forward`` (a subclass overriding ``forward`` is called as a module)."""
    return type(module) is nn.Linear or (isinstance(module, FusedLinear) and type(module).forward is FusedLinear.forward)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` that runs each run of two or more linear layers in it (fused layers
    and plain ``nn.Linear``, with the ``nn.Identity`` placeholders :func:`fuse` leaves between
    them) as one :func:`fused_chain` call: one autograd node for the whole run instead of one per
    layer. Values and gradients are those of calling the modules one by one; the other modules
    (``nn.Flatten``, dropout, ...) and any layer with a hook registered on it run as usual, and
    with any global module hook registered every module is called as a module.

    :func:`fuse` turns each plain ``nn.Sequential`` it fuses into one; the modules and their
    ``state_dict`` keys stay as they were."""

    def forward(self, input):
        if _global_hooks():
            return super().forward(input)
        run = []
        for module in self._modules.values():
            if not _hooked(module):
                if type(module) is nn.Identity or type(module) is FusedActivation:
                    continue
                if _chainable(module):
                    run.append(module)
                    continue
            input = _run(run, input)
            run = []
            input = module(input)
        return _run(run, input)


def _run(layers: list, input):
    """A run of linear layers: one fused_chain call (two or more layers), else the layers themselves."""
    if len(layers) < 2:
        for layer in layers:
            input = layer(input)
        return input
    try:  # parameters straight from _parameters: nn.Module.__getattr__ costs ~0.5 us a lookup
        specs = [(m._parameters["weight"], m._parameters["bias"], m.activation, m.negative_slope)
                 if isinstance(m, FusedLinear) else
                 (m._parameters["weight"], m._parameters["bias"], "identity", 0.0) for m in layers]
    except KeyError:  # a parametrized layer (weight_norm, ...): its weight is computed per call
        specs = [(m.weight, m.bias, m.activation, m.negative_slope) if isinstance(m, FusedLinear) else
                 (m.weight, m.bias, "identity", 0.0) for m in layers]
    return fused_chain(input, specs)


def chain_call(input, *layers):
    """``layers`` (fused layers and plain ``nn.Linear``) called one after another on ``input``, as
    one :func:`fused_chain` call where that gives the same as calling them: what a forward that
    :func:`fusedlinear.fuse` rewrote calls for each run of layers in its graph."""
    if _global_hooks() or not all(_chainable(m) and not _hooked(m) for m in layers):
        for layer in layers:
            input = layer(input)
        return input
    return _run(list(layers), input)


# The registry names each entry's fused class; every name must be one of the classes above.
_FUSED_CLASSES = {cls.__name__: cls for cls in (
    FusedLinear, FusedLinearReLU, FusedLinearSigmoid, FusedLinearTanh, FusedLinearSiLU, FusedLinearGELU,
    FusedLinearLeakyReLU, FusedLinearQuickGELU, FusedLinearFastGELU, FusedLinearReLU6, FusedLinearReLU2,
    FusedLinearHardswish, FusedLinearHardsigmoid, FusedLinearMish, FusedLinearSoftplus)}
assert {e.fused_class for e in _registry.REGISTRY.values()} <= set(_FUSED_CLASSES), "registry names an unknown fused class"
