"""Rewriting a forward that calls a functional activation: a subclass of the module's own class
whose forward is the traced graph less the fused activation calls (runs of layers as one
fused_chain call)."""

from __future__ import annotations

import copy
import inspect

import torch
import torch.fx
from torch import nn

from ..modules import FusedSequential, _chainable, chain_call
from .trace import _graphs, _Refused


def _rewritable(module: nn.Module) -> str | None:
    """Why ``module``'s forward cannot be replaced by its graph, or None."""
    if type(module) is nn.Sequential or isinstance(module, FusedSequential):
        return "nn.Sequential's forward is not rewritten"
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.default is not p.empty for p in params):
        return ("its forward has optional or variable arguments, and a graph holds for one way of calling "
                "it only")
    return None


def _erase(graph: torch.fx.Graph, erased) -> None:
    """Remove the activation calls named in ``erased`` ((activation node, its input node) names)."""
    nodes = {n.name: n for n in graph.nodes}
    for act, source in erased:
        if act not in nodes or source not in nodes or nodes[act].args[:1] != (nodes[source],):
            raise _Refused(f"tracing its forward again gave a graph without the call {act}({source}) that fuse "
                           f"planned to remove")
    for act, source in erased:
        nodes[act].replace_all_uses_with(nodes[source])
        graph.erase_node(nodes[act])
    graph.lint()


def _chain_runs(graph: torch.fx.Graph, module: nn.Module) -> list:
    """Replace each run of two or more layer calls in ``graph`` (fused layers or plain ``nn.Linear``,
    each output used only as the next layer's input) with one :func:`chain_call`; returns the runs
    (lists of module paths)."""

    def layer(node):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            return False
        return _chainable(module.get_submodule(node.target))

    runs, seen = [], set()
    for node in list(graph.nodes):
        if node in seen or not layer(node):
            continue
        run = [node]
        while len(run[-1].users) == 1:
            (user,) = run[-1].users
            if not (layer(user) and user.args[0] is run[-1]):
                break
            run.append(user)
        seen.update(run)
        if len(run) < 2:
            continue
        with graph.inserting_before(run[0]):
            attrs = [graph.get_attr(n.target) for n in run]
            call = graph.call_function(chain_call, (run[0].args[0], *attrs))
        run[-1].replace_all_uses_with(call)
        for n in reversed(run):
            graph.erase_node(n)
        runs.append([n.target for n in run])
    return runs


def _compile(graph: torch.fx.Graph):
    code = graph.python_code(root_module="self")
    scope = dict(code.globals)
    exec(compile(code.src, "<fusedlinear.fuse rewritten forward>", "exec"), scope)
    return scope["forward"]


def _refuse_arguments(module, names, values):
    bad = [f"{n}={type(v).__name__}" for n, v in zip(names, values) if not isinstance(v, torch.Tensor)]
    raise TypeError(
        f"{type(module).__name__}.forward was rewritten by fusedlinear.fuse for tensor arguments, got "
        f"{', '.join(bad)}; call it with tensors, or use fusedlinear.unfuse(model) for other arguments")


def _rewritten_class(base: type, erased: dict) -> type:
    """A subclass of ``base`` (same name) whose forward is ``base.forward``'s graph less the
    activation calls in ``erased`` (``{training: [(act, input) node names]}``). Its forward is set
    per instance by :func:`_install` (it traces that instance)."""

    def __reduce_ex__(self, protocol):
        return _rebuild, (base, erased, self.__getstate__())

    def __deepcopy__(self, memo):
        new = base.__new__(base)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__getstate__(), memo))
        new.__class__ = type(self)  # the forward reads self.<children>: valid for the copy too
        return new

    return type(base.__name__, (base,), {
        "__module__": base.__module__, "__qualname__": base.__qualname__, "__doc__": base.__doc__,
        "_fusedlinear_base": base, "_fusedlinear_erased": erased,
        "__reduce_ex__": __reduce_ex__, "__deepcopy__": __deepcopy__,
    })


def _install(cls: type, module: nn.Module, expected: dict | None = None) -> None:
    """Build ``cls.forward`` from ``module``'s (still ``base``-classed) graphs; raises
    :class:`_Refused` (``module`` and ``cls`` unchanged) where they are not the graphs planned
    (``expected``: ``{training: graph}``) or lack a call to remove."""
    graphs = _graphs(module)
    if expected is not None and any(str(graphs[t]) != str(expected[t]) for t in (True, False)):
        raise _Refused("tracing its forward again gave another graph than the one fuse planned with")
    fns = {}
    for training in (True, False):
        if training is False and graphs[False] is graphs[True]:
            fns[False] = fns[True]
            continue
        _erase(graphs[training], cls._fusedlinear_erased[training])
        chains = _chain_runs(graphs[training], module)
        fns[training] = _compile(graphs[training])
    names = list(inspect.signature(cls._fusedlinear_base.forward).parameters)[1:]
    args = ", ".join(names)
    check = " and ".join(f"isinstance({n}, _Tensor)" for n in names) or "True"
    call = "_train" if fns[True] is fns[False] else "(_train if self.training else _eval)"
    src = (f"def forward(self, {args}):\n"
           f"    if not ({check}):\n        _refuse(self, {names!r}, ({args}{',' if names else ''}))\n"
           f"    return {call}(self, {args})\n")
    scope = {"_Tensor": torch.Tensor, "_refuse": _refuse_arguments, "_train": fns[True], "_eval": fns[False]}
    exec(compile(src, "<fusedlinear.fuse rewritten forward>", "exec"), scope)
    forward = scope["forward"]
    forward.__doc__ = cls._fusedlinear_base.forward.__doc__
    forward.__wrapped__ = cls._fusedlinear_base.forward  # inspect.signature shows the user's
    cls.forward, cls._fusedlinear_chains = forward, chains


def _rebuild(base: type, erased: dict, state: dict) -> nn.Module:
    """Unpickling a module whose forward fuse rewrote: the same class, traced again."""
    module = base.__new__(base)
    module.__setstate__(state)
    cls = _rewritten_class(base, erased)
    _install(cls, module)
    module.__class__ = cls
    return module
