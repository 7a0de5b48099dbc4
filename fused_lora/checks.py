"""The argument checks every op relies on: shapes, dtypes and devices, with messages naming the
argument. Cheap (no host sync: they read shapes, never values), run by each op's real and fake
impl, so a direct ``torch.ops.fused_lora.*`` call with inconsistent shapes raises instead of
reading out of bounds, and torch.compile checks them once at trace time."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["check_tensor", "check_lora_shapes", "check_multi_shapes", "FLOATS"]

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: object, ndim: Optional[int] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _same_device(x: Tensor, tensors: dict[str, Optional[Tensor]]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all must share a device")


def _check_dtypes(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor) -> None:
    """weight/bias in x's dtype; adapters in x's dtype or fp32 (PEFT keeps adapters in fp32)."""
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype ({weight.dtype}) must match x dtype ({x.dtype})")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias dtype ({bias.dtype}) must match x dtype ({x.dtype})")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B dtype ({lora_B.dtype}) must match lora_A dtype ({lora_A.dtype})")
    if lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"lora_A/lora_B dtype ({lora_A.dtype}) must be x's dtype ({x.dtype}) or float32")


def _check_x_weight(x: Tensor, weight: Tensor, x_ndim: Optional[int]) -> tuple[int, int]:
    check_tensor("x", x, x_ndim)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., in_features], got a 0-d tensor")
    check_tensor("weight", weight, 2)
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(
            f"x's last dim ({x.shape[-1]}) must equal weight's in_features (weight is {tuple(weight.shape)})"
        )
    return out_f, in_f


def _check_bias(bias: Optional[Tensor], out_f: int) -> None:
    if bias is not None:
        check_tensor("bias", bias, 1)
        if bias.shape[0] != out_f:
            raise ValueError(f"bias must be [out_features={out_f}], got {tuple(bias.shape)}")


def _check_grads_io(x: Tensor, out_f: int, r: int, dy: Optional[Tensor], xa: Optional[Tensor]) -> None:
    M = x.shape[0]
    if dy is not None and tuple(dy.shape) != (M, out_f):
        raise ValueError(f"dy must be [M={M}, out_features={out_f}], got {tuple(dy.shape)}")
    if xa is not None and tuple(xa.shape) != (M, r):
        raise ValueError(f"xa must be [M={M}, r={r}], got {tuple(xa.shape)}")
    _same_device(x, {"dy": dy, "xa": xa})


def check_lora_shapes(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                      *, dy: Optional[Tensor] = None, xa: Optional[Tensor] = None,
                      x_ndim: Optional[int] = 2) -> None:
    """Single adapter: x [M, in] (any leading dims with x_ndim=None), weight [out, in], bias [out],
    lora_A [r, in], lora_B [out, r]; backward's dy [M, out] and xa [M, r]."""
    out_f, in_f = _check_x_weight(x, weight, x_ndim)
    check_tensor("lora_A", lora_A, 2)
    check_tensor("lora_B", lora_B, 2)
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"rank r must be >= 1, got lora_A of shape {tuple(lora_A.shape)}")
    if lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A must be [r, in_features={in_f}], got {tuple(lora_A.shape)}")
    if lora_B.shape[1] != r:
        raise ValueError(
            f"lora_B's rank ({lora_B.shape[1]}) must match lora_A's rank ({r}); lora_B must be [out, r]"
        )
    if lora_B.shape[0] != out_f:
        raise ValueError(f"lora_B must be [out_features={out_f}, r], got {tuple(lora_B.shape)}")
    _check_bias(bias, out_f)
    _same_device(x, {"weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B})
    _check_dtypes(x, weight, bias, lora_A, lora_B)
    _check_grads_io(x, out_f, r, dy, xa)


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def check_multi_shapes(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                       scales: Tensor, ranks: Optional[Tensor], plan: Optional[Tensor], *,
                       dy: Optional[Tensor] = None, xa: Optional[Tensor] = None,
                       x_ndim: Optional[int] = 2) -> None:
    """Mixed adapters: lora_A [S, R, in], lora_B [S, out, R], scales [S] floating, ranks [S]
    integer or None, plan a routing-plan tensor for x's rows over S slots (None: not checked)."""
    out_f, in_f = _check_x_weight(x, weight, x_ndim)
    check_tensor("lora_A", lora_A, 3)
    check_tensor("lora_B", lora_B, 3)
    n_slots, r_max = lora_A.shape[0], lora_A.shape[1]
    if n_slots < 1:
        raise ValueError(
            f"lora_A must hold at least one slot [n_slots, r_max, in], got {tuple(lora_A.shape)}"
        )
    if r_max < 1:
        raise ValueError(f"max rank r_max must be >= 1, got lora_A of shape {tuple(lora_A.shape)}")
    if lora_A.shape[2] != in_f:
        raise ValueError(f"lora_A must be [n_slots, r_max, in_features={in_f}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (n_slots, out_f, r_max):
        raise ValueError(
            f"lora_B must be [n_slots={n_slots}, out_features={out_f}, r_max={r_max}], "
            f"got {tuple(lora_B.shape)}"
        )
    _check_bias(bias, out_f)
    if not isinstance(scales, Tensor):
        raise TypeError(f"scales must be a torch.Tensor [n_slots], got {type(scales).__name__}")
    if not scales.is_floating_point():
        raise TypeError(f"scales must be a floating tensor (float32), got {scales.dtype}")
    if tuple(scales.shape) != (n_slots,):
        raise ValueError(f"scales must be [n_slots={n_slots}], got {tuple(scales.shape)}")
    if ranks is not None:
        if not isinstance(ranks, Tensor):
            raise TypeError(f"ranks must be a torch.Tensor [n_slots] or None, got {type(ranks).__name__}")
        if ranks.dtype not in _INT_DTYPES:
            raise TypeError(f"ranks must be an integer tensor, got {ranks.dtype}")
        if tuple(ranks.shape) != (n_slots,):
            raise ValueError(f"ranks must be [n_slots={n_slots}], got {tuple(ranks.shape)}")
    if plan is not None:
        from fused_lora.routing import sizes

        S, T = sizes(x.shape[0], n_slots)
        n = 3 * x.shape[0] + 3 * S + 3 * T
        if plan.dtype != torch.int64 or plan.dim() != 1 or plan.shape[0] != n or plan.stride(0) != 1:
            raise ValueError(
                f"plan must be the int64 data of a RoutingPlan for M={x.shape[0]} tokens over "
                f"n_slots={n_slots} ({n} contiguous elements), got {plan.dtype} of shape "
                f"{tuple(plan.shape)}, stride {tuple(plan.stride())}"
            )
    _same_device(x, {"weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B,
                     "scales": scales, "ranks": ranks, "plan": plan})
    _check_dtypes(x, weight, bias, lora_A, lora_B)
    _check_grads_io(x, out_f, r_max, dy, xa)


def moe_n_virtual(weight: Tensor, lora_A: Tensor) -> int:
    """Ids a MoE routing plan is built over: E experts (lora_A [E, r, in]), or (S + 1) * E virtual
    experts with an adapter bank (lora_A [S, E, r, in]): id (a + 1) * E + e is adapter a on
    expert e, ids [0, E) are expert e without adapter (base only)."""
    E = weight.shape[0]
    return E if lora_A.dim() == 3 else (lora_A.shape[0] + 1) * E


def check_moe_shapes(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                     plan: Optional[Tensor], *, dy: Optional[Tensor] = None, xa: Optional[Tensor] = None,
                     x_ndim: Optional[int] = 2, slot_scales: Optional[Tensor] = None, topk: int = 1) -> None:
    """Mixture of experts: x [T, in] (any leading dims with x_ndim=None), weight [E, out, in]
    (any strides: a transposed view of an [E, in, out] tensor is read in place), bias [E, out],
    lora_A [E, r, in] and lora_B [E, out, r], or adapter banks lora_A [S, E, r, in] and
    lora_B [S, E, out, r] with slot_scales None or float32 [S]; topk >= 1 rows per row of x (row
    m of the op reads x[m // topk]: M = T * topk rows); plan a routing-plan tensor for the M
    rows over :func:`moe_n_virtual` ids (None: not checked); backward's dy [M, out], xa [M, r]."""
    check_tensor("x", x, x_ndim)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., in_features], got a 0-d tensor")
    check_tensor("weight", weight, 3)
    E, out_f, in_f = weight.shape
    if E < 1:
        raise ValueError(f"weight must hold at least one expert [E, out, in], got {tuple(weight.shape)}")
    if x.shape[-1] != in_f:
        raise ValueError(
            f"x's last dim ({x.shape[-1]}) must equal weight's in_features (weight is [E, out, in] = "
            f"{tuple(weight.shape)})"
        )
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")
    check_tensor("lora_A", lora_A)
    check_tensor("lora_B", lora_B)
    if lora_A.dim() == 4:  # adapter banks: [S, E, r, in], [S, E, out, r]
        S = lora_A.shape[0]
        if S < 1 or lora_A.shape[1] != E or lora_A.shape[3] != in_f:
            raise ValueError(f"lora_A must be [S, E={E}, r, in_features={in_f}] (a bank of S >= 1 adapters), "
                             f"got {tuple(lora_A.shape)}")
        r = lora_A.shape[2]
        want_b = (S, E, out_f, r)
    elif lora_A.dim() == 3:
        if lora_A.shape[0] != E or lora_A.shape[2] != in_f:
            raise ValueError(f"lora_A must be [E={E}, r, in_features={in_f}], got {tuple(lora_A.shape)}")
        r = lora_A.shape[1]
        want_b = (E, out_f, r)
    else:
        raise ValueError(f"lora_A must be [E, r, in] (one adapter) or [S, E, r, in] (a bank of S adapters), "
                         f"got a {lora_A.dim()}-D tensor of shape {tuple(lora_A.shape)}")
    if r < 1:
        raise ValueError(f"rank r must be >= 1, got lora_A of shape {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != want_b:
        dims = "S={}, E={}, out_features={}, r={}" if len(want_b) == 4 else "E={}, out_features={}, r={}"
        raise ValueError(f"lora_B must be [{dims.format(*want_b)}], got {tuple(lora_B.shape)}")
    if slot_scales is not None:
        if lora_A.dim() != 4:
            raise ValueError("slot_scales (one scale per adapter) needs adapter banks lora_A [S, E, r, in]")
        check_tensor("slot_scales", slot_scales, 1)
        if slot_scales.shape[0] != lora_A.shape[0] or slot_scales.dtype != torch.float32:
            raise ValueError(f"slot_scales must be float32 [S={lora_A.shape[0]}], got {slot_scales.dtype} of "
                             f"shape {tuple(slot_scales.shape)}")
    if bias is not None:
        check_tensor("bias", bias, 2)
        if tuple(bias.shape) != (E, out_f):
            raise ValueError(f"bias must be [E={E}, out_features={out_f}], got {tuple(bias.shape)}")
    M = x.shape[0] * topk
    if plan is not None:
        from fused_lora.routing import sizes

        nv = moe_n_virtual(weight, lora_A)
        S_, T_ = sizes(M, nv)
        n = 3 * M + 3 * S_ + 3 * T_
        if plan.dtype != torch.int64 or plan.dim() != 1 or plan.shape[0] != n or plan.stride(0) != 1:
            raise ValueError(
                f"plan must be the int64 data of a RoutingPlan for M={M} rows over "
                f"{nv} expert ids ({n} contiguous elements), got {plan.dtype} of shape "
                f"{tuple(plan.shape)}, stride {tuple(plan.stride())}"
            )
    _same_device(x, {"weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B, "plan": plan,
                     "slot_scales": slot_scales})
    _check_dtypes(x, weight, bias, lora_A, lora_B)
    if dy is not None and tuple(dy.shape) != (M, out_f):
        raise ValueError(f"dy must be [M={M}, out_features={out_f}], got {tuple(dy.shape)}")
    if xa is not None and tuple(xa.shape) != (M, r):
        raise ValueError(f"xa must be [M={M}, r={r}], got {tuple(xa.shape)}")
    _same_device(x, {"dy": dy, "xa": xa})
