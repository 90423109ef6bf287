"""The second way fuse reads a model: TorchDynamo, for the Linear layers called inside forwards
torch.fx cannot trace (Hugging Face's ``**kwargs: Unpack[...]`` passed on, ``@deprecate_kwarg``
wrappers, branches on tensor attributes: OPT, BART, Whisper decoder layers, ...).

``torch.compile`` with a backend that only keeps the graph runs the model once on the user's
``example_inputs`` (under ``no_grad``; random states put back). Dynamo inlines every module, so
each op of the graph carries ``nn_module_stack``: the modules whose forward it ran in. A pair is
an ``F.linear`` node run by an ``nn.Linear`` ``M`` whose one user belongs to the call of another
module ``A``, and that call of ``A`` (its ops, connected) reads nothing traced but that node:
``A(M(x))`` and nothing else sees ``M``'s output. ``A`` must be recognised as an activation of the
table (:mod:`fusedlinear.torch_ext.recognise`), every call of ``M`` in the capture must be such a
pair with the same ``A``, and every call of ``A`` such a pair with a fused Linear.

The forward that calls them is not changed: ``M`` becomes the fused layer and ``A`` a
:class:`FusedActivation` (identity), so only modules change, never code. What the capture
cannot see it cannot vouch for: a branch the example call does not take is not read, so the
report says the pair was read from the example call.
"""

from __future__ import annotations

import random
import re

import torch
from torch import nn

_LINEAR_OPS = {torch.nn.functional.linear}  # what nn.Linear.forward calls; Dynamo records it as is


def _module_path(source: str) -> str:
    """``L['self'].encoder.layers[0].fc1`` (Dynamo's source name) -> ``encoder.layers.0.fc1``."""
    path = re.sub(r"^L\['self'\]\.?|^L\[\"self\"\]\.?", "", source)
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
    # Each capture adds a cache entry to the model's forwards; past Dynamo's recompile limit it would
    # run them eagerly and show no graph, so start from an empty cache (and leave none behind).
    torch.compiler.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=keep, dynamic=False)(*args, **kwargs)
    finally:
        torch.compiler.reset()
        random.setstate(rng)
        torch.random.set_rng_state(torch_rng)
    return [gm.graph for gm in captured]


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
    ``wanted``: the pairs the captured graphs show (see the module doc) and why each other was left.
    ``recognise(module)`` gives the spec or raises with the reason."""
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
