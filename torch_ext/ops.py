"""The autograd layer: ``fused_linear``, ``fused_chain`` and the ``torch.library`` ops they call.

Two ops in namespace ``fusedlinear`` are the one door to the kernels, for eager and compiled
code alike::

    fusedlinear::linear_act(input (M,K), weight (N,K), bias (N,)?, activation, negative_slope)
        -> (A (M,N), Z (M,N) or (0,))
    fusedlinear::linear_act_backward(grad (M,N), saved, input, weight, activation,
        negative_slope, output_mask[3]) -> (dX (M,K), dW (N,K), db (N,)) (empty where masked)

Defined with ``torch.library.Library`` (``define``/``impl``: lighter per call than
``custom_op``'s wrapper), each registered per dispatch key:

    key                          implementation
    CPU, CUDA                    the kernels :func:`fusedlinear.backend.route` picks (Numba, CuPy)
    CompositeExplicitAutograd    plain torch ops (``backend.reference``): every other device
    Meta / fake (register_fake)  shapes only, for torch.compile and torch.export
    vmap (register_vmap)         plain torch ops with the batch as a leading dimension
    Autograd (register_autograd) ``linear_act``: :func:`_setup_context` + :func:`_backward`

Eager calls reach the op through :class:`FusedLinearFunction` (and runs of layers through one
:class:`FusedChainFunction` node): the same ``_setup_context``/``_backward`` plus a ``jvp``
(forward-mode AD) and ``generate_vmap_rule``, which ``torch.func`` needs and
``register_autograd``'s generated Function does not have (torch 2.13/2.14: ``torch.func.grad``
refuses it, ``jacfwd`` gets zero tangents). Under ``torch.compile`` the entry points call the op
itself (Dynamo does not trace a custom ``jvp``); both routes run the op, so the same kernels.

Backward, first order: ``linear_act_backward`` (the kernels). With ``create_graph=True``: the
activation table's formulas as differentiable torch ops on Z recomputed from X, W, b, so second
derivatives are autograd's. Autocast: ``fused_linear``/``fused_chain`` cast to the autocast dtype
first, as ``F.linear`` is cast. Which implementation runs a call is decided in one place,
:func:`fusedlinear.backend.route`.

Every entry point (``fused_linear``, ``fused_chain``, both Functions' ``apply``, both ops and
their fake implementations) validates its arguments: :func:`_valid` passes the common call in a
few cheap tests, :func:`_check` names the bad value and the fix. One exception: the ops' schema
says ``float negative_slope``, and the dispatcher converts a 0-d tensor to that float before any
implementation runs (as for every ATen op with a float argument), so ``torch.ops.fusedlinear.linear_act``
cannot see a tensor slope to refuse it as ``fused_linear`` does; it computes with its value (no
gradient flows into it). Meta tensors run as plain torch ops (shapes only, as ``F.linear`` gives).
"""

from __future__ import annotations

import inspect
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
# The two ops, looked up once (torch.ops.<namespace>.<name> is two attribute lookups in Python per call).
_LINEAR_ACT = torch.ops.fusedlinear.linear_act
_LINEAR_ACT_BACKWARD = torch.ops.fusedlinear.linear_act_backward


# ---------------------------------------------------------------- implementations per dispatch key


def _linear_act(input, weight, bias, activation, negative_slope):
    """CPU and CUDA: the backend :func:`fusedlinear.backend.route` picks."""
    _check_op(input, weight, bias, activation, negative_slope)
    return backend.route(input, weight, bias).forward(input, weight, bias, activation, negative_slope)


def _linear_act_backward(grad, saved, input, weight, activation, negative_slope, output_mask):
    _check_op_backward(grad, saved, input, weight, activation, negative_slope, output_mask)
    return backend.route(input, weight).backward(grad, saved, input, weight, activation, negative_slope, output_mask)


def _linear_act_plain(input, weight, bias, activation, negative_slope):
    """Every other dispatch key (another device): plain torch ops."""
    _check_op(input, weight, bias, activation, negative_slope)
    return _reference.forward(input, weight, bias, activation, negative_slope)


def _linear_act_backward_plain(grad, saved, input, weight, activation, negative_slope, output_mask):
    _check_op_backward(grad, saved, input, weight, activation, negative_slope, output_mask)
    return _reference.backward(grad, saved, input, weight, activation, negative_slope, output_mask)


def _refuse_nested(op, tensors):
    """NestedTensorCPU/CUDA keys: no kernel takes nested tensors; the message names the tensor and
    the fix (the dispatcher's own error says only that the op has no such backend)."""
    label, t = next(((label, t) for label, t in tensors.items() if _not_strided(t)), ("input", tensors["input"]))
    raise ValueError(f"fusedlinear::{op}: {_layout_fix(label, t)} (or call fused_linear, which runs nested "
                     f"tensors as plain torch ops)")


for _key in ("NestedTensorCPU", "NestedTensorCUDA", "AutogradNestedTensor"):
    _lib.impl("linear_act", lambda input, weight, bias, *_: _refuse_nested(
        "linear_act", {"input": input, "weight": weight, "bias": bias}), _key)
    _lib.impl("linear_act_backward", lambda grad, saved, input, weight, *_: _refuse_nested(
        "linear_act_backward", {"grad": grad, "saved": saved, "input": input, "weight": weight}), _key)

for _key, _forward, _backward_impl in (("CPU", _linear_act, _linear_act_backward),
                                       ("CUDA", _linear_act, _linear_act_backward),
                                       ("CompositeExplicitAutograd", _linear_act_plain, _linear_act_backward_plain)):
    _lib.impl("linear_act", _forward, _key)
    _lib.impl("linear_act_backward", _backward_impl, _key)
del _key, _forward, _backward_impl


@torch.library.register_fake("fusedlinear::linear_act", lib=_lib)
def _linear_act_fake(input, weight, bias, activation, negative_slope):
    _check_op(input, weight, bias, activation, negative_slope)
    shape = (input.shape[0], weight.shape[0])
    keep_z = _acts.ACTIVATIONS[activation].keeps_z
    return input.new_empty(shape), input.new_empty(shape if keep_z else (0,))


@torch.library.register_fake("fusedlinear::linear_act_backward", lib=_lib)
def _linear_act_backward_fake(grad, saved, input, weight, activation, negative_slope, output_mask):
    _check_op_backward(grad, saved, input, weight, activation, negative_slope, output_mask)
    return (
        input.new_empty(input.shape if output_mask[0] else (0,)),
        input.new_empty(weight.shape if output_mask[1] else (0,)),
        input.new_empty((weight.shape[0],) if output_mask[2] else (0,)),
    )


def _front(t, dim):
    """``t`` with its vmap batch dimension ``dim`` moved to the front (None: not batched)."""
    return t if dim is None or t is None else t.movedim(dim, 0)


def _out_dims(outputs, ranks):
    """vmap out_dims: 0 for an output with a batch dimension (one more than its rank), else None."""
    return tuple(0 if t.dim() == rank + 1 else None for t, rank in zip(outputs, ranks))


@torch.library.register_vmap("fusedlinear::linear_act", lib=_lib)
def _linear_act_vmap(info, in_dims, input, weight, bias, activation, negative_slope):
    """Z = X Wᵀ + b with the batch as a leading dimension of any of X, W, b (matmul broadcasts)."""
    x, w = _front(input, in_dims[0]), _front(weight, in_dims[1])
    z = torch.matmul(x, w.transpose(-1, -2))
    if bias is not None:
        z = z + (_front(bias, in_dims[2]).unsqueeze(-2) if in_dims[2] is not None else bias)
    a = _reference.FORWARD[activation](z, negative_slope)
    out = (a, z if _acts.ACTIVATIONS[activation].keeps_z else a.new_empty(0))
    return out, _out_dims(out, (2, 2))


@torch.library.register_vmap("fusedlinear::linear_act_backward", lib=_lib)
def _linear_act_backward_vmap(info, in_dims, grad, saved, input, weight, activation, negative_slope, output_mask):
    """dZ = dA ⊙ g'(saved), dX = dZ W, dW = dZᵀ X, db = Σ_rows dZ, batched as leading dimensions."""
    g, s, x, w = (_front(t, d) for t, d in zip((grad, saved, input, weight), in_dims))
    dz = _reference.grad_z(g, s, activation, negative_slope)
    empty = dz.new_empty(0)
    out = (torch.matmul(dz, w) if output_mask[0] else empty,
           torch.matmul(dz.transpose(-1, -2), x) if output_mask[1] else empty,
           dz.sum(-2) if output_mask[2] else empty)
    return out, _out_dims(out, (2, 2, 1))


# ---------------------------------------------------------------- autograd


def _kept(activation: str, a, z):
    """What backward needs of a forward's (A, Z) for ``activation``: A, or Z (empty if neither)."""
    return a if _acts.ACTIVATIONS[activation].saves == "a" else z


def _setup_context(ctx, inputs, output):
    input, weight, bias, activation, negative_slope = inputs
    a, z = output
    ctx.save_for_backward(input, weight, bias, _kept(activation, a, z))  # bias: for create_graph
    ctx.activation = activation
    ctx.negative_slope = negative_slope
    ctx.mark_non_differentiable(z)


def _backward(ctx, grad_a, grad_z):
    """dX, dW, db as autograd needs them (``ctx.needs_input_grad``): the backward op, or with
    ``create_graph=True`` (grad mode on) the same formulas as differentiable torch ops."""
    input, weight, bias, saved = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    if grad_a is None:
        return None, None, None, None, None
    if torch.is_grad_enabled():  # g'(Z) from Z recomputed with a graph in X, W, b
        plain = backend.route(input, weight, graph=True)
        saved = _kept(ctx.activation, *plain.forward(input, weight, bias, ctx.activation, ctx.negative_slope))
        dx, dw, db = plain.backward(grad_a, saved, input, weight, ctx.activation, ctx.negative_slope, mask)
    else:
        dx, dw, db = _LINEAR_ACT_BACKWARD(
            grad_a, saved, input, weight, ctx.activation, ctx.negative_slope, mask)
    return (dx if mask[0] else None), (dw if mask[1] else None), (db if mask[2] else None), None, None


torch.library.register_autograd("fusedlinear::linear_act", _backward, setup_context=_setup_context, lib=_lib)


def _tangent_z(input, weight, t_input, t_weight, t_bias):
    """Forward-mode AD of Z = X Wᵀ + b: Ż = Ẋ Wᵀ + X Ẇᵀ + ḃ (None if no input has a tangent)."""
    parts = [t_input @ weight.T if t_input is not None else None,
             input @ t_weight.T if t_weight is not None else None, t_bias]
    parts = [p for p in parts if p is not None]
    return sum(parts[1:], parts[0]) if parts else None


def _tangent_a(t_z, saved, activation, slope):
    """Ȧ = Ż ⊙ g'(Z): the activation table's backward formula with Ż for dA."""
    return None if t_z is None else _reference.grad_z(t_z, saved, activation, slope)


class FusedLinearFunction(torch.autograd.Function):
    """A = g(X Wᵀ + b) for a 2-D X; returns (A, Z-or-empty). Use :func:`fused_linear`.

    Calls ``fusedlinear::linear_act``; its backward, the op's registered one; plus forward-mode
    AD (``jvp``) and vmap (generated from the op's vmap rule), so ``torch.func`` takes it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias=None, activation="relu", negative_slope=0.01):
        if type(negative_slope) is not float:  # the op's schema would refuse it naming no fix
            _check_op(input, weight, bias, activation, negative_slope)
        return torch.ops.fusedlinear.linear_act(input, weight, bias, activation, negative_slope)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0], inputs[1], _kept(inputs[3], *output))

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, t_input, t_weight, t_bias, _activation, _slope):
        input, weight, saved = ctx.saved_tensors
        return _tangent_a(_tangent_z(input, weight, t_input, t_weight, t_bias), saved, ctx.activation,
                          ctx.negative_slope), None


# Function.apply binds its arguments to forward's signature on every call (setup_context style);
# inspect.signature() takes a function's __signature__ as it is: 25 -> 16 us per apply of a
# trivial Function (torch 2.13, 2-core Xeon, loaded box: best of 5 x 5000 calls).
FusedLinearFunction.forward.__signature__ = inspect.signature(FusedLinearFunction.forward)


def _node_forward(input, weight, bias, activation, negative_slope):
    return _LINEAR_ACT(input, weight, bias, activation, negative_slope)


# fused_linear's node: FusedLinearFunction (grad_fn FusedLinearFunctionBackward) called with its
# five arguments always by position, so that apply's binding fills one *args parameter instead of
# five with defaults: 5.1 -> 2.3 us of inspect per call (torch 2.13, 2-core Xeon).
_node_forward.__signature__ = inspect.Signature([inspect.Parameter("inputs", inspect.Parameter.VAR_POSITIONAL)])
_LinearNode = type("FusedLinearFunction", (FusedLinearFunction,), {
    "forward": staticmethod(_node_forward), "__module__": __name__, "__qualname__": "FusedLinearFunction"})


# ---------------------------------------------------------------- validation


def _name(t) -> str:
    return f"{type(t).__name__}" if not isinstance(t, torch.Tensor) else f"Tensor{tuple(t.shape)} {t.dtype} on {t.device}"


_COMMON_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_STRIDED = torch.strided


def _valid(input, weight, bias, activation, negative_slope, features=None) -> bool:
    """The common valid call (strided CPU or CUDA tensors on one device, of one float dtype, shapes
    that fit, a known activation) in a few cheap tests, ~1 us less per layer than :func:`_check`;
    anything else goes there (at the entry points, through :func:`_prepare`)."""
    if not (isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor) and (input.is_cpu or input.is_cuda)):
        return False
    dtype, device = input.dtype, input.device
    return (weight.dtype == dtype and dtype in _COMMON_FLOATS and weight.device == device and weight.dim() == 2
            and input.dim() > 0 and input.layout is _STRIDED and weight.layout is _STRIDED
            and not (input.is_nested or weight.is_nested)
            and (input.shape[-1] if features is None else features) == weight.shape[1]
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype == dtype and bias.device == device
                                  and bias.dim() == 1 and bias.layout is _STRIDED and bias.shape[0] == weight.shape[0]))
            and type(activation) is str and activation in _acts.ACTIVATIONS and type(negative_slope) is float)


def _autocasting(input) -> bool:
    """Whether autocast is on for ``input``'s device (a CPU or CUDA tensor, as :func:`_valid` passes)."""
    return torch.is_autocast_enabled("cuda" if input.is_cuda else "cpu")


def _not_strided(t) -> bool:
    return t is not None and (t.layout is not _STRIDED or t.is_nested)


def _layout_fix(label: str, t) -> str:
    kind = "a nested tensor" if t.is_nested else f"layout {t.layout}"
    fix = f"{label}.to_padded_tensor(0.0)" if t.is_nested else f"{label}.to_dense()"
    return f"{label} is {kind}; the fused kernels take dense strided tensors: convert with {fix}"


def _autocast(input, weight, bias):
    """The floating tensors cast to the autocast dtype of the input's device, as autocast casts
    ``F.linear``'s (float64 excepted, as autocast does). The casts are torch ops before the fused
    node, so autograd records them as it does for ``F.linear``."""
    dtype = torch.get_autocast_dtype(input.device.type)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
    return cast(input), cast(weight), cast(bias)


def _prepare(input, weight, bias, activation, negative_slope, features=None, where=""):
    """The slow path of ``fused_linear``/``fused_chain``: apply autocast, validate (:func:`_check`),
    and ask :func:`fusedlinear.backend.route` whether the call runs as plain torch ops (a layout no
    kernel takes: sparse, mkldnn, nested) or goes to the fused op.
    Returns (input, weight, bias, plain)."""
    device = input.device.type if isinstance(input, torch.Tensor) else None
    # is_autocast_enabled raises for a device type autocast does not know (meta)
    if device is not None and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        input, weight, bias = _autocast(input, weight, bias)
    _check(input, weight, bias, activation, negative_slope, features, where)
    # meta tensors (init_empty_weights, torch.device("meta")): shapes only, as F.linear + activation give them
    plain = device == "meta" or backend.route(input, weight, bias, front=True) is _reference
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
        if t is not None and t.dtype not in _COMMON_FLOATS:  # float8 & co: no kernel, and no torch activation either
            raise TypeError(
                f"fused_linear: {where}{label} has dtype {t.dtype}; fused layers compute in float32, float64, "
                f"float16 or bfloat16: convert with {label}.float() (or {label}.to(torch.bfloat16)) and back after"
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


def _valid_backward(grad, saved, input, weight, activation, negative_slope, output_mask) -> bool:
    """The common valid backward call, as :func:`_valid` for the forward; else :func:`_check_op_backward`
    names what is wrong."""
    if not (_valid(input, weight, None, activation, negative_slope) and input.dim() == 2
            and isinstance(grad, torch.Tensor) and isinstance(saved, torch.Tensor)):
        return False
    dtype, device, shape = input.dtype, input.device, (input.shape[0], weight.shape[0])
    return (grad.dtype == dtype and saved.dtype == dtype and grad.device == device and saved.device == device
            and grad.layout is _STRIDED and saved.layout is _STRIDED and not (grad.is_nested or saved.is_nested)
            and grad.shape == shape and (saved.shape == shape or _acts.ACTIVATIONS[activation].saves == "none")
            and len(output_mask) == 3)


def _check_op_backward(grad, saved, input, weight, activation, negative_slope, output_mask) -> None:
    """``fusedlinear::linear_act_backward``'s validation (eager and fake): the forward's checks on
    (input, weight), then ``grad`` (and ``saved`` where the activation keeps one) of shape (M, N)."""
    if _valid_backward(grad, saved, input, weight, activation, negative_slope, output_mask):
        return
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
        Under autocast it computes in the autocast dtype, as ``F.linear`` does; ``torch.func``
        transforms and forward-mode AD go through the op's registered rules; sparse, mkldnn or
        nested tensors run as plain torch ops.
    """
    if not (_valid(input, weight, bias, activation, negative_slope) and not _autocasting(input)):
        input, weight, bias, plain = _prepare(input, weight, bias, activation, negative_slope)
        if plain:
            return _plain_layers(input, [(weight, bias, activation, float(negative_slope))])
    negative_slope = float(negative_slope)
    # Compiled: the op itself (Dynamo does not trace a custom jvp). Inference mode: the op itself too
    # (no autograd, no forward AD there, so no node: ~10 us less per call).
    node = _LINEAR_ACT if torch.compiler.is_compiling() or torch.is_inference_mode_enabled() else _LinearNode.apply
    if input.dim() == 2:
        return node(input, weight, bias, activation, negative_slope)[0]
    return _on_rows(input, lambda x: node(x, weight, bias, activation, negative_slope)[0])


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


def _layers(spec, params):
    """(weight, bias or None, activation, slope) per layer, from a chain's ``spec`` and ``params``."""
    layers, i = [], 0
    for activation, slope, has_bias in spec:
        layers.append((params[i], params[i + 1] if has_bias else None, activation, slope))
        i += 1 + has_bias
    return layers


class _Checked(tuple):
    """A chain spec whose layers :func:`fused_chain` has validated (the Function skips its checks)."""


def _check_chain(input, spec, params) -> None:
    """FusedChainFunction.apply's validation of what :func:`fused_chain` validates for itself."""
    if not all(isinstance(s, tuple) and len(s) == 3 for s in spec) or len(params) != sum(1 + bool(s[2]) for s in spec):
        raise ValueError(
            f"FusedChainFunction.apply: spec must hold (activation, negative_slope, has_bias) per layer and "
            f"params one weight per layer plus one bias per layer with has_bias; got {len(spec)} layers, "
            f"{len(params)} params; use fused_chain(input, [(weight, bias, activation, slope), ...])"
        )
    features = None
    for n, (weight, bias, activation, slope) in enumerate(_layers(spec, params)):
        _check(input, weight, bias, activation, slope, features, f"layer {n}: " if n else "", rows=True)
        features = weight.shape[0]


class _Chain(torch.autograd.Function):
    """Fused layers applied one after another, as one autograd node::

        h_0 = input,   h_{i+1} = g_i(h_i W_iᵀ + b_i),   output = h_L

    Forward and backward are the same op calls as :class:`FusedLinearFunction`, layer by layer
    (backward from the last layer to the first, each layer's dX the dA of the one before); one
    node instead of L saves the per-layer autograd and Python overhead, which at small batches is
    most of a layer's time. ``spec`` holds (activation, slope, has bias) per layer; ``params``
    the weights and biases, in order.

    ``forward`` also returns h_1 .. h_{L-1} and the Z of each layer whose activation keeps Z
    (non-differentiable): ``setup_context``, which ``torch.func`` needs, sees only the outputs.
    :class:`FusedChainFunction` (``apply`` -> h_L) and :func:`fused_chain` call it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, spec, *params):
        if type(spec) is not _Checked:
            _check_chain(input, spec, params)
        h, hs, zs = input, [], []
        for weight, bias, activation, slope in _layers(spec, params):
            h, z = _LINEAR_ACT(h, weight, bias, activation, slope)
            hs.append(h)
            if _acts.ACTIVATIONS[activation].keeps_z:
                zs.append(z)
        return (h, *hs[:-1], *zs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, spec, *params = inputs
        n = len(spec)
        hs = (input, *output[1:n], output[0])  # h_0 .. h_L
        zs = iter(output[n:])
        kept = [hs[i + 1] if saves == "a" else next(zs) if saves == "z" else input.new_empty(0)
                for i, saves in enumerate(_acts.ACTIVATIONS[s[0]].saves for s in spec)]
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*hs[:-1], *kept, *params)  # biases: for create_graph
        ctx.save_for_forward(*hs[:-1], *kept, *params)
        ctx.spec = spec
        ctx.outputs = len(output)

    @staticmethod
    def backward(ctx, grad, *_intermediates):
        spec, needs = ctx.spec, ctx.needs_input_grad
        n = len(spec)
        saved = ctx.saved_tensors
        hs, kept, params = list(saved[:n]), list(saved[n:2 * n]), saved[2 * n:]
        if torch.is_grad_enabled():  # create_graph: every h_i and g'(Z_i) recomputed with a graph
            op = backend.route(hs[0], params[0], graph=True)
            h = hs[0]
            for i, (weight, bias, activation, slope) in enumerate(_layers(spec, params)):
                hs[i] = h
                h, z = op.forward(h, weight, bias, activation, slope)
                kept[i] = _kept(activation, h, z)
            op = op.backward
        else:
            op = _LINEAR_ACT_BACKWARD
        grads = [None] * len(params)  # one per parameter (weights and biases, in order)
        i = len(grads)
        for layer in range(n - 1, -1, -1):
            activation, slope, has_bias = spec[layer]
            i -= 1 + has_bias
            earlier = needs[0] or any(needs[2:2 + i])  # does anything before this layer need a gradient?
            mask = [earlier, needs[2 + i], has_bias and needs[3 + i]]
            dx, dw, db = op(grad, kept[layer], hs[layer], params[i], activation, slope, mask)
            grads[i] = dw if mask[1] else None
            if has_bias:
                grads[i + 1] = db if mask[2] else None
            if not earlier:
                break
            grad = dx
        return (grad if needs[0] else None), None, *grads

    @staticmethod
    def jvp(ctx, t_input, _t_spec, *t_params):
        n = len(ctx.spec)
        saved = ctx.saved_tensors
        hs, kept, params = saved[:n], saved[n:2 * n], saved[2 * n:]
        t, i = t_input, 0
        for layer, (activation, slope, has_bias) in enumerate(ctx.spec):
            t_z = _tangent_z(hs[layer], params[i], t, t_params[i], t_params[i + 1] if has_bias else None)
            t = _tangent_a(t_z, kept[layer], activation, slope)
            i += 1 + has_bias
        return (t, *[None] * (ctx.outputs - 1))



_Chain.forward.__signature__ = inspect.signature(_Chain.forward)  # as FusedLinearFunction's

# The node itself, named so that its grad_fn is FusedChainFunctionBackward. Not FusedChainFunction
# below: torch.func calls a node's own ``apply`` inside its transforms and needs all its outputs.
_ChainNode = type("FusedChainFunction", (_Chain,), {"__module__": __name__, "__qualname__": "FusedChainFunction"})


class FusedChainFunction(_Chain):
    __doc__ = _Chain.__doc__

    @staticmethod
    def apply(input, spec, *params):
        """h_L, validated like :func:`fused_chain`; an empty ``spec`` returns ``input``."""
        if not spec:
            _check_chain(input, (), params)
            return input
        return _ChainNode.apply(input, spec, *params)[0]


def fused_chain(input, layers):
    r"""Applies fused layers one after another, ``h = act_i(h @ W_i.T + b_i)``, as one autograd node.

    ``layers``: a sequence of ``(weight, bias or None, activation, negative_slope)``. Equal to
    calling :func:`fused_linear` layer by layer, values and gradients alike; faster at small
    batches, where each autograd node's own overhead is a large part of a layer's time.
    An empty sequence returns ``input``, as an empty ``nn.Sequential`` does.
    :class:`FusedSequential` calls this for its runs of linear layers.
    """
    spec, params, features, plain = [], [], None, False
    fast = isinstance(input, torch.Tensor) and not _autocasting(input)
    for n, layer in enumerate(layers):
        try:
            weight, bias, activation, slope = layer
        except (TypeError, ValueError):  # only a malformed layer pays for the message
            raise _bad_layer(n, layer) from None
        if not (fast and _valid(input, weight, bias, activation, slope, features)):
            # Autocast casts each layer's tensors; the input, cast once, is checked with layer 0.
            x, weight, bias, special = _prepare(input, weight, bias, activation, slope, features,
                                                f"layer {n}: " if n else "")
            input, plain = (x if n == 0 else input), plain or special
        features = weight.shape[0]  # the next layer's input has out_features columns
        spec.append((activation, float(slope), bias is not None))
        params += [weight] if bias is None else [weight, bias]
    if not spec:
        return input
    if plain:
        return _plain_layers(input, _layers(spec, params))
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():  # the op per layer (as fused_linear)
        return _on_rows(input, lambda x: _compiled_chain(x, _layers(spec, params)))
    spec = _Checked(spec)
    return _on_rows(input, lambda x: _ChainNode.apply(x, spec, *params)[0])


def _compiled_chain(h, layers):
    for weight, bias, activation, slope in layers:
        h = _LINEAR_ACT(h, weight, bias, activation, slope)[0]
    return h


def _bad_layer(n, layer) -> TypeError:
    given = (f"a tensor of shape {tuple(layer.shape)} (a bare tuple? wrap one layer in a list: [(w, b, 'relu', 0.0)])"
             if isinstance(layer, torch.Tensor) else
             f"a {type(layer).__name__} of {len(layer)} items" if hasattr(layer, "__len__") else _name(layer))
    return TypeError(f"fused_chain: layer {n} is {given}; layers must be "
                     f"[(weight, bias or None, activation, negative_slope), ...]")
