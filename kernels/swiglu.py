"""SwiGLU / GeGLU MLP in Triton: y = (act(x @ Wg.T + bg) * (x @ Wu.T + bu)) @ Wd.T + bd, forward and
backward, with act silu (SwiGLU: Llama's, PaLM's and Mistral's MLP) or gelu_tanh (GeGLU: Gemma's).

Reference module: `tritongpt.model.layers.SwiGLUFeedForward` (gate, up, down; dropout stays in the
module), with activation="gelu" for GeGLU. Every product is kernels/mlp.py's tiled matmul
kernel (BLOCK_M x BLOCK_N output tiles, K walked in BLOCK_K steps, fp32 accumulators in
registers, grouped program order), with the gated prologue/epilogues it has beside GELU's (shown
for silu; GeGLU is the same launches with gelu_tanh and its derivative in place of silu's):

  forward   g = x @ Wg.T + bg, u = x @ Wu.T + bu   ONE pass: each x tile is loaded once and
            a = silu(g) * u                        multiplied by the matching columns of Wg and
                                                   Wu (two accumulators); the epilogue writes g
                                                   and u (saved) and a (read once, then freed)
            y = a @ Wd.T + bd                      bias in the epilogue
  backward  da = dy @ Wd                           never stored: the epilogue writes
            dg = da * u * silu'(g), du = da * silu(g)   both gradients from the one accumulator,
            a = silu(g) * u                        and a from the g and u it reads anyway (only
                                                   when dWd is wanted; freed once dWd is made)
            dWd = dy.T @ a                         a plain matmul (with no dg/du launch, i.e. only
                                                   Wd and biases train: a recomputed on the B
                                                   tiles as they are loaded, B_SWIGLU)
            dWg = dg.T @ x,  dWu = du.T @ x
            dx = dg @ Wg + du @ Wu                 one launch: the second product is added to
                                                   the first's accumulator (no [M, C] partial)
            dbg = sum(dg), dbu = sum(du), dbd = sum(dy)
            (only the gradients autograd asks for: a frozen weight skips its product)

That is the fused way. On a GPU in bf16/fp16 kernels/mlp.py's MLP_MATMUL may run a product on cuBLAS instead,
the faster per shape: a plain one as torch.mm / addmm (dx as mm + addmm_, a [M, C] partial rounded in between),
the gated ones split, cuBLAS's g and u (or da, stored) and then one Triton pass (_gate_pointwise_kernel) making
a (or dg, du and, for dWd, a) from them. The split way saves the same tensors; fp32 keeps the fused one.

So x, g and u are saved for backward: x plus TWO [M, H] tensors, where the eager reference keeps
x plus FOUR (g, silu(g), u, a) -- measured with _common.saved_tensor_bytes() in tests/test_swiglu.py.
Backward holds a fourth [M, H] (a) for the one dWd product: recomputing it on dWd's B tiles instead
costs the activation C / BLOCK_M times per element inside the inner loop (kernels/mlp.py's note).
silu(g) = g * sigmoid(g), silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g) from exp(-|g|)
(no overflow); gelu_tanh and its derivative are kernels/mlp.py's. Forward multiplies act of the
*rounded* g by the rounded u, the values backward recomputes a from. Math is fp32; fp32 inputs
use IEEE products (no TF32) so fp32 parity holds; bf16/fp16 use tensor cores with fp32
accumulation.

Public API: `swiglu_mlp(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation="silu")`
(activation "gelu": GeGLU), built from the custom ops `tritongpt::swiglu_mlp_fwd` /
`tritongpt::swiglu_mlp_bwd` (with fake impls; the activation is a str argument of both) inside an
autograd.Function, so it runs under torch.compile as opaque calls in one graph.
"""
import math
from typing import Optional

import torch

from tritongpt.kernels._common import (autocast_dtype, check_runnable, check_same_device, check_same_dtype,
                                       check_tensor, custom_op, first_order_only, no_func_transform)
from tritongpt.kernels.mlp import EPI_SWIGLU, EPI_SWIGLU_GRAD, GATES, _matmul

NAMES = ("x", "w_gate", "b_gate", "w_up", "b_up", "w_down", "b_down")


# Launchers: the products of the table above (bench/compile_check.py calls them on meta tensors).
def _fwd_launch(x, wg, bg, wu, bu, wd, bd, activation="silu"):
    a, (g, u) = _matmul(x, wg.t(), bg, EPI_SWIGLU, b2=wu.t(), bias2=bu, gate=activation)
    y, _ = _matmul(a, wd.t(), bd)
    return y, g, u


def _bwd_launch(dy, x, g, u, wg, wu, wd, needs=(True,) * 7, activation="silu"):
    """-> (dx, dwg, dbg, dwu, dbu, dwd, dbd); needs: autograd's needs_input_grad, a gradient not
    made comes back as an empty tensor (its products are skipped)."""
    need_dx, need_dwg, need_dbg, need_dwu, need_dbu, need_dwd, need_dbd = needs

    def skipped():
        return dy.new_empty(0)  # one per output: a custom op's outputs may not alias each other

    dg = du = act = None
    if need_dx or need_dwg or need_dbg or need_dwu or need_dbu:  # [M, H] each; a beside them if dWd wants it
        dg, extra = _matmul(dy, wd, epilogue=EPI_SWIGLU_GRAD, aux=g, aux2=u, gate=activation, store_act=need_dwd)
        du, act = extra if need_dwd else (extra, None)
        del extra  # else the (du, a) tuple keeps a alive after dWd, through the products below
    if not need_dwd:
        dwd = skipped()
    elif act is not None:  # [C, H] = dy^T a, a plain matmul; a is freed right after
        dwd, _ = _matmul(dy.t(), act, tokens=dy.shape[0])
        act = None
    else:  # no dg/du launch to make a beside: act(g) * u recomputed on the B tiles as loaded
        dwd, _ = _matmul(dy.t(), g, b2=u, b_swiglu=True, gate=activation)
    dwg = _matmul(dg.t(), x, tokens=x.shape[0])[0] if need_dwg else skipped()      # [H, C]
    dwu = _matmul(du.t(), x, tokens=x.shape[0])[0] if need_dwu else skipped()      # [H, C]
    dx = _matmul(dg, wg, a2=du, b2=wu)[0] if need_dx else skipped()                # [M, C]
    dbg = dg.sum(0, dtype=torch.float32).to(wg.dtype) if need_dbg else skipped()
    dbu = du.sum(0, dtype=torch.float32).to(wu.dtype) if need_dbu else skipped()
    dbd = dy.sum(0, dtype=torch.float32).to(wd.dtype) if need_dbd else skipped()
    return dx, dwg, dbg, dwu, dbu, dwd, dbd


def _check_activation(activation):
    if activation not in GATES:
        raise ValueError(f"activation must be one of {', '.join(map(repr, GATES))}, got {activation!r}")


def _check_op_shapes(x, wg, bg, wu, bu, wd, bd, **grads):
    """Shapes, dtype and device the products need, in the ops and their fake impls (so a direct
    call, and torch.compile's tracing, report them too). grads: backward's dy, g and u."""
    check_tensor(x, "x", ndim=2)
    M, C = x.shape
    check_tensor(wg, "w_gate", ndim=2)
    H = wg.shape[0]
    check_tensor(wg, "w_gate", shape=(H, C))
    check_tensor(wu, "w_up", shape=(H, C))
    check_tensor(wd, "w_down", shape=(C, H))
    for name, b, n in (("b_gate", bg, H), ("b_up", bu, H), ("b_down", bd, C)):
        if b is not None:
            check_tensor(b, name, shape=(n,))
    for name, shape in (("dy", (M, C)), ("g", (M, H)), ("u", (M, H))):
        if name in grads:
            check_tensor(grads[name], name, shape=shape)
    check_same_device(x=x, w_gate=wg, b_gate=bg, w_up=wu, b_up=bu, w_down=wd, b_down=bd, **grads)
    check_same_dtype(x=x, w_gate=wg, b_gate=bg, w_up=wu, b_up=bu, w_down=wd, b_down=bd, **grads)


@custom_op("tritongpt::swiglu_mlp_fwd", mutates_args=())
def _swiglu_mlp_fwd(x: torch.Tensor, w_gate: torch.Tensor, b_gate: Optional[torch.Tensor], w_up: torch.Tensor,
                    b_up: Optional[torch.Tensor], w_down: torch.Tensor,
                    b_down: Optional[torch.Tensor], activation: str = "silu"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, C] -> (y [M, C], g [M, H], u [M, H]); the activation a = act(g) * u is freed on return."""
    check_runnable(x, "x")
    _check_activation(activation)
    _check_op_shapes(x, w_gate, b_gate, w_up, b_up, w_down, b_down)
    return _fwd_launch(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation)


@_swiglu_mlp_fwd.register_fake
def _(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation="silu"):
    _check_activation(activation)
    _check_op_shapes(x, w_gate, b_gate, w_up, b_up, w_down, b_down)
    M, H = x.shape[0], w_gate.shape[0]
    return x.new_empty((M, w_down.shape[0])), x.new_empty((M, H)), x.new_empty((M, H))


@custom_op("tritongpt::swiglu_mlp_bwd", mutates_args=())
def _swiglu_mlp_bwd(dy: torch.Tensor, x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, w_gate: torch.Tensor,
                    w_up: torch.Tensor, w_down: torch.Tensor, needs: list[bool], activation: str = "silu"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
    """-> (dx, dw_gate, db_gate, dw_up, db_up, dw_down, db_down); those not in needs come back empty."""
    check_runnable(dy, "dy")
    _check_activation(activation)
    _check_op_shapes(x, w_gate, None, w_up, None, w_down, None, dy=dy, g=g, u=u)
    if len(needs) != 7:
        raise ValueError(f"needs must hold 7 flags (dx, dw_gate, db_gate, dw_up, db_up, dw_down, db_down), "
                         f"got {len(needs)}")
    return _bwd_launch(dy, x, g, u, w_gate, w_up, w_down, needs, activation)


@_swiglu_mlp_bwd.register_fake
def _(dy, x, g, u, w_gate, w_up, w_down, needs, activation="silu"):
    _check_activation(activation)
    _check_op_shapes(x, w_gate, None, w_up, None, w_down, None, dy=dy, g=g, u=u)
    H = w_gate.shape[0]
    shapes = (x.shape, w_gate.shape, (H,), w_up.shape, (H,), w_down.shape, w_down.shape[:1])
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


class SwiGLUMLPFunction(torch.autograd.Function):
    """Saves x, g and u only (plus the weights, which live anyway); activation "silu" or "gelu"."""

    @staticmethod
    def forward(ctx, x, wg, bg, wu, bu, wd, bd, activation="silu"):
        shape = x.shape
        x2 = x.reshape(math.prod(shape[:-1]), shape[-1])  # not -1: C may be 0
        y, g, u = _swiglu_mlp_fwd.call(x2, wg, bg, wu, bu, wd, bd, activation)
        ctx.save_for_backward(x2, g, u, wg, wu, wd)
        ctx.activation = activation
        return y.view(*shape[:-1], wd.shape[0])

    @staticmethod
    def backward(ctx, dy):
        first_order_only("swiglu_mlp")
        x2, g, u, wg, wu, wd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape[0], dy.shape[-1])
        needs = list(ctx.needs_input_grad[:7])  # False for a frozen weight and for a bias that is None
        grads = _swiglu_mlp_bwd.call(dy2, x2, g, u, wg, wu, wd, needs, ctx.activation)
        dx = grads[0].view(*dy.shape[:-1], x2.shape[-1]) if needs[0] else grads[0]
        return tuple(gr if need else None for gr, need in zip((dx,) + tuple(grads[1:]), needs)) + (None,)


def swiglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, b_gate: Optional[torch.Tensor], w_up: torch.Tensor,
               b_up: Optional[torch.Tensor], w_down: torch.Tensor, b_down: Optional[torch.Tensor],
               activation: str = "silu") -> torch.Tensor:
    """(act(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)) @ w_down.T + b_down over the last dim of x,
    act silu (activation "silu", SwiGLU) or gelu_tanh ("gelu", GeGLU). Differentiable.

    w_gate, w_up [H, C], w_down [C, H] (nn.Linear layout), biases [H] / [C] or None. All tensors
    share one dtype (fp32/bf16/fp16) and device. Under torch.autocast the inputs are cast to the
    autocast dtype first, as nn.Linear would be.
    """
    no_func_transform("swiglu_mlp")
    _check_activation(activation)
    args = (x, w_gate, b_gate, w_up, b_up, w_down, b_down)
    for name, t in zip(NAMES, args):
        if t is not None or not name.startswith("b_"):
            check_tensor(t, name)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim (the feature one), got a scalar")
    check_same_device(**dict(zip(NAMES, args)))
    dt = autocast_dtype(x.device)
    if dt is not None:
        args = tuple(t.to(dt) if t is not None else None for t in args)
    return SwiGLUMLPFunction.apply(*args, activation)  # shapes and dtypes: checked by the op


__all__ = ["swiglu_mlp", "SwiGLUMLPFunction"]
