"""What a pair is: which calls are activations (the registry for torch's functions, methods and
modules; :mod:`.recognise` for any other module), which Linear layers may become fused layers, and
the walk from a Linear's call in a graph to its activation (through dropout and identity).

spec = (table name, negative_slope)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize, prune

from ...backend import activations as _registry
from .. import modules as _layers
from ..modules import FusedLinear
from .recognise import Refused, recognise

# Activations that commute with dropout: g(m * z) = m * g(z) for every mask value m >= 0, and so
# do their gradients (positively homogeneous, g(0) = 0): dropout may run after them in any mode.
_COMMUTE_WITH_DROPOUT = {"relu", "leaky_relu"}


def _layer_for(linear: nn.Linear, spec) -> FusedLinear:
    """The fused layer for ``linear`` then activation ``spec``, sharing ``linear``'s parameters."""
    cls, kwargs = _layers.fused_class(*spec)
    layer = cls._build(linear.in_features, linear.out_features, linear.bias is not None,
                       device="meta", dtype=linear.weight.dtype, **kwargs)
    layer.weight, layer.bias = linear.weight, linear.bias  # shared: optimizers keep working
    own = {name: value for name, value in linear.__dict__.items() if name not in layer.__dict__}
    layer.__dict__.update(own)  # the user's own attributes on the layer, if any
    layer.training = linear.training
    layer._fusedlinear_made_by_fuse = tuple(own)  # what unfuse gives back to the nn.Linear
    return layer


def _describe(spec) -> str:
    activation, slope = spec
    return f"leaky_relu({slope:g})" if activation == "leaky_relu" else activation


def _hooks(module: nn.Module) -> list:
    """The kinds of hook registered on ``module``."""
    kinds = {"forward pre-hook": module._forward_pre_hooks, "forward hook": module._forward_hooks,
             "backward hook": module._backward_hooks, "backward pre-hook": module._backward_pre_hooks,
             "state_dict hook": {**module._state_dict_hooks, **module._state_dict_pre_hooks},
             "load_state_dict hook": {**module._load_state_dict_pre_hooks, **module._load_state_dict_post_hooks}}
    return [kind for kind, hooks in kinds.items() if hooks]


def _ineligible(linear: nn.Module) -> str | None:
    """Why this nn.Linear cannot become a fused layer whatever follows it, or None."""
    if parametrize.is_parametrized(linear):
        return ("parametrized (torch.nn.utils.parametrize: weight_norm, spectral_norm, orthogonal, ...): "
                "its weight is computed per call")
    if any(isinstance(h, prune.BasePruningMethod) for h in linear._forward_pre_hooks.values()):
        return "pruned (torch.nn.utils.prune): its weight is weight_orig * weight_mask, set by a pre-hook"
    if type(linear) is not nn.Linear:
        return f"{type(linear).__name__} is a subclass of nn.Linear; its forward may differ"
    hooks = _hooks(linear)
    if hooks:
        return f"has a {', a '.join(hooks)} registered on it, which would see the fused layer's output"
    if not isinstance(linear.weight, nn.Parameter) or not (linear.bias is None or isinstance(linear.bias, nn.Parameter)):
        return "its weight or bias is not an nn.Parameter"
    return None


@dataclass
class _Pair:
    caller: nn.Module
    training: bool  # which of caller's graphs
    linear_node: torch.fx.Node
    act_node: torch.fx.Node
    input_node: torch.fx.Node  # what the activation read: the Linear's node or the last dropout's
    spec: tuple
    act_module: nn.Module | None
    dropouts: list


def _constant(value) -> bool:
    found = []
    torch.fx.node.map_arg(value, found.append)
    return not found


def _activation(node: torch.fx.Node, caller: nn.Module, source: torch.fx.Node):
    """(spec, activation module or None) if ``node`` is a known activation applied to ``source``
    (and nothing else depends on a traced value); for a module that could be one but is not
    taken for one, the reason (a string); else None."""
    args, kwargs = node.args, node.kwargs
    if not args or args[0] is not source or not _constant((args[1:], kwargs)):
        return None
    if node.op == "call_module":
        module = caller.get_submodule(node.target)
        if len(args) != 1 or kwargs:
            return None
        if _registry.match_module(module) is None and (type(module).__module__.startswith("torch.nn.")
                                                       or any(True for _ in module.parameters())
                                                       or any(True for _ in module.buffers())):
            return None  # a layer, or torch's own module with other settings: not an activation candidate
        try:
            spec = _recognise(module)
        except Refused as why:
            return str(why)
        return (spec, module) if spec[0] != "identity" else "it computes the identity: nothing to fuse"
    if node.op == "call_function":
        spec = _registry.match_function(node.target, args, kwargs)
        return (spec, None) if spec else None
    if node.op == "call_method" and len(args) == 1 and not kwargs:
        spec = _registry.match_method(node.target)
        return (spec, None) if spec else None
    return None


_RECOGNISED: dict = {}  # id(module) -> spec or Refused, for the fuse call under way (cleared by fuse)


def _recognise(module):
    if id(module) not in _RECOGNISED:
        try:
            _RECOGNISED[id(module)] = (module, recognise(module))
        except Refused as why:
            _RECOGNISED[id(module)] = (module, why)
    found = _RECOGNISED[id(module)][1]
    if isinstance(found, Refused):
        raise found
    return found


def _what(node: torch.fx.Node) -> str:
    return {"call_module": f"self.{node.target}(...)", "call_method": f".{node.target}()", "output": "the output",
            "call_function": f"{getattr(node.target, '__name__', node.target)}(...)"}.get(node.op, node.op)


def _follow(caller: nn.Module, training: bool, node: torch.fx.Node):
    """The pair starting at the Linear call ``node``, or the reason there is none."""
    current, dropouts = node, []
    while True:
        users = list(current.users)
        if len(users) != 1:
            what = "its output" if current is node else f"the output of {_what(current)} after it"
            return (f"{what} is used {len(users)} times" if users else f"{what} is not used")
        user = users[0]
        module = caller.get_submodule(user.target) if user.op == "call_module" else None
        if (type(module) in (nn.Dropout, nn.Identity) and user.args == (current,) and not user.kwargs
                and not _hooks(module)):
            dropouts += [module] if type(module) is nn.Dropout else []
            current = user
            continue
        found = _activation(user, caller, current)
        if found is None:
            return f"no activation after it (its output goes to {_what(user)})"
        if isinstance(found, str):
            return f"its output goes to {_what(user)}, not taken for an activation: {found}"
        spec, act_module = found
        if act_module is not None and _hooks(act_module):
            return f"its activation {_what(user)} has a hook registered on it"
        for drop in dropouts:
            if drop.p != 0 and spec[0] not in _COMMUTE_WITH_DROPOUT and drop.training:
                return (f"dropout (p={drop.p}) in training mode between it and {_describe(spec)}: the fused layer "
                        f"would apply dropout after the activation, which changes values")
        return _Pair(caller, training, node, user, current, spec, act_module, dropouts)
