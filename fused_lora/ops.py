"""Every fused_lora op's schema, in one place: torch custom ops with fake (meta) impls and
autograd, so eager, ``torch.compile(fullgraph=True)`` and CUDA graphs all see the same ops.

Each op takes a resolved ``backend`` string ("torch", "triton" or "cuda"; see
:mod:`fused_lora.dispatch`) and runs that backend's kernel for the tensors' device:

=============================  ==========================  ==============================
op                             Triton kernel (kernels/)    CUDA kernel (csrc/)
=============================  ==========================  ==============================
fused_lora::lora_linear_fwd    _lora_shrink_kernel +       lora_linear_fwd
                               _lora_fwd_kernel
fused_lora::lora_linear_bwd    _lora_bwd_ds_kernel +       lora_linear_bwd
                               _lora_bwd_kernel
fused_lora::multi_lora_        _mlora_bgmv_shrink_kernel   multi_lora_linear_fwd
linear_fwd                     or _mlora_sgmv_shrink_kernel
                               + _mlora_fwd_kernel
fused_lora::multi_lora_        shrink kernel (ds) +        multi_lora_linear_bwd
linear_bwd                     _mlora_fwd_kernel (dx) +
                               _mlora_bwd_weight_kernel
=============================  ==========================  ==============================

References: :func:`fused_lora.reference.lora_linear_fwd` / ``lora_linear_bwd``.
Tests: ``tests/test_lora_linear.py`` (kernels), ``tests/test_ops.py`` (opcheck, compile).
Multi-adapter ops (kernels/multi_lora.py): references ``multi_lora_linear_fwd`` / ``_bwd`` in
:mod:`fused_lora.reference`; tests ``tests/test_multi_lora.py``.

Ops take 2-D activations; :mod:`fused_lora.functional` validates arguments, flattens leading
dims, resolves the backend and draws the dropout seed. The seed is a CPU int64 scalar tensor
(or None when dropout is off) so that drawing it is a traced RNG op under torch.compile and is
replayed by activation checkpointing (it comes from torch's CPU generator).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_lora import dispatch
from fused_lora.reference import acc_dtype

__all__ = ["lora_linear_fwd", "lora_linear_bwd", "multi_lora_linear_fwd", "multi_lora_linear_bwd"]

_DEVICES = ("cpu", "cuda")


def seed_value(seed: Optional[Tensor]) -> int:
    """The int seed carried by a CPU int64 scalar tensor (0 when dropout is off)."""
    return 0 if seed is None else int(seed.item())


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
    backend: str,
) -> tuple[Tensor, Tensor]:
    """y = x W0^T + b + scale * (drop(x) A^T) B^T on x [M, in].

    Returns (y [M, out] in x.dtype, xa = drop(x) A^T [M, r] in fp32 (fp64 for fp64 x), which
    backward needs; x's dropout mask is never stored, backward regenerates it from the seed)."""
    impl = dispatch.module(backend)
    return impl.lora_linear_fwd(
        x, weight, bias, lora_A, lora_B, scale, dropout_p, seed_value(seed)
    )


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, backend):
    M = x.shape[0]
    y = x.new_empty(M, weight.shape[0])
    xa = x.new_empty(M, lora_A.shape[0], dtype=acc_dtype(x.dtype))
    return y, xa


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
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) for lora_linear_fwd; a gradient not asked for is an empty tensor."""
    impl = dispatch.module(backend)
    return impl.lora_linear_bwd(
        dy, x, weight, lora_A, lora_B, xa, scale, dropout_p, seed_value(seed),
        needs_dx, needs_dA, needs_dB,
    )


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, scale, dropout_p, seed, needs_dx, needs_dA, needs_dB,
      backend):
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    dA = lora_A.new_empty(lora_A.shape) if needs_dA else lora_A.new_empty(0)
    dB = lora_B.new_empty(lora_B.shape) if needs_dB else lora_B.new_empty(0)
    return dx, dA, dB


def _base_grads(dy: Tensor, x: Tensor, weight: Tensor, need_dw: bool, need_db: bool
                ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of the base weight and bias. They are frozen in LoRA; if a caller does train
    them, these are the plain linear gradients (unfused: this is never the hot path)."""
    acc = acc_dtype(x.dtype)
    dW = (dy.to(acc).t() @ x.to(acc)).to(weight.dtype) if need_dw else None
    db = dy.to(acc).sum(0).to(dy.dtype) if need_db else None
    return dW, db


def _lora_linear_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, backend = inputs
    _, xa = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
    ctx.has_bias = bias is not None


def _lora_linear_backward(ctx, dy, _dxa):
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    nx, nw, nb, nA, nB = ctx.needs_input_grad[:5]
    dx = dA = dB = None
    if nx or nA or nB:
        dx, dA, dB = lora_linear_bwd(
            dy, x, weight, lora_A, lora_B, xa, ctx.scale, ctx.dropout_p, seed,
            nx, nA, nB, ctx.backend,
        )
        dx = dx if nx else None
        dA = dA if nA else None
        dB = dB if nB else None
    dW, db = _base_grads(dy, x, weight, nw, nb and ctx.has_bias)
    return dx, dW, db, dA, dB, None, None, None, None


lora_linear_fwd.register_autograd(
    _lora_linear_backward, setup_context=_lora_linear_setup_context
)


# --------------------------------------------------------------------------------------------
# fused_lora::multi_lora_linear_fwd / multi_lora_linear_bwd -- mixed adapters, one per token
# --------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "fused_lora::multi_lora_linear_fwd", mutates_args=(), device_types=_DEVICES
)
def multi_lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scales: Tensor,
    adapter_ids: Tensor,
    ranks: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor]:
    """y[t] = x[t] W0^T + b + scales[i] (x[t] A[i, :r_i]^T) B[i, :, :r_i]^T, i = adapter_ids[t]
    (int64 [M]; -1: base only; any other id outside [0, S) also acts as -1) on x [M, in],
    lora_A [S, R, in], lora_B [S, out, R], scales float32 [S], ranks None (every slot has R) or
    int64 [S] (clamped to [0, R]; columns past a slot's rank are never read).

    Returns (y [M, out] in x.dtype, xa [M, R] fp32 (fp64 for fp64 x): x A[i]^T on live columns,
    0 past a slot's rank and on rows without an adapter; backward needs it)."""
    impl = dispatch.module(backend)
    return impl.multi_lora_linear_fwd(x, weight, bias, lora_A, lora_B, scales, adapter_ids, ranks)


@multi_lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scales, adapter_ids, ranks, backend):
    M = x.shape[0]
    y = x.new_empty(M, weight.shape[0])
    xa = x.new_empty(M, lora_A.shape[1], dtype=acc_dtype(x.dtype))
    return y, xa


@torch.library.custom_op(
    "fused_lora::multi_lora_linear_bwd", mutates_args=(), device_types=_DEVICES
)
def multi_lora_linear_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scales: Tensor,
    adapter_ids: Tensor,
    ranks: Optional[Tensor],
    xa: Tensor,
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) for multi_lora_linear_fwd: dA / dB are full [S, ...] stacks, exactly zero
    for slots absent from the batch and past each slot's rank; a gradient not asked for is an
    empty tensor."""
    impl = dispatch.module(backend)
    return impl.multi_lora_linear_bwd(
        dy, x, weight, lora_A, lora_B, scales, adapter_ids, ranks, xa, needs_dx, needs_dA, needs_dB,
    )


@multi_lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, scales, adapter_ids, ranks, xa, needs_dx, needs_dA, needs_dB,
      backend):
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    dA = lora_A.new_empty(lora_A.shape) if needs_dA else lora_A.new_empty(0)
    dB = lora_B.new_empty(lora_B.shape) if needs_dB else lora_B.new_empty(0)
    return dx, dA, dB


def _multi_lora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scales, adapter_ids, ranks, backend = inputs
    _, xa = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, scales, adapter_ids, ranks, xa)
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _multi_lora_backward(ctx, dy, _dxa):
    x, weight, lora_A, lora_B, scales, adapter_ids, ranks, xa = ctx.saved_tensors
    nx, nw, nb, nA, nB = ctx.needs_input_grad[:5]
    dx = dA = dB = None
    if nx or nA or nB:
        dx, dA, dB = multi_lora_linear_bwd(
            dy, x, weight, lora_A, lora_B, scales, adapter_ids, ranks, xa, nx, nA, nB, ctx.backend,
        )
        dx = dx if nx else None
        dA = dA if nA else None
        dB = dB if nB else None
    dW, db = _base_grads(dy, x, weight, nw, nb and ctx.has_bias)
    # Scales are not trained (per-adapter alpha / r constants); ids and ranks are integers.
    return dx, dW, db, dA, dB, None, None, None, None


multi_lora_linear_fwd.register_autograd(
    _multi_lora_backward, setup_context=_multi_lora_setup_context
)
