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
"""

from __future__ import annotations

import numbers

import torch

from .. import backend
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
    return backend.forward(input, weight, bias, activation, negative_slope)


def _linear_act_backward(grad, saved, input, weight, activation, negative_slope, output_mask):
    return backend.backward(grad, saved, input, weight, activation, negative_slope, output_mask)


_lib.impl("linear_act", _linear_act, "CompositeExplicitAutograd")
_lib.impl("linear_act_backward", _linear_act_backward, "CompositeExplicitAutograd")


@torch.library.register_fake("fusedlinear::linear_act", lib=_lib)
def _linear_act_fake(input, weight, bias, activation, negative_slope):
    shape = (input.shape[0], weight.shape[0])
    keep_z = _acts.ACTIVATIONS[activation].saves == "z"
    return input.new_empty(shape), input.new_empty(shape if keep_z else (0,))


@torch.library.register_fake("fusedlinear::linear_act_backward", lib=_lib)
def _linear_act_backward_fake(grad, saved, input, weight, activation, negative_slope, output_mask):
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


def _refuse_double_backward() -> None:
    """The backward kernels are not differentiable: refuse create_graph=True instead of returning
    gradients without a graph."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fusedlinear: double backward (create_graph=True) is not supported by fused layers; "
            "use plain nn.Linear + activation for higher-order gradients (fusedlinear.unfuse(model))"
        )


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
        ctx.save_for_backward(input, weight, _kept(activation, a, z))
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        ctx.mark_non_differentiable(z)
        return a, z

    @staticmethod
    def backward(ctx, grad_a, grad_z):
        _refuse_double_backward()
        input, weight, saved = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        if grad_a is None:
            return None, None, None, None, None
        op = backend.backward if _direct(grad_a) else torch.ops.fusedlinear.linear_act_backward
        dx, dw, db = op(grad_a, saved, input, weight, ctx.activation, ctx.negative_slope, mask)
        return (dx if mask[0] else None), (dw if mask[1] else None), (db if mask[2] else None), None, None


def _name(t) -> str:
    return f"{type(t).__name__}" if not isinstance(t, torch.Tensor) else f"Tensor{tuple(t.shape)} {t.dtype} on {t.device}"


_COMMON_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _valid(input, weight, bias, activation, negative_slope, features=None) -> bool:
    """The common valid call (CPU tensors of one float dtype, shapes that fit, a known activation)
    in a few cheap tests, ~1 us less per layer than :func:`_check`; anything else goes there."""
    if not (isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor) and input.is_cpu and weight.is_cpu):
        return False
    dtype = input.dtype
    return (weight.dtype == dtype and dtype in _COMMON_FLOATS and weight.dim() == 2 and input.dim() > 0
            and (input.shape[-1] if features is None else features) == weight.shape[1]
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.is_cpu and bias.dtype == dtype
                                  and bias.dim() == 1 and bias.shape[0] == weight.shape[0]))
            and type(activation) is str and activation in _acts.ACTIVATIONS and type(negative_slope) is float)


def _check(input, weight, bias, activation, negative_slope, features=None, where="") -> None:
    """Validation at the public entry point; the messages name the bad value and the fix.
    ``features``: the input's last dimension where it is not ``input``'s (a later layer of a chain),
    ``where``: which layer of a chain, for the messages."""
    for label, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fused_linear: {where}{label} must be a torch.Tensor, got {_name(t)}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"fused_linear: {where}bias must be a torch.Tensor or None, got {_name(bias)}")
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
    if weight.dim() != 2:
        raise ValueError(f"fused_linear: {where}weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if input.dim() == 0:
        raise ValueError("fused_linear: input must have at least 1 dimension (*, in_features), got a 0-d tensor")
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
    _acts.check_activation(activation)
    if not isinstance(negative_slope, numbers.Real) or isinstance(negative_slope, bool):
        raise TypeError(f"fused_linear: {where}negative_slope must be a real number, got {negative_slope!r}")


def fused_linear(input, weight, bias=None, activation="relu", negative_slope=0.01):
    r"""Applies ``activation(input @ weight.T + bias)`` in one fused kernel (forward and backward).

    Same arguments, in the same order, as :func:`torch.nn.functional.linear`, plus the activation.

    Args:
        input: ``(*, in_features)``, any number of leading dimensions (none included).
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or ``None``.
        activation: one of ``identity, relu, sigmoid, tanh, gelu, gelu_tanh, silu, leaky_relu``.
        negative_slope: the slope of ``leaky_relu`` for negative inputs (ignored otherwise).

    Returns:
        ``(*, out_features)``, equal to ``act(F.linear(input, weight, bias))``, with gradients
        equal to autograd's for every input that requires them.
    """
    if not _valid(input, weight, bias, activation, negative_slope):
        _check(input, weight, bias, activation, negative_slope)
    return _on_rows(input, lambda x: FusedLinearFunction.apply(x, weight, bias, activation, float(negative_slope))[0])


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
        h, keep, i = input, [], 0
        op = _chain_op(input, params, "forward", torch.ops.fusedlinear.linear_act)
        weights = []
        for activation, slope, has_bias in spec:
            weight, bias = params[i], (params[i + 1] if has_bias else None)
            i += 1 + has_bias
            a, z = op(h, weight, bias, activation, slope)
            keep += [h, _kept(activation, a, z)]
            weights.append(weight)
            h = a
        ctx.save_for_backward(*keep, *weights)  # backward needs no bias
        ctx.spec = spec
        return h

    @staticmethod
    def backward(ctx, grad):
        _refuse_double_backward()
        spec, needs = ctx.spec, ctx.needs_input_grad
        saved = ctx.saved_tensors
        weights = saved[2 * len(spec):]
        op = _chain_op(saved[0], weights, "backward", torch.ops.fusedlinear.linear_act_backward, grad)
        grads = [None] * (len(needs) - 2)  # one per parameter (weights and biases, in order)
        i = len(grads)
        for layer in range(len(spec) - 1, -1, -1):
            activation, slope, has_bias = spec[layer]
            i -= 1 + has_bias
            earlier = needs[0] or any(needs[2:2 + i])  # does anything before this layer need a gradient?
            mask = [earlier, needs[2 + i], has_bias and needs[3 + i]]
            dx, dw, db = op(grad, saved[2 * layer + 1], saved[2 * layer], weights[layer], activation, slope, mask)
            grads[i] = dw if mask[1] else None
            if has_bias:
                grads[i + 1] = db if mask[2] else None
            if not earlier:
                break
            grad = dx
        return (grad if needs[0] else None), None, *grads


def fused_chain(input, layers):
    r"""Applies fused layers one after another, ``h = act_i(h @ W_i.T + b_i)``, as one autograd node.

    ``layers``: a sequence of ``(weight, bias or None, activation, negative_slope)``. Equal to
    calling :func:`fused_linear` layer by layer, values and gradients alike; faster at small
    batches, where each autograd node's own overhead is a large part of a layer's time.
    :class:`FusedSequential` calls this for its runs of linear layers.
    """
    spec, params, features = [], [], None
    for n, (weight, bias, activation, slope) in enumerate(layers):
        if not _valid(input, weight, bias, activation, slope, features):
            _check(input, weight, bias, activation, slope, features, f"layer {n}: " if n else "")
        features = weight.shape[0]  # the next layer's input has out_features columns
        spec.append((activation, float(slope), bias is not None))
        params += [weight] if bias is None else [weight, bias]
    spec = tuple(spec)
    return _on_rows(input, lambda x: FusedChainFunction.apply(x, spec, *params))
