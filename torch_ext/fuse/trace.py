"""Reading one module's own forward as a torch.fx graph (its children as opaque calls), in train
and in eval mode, refusing forwards a graph would misrepresent (set attributes, draw random numbers)."""

from __future__ import annotations

import random

import torch
import torch.fx
from torch import nn


class _OwnForward(torch.fx.Tracer):
    """Traces the root's forward only: every module it calls is a leaf (an opaque call)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


class _Refused(Exception):
    """A forward fuse will not replace by its graph; the message says why."""


def _state(module: nn.Module) -> list:
    """What a forward could set on ``module`` or its submodules while traced: each one's attributes."""
    return [(m, dict(m.__dict__), {k: dict(v) for k, v in m.__dict__.items() if k in ("_parameters", "_buffers", "_modules")})
            for m in module.modules()]


def _changed(before: list) -> list:
    """The ``name.attribute`` set since ``before`` (restored to what it was)."""
    found = []
    for m, attrs, tables in before:
        now = m.__dict__
        diff = {k for k in attrs.keys() | now.keys() if k not in attrs or k not in now or now[k] is not attrs[k]}
        diff |= {k for k, table in tables.items() if now.get(k) is attrs.get(k) and dict(now[k]) != table}
        if diff:
            found += [f"{type(m).__name__}.{k}" for k in sorted(diff)]
            now.clear()
            now.update(attrs)
            for k, table in tables.items():
                attrs[k].clear()
                attrs[k].update(table)
    return found


def _trace(module: nn.Module, training: bool) -> torch.fx.Graph:
    """The graph of ``module``'s forward with ``module.training`` set to ``training`` (restored).
    Raises :class:`_Refused` where the forward sets attributes on modules (put back as they were)
    or draws random numbers (``random``, torch's CPU generator; their states are put back): a
    graph would freeze what tracing did once."""
    was = module.training
    object.__setattr__(module, "training", training)  # this module only; children are not run
    before, rng, torch_rng = _state(module), random.getstate(), torch.random.get_rng_state()
    try:
        graph = _OwnForward().trace(module)
    finally:
        set_attrs = _changed(before)
        drew = random.getstate() != rng or not torch.equal(torch.random.get_rng_state(), torch_rng)
        random.setstate(rng)
        torch.random.set_rng_state(torch_rng)
        object.__setattr__(module, "training", was)
    if set_attrs:
        raise _Refused(f"its forward sets {', '.join(set_attrs)} when called, which a graph would not do")
    if drew:
        raise _Refused("its forward draws random numbers in Python (random/torch.rand...), which a graph "
                       "would freeze to one outcome")
    return graph


def _graphs(module: nn.Module) -> dict:
    """``{True: train graph, False: eval graph}`` (one object when both read the same), or raises
    what tracing raised; :class:`_Refused` where tracing one mode twice gives two graphs."""
    by_mode = {}
    for training in (True, False):  # each mode twice in a row: a forward alternating between calls differs
        by_mode[training] = _trace(module, training)
        if str(_trace(module, training)) != str(by_mode[training]):
            raise _Refused("tracing its forward twice gave two different graphs (it depends on something "
                           "besides its arguments and children)")
    train, evaluate = by_mode[True], by_mode[False]
    if train.python_code("self").src == evaluate.python_code("self").src:
        evaluate = train
    return {True: train, False: evaluate}


def _is_container(module: nn.Module) -> bool:
    """Has no forward of its own (``nn.ModuleList``, ``nn.ModuleDict``): its parents call its children."""
    return type(module).forward is nn.Module.forward


def _opaque(module: nn.Module) -> str | None:
    """Why ``module``'s forward is not read as a graph, or None."""
    if isinstance(module, torch.jit.ScriptModule):
        return "a TorchScript module"
    cls = type(module)
    if hasattr(cls, "_fusedlinear_base"):
        return "its forward was rewritten by an earlier fuse (unfuse first to fuse it again)"
    if cls.__module__.startswith("torch.") and cls is not nn.Sequential:
        return f"{cls.__name__}'s forward is PyTorch's own, not rewritten"
    return None
