"""The second way fuse reads a model: TorchDynamo, for the Linear layers called inside forwards
torch.fx cannot trace (Hugging Face's ``**kwargs: Unpack[...]`` passed on, ``@deprecate_kwarg``
wrappers, branches on tensor attributes: OPT, BART, Whisper decoder layers, ...).

``torch.compile`` with a backend that only keeps the graph runs the model on the user's
``example_inputs`` once in train and once in eval mode (under ``no_grad``; random states and
buffers put back), after one eager call that says whether the inputs suit the model. Dynamo inlines every module, so
each op of the graph carries ``nn_module_stack``: the modules whose forward it ran in. A pair is
an ``F.linear`` node run by an ``nn.Linear`` ``M`` whose one user belongs to the call of another
module ``A``, and that call of ``A`` (its ops, connected) reads nothing traced but that node:
``A(M(x))`` and nothing else sees ``M``'s output. ``A`` must be recognised as an activation of the
table (:mod:`fusedlinear.torch_ext.recognise`), every call of ``M`` in the capture must be such a
pair with the same ``A``, and every call of ``A`` such a pair with a fused Linear.

A pair must show in both modes' captures. The forward that calls them is not changed: ``M``
becomes the fused layer and ``A`` a :class:`FusedActivation` (identity), so only modules change,
never code. What the capture cannot see it cannot vouch for (a branch the example call does not
take, another method calling ``A``), so each pair is also checked on the caller's bytecode
(:func:`_fixed_call_site`): one straight ``self.A(self.M(...))`` that every call of either runs.
"""

from __future__ import annotations

import dis
import inspect
import random
import types
import re

import torch
from torch import nn

_LINEAR_OPS = {torch.nn.functional.linear}  # what nn.Linear.forward calls; Dynamo records it as is


def _module_path(source: str) -> str:
    """``L['self'].encoder.layers[0].fc1`` (Dynamo's source name; the root is the forward's first
    parameter, whatever its name) -> ``encoder.layers.0.fc1``."""
    path = re.sub(r"^L\[['\"][^'\"]+['\"]\]\.?", "", source)
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[['\"]([^'\"]+)['\"]\]|\[(\d+)\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.strip(".")


def graphs(model: nn.Module, example_inputs) -> list:
    """The FX graphs TorchDynamo captures from one call of ``model`` on ``example_inputs`` (a dict of
    keyword arguments, a tuple of positional ones, or one tensor)."""
    if isinstance(example_inputs, dict):
        args, kwargs = (), example_inputs
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    captured = []

    def keep(gm, _inputs):
        captured.append(gm)
        return gm.forward

    rng, torch_rng = random.getstate(), torch.random.get_rng_state()
    buffers = [(b, b.detach().clone()) for b in model.buffers()]  # batch norm's running stats in train mode
    # Each capture adds a cache entry to the model's forwards; past Dynamo's recompile limit it would
    # run them eagerly and show no graph, so start from an empty cache (and leave none behind).
    torch.compiler.reset()
    try:
        with torch.no_grad():
            try:  # eagerly first: the model's own error, not Dynamo's rewording of it
                model(*args, **kwargs)
            except Exception as error:
                raise ValueError(f"fuse: calling the model on example_inputs raised {_first_line(error)}; pass "
                                 f"example_inputs the model accepts (a dict of keyword arguments, a tuple of "
                                 f"positional ones, or one tensor)") from error
            try:
                torch.compile(model, backend=keep, dynamic=False)(*args, **kwargs)
            except Exception as error:
                raise ValueError(f"fuse: TorchDynamo could not capture the call of the model on example_inputs: "
                                 f"{_first_line(error)}; fuse without example_inputs") from error
    finally:
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
        torch.compiler.reset()
        random.setstate(rng)
        torch.random.set_rng_state(torch_rng)
    return [gm.graph for gm in captured]


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def _stack(node, model):
    """The modules whose forward ``node`` ran in, outermost first (those ``model`` has)."""
    found = []
    for source, _cls in node.meta.get("nn_module_stack", {}).values():
        try:
            found.append(model.get_submodule(_module_path(source)))
        except AttributeError:
            return []
    return found


def pairs(model: nn.Module, example_inputs, wanted, recognise):
    """``({id(linear): (spec, activation module)}, {id(linear): reason})`` for the Linear layers in
    ``wanted``: the pairs the captures in train and in eval mode both show, whose call sites the
    caller's code shows to hold on every call (see the module doc), and why each other was left.
    ``recognise(module)`` gives the spec or raises with the reason."""
    was = [(m, m.training) for m in model.modules()]
    by_mode = []
    try:
        for training in (True, False):
            model.train(training)
            by_mode.append(_pairs_one_mode(model, example_inputs, wanted, recognise))
    finally:
        for m, training in was:
            m.training = training
    (found, reasons), (found_eval, reasons_eval) = by_mode
    for linear_id in found_eval.keys() - found.keys():
        reasons[linear_id] += " (in train mode; a pair must hold in both modes)"
    for linear_id in list(found):
        if found_eval.get(linear_id) != found[linear_id]:
            why = reasons_eval.get(linear_id, "called before another activation")
            reasons[linear_id] = f"{why} (in eval mode; a pair must hold in both modes)"
            del found[linear_id]
            continue
        why = _fixed_call_site(model, next(m for m in wanted if id(m) == linear_id), found[linear_id][1])
        if why is not None:
            reasons[linear_id] = why
            del found[linear_id]
    return found, reasons


def _pairs_one_mode(model: nn.Module, example_inputs, wanted, recognise):
    wanted = {id(m): m for m in wanted}
    found, reasons = {}, {}
    calls, paired = {}, {}  # id(activation module) -> how many calls of it the capture has; how many are pairs
    for graph in graphs(model, example_inputs):
        nodes = list(graph.nodes)
        stacks = {n: _stack(n, model) for n in nodes}
        acts = {}
        for n in nodes:
            if not (n.op == "call_function" and n.target in _LINEAR_OPS and stacks[n]
                    and id(stacks[n][-1]) in wanted and isinstance(stacks[n][-1], nn.Linear)):
                continue
            linear = stacks[n][-1]
            if id(linear) in reasons:
                continue
            got = _pair(n, linear, stacks, recognise)
            if isinstance(got, str):
                reasons[id(linear)] = got
                found.pop(id(linear), None)
                continue
            spec, act = got
            if id(linear) in found and found[id(linear)] != (spec, act):
                reasons[id(linear)] = "called before different activations in the example call"
                del found[id(linear)]
                continue
            found[id(linear)] = (spec, act)
            acts[id(act)] = act
            paired[id(act)] = paired.get(id(act), 0) + 1
        for act_id in acts:  # every call of that module in this graph: its connected runs of ops
            inside = [n for n in nodes if any(id(m) == act_id for m in stacks[n])]
            seen = set()
            for n in inside:
                if n not in seen:
                    seen |= _call_nodes(n, act_id, stacks)
                    calls[act_id] = calls.get(act_id, 0) + 1
    for linear_id, (spec, act) in list(found.items()):
        if calls.get(id(act), 0) != paired.get(id(act), 0):
            reasons[linear_id] = (f"its activation module ({type(act).__name__}) is also called on other inputs "
                                  f"in the example call")
            del found[linear_id]
    for linear_id in wanted:
        if linear_id not in found:
            reasons.setdefault(linear_id, "not called in the example call")
    return found, reasons


def _call_nodes(start, act_id, stacks):
    """The nodes of the call of module ``act_id`` that ``start`` belongs to: connected through
    args and users, every one run inside that module."""
    inside = lambda n: any(id(m) == act_id for m in stacks.get(n, ()))  # noqa: E731
    seen, todo = set(), [start]
    while todo:
        n = todo.pop()
        if n in seen or not inside(n):
            continue
        seen.add(n)
        todo += list(n.users) + list(n.all_input_nodes)
    return seen


def _pair(node, linear, stacks, recognise):
    """``(spec, activation module)`` if ``node`` (linear's F.linear) feeds one activation module's
    call and nothing else, else the reason."""
    users = list(node.users)
    if not users:
        return "its output is not used"
    outer = stacks[node][:-1]
    owners = []  # the module each user runs in, one level inside the Linear's caller (None: the caller itself)
    for user in users:
        inner = stacks.get(user, [])
        owners.append(inner[len(outer)] if len(inner) > len(outer) and inner[: len(outer)] == outer else None)
    act = owners[0]
    if act is None or any(o is not act for o in owners):
        if len(users) > 1:
            return f"its output is used {len(users)} times in the example call"
        what = getattr(users[0].target, "__name__", str(users[0].target))
        return f"no activation module after it in the example call (its output goes to {what}(...))"
    if isinstance(act, nn.Linear):
        return "no activation module after it in the example call (its output goes to another Linear)"
    call = _call_nodes(users[0], id(act), stacks)
    if any(u not in call for u in users):  # two calls of one module on the same output
        return f"its output is used {len(users)} times in the example call"
    try:
        spec = recognise(act)
    except Exception as why:  # noqa: BLE001 - recognise raises Refused with the reason
        return f"its output goes to {type(act).__name__}, not taken for an activation: {why}"
    if spec[0] == "identity":
        return f"its output goes to {type(act).__name__}, which computes the identity: nothing to fuse"
    outside_inputs = {a for n in call for a in n.all_input_nodes if a not in call}
    if outside_inputs != {node}:
        return f"the call of {type(act).__name__} after it reads other traced values too"
    escaping = [n for n in call if any(u not in call for u in n.users)]
    if len(escaping) != 1:
        return f"the call of {type(act).__name__} after it has {len(escaping)} outputs"
    return spec, act


def _fixed_call_site(model: nn.Module, linear: nn.Module, act: nn.Module) -> str | None:
    """None where the caller's code calls ``linear`` and then ``act`` on its output at one place, on
    every call: a capture reads one path through the code, and the fused layer (``linear`` followed
    by ``act``, ``act`` an identity) is exact only if no other path calls either of them. Else why.

    What is checked, on the bytecode of the class of the module holding both: it holds each once, as
    ``self.<name>``, and no other module holds them; ``self.<name>`` of each is loaded once in all the
    class's code, in ``forward``; ``forward`` passes ``self`` to nothing (so no helper can reach
    them); and from the first of the two loads to the end of the activation's call the code runs
    straight (no jump, no jump target, and no call between the Linear's and the activation's)."""
    holders = [m for m in model.modules() if any(c is linear or c is act for c in m._modules.values())]
    caller = holders[0] if len(holders) == 1 else None
    names = [n for n, c in caller._modules.items() if c is linear or c is act] if caller is not None else []
    if caller is None or len(names) != 2:
        return ("it or its activation is held by more than one module or under "
                "more than one name, so calls the example call did not make cannot be ruled out")
    lin_name, act_name = (names if caller._modules[names[0]] is linear else names[::-1])
    refuse = (f"{type(caller).__name__}'s code is not one straight call "
              f"self.{act_name}(self.{lin_name}(...)) on every path")
    forward = inspect.unwrap(type(caller).forward)
    code = getattr(forward, "__code__", None)
    if code is None or code.co_argcount < 1:
        return refuse
    loads = {}  # name -> [(code, index)]
    for fn_code in _class_code(type(caller)):
        for i, ins in enumerate(dis.get_instructions(fn_code)):
            if ins.argval in (lin_name, act_name) and (ins.opname.startswith("LOAD_") or ins.opname == "LOAD_CONST"):
                loads.setdefault(ins.argval, []).append((fn_code, i))
    if any(len(loads.get(n, ())) != 1 or loads[n][0][0] is not code for n in (lin_name, act_name)):
        return refuse + " (each loaded once, in forward)"
    ins = list(dis.get_instructions(code))
    me = code.co_varnames[0]
    for i, x in enumerate(ins):  # self only ever has attributes read from it
        if x.opname in ("LOAD_FAST", "LOAD_DEREF", "LOAD_CLOSURE") and x.argval == me and not (
                i + 1 < len(ins) and ins[i + 1].opname in ("LOAD_ATTR", "LOAD_METHOD")):
            return refuse + f" ({me} is passed on)"
    if me in code.co_cellvars:
        return refuse + f" ({me} is used by a nested function)"
    at_lin, at_act = loads[lin_name][0][1], loads[act_name][0][1]
    lin_end, act_end = _call_end(ins, at_lin), _call_end(ins, at_act)
    if lin_end is None or act_end is None or not lin_end < act_end:
        return refuse
    region = ins[min(at_lin, at_act):act_end + 1]
    jumps = set(dis.hasjrel) | set(dis.hasjabs)
    if (any(x.opcode in jumps or (x.is_jump_target and k) for k, x in enumerate(region))
            or sum(x.opname.startswith("CALL") for x in ins[lin_end + 1:act_end + 1]) != 1):
        return refuse  # a branch, or a call between the two that could change the value on another input
    return None


def _call_end(ins: list, at: int):
    """The index of the instruction that ends the call of the attribute loaded at ``at``: its callable,
    then its arguments, until one value is left where the object was."""
    depth = 1
    for i in range(at, len(ins)):
        depth += dis.stack_effect(ins[i].opcode, ins[i].arg if ins[i].opcode >= dis.HAVE_ARGUMENT else None,
                                  jump=False)
        if depth <= 1 and i > at:
            return i
    return None


def _class_code(cls: type) -> list:
    """The code objects of ``cls``'s own methods (its bases outside torch included), nested ones too."""
    found = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        for value in vars(klass).values():
            for fn in (value, getattr(value, "__func__", None), getattr(value, "fget", None),
                       getattr(value, "fset", None)):
                fn = inspect.unwrap(fn) if callable(fn) else None
                found += _nested(fn.__code__) if hasattr(fn, "__code__") else []
    return found


def used_outside_forward(holder: nn.Module, module: nn.Module) -> str | None:
    """Why ``module`` (a child of ``holder``) may be called by code fuse did not read: a method of
    ``holder``'s class other than ``forward`` and ``__init__`` uses ``self.<its name>`` as a value
    (calls it, passes it on; reading its attributes is fine), where a fused layer or an identity
    would give other values. None when no method does."""
    names = {n for n, c in holder._modules.items() if c is module}
    forward = inspect.unwrap(type(holder).forward)
    mine = _nested(forward.__code__) if hasattr(forward, "__code__") else []
    for code in _class_code(type(holder)):
        if code.co_name == "__init__" or any(code is c for c in mine):
            continue
        ins = list(dis.get_instructions(code))
        for i, x in enumerate(ins):
            if x.argval in names and x.opname.startswith("LOAD_") and not (
                    i + 1 < len(ins) and ins[i + 1].opname in ("LOAD_ATTR", "LOAD_METHOD")
                    and ins[i + 1].argval not in ("forward", "__call__")):
                return (f"{type(holder).__name__}.{code.co_qualname if hasattr(code, 'co_qualname') else code.co_name} "
                        f"also uses self.{x.argval}, which fuse cannot read: it would see the fused layer")
    return None


def _nested(code) -> list:
    found, todo = [], [code]
    while todo:
        c = todo.pop()
        found.append(c)
        todo += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    return found
