"""Every fused_lora op's schema, in one place: torch custom ops with fake (meta) impls and
autograd, so eager, ``torch.compile(fullgraph=True)`` and CUDA graphs all see the same ops.

Each op takes ``impl``, a registry entry that :func:`fused_lora.backends.select` chose once per
call ("torch", "triton", "triton:decode", "cuda:wgmma256", ...), looks it up
(:func:`fused_lora.backends.kernel`) and runs it. Where an op's code lives, by name:

=============================  ============================  ================================
op (schema here)               Triton (kernels/)             CUDA (csrc/)
=============================  ============================  ================================
fused_lora::lora_linear_fwd    _lora_shrink_kernel +         lora_linear_fwd_cuda
                               _lora_fwd_kernel              (lora_linear_cuda.cu)
fused_lora::lora_linear_bwd    _lora_bwd_ds_kernel +         lora_linear_bwd_cuda
                               _lora_bwd_kernel
fused_lora::multi_lora_        _mlora_bgmv_shrink_kernel     multi_lora_linear_fwd_cuda
linear_fwd                     or _mlora_sgmv_shrink_kernel  (multi_lora_cuda.cu)
                               + _mlora_fwd_kernel
fused_lora::multi_lora_        shrink kernel (ds) +          multi_lora_linear_bwd_cuda
linear_bwd                     _mlora_fwd_kernel (dx) +
                               _mlora_bwd_weight_kernel
fused_lora::moe_lora_          _moe_shrink_kernel +          moe_lora_linear_fwd_cuda
linear_fwd                     _moe_gemm_kernel              (moe_lora_cuda.cu; grouped GEMM
fused_lora::moe_lora_          _moe_shrink_kernel (ds) +     in gemm.cu) / _bwd_cuda
linear_bwd                     _moe_gemm_kernel (dx) +
                               _moe_bwd_weight_kernel
=============================  ============================  ================================

References: :mod:`fused_lora.reference` (same names). Backends: :mod:`fused_lora.backends`.
Tests: ``tests/ops/test_<op>.py``.

The ops take 2-D activations and check the shapes they rely on (cheap, no host sync), so a
direct ``torch.ops.fused_lora.*`` call with inconsistent shapes raises instead of reading out of
bounds; :mod:`fused_lora.functional` handles leading dims, autocast, the backend choice and the
dropout seed. The seed is a CPU int64 scalar tensor (or None when dropout is off) so that
drawing it is a traced RNG op under torch.compile and is replayed by activation checkpointing.
Mixed-adapter ops take the batch's routing plan tensor (:mod:`fused_lora.routing`), built once
per batch and saved for backward.

Double backward (``create_graph=True``) differentiates the reference again: the backward
formula recomputes the forward with differentiable torch ops and returns their gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_lora import backends, reference, routing
from fused_lora.checks import check_lora_shapes, check_multi_shapes
from fused_lora.reference import acc_dtype

__all__ = ["lora_linear_fwd", "lora_linear_bwd", "multi_lora_linear_fwd", "multi_lora_linear_bwd"]

_DEVICES = ("cpu", "cuda")


def seed_value(seed: Optional[Tensor]) -> int:
    """The int seed carried by a CPU int64 scalar tensor (0 when dropout is off)."""
    return 0 if seed is None else int(seed.item())


def fake_lora_fwd(x: Tensor, weight: Tensor, lora_A: Tensor) -> tuple[Tensor, Tensor]:
    """Shapes of (y, xa) of a single-adapter forward (the fake impls of every backend's op)."""
    M = x.shape[0]
    return x.new_empty(M, weight.shape[0]), x.new_empty(M, lora_A.shape[0], dtype=acc_dtype(x.dtype))


def fake_multi_fwd(x: Tensor, weight: Tensor, lora_A: Tensor) -> tuple[Tensor, Tensor]:
    """Shapes of (y, xa) of a mixed-adapter forward."""
    M = x.shape[0]
    return x.new_empty(M, weight.shape[0]), x.new_empty(M, lora_A.shape[1], dtype=acc_dtype(x.dtype))


def fake_bwd(x: Tensor, lora_A: Tensor, lora_B: Tensor, needs_dx: bool, needs_dA: bool, needs_dB: bool
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Shapes of (dx, dA, dB) of any backward (a gradient not asked for is empty)."""
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    dA = lora_A.new_empty(lora_A.shape) if needs_dA else lora_A.new_empty(0)
    dB = lora_B.new_empty(lora_B.shape) if needs_dB else lora_B.new_empty(0)
    return dx, dA, dB


# --------------------------------------------------------------------------------------------
# fused_lora::lora_linear_fwd / lora_linear_bwd -- one adapter
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fused_lora::lora_linear_fwd", mutates_args=(), device_types=_DEVICES)
def lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float,
    seed: Optional[Tensor],
    impl: str,
) -> tuple[Tensor, Tensor]:
    """y = x W0^T + b + scale * (drop(x) A^T) B^T on x [M, in].

    Returns (y [M, out] in x.dtype, xa = drop(x) A^T [M, r] in fp32 (fp64 for fp64 x), which
    backward needs; x's dropout mask is never stored, backward regenerates it from the seed)."""
    check_lora_shapes(x, weight, bias, lora_A, lora_B)
    k = backends.kernel("lora_linear", impl)
    return k.fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed_value(seed))


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, impl):
    check_lora_shapes(x, weight, bias, lora_A, lora_B)
    return fake_lora_fwd(x, weight, lora_A)


@torch.library.custom_op("fused_lora::lora_linear_bwd", mutates_args=(), device_types=_DEVICES)
def lora_linear_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    scale: float,
    dropout_p: float,
    seed: Optional[Tensor],
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) for lora_linear_fwd; a gradient not asked for is an empty tensor."""
    check_lora_shapes(x, weight, None, lora_A, lora_B, dy=dy, xa=xa)
    k = backends.kernel("lora_linear", impl)
    return k.bwd(dy, x, weight, lora_A, lora_B, xa, scale, dropout_p, seed_value(seed),
                 needs_dx, needs_dA, needs_dB)


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, scale, dropout_p, seed, needs_dx, needs_dA, needs_dB, impl):
    check_lora_shapes(x, weight, None, lora_A, lora_B, dy=dy, xa=xa)
    return fake_bwd(x, lora_A, lora_B, needs_dx, needs_dA, needs_dB)


def _base_grads(dy: Tensor, x: Tensor, weight: Tensor, need_dw: bool, need_db: bool
                ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of the base weight and bias. They are frozen in LoRA; if a caller does train
    them, these are the plain linear gradients (unfused: this is never the hot path)."""
    acc = acc_dtype(x.dtype)
    dW = (dy.to(acc).t() @ x.to(acc)).to(weight.dtype) if need_dw else None
    db = dy.to(acc).sum(0).to(dy.dtype) if need_db else None
    return dW, db


def _lora_linear_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, impl = inputs
    _, xa = output
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, xa, seed)
    ctx.scale, ctx.dropout_p, ctx.impl = scale, dropout_p, impl


def _lora_linear_backward(ctx, dy, _dxa):
    x, weight, bias, lora_A, lora_B, xa, seed = ctx.saved_tensors
    nx, nw, nb, nA, nB = ctx.needs_input_grad[:5]
    if torch.is_grad_enabled():  # create_graph=True: differentiable formulas, on the inputs
        s, p, sd = ctx.scale, ctx.dropout_p, seed_value(seed)
        y = reference.lora_linear(x, weight, bias, lora_A, lora_B, s, p, sd)
        want = [t for t, n in zip((x, weight, bias, lora_A, lora_B), (nx, nw, nb, nA, nB)) if n]
        g = iter(torch.autograd.grad(y, want, dy, create_graph=True, allow_unused=True))
        out = [next(g) if n else None for n in (nx, nw, nb, nA, nB)]
        return (*out, None, None, None, None)
    dx = dA = dB = None
    if nx or nA or nB:
        dx, dA, dB = lora_linear_bwd(
            dy, x, weight, lora_A, lora_B, xa, ctx.scale, ctx.dropout_p, seed, nx, nA, nB, ctx.impl,
        )
        dx = dx if nx else None
        dA = dA if nA else None
        dB = dB if nB else None
    dW, db = _base_grads(dy, x, weight, nw, nb and bias is not None)
    return dx, dW, db, dA, dB, None, None, None, None


lora_linear_fwd.register_autograd(_lora_linear_backward, setup_context=_lora_linear_setup_context)


# --------------------------------------------------------------------------------------------
# fused_lora::multi_lora_linear_fwd / multi_lora_linear_bwd -- mixed adapters, one per token
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fused_lora::multi_lora_linear_fwd", mutates_args=(), device_types=_DEVICES)
def multi_lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scales: Tensor,
    ranks: Optional[Tensor],
    plan: Tensor,
    impl: str,
) -> tuple[Tensor, Tensor]:
    """y[t] = x[t] W0^T + b + scales[i] (x[t] A[i, :r_i]^T) B[i, :, :r_i]^T, i = the slot of token
    t in ``plan`` (a RoutingPlan's ``data`` for x's M rows over S = lora_A.shape[0] slots; -1: base
    only) on x [M, in], lora_A [S, R, in], lora_B [S, out, R], scales float32 [S], ranks None
    (every slot has R) or int64 [S] (clamped to [0, R]; columns past a slot's rank are never read).

    Returns (y [M, out] in x.dtype, xa [M, R] fp32 (fp64 for fp64 x): x A[i]^T on live columns,
    0 past a slot's rank and on rows without an adapter; backward needs it)."""
    check_multi_shapes(x, weight, bias, lora_A, lora_B, scales, ranks, plan)
    k = backends.kernel("multi_lora_linear", impl)
    view = routing.unpack(plan, x.shape[0], lora_A.shape[0])
    return k.fwd(x, weight, bias, lora_A, lora_B, scales, ranks, view)


@multi_lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scales, ranks, plan, impl):
    check_multi_shapes(x, weight, bias, lora_A, lora_B, scales, ranks, plan)
    return fake_multi_fwd(x, weight, lora_A)


@torch.library.custom_op("fused_lora::multi_lora_linear_bwd", mutates_args=(), device_types=_DEVICES)
def multi_lora_linear_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scales: Tensor,
    ranks: Optional[Tensor],
    plan: Tensor,
    xa: Tensor,
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) for multi_lora_linear_fwd: dA / dB are full [S, ...] stacks, exactly zero
    for slots absent from the batch and past each slot's rank; a gradient not asked for is an
    empty tensor. The routing is the forward's plan: nothing is sorted again."""
    check_multi_shapes(x, weight, None, lora_A, lora_B, scales, ranks, plan, dy=dy, xa=xa)
    k = backends.kernel("multi_lora_linear", impl)
    view = routing.unpack(plan, x.shape[0], lora_A.shape[0])
    return k.bwd(dy, x, weight, lora_A, lora_B, scales, ranks, view, xa, needs_dx, needs_dA, needs_dB)


@multi_lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, scales, ranks, plan, xa, needs_dx, needs_dA, needs_dB, impl):
    check_multi_shapes(x, weight, None, lora_A, lora_B, scales, ranks, plan, dy=dy, xa=xa)
    return fake_bwd(x, lora_A, lora_B, needs_dx, needs_dA, needs_dB)


def _multi_lora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scales, ranks, plan, impl = inputs
    _, xa = output
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, scales, ranks, plan, xa)
    ctx.impl = impl


def _multi_lora_backward(ctx, dy, _dxa):
    x, weight, bias, lora_A, lora_B, scales, ranks, plan, xa = ctx.saved_tensors
    nx, nw, nb, nA, nB = ctx.needs_input_grad[:5]
    if torch.is_grad_enabled():  # create_graph=True: differentiable formulas, on the inputs
        ids = routing.unpack(plan, x.shape[0], lora_A.shape[0]).ids
        y = reference.multi_lora_linear_differentiable(x, weight, bias, lora_A, lora_B, scales, ids, ranks)
        want = [t for t, n in zip((x, weight, bias, lora_A, lora_B), (nx, nw, nb, nA, nB)) if n]
        g = iter(torch.autograd.grad(y, want, dy, create_graph=True, allow_unused=True))
        out = [next(g) if n else None for n in (nx, nw, nb, nA, nB)]
        return (*out, None, None, None, None)
    dx = dA = dB = None
    if nx or nA or nB:
        dx, dA, dB = multi_lora_linear_bwd(
            dy, x, weight, lora_A, lora_B, scales, ranks, plan, xa, nx, nA, nB, ctx.impl,
        )
        dx = dx if nx else None
        dA = dA if nA else None
        dB = dB if nB else None
    dW, db = _base_grads(dy, x, weight, nw, nb and bias is not None)
    # Scales are not trained by this op (functional routes a scales tensor that requires grad
    # to the differentiable reference); ranks and the plan are integers.
    return dx, dW, db, dA, dB, None, None, None, None


multi_lora_linear_fwd.register_autograd(_multi_lora_backward, setup_context=_multi_lora_setup_context)


# --------------------------------------------------------------------------------------------
# fused_lora::moe_lora_linear_fwd / moe_lora_linear_bwd -- mixture of experts, one per row
# --------------------------------------------------------------------------------------------

from fused_lora.checks import check_moe_shapes, moe_n_virtual  # noqa: E402  (appended section: keeps merges clean)

__all__ += ["moe_lora_linear_fwd", "moe_lora_linear_bwd"]


def _moe_view(plan: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, topk: int):
    return routing.unpack(plan, x.shape[0] * topk, moe_n_virtual(weight, lora_A))


@torch.library.custom_op("fused_lora::moe_lora_linear_fwd", mutates_args=(), device_types=_DEVICES)
def moe_lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float,
    seed: Optional[Tensor],
    plan: Tensor,
    impl: str,
    slot_scales: Optional[Tensor] = None,
    topk: int = 1,
) -> tuple[Tensor, Tensor]:
    """y[m] = x[m // topk] W[e]^T + b[e] + scale * (drop(x)[m] A[v]^T) B[v]^T, v the id of row m in
    ``plan`` (a RoutingPlan's ``data`` for M = T * topk rows), e its expert, on x [T, in],
    weight [E, out, in] (any strides), bias [E, out], and either one adapter per expert
    (lora_A [E, r, in], lora_B [E, out, r]; v = e in [0, E)) or adapter banks (lora_A
    [S, E, r, in], lora_B [S, E, out, r]; v = (a + 1) * E + e is adapter a on expert e, v < E
    is expert v without adapter; slot_scales [S] float32 scales adapter a's term, None = 1).

    topk > 1 reads each row of x for topk consecutive rows (a token's top-k experts) without
    copying it. Returns (y [M, out] in x.dtype, xa = drop(x) A[v]^T [M, r] fp32 (fp64 for fp64
    x), which backward needs). Rows of no expert (unvalidated out-of-range ids) get y = 0."""
    check_moe_shapes(x, weight, bias, lora_A, lora_B, plan, slot_scales=slot_scales, topk=topk)
    k = backends.kernel("moe_lora_linear", impl)
    view = _moe_view(plan, x, weight, lora_A, topk)
    return k.fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed_value(seed), view,
                 slot_scales=slot_scales, topk=topk)


@moe_lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, plan, impl, slot_scales=None, topk=1):
    check_moe_shapes(x, weight, bias, lora_A, lora_B, plan, slot_scales=slot_scales, topk=topk)
    M = x.shape[0] * topk
    return x.new_empty(M, weight.shape[1]), x.new_empty(M, lora_A.shape[-2], dtype=acc_dtype(x.dtype))


@torch.library.custom_op("fused_lora::moe_lora_linear_bwd", mutates_args=(), device_types=_DEVICES)
def moe_lora_linear_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    scale: float,
    dropout_p: float,
    seed: Optional[Tensor],
    plan: Tensor,
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
    impl: str,
    slot_scales: Optional[Tensor] = None,
    topk: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx [T, in] (each token's topk rows summed), dA, dB in lora_A / lora_B's shapes) for
    moe_lora_linear_fwd; adapters x experts without rows get exact zeros; a gradient not asked
    for is an empty tensor. Routing: the forward's plan (nothing is sorted again)."""
    check_moe_shapes(x, weight, None, lora_A, lora_B, plan, dy=dy, xa=xa, slot_scales=slot_scales, topk=topk)
    k = backends.kernel("moe_lora_linear", impl)
    view = _moe_view(plan, x, weight, lora_A, topk)
    return k.bwd(dy, x, weight, lora_A, lora_B, xa, scale, dropout_p, seed_value(seed), view,
                 needs_dx, needs_dA, needs_dB, slot_scales=slot_scales, topk=topk)


@moe_lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, scale, dropout_p, seed, plan, needs_dx, needs_dA, needs_dB, impl,
      slot_scales=None, topk=1):
    check_moe_shapes(x, weight, None, lora_A, lora_B, plan, dy=dy, xa=xa, slot_scales=slot_scales, topk=topk)
    return fake_bwd(x, lora_A, lora_B, needs_dx, needs_dA, needs_dB)


def _moe_base_grads(dy: Tensor, x: Tensor, weight: Tensor, ids: Tensor, need_dw: bool, need_db: bool,
                    topk: int = 1) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Per-expert base weight / bias gradients, dW[e] = dy[rows]^T x[rows // topk], db[e] = sum
    dy[rows], over every row of expert e (virtual ids: e = id % E). The base is frozen in LoRA;
    if a caller does train it, this is a loop over the experts present (one host sync;
    unfused: never the hot path)."""
    if not (need_dw or need_db):
        return None, None
    acc = acc_dtype(x.dtype)
    E = weight.shape[0]
    base = torch.where(ids >= 0, ids % E, -1)
    dW = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_dw else None
    db = torch.zeros(E, dy.shape[1], dtype=acc, device=x.device) if need_db else None
    for e in reference._moe_experts(base, E):
        rows = (base == e).nonzero(as_tuple=True)[0]
        g = dy[rows].to(acc)
        if dW is not None:
            dW[e] = g.t() @ x[rows // topk].to(acc)
        if db is not None:
            db[e] = g.sum(0)
    return (dW.to(weight.dtype) if dW is not None else None,
            db.to(dy.dtype) if db is not None else None)


def _moe_lora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, plan, impl, slot_scales, topk = inputs
    _, xa = output
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, xa, seed, plan, slot_scales)
    ctx.scale, ctx.dropout_p, ctx.impl, ctx.topk = scale, dropout_p, impl, topk


def _moe_lora_backward(ctx, dy, _dxa):
    x, weight, bias, lora_A, lora_B, xa, seed, plan, slot_scales = ctx.saved_tensors
    nx, nw, nb, nA, nB = ctx.needs_input_grad[:5]
    topk = ctx.topk
    ids = _moe_view(plan, x, weight, lora_A, topk).ids
    if torch.is_grad_enabled():  # create_graph=True: differentiable formulas, on the inputs
        y = reference.moe_lora_linear(x, weight, bias, lora_A, lora_B, ctx.scale, ids, ctx.dropout_p,
                                      seed_value(seed), slot_scales, topk)
        want = [t for t, n in zip((x, weight, bias, lora_A, lora_B), (nx, nw, nb, nA, nB)) if n]
        g = iter(torch.autograd.grad(y, want, dy, create_graph=True, allow_unused=True))
        out = [next(g) if n else None for n in (nx, nw, nb, nA, nB)]
        return (*out, None, None, None, None, None, None, None)
    dx = dA = dB = None
    if nx or nA or nB:
        dx, dA, dB = moe_lora_linear_bwd(
            dy, x, weight, lora_A, lora_B, xa, ctx.scale, ctx.dropout_p, seed, plan, nx, nA, nB, ctx.impl,
            slot_scales, topk,
        )
        dx = dx if nx else None
        dA = dA if nA else None
        dB = dB if nB else None
    dW, db = _moe_base_grads(dy, x, weight, ids, nw, nb and bias is not None, topk)
    return dx, dW, db, dA, dB, None, None, None, None, None, None, None


moe_lora_linear_fwd.register_autograd(_moe_lora_backward, setup_context=_moe_lora_setup_context)
