"""``fuse``/``unfuse``: find each ``nn.Linear`` whose output only feeds an activation, by reading
the model's forward code as a graph (``torch.fx`` symbolic tracing), and swap in the fused layer.

How it reads a model. Every module that has children and its own ``forward`` is traced on its
own, its children standing as opaque calls (fx "leaf" modules), so each graph is the code of one
``forward``: ``self.fc1(x)`` is a ``call_module`` node, ``F.gelu(h)`` a ``call_function`` node,
``h.relu()`` a ``call_method`` node. A pair ``Linear -> activation`` is fused where the Linear's
output has that one use (an ``nn.Dropout`` or ``nn.Identity`` between them may pass it on, where
moving it after the activation keeps values), and where every call of that Linear, in every
graph that calls it, is such a pair with the same activation. A module whose forward cannot be
traced (data-dependent control flow, ...) and PyTorch's own modules with children
(``nn.TransformerEncoderLayer``, ...) are opaque: the Linear layers they call directly are left
alone, their children are read in their own graphs. Each module is traced in train and in eval
mode; a forward that reads ``self.training`` gets one graph per mode. A forward is not read as a
graph (the report says why) where tracing it sets attributes on modules (``self.n += 1``,
``self.last = h``; put back as they were), draws random numbers (``random``, ``torch.rand``:
stochastic depth; the generators' states are put back), or gives another graph when traced again.

How it changes a model, keeping the module tree and every ``state_dict`` key:

* the ``nn.Linear`` becomes the fused layer, at the same name, sharing its parameters;
* an activation *module* whose every call was fused becomes a :class:`FusedActivation` (an
  ``nn.Identity`` that remembers the original); the user's ``forward`` stays as written;
* a *functional* or *method* activation (``F.relu(self.fc(x))``) can only go by changing the
  code that calls it: that module's class becomes a subclass of its own class (same name, same
  attributes and methods, ``isinstance`` unchanged) whose ``forward`` is the traced graph less the
  fused activation calls. Such a forward holds for tensor arguments (any other argument raises a
  clear error) and is specialised to the Python values it read at ``fuse`` time, as any fx graph;
  only forwards whose arguments are all required are rewritten;
* a plain ``nn.Sequential`` that now holds fused layers becomes a :class:`FusedSequential`.

Everything is planned (traced, checked, built) before anything in the model changes, so a
refusal leaves the model as it was. :func:`unfuse` undoes each of these.
"""

from __future__ import annotations

import copy
import inspect
import random
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune

from . import modules as _layers
from ..backend import activations as _registry
from .modules import FusedActivation, FusedLinear, FusedSequential, _chainable, chain_call
from . import capture as _capture
from .recognise import Refused, recognise

# ---------------------------------------------------------------------------------------------
# Which calls are activations: spec = (table name, negative_slope), from the registry
# (fusedlinear.backend.activations) for torch's functions, methods and modules, and by what it
# computes (fusedlinear.torch_ext.recognise) for any other module.

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


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class FusedPair:
    """One fused pair: the ``nn.Linear`` at ``linear`` and its ``activation``, called from the
    forward of ``caller``; ``how``: what changed besides the Linear."""

    linear: str
    activation: str
    caller: str
    how: str


@dataclass
class FuseReport:
    """What :func:`fuse` did: ``fused`` pairs, each ``nn.Linear`` ``left_alone`` with the reason,
    the modules whose ``forward`` was ``rewritten`` (and the runs of layers those call as one
    ``fused_chain``: ``chains``), and the modules found ``untraceable`` with the error. ``str(report)`` is a readable table."""

    fused: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)  # (path, reason)
    rewritten: list = field(default_factory=list)
    untraceable: dict = field(default_factory=dict)  # path -> error
    chains: list = field(default_factory=list)  # runs of layers a rewritten forward calls as one fused_chain

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} Linear+activation pair(s)"
                 + (f", left {len(self.left_alone)} nn.Linear alone" if self.left_alone else "")]
        lines += [f"  fused   {p.linear} + {p.activation}  (in {p.caller}.forward; {p.how})" for p in self.fused]
        lines += [f"  left    {path}: {reason}" for path, reason in self.left_alone]
        lines += [f"  forward rewritten: {path}" for path in self.rewritten]
        lines += [f"  chained: {' -> '.join(run)} (one fused_chain call)" for run in self.chains]
        lines += [f"  untraceable: {path}: {why}" for path, why in self.untraceable.items()]
        return "\n".join(lines)


def _path(name: str) -> str:
    return name or "(model)"


# ---------------------------------------------------------------------------------------------
# Tracing one module's own forward


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


# ---------------------------------------------------------------------------------------------
# Reading the graphs


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


def _rewritable(module: nn.Module) -> str | None:
    """Why ``module``'s forward cannot be replaced by its graph, or None."""
    if type(module) is nn.Sequential or isinstance(module, FusedSequential):
        return "nn.Sequential's forward is not rewritten"
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.default is not p.empty for p in params):
        return ("its forward has optional or variable arguments, and a graph holds for one way of calling "
                "it only")
    return None


# ---------------------------------------------------------------------------------------------
# Rewritten forwards


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


# ---------------------------------------------------------------------------------------------
# fuse


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
    ``nn.GELU(approximate=...)``, ``nn.SiLU``, ``nn.Sigmoid``, ``nn.Tanh``, ``nn.LeakyReLU``),
    functions (``F.relu``, ``F.gelu``, ``F.silu``, ``F.leaky_relu``, ``torch.relu``,
    ``torch.sigmoid``, ``torch.tanh``, ...) and tensor methods (``.relu()``, ``.sigmoid()``,
    ``.tanh()``), in place variants included. Outputs and gradients stay those of the model; a
    pair that cannot be fused so is left alone. State-dict keys are unchanged (checkpoints load
    both ways with ``strict=True``) and the fused layers share the Linear layers' parameters.
    How the model is read and changed: see :mod:`fusedlinear.torch_ext.fuse`.

    A Linear called from a forward that torch.fx cannot trace (Hugging Face's OPT, BART, Whisper
    layers, ...) is read with TorchDynamo instead when ``example_inputs`` is given (a dict of
    keyword arguments, a tuple of positional ones, or one tensor for one call of ``model``): its
    pair is fused where the activation is a module (see :mod:`fusedlinear.torch_ext.capture`).

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


def _plan(model: nn.Module, refused: dict | None = None, example_inputs=None):
    """Everything fuse will do to ``model``, as a list of assignments that cannot fail, and the report;
    ``refused``: ``{id(module): why}`` for forwards found not to be rewritable while building a plan."""
    refused = refused or {}
    paths, parents = {}, {}
    for name, module in model.named_modules():
        paths[id(module)] = name
        for child_name, child in module._modules.items():
            if child is not None:
                parents.setdefault(id(child), []).append((module, child_name))
    modules = {id(m): m for m in model.modules()}
    summary = FuseReport()
    summary.untraceable.update({_path(paths[i]): f"forward not rewritten: {why}" for i, why in refused.items()})

    # 1. trace every module that has children and its own forward
    graphs, unread = {}, {}  # id -> {training: graph}; id -> why not read
    for module in modules.values():
        if not module._modules or _is_container(module):
            continue
        why = _opaque(module)
        if why is None:
            try:
                graphs[id(module)] = _graphs(module)
                continue
            except _Refused as error:
                why = f"forward not read as a graph: {error}"
                summary.untraceable[_path(paths[id(module)])] = why
            except Exception as error:  # noqa: BLE001 - tracing runs user code on proxies; any failure
                # means "cannot be read as a graph", which the report says with the error
                why = f"untraceable forward ({type(error).__name__}: {str(error).strip().splitlines()[0][:160]})"
                summary.untraceable[_path(paths[id(module)])] = why
        unread[id(module)] = why

    def callers(module):
        """The modules whose forward may call ``module`` (through containers)."""
        found = []
        for parent, _ in parents.get(id(module), []):
            found += callers(parent) if _is_container(parent) else [parent]
        return found

    # 2. every call of every module, and the pairs
    calls, pairs, reasons = {}, {}, {}  # id(module) -> [node]; id(linear node) -> pair; id(linear) -> reason
    for caller_id, by_mode in graphs.items():
        caller = modules[caller_id]
        for training in (True, False):
            if training is False and by_mode[False] is by_mode[True]:
                continue
            for node in by_mode[training].nodes:
                if node.op == "get_attr" and "." in node.target:
                    owner = caller.get_submodule(node.target.rsplit(".", 1)[0])
                    reasons.setdefault(id(owner), f"{_path(paths[caller_id])}.forward reads its "
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

    # 3. which Linear layers and activation modules can change: a fixed point, since dropping one
    # pair can make an activation module keep other callers, which can make a forward need a rewrite
    linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
    chosen = {}  # id(linear) -> spec
    unread_callers = []  # Linear layers left only because a forward calling them could not be traced
    for linear in linears:
        why = _ineligible(linear)
        unknown = [c for c in callers(linear) if id(c) not in graphs]
        if why is None and unknown:
            why = f"called from {_path(paths[id(unknown[0])])}, whose forward is not read: {unread[id(unknown[0])]}"
            unread_callers.append(linear)
        if why is None and not calls.get(id(linear)):
            why = ("it is the whole model: no activation after it" if linear is model else
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

    while True:
        live = [p for p in pairs.values() if id(p.caller.get_submodule(p.linear_node.target)) in chosen]
        fused_calls = {p.act_node for p in live}
        swappable = set()  # ids of activation modules to become FusedActivation
        for p in live:
            act = p.act_module
            if act is None:
                continue
            act_callers = callers(act)
            if (all(n in fused_calls for n in calls.get(id(act), [])) and all(id(c) in graphs for c in act_callers)
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
                                       f"{_path(paths[id(p.caller)])}.forward, which cannot change: {why}")
                dropped = True
        if not dropped:
            break

    # 3b. the Linear layers whose callers fx could not read, read with TorchDynamo from an example call
    dynamo = {}  # id(linear) -> its activation module
    if unread_callers and example_inputs is None:
        for linear in unread_callers:
            reasons[id(linear)] += "; pass example_inputs= to fuse to read it with TorchDynamo"
    elif unread_callers:
        found, why = _capture.pairs(model, example_inputs, unread_callers, _recognise)
        for linear_id, (spec, act) in found.items():
            if calls.get(id(act)) or act is model:  # called from a forward fx did read: fx's plan decides
                why[linear_id] = f"its activation {type(act).__name__} is also called from a forward read by torch.fx"
                continue
            chosen[linear_id], dynamo[linear_id] = spec, act
            swappable.add(id(act))
        for linear_id, reason in why.items():
            reasons[linear_id] += f"; TorchDynamo, from example_inputs: {reason}"

    # 4. build everything new; nothing in the model has changed yet
    plan = []
    new_layers = {}
    for linear in linears:
        if id(linear) in chosen:
            fused = _layer_for(linear, chosen[id(linear)])
            new_layers[id(linear)] = fused
            for parent, name in parents.get(id(linear), []):
                plan.append(lambda parent=parent, name=name, fused=fused: parent._modules.__setitem__(name, fused))
        else:
            summary.left_alone.append((_path(paths[id(linear)]), reasons[id(linear)]))
    for act_id in swappable:
        holder = FusedActivation(modules[act_id])
        for parent, name in parents.get(act_id, []):
            plan.append(lambda parent=parent, name=name, holder=holder: parent._modules.__setitem__(name, holder))
    for drop in {id(d): d for p in live for d in p.dropouts if d.p != 0 and p.spec[0] not in _COMMUTE_WITH_DROPOUT}.values():
        plan.append(lambda drop=drop: drop.register_forward_pre_hook(_refuse_training))
    for caller_id in needs_rewrite:
        caller = modules[caller_id]
        erased = {training: [(p.act_node.name, p.input_node.name) for p in live
                             if p.caller is caller and p.training is (training if graphs[caller_id][False]
                                                                      is not graphs[caller_id][True] else True)]
                  for training in (True, False)}
        cls = _rewritten_class(type(caller), erased)
        try:
            _install(cls, caller, graphs[caller_id])
        except _Refused as error:  # plan again without rewriting it: nothing has changed yet
            return _plan(model, {**refused, caller_id: str(error)}, example_inputs)
        plan.append(lambda caller=caller, cls=cls: setattr(caller, "__class__", cls))
        summary.rewritten.append(_path(paths[caller_id]))
        summary.chains += [[f"{paths[caller_id]}.{t}".lstrip(".") for t in run] for run in cls._fusedlinear_chains]
    for p in live:
        how = ("forward rewritten without the activation call" if id(p.caller) in needs_rewrite else
               f"self.{p.act_node.target} became FusedActivation")
        pair = FusedPair(_path(paths[id(p.caller.get_submodule(p.linear_node.target))]), _describe(p.spec),
                         _path(paths[id(p.caller)]), how)
        if pair not in summary.fused:  # a forward with one graph per mode has each pair twice
            summary.fused.append(pair)
    for linear_id, act in dynamo.items():
        summary.fused.append(FusedPair(_path(paths[linear_id]), _describe(chosen[linear_id]),
                                       _path(paths[id(callers(modules[linear_id])[0])]),
                                       f"read by TorchDynamo from example_inputs; {_path(paths[id(act)])} became "
                                       f"FusedActivation"))
    for module in modules.values():
        if type(module) is nn.Sequential and any(id(m) in new_layers for m in module._modules.values()):
            plan.append(lambda module=module: setattr(module, "__class__", FusedSequential))
    return plan, summary


def _owned(by_mode: dict) -> set:
    return {by_mode[True], by_mode[False]}


def _refuse_training(module, args):
    """Pre-hook fuse puts on a dropout it moved after a fused activation that does not commute with it."""
    if module.training:
        raise RuntimeError(
            "fusedlinear.fuse moved this dropout after the activation of the fused layer before it, which "
            "keeps values in eval mode only; fuse the model after model.train(), or unfuse it to train")


# ---------------------------------------------------------------------------------------------
# unfuse


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
