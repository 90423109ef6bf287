"""fuse: trace every forward, find the pairs, choose which change (a fixed point), and build
everything new before anything in the model changes."""

from __future__ import annotations

import copy

from torch import nn

from ..modules import FusedActivation, FusedSequential
from . import capture as _capture
from .patterns import (_COMMUTE_WITH_DROPOUT, _RECOGNISED, _describe, _ineligible, _layer_for, _Pair, _follow,
                       _recognise, _what)
from .report import FusedPair, FuseReport, _path
from .rewrite import _install, _rewritable, _rewritten_class
from .trace import _graphs, _is_container, _opaque, _Refused


def _check_call(name: str, model, inplace, report=False) -> None:
    if isinstance(model, type):
        raise TypeError(f"{name} expects an nn.Module instance, got the class {model.__name__}; "
                        f"pass an instance, e.g. {name}({model.__name__}(...))")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} expects an nn.Module, got {type(model).__name__}")
    for label, value in (("inplace", inplace), ("report", report)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: {label} must be True or False, got {value!r}")


def fuse(model: nn.Module, inplace: bool = False, report: bool = False, example_inputs=None):
    """Replace each ``nn.Linear`` of ``model`` whose output only feeds an activation with the
    matching fused layer, wherever the model calls it: activation modules (``nn.ReLU``,
    ``nn.GELU(approximate=...)``, ``nn.SiLU``, ``nn.Mish``, ... and any parameter-free module
    that computes an activation of the table, e.g. Hugging Face's ``ACT2FN`` classes: see
    :mod:`fusedlinear.torch_ext.fuse.recognise`), functions (``F.relu``, ``F.gelu``, ``F.silu``,
    ``F.leaky_relu``, ``F.relu6``, ``F.hardswish``, ``F.mish``, ``F.softplus``, ``torch.relu``,
    ``torch.sigmoid``, ``torch.tanh``, ...) and tensor methods (``.relu()``, ``.sigmoid()``,
    ``.tanh()``), in place variants included; the table of which is
    :mod:`fusedlinear.backend.activations`. Outputs and gradients stay those of the model; a
    pair that cannot be fused so is left alone. State-dict keys are unchanged (checkpoints load
    both ways with ``strict=True``) and the fused layers share the Linear layers' parameters.
    How the model is read and changed: see :mod:`fusedlinear.torch_ext.fuse`.

    A Linear called from a forward that torch.fx cannot trace (Hugging Face's OPT, BART, Whisper
    layers, ...) is read with TorchDynamo instead when ``example_inputs`` is given (a dict of
    keyword arguments, a tuple of positional ones, or one tensor for one call of ``model``): its
    pair is fused where the activation is a module, the pair shows in train and in eval mode and the
    caller's code calls them at one straight site (see :mod:`fusedlinear.torch_ext.fuse.capture`);
    inputs the model raises on raise ``ValueError`` ("calling the model on example_inputs raised ...").
    That capture calls ``torch.compiler.reset()`` before and after (Dynamo's per-function limit on
    cached graphs would otherwise end the capture after a few fuse calls): functions compiled
    elsewhere in the process compile again on their next call.

    Returns a deep copy unless ``inplace=True`` (then ``model`` itself, changed only once the
    whole plan is made). With ``report=True`` returns ``(model, FuseReport)``: each pair fused and
    each ``nn.Linear`` left alone with the reason.
    """
    _check_call("fuse", model, inplace, report)
    model = model if inplace else copy.deepcopy(model)
    try:
        plan, summary = _plan(model, example_inputs=example_inputs)
    finally:
        _RECOGNISED.clear()
    for apply in plan:
        apply()
    return (model, summary) if report else model


class _Tree:
    """The model's modules: each one's path, the (parent, name) slots holding it, and who calls it."""

    def __init__(self, model: nn.Module):
        self.model, self.paths, self.parents = model, {}, {}
        for name, module in model.named_modules():
            self.paths[id(module)] = name
            for child_name, child in module._modules.items():
                if child is not None:
                    self.parents.setdefault(id(child), []).append((module, child_name))
        self.modules = {id(m): m for m in model.modules()}

    def path(self, module_or_id) -> str:
        return _path(self.paths[module_or_id if isinstance(module_or_id, int) else id(module_or_id)])

    def callers(self, module) -> list:
        """The modules whose forward may call ``module`` (through containers)."""
        found = []
        for parent, _ in self.parents.get(id(module), []):
            found += self.callers(parent) if _is_container(parent) else [parent]
        return found


class _Replan(Exception):
    """A forward could not be rewritten as planned: plan again without rewriting it."""

    def __init__(self, caller_id, why):
        super().__init__(why)
        self.caller_id = caller_id


def _plan(model: nn.Module, refused: dict | None = None, example_inputs=None):
    """Everything fuse will do to ``model``, as a list of assignments that cannot fail, and the report;
    ``refused``: ``{id(module): why}`` for forwards found not to be rewritable while building a plan."""
    refused = refused or {}
    tree, summary = _Tree(model), FuseReport()
    summary.untraceable.update({tree.path(i): f"forward not rewritten: {why}" for i, why in refused.items()})
    graphs, unread = _read_forwards(tree, summary)
    calls, pairs, reasons = _find_pairs(tree, graphs)
    chosen, unread_callers = _eligible(tree, graphs, unread, calls, pairs, reasons)
    live, swappable, needs_rewrite = _settle(tree, graphs, calls, pairs, chosen, reasons, refused)
    dynamo = _read_with_dynamo(tree, example_inputs, unread_callers, calls, chosen, swappable, reasons)
    try:
        plan = _build(tree, summary, graphs, reasons, chosen, live, swappable, needs_rewrite, dynamo)
    except _Replan as again:  # nothing has changed yet
        return _plan(model, {**refused, again.caller_id: str(again)}, example_inputs)
    return plan, summary


def _read_forwards(tree: _Tree, summary: FuseReport):
    """1. Trace every module that has children and its own forward: ``{id: {training: graph}}``
    and, for those not read, ``{id: why}`` (also in the report)."""
    graphs, unread = {}, {}
    for module in tree.modules.values():
        if not module._modules or _is_container(module):
            continue
        why = _opaque(module)
        if why is None:
            try:
                graphs[id(module)] = _graphs(module)
                continue
            except _Refused as error:
                why = f"forward not read as a graph: {error}"
                summary.untraceable[tree.path(module)] = why
            except Exception as error:  # noqa: BLE001 - tracing runs user code on proxies; any failure
                # means "cannot be read as a graph", which the report says with the error
                why = f"untraceable forward ({type(error).__name__}: {str(error).strip().splitlines()[0][:160]})"
                summary.untraceable[tree.path(module)] = why
        unread[id(module)] = why
    return graphs, unread


def _find_pairs(tree: _Tree, graphs: dict):
    """2. Every call of every module in the graphs (``{id(module): [node]}``), the pairs
    (``{linear node: _Pair}``) and why each Linear call is not one (``{id(linear): reason}``)."""
    calls, pairs, reasons = {}, {}, {}
    for caller_id, by_mode in graphs.items():
        caller = tree.modules[caller_id]
        for training in (True, False):
            if training is False and by_mode[False] is by_mode[True]:
                continue
            for node in by_mode[training].nodes:
                if node.op == "get_attr" and "." in node.target:
                    owner = caller.get_submodule(node.target.rsplit(".", 1)[0])
                    reasons.setdefault(id(owner), f"{tree.path(caller_id)}.forward reads its "
                                                  f"{node.target.rsplit('.', 1)[1]} directly")
                if node.op != "call_module":
                    continue
                callee = caller.get_submodule(node.target)
                calls.setdefault(id(callee), []).append(node)
                if type(callee) is nn.Linear:
                    found = _follow(caller, training, node)
                    if isinstance(found, _Pair):
                        pairs[node] = found
                    else:
                        reasons.setdefault(id(callee), found)
    return calls, pairs, reasons


def _eligible(tree: _Tree, graphs, unread, calls, pairs, reasons):
    """3. The Linear layers whose every call is a pair with one activation (``{id(linear): spec}``),
    and those left only because a forward calling them could not be traced (for TorchDynamo)."""
    chosen, unread_callers = {}, []
    for linear in (m for m in tree.modules.values() if isinstance(m, nn.Linear)):
        why = _ineligible(linear)
        for holder, _name in tree.parents.get(id(linear), []) if why is None else []:
            why = why or _capture.used_outside_forward(holder, linear)
        unknown = [c for c in tree.callers(linear) if id(c) not in graphs]
        if why is None and unknown:
            why = f"called from {tree.path(unknown[0])}, whose forward is not read: {unread[id(unknown[0])]}"
            unread_callers.append(linear)
        if why is None and not calls.get(id(linear)):
            why = ("it is the whole model: no activation after it" if linear is tree.model else
                   "not called in any forward read as a graph")
        if why is None and id(linear) in reasons:
            why = reasons[id(linear)]
        specs = {pairs[n].spec for n in calls.get(id(linear), []) if n in pairs}
        if why is None and len(specs) > 1:
            why = f"called before different activations ({', '.join(sorted(map(_describe, specs)))})"
        if why is None:
            chosen[id(linear)] = specs.pop()
        else:
            reasons[id(linear)] = why
    return chosen, unread_callers


def _settle(tree: _Tree, graphs, calls, pairs, chosen, reasons, refused):
    """4. Which activation modules become FusedActivation and which forwards must be rewritten: a
    fixed point, since dropping one pair can make an activation module keep other callers, which
    can make a forward need a rewrite it cannot have. Returns (live pairs, swappable activation
    ids, ids of the forwards to rewrite); drops from ``chosen`` what cannot be fused."""
    while True:
        live = [p for p in pairs.values() if id(p.caller.get_submodule(p.linear_node.target)) in chosen]
        fused_calls = {p.act_node for p in live}
        swappable = set()
        for p in live:
            act = p.act_module
            if act is None:
                continue
            # Only nn.Sequential's forward is known to be all its code: a module of the user's class may
            # call its activation from another method too, which must still see the activation.
            if (all(n in fused_calls for n in calls.get(id(act), []))
                    and all(type(c) is nn.Sequential for c in tree.callers(act))
                    and all(id(c) in graphs for c in tree.callers(act))
                    and all(n.graph in _owned(graphs[id(p.caller)]) for n in calls.get(id(act), []))):
                swappable.add(id(act))
        needs_rewrite = {id(p.caller) for p in live if p.act_module is None or id(p.act_module) not in swappable}
        # a module needing a rewrite keeps its activation modules as they are
        swappable -= {id(p.act_module) for p in live if id(p.caller) in needs_rewrite and p.act_module is not None}
        dropped = False
        for p in live:
            why = (refused.get(id(p.caller)) or _rewritable(p.caller)) if id(p.caller) in needs_rewrite else None
            linear = p.caller.get_submodule(p.linear_node.target)
            if why is not None and id(linear) in chosen:
                del chosen[id(linear)]
                reasons[id(linear)] = (f"{_what(p.act_node)} after it is called in "
                                       f"{tree.path(p.caller)}.forward, which cannot change: {why}")
                dropped = True
        if not dropped:
            return live, swappable, needs_rewrite


def _read_with_dynamo(tree: _Tree, example_inputs, unread_callers, calls, chosen, swappable, reasons) -> dict:
    """5. The Linear layers whose callers fx could not read, read with TorchDynamo from one call on
    ``example_inputs``: adds their pairs to ``chosen`` and their activation modules to ``swappable``;
    returns ``{id(linear): activation module}``."""
    if not unread_callers:
        return {}
    if example_inputs is None:
        for linear in unread_callers:
            reasons[id(linear)] += "; pass example_inputs= to fuse to read it with TorchDynamo"
        return {}
    dynamo = {}
    found, why = _capture.pairs(tree.model, example_inputs, unread_callers, _recognise)
    for linear_id, (spec, act) in found.items():
        if calls.get(id(act)):  # called from a forward fx did read: fx's plan decides
            why[linear_id] = f"its activation {type(act).__name__} is also called from a forward read by torch.fx"
            continue
        chosen[linear_id], dynamo[linear_id] = spec, act
        swappable.add(id(act))
    for linear_id, reason in why.items():
        reasons[linear_id] += f"; TorchDynamo, from example_inputs: {reason}"
    return dynamo


def _build(tree: _Tree, summary, graphs, reasons, chosen, live, swappable, needs_rewrite, dynamo) -> list:
    """6. Build everything new (nothing in the model changes yet) and fill the report; returns the
    assignments that apply it. Raises :class:`_Replan` where a forward cannot be rewritten."""
    plan, new_layers = [], {}
    for linear in (m for m in tree.modules.values() if isinstance(m, nn.Linear)):
        if id(linear) in chosen:
            fused = _layer_for(linear, chosen[id(linear)])
            new_layers[id(linear)] = fused
            for parent, name in tree.parents.get(id(linear), []):
                plan.append(lambda parent=parent, name=name, fused=fused: parent._modules.__setitem__(name, fused))
        else:
            summary.left_alone.append((tree.path(linear), reasons[id(linear)]))
    for act_id in swappable:
        holder = FusedActivation(tree.modules[act_id])
        for parent, name in tree.parents.get(act_id, []):
            plan.append(lambda parent=parent, name=name, holder=holder: parent._modules.__setitem__(name, holder))
    for drop in {id(d): d for p in live for d in p.dropouts if d.p != 0 and p.spec[0] not in _COMMUTE_WITH_DROPOUT}.values():
        plan.append(lambda drop=drop: drop.register_forward_pre_hook(_refuse_training))
    for caller_id in needs_rewrite:
        caller = tree.modules[caller_id]
        erased = {training: [(p.act_node.name, p.input_node.name) for p in live
                             if p.caller is caller and p.training is (training if graphs[caller_id][False]
                                                                      is not graphs[caller_id][True] else True)]
                  for training in (True, False)}
        cls = _rewritten_class(type(caller), erased)
        try:
            _install(cls, caller, graphs[caller_id])
        except _Refused as error:
            raise _Replan(caller_id, str(error)) from None
        plan.append(lambda caller=caller, cls=cls: setattr(caller, "__class__", cls))
        summary.rewritten.append(tree.path(caller_id))
        summary.chains += [[f"{tree.paths[caller_id]}.{t}".lstrip(".") for t in run] for run in cls._fusedlinear_chains]
    for p in live:
        how = ("read by torch.fx; forward rewritten without the activation call" if id(p.caller) in needs_rewrite
               else f"read by torch.fx; self.{p.act_node.target} became FusedActivation")
        pair = FusedPair(tree.path(p.caller.get_submodule(p.linear_node.target)), _describe(p.spec),
                         tree.path(p.caller), how)
        if pair not in summary.fused:  # a forward with one graph per mode has each pair twice
            summary.fused.append(pair)
    for linear_id, act in dynamo.items():
        summary.fused.append(FusedPair(tree.path(linear_id), _describe(chosen[linear_id]),
                                       tree.path(tree.callers(tree.modules[linear_id])[0]),
                                       f"read by TorchDynamo from example_inputs; {tree.path(act)} became FusedActivation"))
    for module in tree.modules.values():
        if type(module) is nn.Sequential and any(id(m) in new_layers for m in module._modules.values()):
            plan.append(lambda module=module: setattr(module, "__class__", FusedSequential))
    return plan


def _owned(by_mode: dict) -> set:
    return {by_mode[True], by_mode[False]}


def _refuse_training(module, args):
    """Pre-hook fuse puts on a dropout it moved after a fused activation that does not commute with it."""
    if module.training:
        raise RuntimeError(
            "fusedlinear.fuse moved this dropout after the activation of the fused layer before it, which "
            "keeps values in eval mode only; fuse the model after model.train(), or unfuse it to train")
