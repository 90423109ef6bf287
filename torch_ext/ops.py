"""The autograd layer: ``fused_linear`` and the ``torch.library`` ops it calls.

Two ops in namespace ``fusedlinear``, each with a fake (meta) implementation so that
``torch.compile(fullgraph=True)`` traces them without a graph break::

    fusedlinear::linear_act(input (M,K), weight (N,K), bias (N,)?, activation, negative_slope)
        -> (A (M,N), Z (M,N) or (0,))
    fusedlinear::linear_act_backward(grad (M,N), saved, input, weight, activation,
        negative_slope, output_mask[3]) -> (dX (M,K), dW (N,K), db (N,)) (empty where masked)

They are defined with ``torch.library.Library`` (lighter per call than ``custom_op``) and
call :mod:`fusedlinear.backend`, which picks the kernels. ``FusedLinearFunction`` glues them
to autograd: it saves what the activation table says backward needs, and asks backward only
for the gradients autograd needs.

Every entry point (``fused_linear``, ``fused_chain``, both Functions' ``apply``, both ops and
their fake implementations) validates its arguments: :func:`_valid` passes the common call in a
few cheap tests, :func:`_check` names the bad value and the fix. What the kernels cannot take
runs as plain PyTorch ops (:mod:`fusedlinear.backend.reference`), giving what
``nn.Linear`` + activation gives:

* autocast: input, weight and bias are cast to the autocast dtype first, as ``F.linear`` is;
* functorch transforms (``torch.func.vmap/grad/jacrev``), forward-mode AD (``dual_level``) and
  non-strided layouts (sparse, mkldnn, nested) at ``fused_linear``/``fused_chain``: the whole
  call is plain ops;
* a backward with ``create_graph=True`` or on batched gradients (``is_grads_batched``,
  ``jacobian(vectorize=True)``): the backward formulas as differentiable torch ops.
"""

from __future__ import annotations

import numbers

import torch

from .. import backend
from ..backend import reference as _reference
from ..kernels import activations as _acts

_lib = torch.library.Library("fusedlinear", "DEF")
_lib.define(
    "linear_act(Tensor input, Tensor weight, Tensor? bias, str activation, float negative_slope)"
    " -> (Tensor, Tensor)"
)
_lib.define(
    "linear_act_backward(Tensor grad, Tensor saved, Tensor input, Tensor weight, str activation,"
    " float negative_slope, bool[3] output_mask) -> (Tensor, Tensor, Tensor)"
)


def _linear_act(input, weight, bias, activation, negative_slope):
    _check_op(input, weight, bias, activation, negative_slope)
    return backend.forward(input, weight, bias, activation, negative_slope)


def _linear_act_backward(grad, saved, input, weight, activation, negative_slope, output_mask):
    _check_op_backward(grad, saved, input, weight, activation, negative_slope, output_mask)
    return backend.backward(grad, saved, input, weight, activation, negative_slope, output_mask)


_lib.impl("linear_act", _linear_act, "CompositeExplicitAutograd")
_lib.impl("linear_act_backward", _linear_act_backward, "CompositeExplicitAutograd")


@torch.library.register_fake("fusedlinear::linear_act", lib=_lib)
def _linear_act_fake(input, weight, bias, activation, negative_slope):
    _check_op(input, weight, bias, activation, negative_slope)
    shape = (input.shape[0], weight.shape[0])
    keep_z = _acts.ACTIVATIONS[activation].saves == "z"
    return input.new_empty(shape), input.new_empty(shape if keep_z else (0,))


@torch.library.register_fake("fusedlinear::linear_act_backward", lib=_lib)
def _linear_act_backward_fake(grad, saved, input, weight, activation, negative_slope, output_mask):
    _check_op_backward(grad, saved, input, weight, activation, negative_slope, output_mask)
    return (
        input.new_empty(input.shape if output_mask[0] else (0,)),
        input.new_empty(weight.shape if output_mask[1] else (0,)),
        input.new_empty((weight.shape[0],) if output_mask[2] else (0,)),
    )


def _direct(t: torch.Tensor) -> bool:
    """Whether a call may skip the ``torch.library`` op and call the backend itself: on real
    tensors in eager mode. The op's trip through the dispatcher costs 2-3 us per call (2-core
    EPYC), a tenth of a whole batch-1 layer. Under torch.compile or export, and with fake or
    functional tensors or any dispatch mode (make_fx, FlopCounterMode), calls go through the op,
    which is what those see and trace. (is_compiling first: Dynamo folds it to True.)"""
    return not torch.compiler.is_compiling() and type(t) is torch.Tensor and not torch._C._len_torch_dispatch_stack()


def _kept(activation: str, a, z):
    """What backward needs of a forward's (A, Z) for ``activation``: A, or Z (empty if neither)."""
    return a if _acts.ACTIVATIONS[activation].saves == "a" else z


_any_autocast = torch._C._is_any_autocast_enabled
_transforms_active = torch._C._are_functorch_transforms_active  # vmap, grad, jacrev, ...
_forward_ad = torch.autograd.forward_ad  # _current_level >= 0: inside a dual_level (forward-mode AD)
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_legacy_batched = torch._C._functorch.is_legacy_batchedtensor  # is_grads_batched, jacobian(vectorize=True)


def _needs_plain_ops(grad: torch.Tensor) -> bool:
    """Whether a backward must run as torch ops: with ``create_graph=True`` (grad mode is on in
    backward; the kernels' result would have no graph) or on batched gradients: functorch-wrapped
    tensors, which have no storage a kernel could read (and which Dynamo never traces; it does not
    know these C functions)."""
    return torch.is_grad_enabled() or (not torch.compiler.is_compiling() and (_legacy_batched(grad) or _wrapped(grad)))


_base_apply = torch.autograd.Function.apply.__func__


def _apply(cls, *args):
    """``cls.apply`` without the validation its override adds, for callers that validated.
    Under torch.compile, ``cls.apply``: Dynamo traces forward/backward and never runs an override."""
    if torch.compiler.is_compiling():
        return cls.apply(*args)
    return _base_apply(cls, *args)


class FusedLinearFunction(torch.autograd.Function):
    """A = g(X Wᵀ + b) for a 2-D X; returns (A, Z-or-empty). Use :func:`fused_linear`."""

    # Old-style forward(ctx, ...): the setup_context style costs an inspect.signature().bind() per
    # call inside Function.apply (~30 us, more than the whole eager Linear+ReLU at batch 1).
    @staticmethod
    def forward(ctx, input, weight, bias, activation, negative_slope):
        if _direct(input):
            a, z = backend.forward(input, weight, bias, activation, negative_slope)
        else:
            a, z = torch.ops.fusedlinear.linear_act(input, weight, bias, activation, negative_slope)
        ctx.save_for_backward(input, weight, bias, _kept(activation, a, z))  # bias: for create_graph
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        ctx.mark_non_differentiable(z)
        return a, z

    @staticmethod
    def backward(ctx, grad_a, grad_z):
        input, weight, bias, saved = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        if grad_a is None:
            return None, None, None, None, None
        if _needs_plain_ops(grad_a):
            if torch.is_grad_enabled():  # create_graph: g'(Z) from Z recomputed with a graph in X, W, b
                saved = _kept(ctx.activation, *_reference.forward(input, weight, bias, ctx.activation, ctx.negative_slope))
            op = _reference.backward
        else:
            op = backend.backward if _direct(grad_a) else torch.ops.fusedlinear.linear_act_backward
        dx, dw, db = op(grad_a, saved, input, weight, ctx.activation, ctx.negative_slope, mask)
        return (dx if mask[0] else None), (dw if mask[1] else None), (db if mask[2] else None), None, None

    @classmethod
    def apply(cls, input, weight, bias=None, activation="relu", negative_slope=0.01):
        """Validated like :func:`fused_linear` (``input`` must be 2-D, strided); under a functorch
        transform it runs as plain torch ops, under autocast in the autocast dtype."""
        if not (_valid(input, weight, bias, activation, negative_slope) and input.dim() == 2):
            input, weight, bias, plain = _prepare(input, weight, bias, activation, negative_slope, rows=True)
            if plain:
                return _reference.forward(input, weight, bias, activation, float(negative_slope))
        return _base_apply(cls, input, weight, bias, activation, float(negative_slope))


def _name(t) -> str:
    return f"{type(t).__name__}" if not isinstance(t, torch.Tensor) else f"Tensor{tuple(t.shape)} {t.dtype} on {t.device}"


_COMMON_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_STRIDED = torch.strided


def _valid(input, weight, bias, activation, negative_slope, features=None) -> bool:
    """The common valid call (strided CPU tensors of one float dtype, shapes that fit, a known
    activation, no autocast or functorch transform) in a few cheap tests, ~1 us less per layer
    than :func:`_prepare`; anything else goes there."""
    if not (isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor) and input.is_cpu and weight.is_cpu):
        return False
    dtype = input.dtype
    return (weight.dtype == dtype and dtype in _COMMON_FLOATS and weight.dim() == 2 and input.dim() > 0
            and input.layout is _STRIDED and weight.layout is _STRIDED and not (input.is_nested or weight.is_nested)
            and (input.shape[-1] if features is None else features) == weight.shape[1]
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.is_cpu and bias.dtype == dtype
                                  and bias.dim() == 1 and bias.layout is _STRIDED and bias.shape[0] == weight.shape[0]))
            and type(activation) is str and activation in _acts.ACTIVATIONS and type(negative_slope) is float
            and not (_any_autocast() or _transforms_active()) and _forward_ad._current_level < 0)


def _not_strided(t) -> bool:
    return t is not None and (t.layout is not _STRIDED or t.is_nested)


def _layout_fix(label: str, t) -> str:
    kind = "a nested tensor" if t.is_nested else f"layout {t.layout}"
    fix = f"{label}.to_padded_tensor(0.0)" if t.is_nested else f"{label}.to_dense()"
    return f"{label} is {kind}; the fused kernels take dense strided tensors: convert with {fix}"


def _autocast(input, weight, bias):
    """Under autocast for the input's device, the floating tensors cast to the autocast dtype,
    as autocast casts ``F.linear``'s (float64 excepted, as autocast does)."""
    if not (isinstance(input, torch.Tensor) and torch.is_autocast_enabled(input.device.type)):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(input.device.type)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
    return cast(input), cast(weight), cast(bias)


def _prepare(input, weight, bias, activation, negative_slope, features=None, where="", rows=False):
    """The slow path of an entry point: validate (:func:`_check`), apply autocast, and say whether
    the call must run as plain torch ops (a functorch transform, forward-mode AD, a non-strided layout; only the
    functional API takes those, ``rows`` entry points reject the layouts).
    Returns (input, weight, bias, plain)."""
    if _any_autocast():
        input, weight, bias = _autocast(input, weight, bias)
    _check(input, weight, bias, activation, negative_slope, features, where, rows)
    plain = _transforms_active() or _forward_ad._current_level >= 0 or any(map(_not_strided, (input, weight, bias)))
    return input, weight, bias, plain


def _check(input, weight, bias, activation, negative_slope, features=None, where="", rows=False) -> None:
    """Validation at the public entry point; the messages name the bad value and the fix.
    ``features``: the input's last dimension where it is not ``input``'s (a later layer of a chain),
    ``where``: which layer of a chain, for the messages; ``rows``: the tensors must be 2-D and
    strided (the Functions and ops; elsewhere plain torch ops run other layouts)."""
    for label, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fused_linear: {where}{label} must be a torch.Tensor, got {_name(t)}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"fused_linear: {where}bias must be a torch.Tensor or None, got {_name(bias)}")
    _acts.check_activation(activation)
    if isinstance(negative_slope, torch.Tensor):
        raise TypeError(
            f"fused_linear: {where}negative_slope must be a Python number, got a tensor ({_name(negative_slope)}); "
            f"pass float(negative_slope) (the slope is a constant: no gradient flows into it)"
        )
    if not isinstance(negative_slope, numbers.Real) or isinstance(negative_slope, bool):
        raise TypeError(f"fused_linear: {where}negative_slope must be a real number, got {negative_slope!r}")
    for label, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None and (not t.is_floating_point() or t.is_complex()):
            raise TypeError(
                f"fused_linear: {where}{label} has dtype {t.dtype}; a real floating dtype is needed "
                f"(convert with {label}.float() or {label}.double())"
            )
    for label, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != input.dtype:
            raise TypeError(
                f"fused_linear: {where}input is {input.dtype} but {label} is {t.dtype}; "
                f"cast one to match (e.g. input.to({label}.dtype) or model.to({input.dtype}))"
            )
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"fused_linear: {where}input is on {input.device} but {label} is on {t.device}; "
                f"move them to one device (e.g. input.to({label}.device))"
            )
    for label, t in (("input", input), ("weight", weight), ("bias", bias)):
        if _not_strided(t):
            if rows:
                raise ValueError(f"fused_linear: {where}{_layout_fix(label, t)} (or call fused_linear, "
                                 f"which runs other layouts as plain torch ops)")
            return  # plain torch ops run it and check its shapes, as for nn.Linear
    if weight.dim() != 2:
        raise ValueError(f"fused_linear: {where}weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if input.dim() == 0:
        raise ValueError("fused_linear: input must have at least 1 dimension (*, in_features), got a 0-d tensor")
    if rows and input.dim() != 2:
        raise ValueError(
            f"fused_linear: {where}input must be 2-D (rows, in_features) here, got shape {tuple(input.shape)}; "
            f"call fused_linear / fused_chain, which take any leading dimensions"
        )
    if features is not None and features != weight.shape[1]:
        raise ValueError(
            f"fused_linear: {where}its input has {features} features (the layer before has out_features="
            f"{features}) but weight {tuple(weight.shape)} expects in_features={weight.shape[1]}; "
            f"build the layer with in_features={features}"
        )
    if features is None and input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"fused_linear: {where}input's last dimension is {input.shape[-1]} (input shape {tuple(input.shape)}) but "
            f"weight {tuple(weight.shape)} expects in_features={weight.shape[1]}; reshape the input or "
            f"build the layer with in_features={input.shape[-1]}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"fused_linear: {where}bias must have shape ({weight.shape[0]},) = (out_features,), got {tuple(bias.shape)}"
        )


def _check_op(input, weight, bias, activation, negative_slope) -> None:
    """``fusedlinear::linear_act``'s validation (eager and fake): 2-D strided input."""
    if not (_valid(input, weight, bias, activation, negative_slope) and input.dim() == 2):
        _check(input, weight, bias, activation, negative_slope, rows=True)


def _check_op_backward(grad, saved, input, weight, activation, negative_slope, output_mask) -> None:
    """``fusedlinear::linear_act_backward``'s validation (eager and fake): the forward's checks on
    (input, weight), then ``grad`` (and ``saved`` where the activation keeps one) of shape (M, N)."""
    _check_op(input, weight, None, activation, negative_slope)
    shape = (input.shape[0], weight.shape[0])
    keeps = _acts.ACTIVATIONS[activation].saves != "none"
    for label, t in (("grad", grad), ("saved", saved)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fused_linear backward: {label} must be a torch.Tensor, got {_name(t)}")
        if t.dtype != input.dtype or t.device != input.device or _not_strided(t):
            raise TypeError(
                f"fused_linear backward: {label} is {_name(t)} (layout {t.layout}) but input is {input.dtype} on "
                f"{input.device}; pass a dense tensor of the input's dtype and device (e.g. {label}.to(input))"
            )
        if (label == "grad" or keeps) and tuple(t.shape) != shape:
            what = "the forward's output" if label == "grad" else f"the forward's {_acts.ACTIVATIONS[activation].saves.upper()}"
            raise ValueError(
                f"fused_linear backward: {label} has shape {tuple(t.shape)}, expected {shape} = (rows, out_features), "
                f"the shape of {what}"
            )
    if len(output_mask) != 3:
        raise ValueError(f"fused_linear backward: output_mask must have 3 entries (dX, dW, db), got {list(output_mask)}")


def fused_linear(input, weight, bias=None, activation="relu", negative_slope=0.01):
    r"""Applies ``activation(input @ weight.T + bias)`` in one fused kernel (forward and backward).

    Same arguments, in the same order, as :func:`torch.nn.functional.linear`, plus the activation.

    Args:
        input: ``(*, in_features)``, any number of leading dimensions (none included).
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or ``None``.
        activation: one of ``identity, relu, sigmoid, tanh, gelu, gelu_tanh, silu, leaky_relu``.
        negative_slope: the slope of ``leaky_relu`` for negative inputs (ignored otherwise); a
            Python number (a tensor is refused: no gradient would flow into it).

    Returns:
        ``(*, out_features)``, equal to ``act(F.linear(input, weight, bias))``, with gradients
        equal to autograd's for every input that requires them (second derivatives included).
        Under autocast it computes in the autocast dtype, as ``F.linear`` does; under
        ``torch.func`` transforms and for sparse, mkldnn or nested tensors it runs as those plain
        torch ops.
    """
    if not _valid(input, weight, bias, activation, negative_slope):
        input, weight, bias, plain = _prepare(input, weight, bias, activation, negative_slope)
        if plain:
            return _plain_layers(input, [(weight, bias, activation, float(negative_slope))])
    return _on_rows(input, lambda x: _apply(FusedLinearFunction, x, weight, bias, activation, float(negative_slope))[0])


def _plain_layers(input, layers):
    """The layers as plain torch ops (``act(F.linear(h, W, b))``), so a functorch transform, a
    sparse, mkldnn or nested tensor gets what ``nn.Linear`` + activation gives; where torch itself
    cannot run a layout, its error names the layout and the fix."""
    for weight, bias, activation, slope in layers:
        try:
            input = _reference.layer(input, weight, bias, activation, slope)
        except (RuntimeError, NotImplementedError) as exc:
            fixes = [_layout_fix(label, t) for label, t in (("input", input), ("weight", weight), ("bias", bias))
                     if _not_strided(t)]
            if not fixes:
                raise
            # In the message itself (str(exc), one-line logs), not only a note a traceback shows.
            raise type(exc)(f"fusedlinear: {'; '.join(fixes)} (plain torch ops ran this layer and "
                            f"PyTorch refused: {exc})") from exc
    return input


def _on_rows(input, fn):
    """``fn`` on ``input`` flattened to rows ``(M, in_features)``, its output given back the leading
    dimensions; a 2-D input (the common case) goes straight through, with no reshapes (a few us
    per call at small batches)."""
    if input.dim() == 2:
        return fn(input)
    lead = input.shape[:-1]
    out = fn(input.reshape(lead.numel(), input.shape[-1]))
    return out.reshape(*lead, out.shape[-1])


def _chain_op(input, params, name, library_op, grad=None):
    """The function a chain calls for every layer: the backend's (chosen once for the chain when
    the calls may skip the op and no dimension is zero), else the ``torch.library`` op."""
    if not _direct(input if grad is None else grad):
        return library_op
    if input.numel() and min(map(torch.Tensor.numel, params)):  # no zero-sized layer (map: no Python frames)
        return getattr(backend.for_call(input, params[0]), name)
    return getattr(backend, name)


def _layers(spec, params):
    """(weight, bias or None, activation, slope) per layer, from a chain's ``spec`` and ``params``."""
    layers, i = [], 0
    for activation, slope, has_bias in spec:
        layers.append((params[i], params[i + 1] if has_bias else None, activation, slope))
        i += 1 + has_bias
    return layers


class FusedChainFunction(torch.autograd.Function):
    """Fused layers applied one after another, as one autograd node::

        h_0 = input,   h_{i+1} = g_i(h_i W_iᵀ + b_i),   output = h_L

    Forward and backward are the same kernel calls as :class:`FusedLinearFunction`, layer by
    layer (backward from the last layer to the first, each layer's dX the dA of the one before);
    one node instead of L saves the per-layer autograd and Python overhead, which at small
    batches is most of a layer's time. ``spec`` holds (activation, slope, has bias) per layer;
    ``params`` the weights and biases, in order. Use :func:`fused_chain`."""

    @staticmethod
    def forward(ctx, input, spec, *params):
        h, keep = input, []
        op = _chain_op(input, params, "forward", torch.ops.fusedlinear.linear_act)
        for weight, bias, activation, slope in _layers(spec, params):
            a, z = op(h, weight, bias, activation, slope)
            keep += [h, _kept(activation, a, z)]
            h = a
        ctx.save_for_backward(*keep, *params)  # biases: for create_graph
        ctx.spec = spec
        return h

    @staticmethod
    def backward(ctx, grad):
        spec, needs = ctx.spec, ctx.needs_input_grad
        saved = ctx.saved_tensors
        params = saved[2 * len(spec):]
        if _needs_plain_ops(grad):
            op = _reference.backward
            if torch.is_grad_enabled():  # create_graph: every h_i and g'(Z_i) recomputed with a graph
                saved, h = [], saved[0]
                for weight, bias, activation, slope in _layers(spec, params):
                    a, z = _reference.forward(h, weight, bias, activation, slope)
                    saved += [h, _kept(activation, a, z)]
                    h = a
        else:
            op = _chain_op(saved[0], params, "backward", torch.ops.fusedlinear.linear_act_backward, grad)
        grads = [None] * len(params)  # one per parameter (weights and biases, in order)
        i = len(grads)
        for layer in range(len(spec) - 1, -1, -1):
            activation, slope, has_bias = spec[layer]
            i -= 1 + has_bias
            earlier = needs[0] or any(needs[2:2 + i])  # does anything before this layer need a gradient?
            mask = [earlier, needs[2 + i], has_bias and needs[3 + i]]
            dx, dw, db = op(grad, saved[2 * layer + 1], saved[2 * layer], params[i], activation, slope, mask)
            grads[i] = dw if mask[1] else None
            if has_bias:
                grads[i + 1] = db if mask[2] else None
            if not earlier:
                break
            grad = dx
        return (grad if needs[0] else None), None, *grads

    @classmethod
    def apply(cls, input, spec, *params):
        """Validated like :func:`fused_chain` (``input`` must be 2-D, strided; ``spec`` a sequence of
        (activation, slope, has_bias)); an empty ``spec`` returns ``input``."""
        spec = tuple(spec)
        if not all(isinstance(s, tuple) and len(s) == 3 for s in spec) or len(params) != sum(1 + bool(s[2]) for s in spec):
            raise ValueError(
                f"FusedChainFunction.apply: spec must hold (activation, negative_slope, has_bias) per layer and "
                f"params one weight per layer plus one bias per layer with has_bias; got {len(spec)} layers, "
                f"{len(params)} params; use fused_chain(input, [(weight, bias, activation, slope), ...])"
            )
        return _chain(input, _layers(spec, params), rows=True)


def fused_chain(input, layers):
    r"""Applies fused layers one after another, ``h = act_i(h @ W_i.T + b_i)``, as one autograd node.

    ``layers``: a sequence of ``(weight, bias or None, activation, negative_slope)``. Equal to
    calling :func:`fused_linear` layer by layer, values and gradients alike; faster at small
    batches, where each autograd node's own overhead is a large part of a layer's time.
    An empty sequence returns ``input``, as an empty ``nn.Sequential`` does.
    :class:`FusedSequential` calls this for its runs of linear layers.
    """
    return _chain(input, layers)


def _bad_layer(n, layer) -> TypeError:
    given = (f"a tensor of shape {tuple(layer.shape)} (a bare tuple? wrap one layer in a list: [(w, b, 'relu', 0.0)])"
             if isinstance(layer, torch.Tensor) else
             f"a {type(layer).__name__} of {len(layer)} items" if hasattr(layer, "__len__") else _name(layer))
    return TypeError(f"fused_chain: layer {n} is {given}; layers must be "
                     f"[(weight, bias or None, activation, negative_slope), ...]")


def _chain(input, layers, rows=False):
    """fused_chain and FusedChainFunction.apply: validate each layer, then one FusedChainFunction
    node (or plain torch ops layer by layer, where :func:`_prepare` says so)."""
    spec, params, features, plain = [], [], None, False
    for n, layer in enumerate(layers):
        try:
            weight, bias, activation, slope = layer
        except (TypeError, ValueError):  # only a malformed layer pays for the message
            raise _bad_layer(n, layer) from None
        if rows or not _valid(input, weight, bias, activation, slope, features):
            # Autocast casts each layer's tensors; the input, cast once, is checked with layer 0.
            x, weight, bias, special = _prepare(input, weight, bias, activation, slope, features,
                                                f"layer {n}: " if n else "", rows)
            input, plain = (x if n == 0 else input), plain or special
        features = weight.shape[0]  # the next layer's input has out_features columns
        spec.append((activation, float(slope), bias is not None))
        params += [weight] if bias is None else [weight, bias]
    if not spec:
        return input
    if plain:
        return _plain_layers(input, _layers(spec, params))
    spec = tuple(spec)
    run = _base_apply if rows else _apply  # rows: called from the apply override itself
    return _on_rows(input, lambda x: run(FusedChainFunction, x, spec, *params))
