"""unfuse: the inverse of fuse."""

from __future__ import annotations

import copy

from torch import nn

from ..modules import FusedActivation, FusedLinear, FusedSequential
from .plan import _check_call, _refuse_training
from .report import _path


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inverse of :func:`fuse`: each fused layer it made becomes an ``nn.Linear`` sharing its
    parameters, each :class:`FusedActivation` the original activation module, each rewritten
    forward the class's own, each :class:`FusedSequential` an ``nn.Sequential``. A fused layer
    built by hand in an ``nn.Sequential`` with an ``nn.Identity`` after it becomes ``nn.Linear``
    and its activation module. Returns a deep copy unless ``inplace=True``. Raises ``ValueError``
    (before changing anything) for a hand-built fused layer it cannot split without changing
    ``state_dict`` keys."""
    _check_call("unfuse", model, inplace)
    model = model if inplace else copy.deepcopy(model)
    plan, linears = [], {}
    for name, seq in model.named_modules():
        for child_name, child in seq._modules.items():
            if isinstance(child, FusedActivation):
                child.original.training = child.training
                plan.append(lambda seq=seq, n=child_name, m=child.original: seq._modules.__setitem__(n, m))
            elif isinstance(child, FusedLinear):
                linear = linears.setdefault(id(child), child.to_linear())
                linear.training = child.training
                own = getattr(child, "_fusedlinear_made_by_fuse", None)
                if own is not None:
                    linear.__dict__.update({key: child.__dict__[key] for key in own if key in child.__dict__})
                    plan.append(lambda seq=seq, n=child_name, m=linear: seq._modules.__setitem__(n, m))
                    continue
                names = list(seq._modules)
                after = names[names.index(child_name) + 1] if child_name != names[-1] else None
                if child.activation != "identity" and not (
                        isinstance(seq, nn.Sequential) and after is not None and type(seq._modules[after]) is nn.Identity):
                    raise ValueError(
                        f"unfuse: the fused layer {_path(f'{name}.{child_name}'.lstrip('.'))} ({child.activation}) has "
                        f"no nn.Identity after it in an nn.Sequential to hold its activation, so state_dict keys "
                        f"would change; replace it by hand")
                plan.append(lambda seq=seq, n=child_name, m=linear: seq._modules.__setitem__(n, m))
                if child.activation != "identity":
                    plan.append(lambda seq=seq, n=after, m=child.activation_module(): seq._modules.__setitem__(n, m))
        base = getattr(type(seq), "_fusedlinear_base", None)
        if base is not None:
            plan.append(lambda seq=seq, base=base: setattr(seq, "__class__", base))
        if type(seq) is FusedSequential:
            plan.append(lambda seq=seq: setattr(seq, "__class__", nn.Sequential))
        for key, hook in list(seq._forward_pre_hooks.items()):
            if hook is _refuse_training:
                plan.append(lambda seq=seq, key=key: seq._forward_pre_hooks.pop(key))
    for apply in plan:
        apply()
    return model
