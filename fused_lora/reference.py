"""Plain-PyTorch reference for every fused_lora op: the tests' source of truth and the CPU path.

Everything here accumulates in fp32 (fp64 for fp64 inputs), the way the kernels do, and regenerates
the LoRA-branch dropout mask from a seed with the same counter-based hash as the Triton and CUDA
kernels (``dropout_keep_mask``), so all backends drop exactly the same elements for a given seed.

Layouts follow PEFT / loralib: ``weight`` [out, in], ``lora_A`` [r, in], ``lora_B`` [out, r].
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "acc_dtype",
    "dropout_keep_mask",
    "dropout_keys",
    "dropout_threshold",
    "lora_linear",
    "lora_linear_fwd",
    "lora_linear_bwd",
    "multi_lora_linear",
    "multi_lora_linear_fwd",
    "multi_lora_linear_bwd",
    "multi_lora_linear_differentiable",
]

_M32 = 0xFFFFFFFF


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for ``dtype``: fp32 for half types and fp32, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Dropout RNG. One 32-bit hash per element, keyed by two 31-bit keys taken from a 62-bit seed.
# lowbias32 (C. Wellons' integer-hash search: bias 0.17, i.e. near-ideal avalanche) costs
# 2 multiplies + 3 xor-shifts, a fifth of Philox-4x32-10's 20 multiplies, and is trivial to
# reproduce bit-for-bit in Triton, CUDA C++ and here. An element (m, k) of an [M, K] input is
# kept when (h >> 8) >= threshold, threshold = round(p * 2^24): the keep probability is 1 - p
# to within 3e-8.
# --------------------------------------------------------------------------------------------


def dropout_keys(seed: int) -> tuple[int, int]:
    """Split a seed in [0, 2^62) into the two 31-bit hash keys the kernels take."""
    return seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF


def dropout_threshold(p: float) -> int:
    """24-bit keep threshold for drop probability ``p``: keep iff (hash >> 8) >= threshold."""
    return int(round(p * (1 << 24)))


def _hash32(x: Tensor) -> Tensor:
    # x: int64 tensor holding uint32 values. int64 products wrap mod 2^64, so their low 32 bits
    # are the uint32 product.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return x


def dropout_hash(seed: int, index: Tensor) -> Tensor:
    """The kernels' per-element hash of a flat element index (int64 tensor) -> uint32 in int64."""
    k1, k2 = dropout_keys(seed)
    lo = index & _M32
    hi = index >> 32
    h = _hash32(lo ^ k1)
    h = _hash32(h ^ ((k2 + hi * 0x9E3779B9) & _M32))
    return h


def dropout_keep_mask(seed: int, M: int, K: int, p: float, device=None) -> Tensor:
    """Boolean keep-mask [M, K] for an [M, K] row-major input (element (m, k) has index m*K + k)."""
    index = torch.arange(M * K, dtype=torch.int64, device=device).view(M, K)
    return (dropout_hash(seed, index) >> 8) >= dropout_threshold(p)


def _dropped(x2d: Tensor, dropout_p: float, seed: int, dtype: torch.dtype) -> Tensor:
    """drop(x) in ``dtype``: x * keep / (1 - p), or x itself when p == 0."""
    xf = x2d.to(dtype)
    if dropout_p == 0.0:
        return xf
    keep = dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], dropout_p, device=x2d.device)
    return torch.where(keep, xf * (1.0 / (1.0 - dropout_p)), torch.zeros((), dtype=dtype))


# --------------------------------------------------------------------------------------------
# Single adapter: y = x W0^T + b + s * (drop(x) A^T) B^T
# --------------------------------------------------------------------------------------------


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """Differentiable reference (plain autograd), any leading dims, computed in the accumulation
    dtype and cast to x's dtype. Used by the tests (in fp64 it is the ground truth)."""
    acc = acc_dtype(x.dtype)
    x2d = x.reshape(-1, x.shape[-1])
    xd = _dropped(x2d, dropout_p, seed, acc)
    y = x2d.to(acc) @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    y = y + scale * ((xd @ lora_A.to(acc).t()) @ lora_B.to(acc).t())
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """Forward kernel semantics on 2-D x [M, in]: returns (y [M, out] in x.dtype,
    xa = drop(x) A^T [M, r] in the accumulation dtype, saved for backward)."""
    acc = acc_dtype(x.dtype)
    xd = _dropped(x, dropout_p, seed, acc)
    xa = xd @ lora_A.to(acc).t()
    y = x.to(acc) @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    y = y + scale * (xa @ lora_B.to(acc).t())
    return y.to(x.dtype), xa


def lora_linear_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward kernel semantics on 2-D tensors. Returns (dx, dA, dB); a gradient that is not
    needed comes back as an empty tensor (numel 0) of the right dtype.

    dS = s dY B; dX = dY W0 + drop'(dS A); dA = dS^T drop(X); dB = s dY^T xa.
    """
    acc = acc_dtype(x.dtype)
    dyf = dy.to(acc)
    empty_x = x.new_empty(0)
    empty_w = lora_A.new_empty(0)
    ds = None
    if needs_dx or needs_dA:
        ds = scale * (dyf @ lora_B.to(acc))
    dx = empty_x
    if needs_dx:
        dxl = ds @ lora_A.to(acc)
        if dropout_p != 0.0:
            keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p, device=x.device)
            dxl = torch.where(keep, dxl * (1.0 / (1.0 - dropout_p)), torch.zeros((), dtype=acc))
        dx = (dyf @ weight.to(acc) + dxl).to(x.dtype)
    dA = empty_w
    if needs_dA:
        dA = (ds.t() @ _dropped(x, dropout_p, seed, acc)).to(lora_A.dtype)
    dB = lora_B.new_empty(0)
    if needs_dB:
        dB = (scale * (dyf.t() @ xa.to(acc))).to(lora_B.dtype)
    return dx, dA, dB


# --------------------------------------------------------------------------------------------
# Mixed adapters: y[t] = x[t] W0^T + b + scales[i] (x[t] A[i,:r_i]^T) B[i,:,:r_i]^T, i = ids[t]
# --------------------------------------------------------------------------------------------


def _rank_mask(ranks: Optional[Tensor], n_slots: int, r_max: int, device) -> Tensor:
    """[n_slots, r_max] bool: column j of slot i is live iff j < ranks[i]."""
    cols = torch.arange(r_max, device=device)
    if ranks is None:
        return torch.ones(n_slots, r_max, dtype=torch.bool, device=device)
    return cols[None, :] < ranks.to(device)[:, None]


def multi_lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scales: Tensor,
    adapter_ids: Tensor,
    ranks: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """Mixed-adapter forward on 2-D x [M, in], ids [M]. Returns (y [M, out] in x.dtype,
    xa [M, r_max] in the accumulation dtype: x A[id]^T on live columns, 0 elsewhere and on
    rows with id -1). Columns beyond a slot's rank are never read into the result (they may
    hold NaN)."""
    acc = acc_dtype(x.dtype)
    M = x.shape[0]
    n_slots, r_max = lora_A.shape[0], lora_A.shape[1]
    y = x.to(acc) @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    ids = adapter_ids.to(torch.int64)
    # Ids outside [0, n_slots) act as -1 (only reachable with validate=False; never indexed).
    active = (ids >= 0) & (ids < n_slots)
    xa = torch.zeros(M, r_max, dtype=acc, device=x.device)
    if n_slots == 0 or not bool(active.any()):
        return y.to(x.dtype), xa
    live = _rank_mask(ranks, n_slots, r_max, x.device)
    for slot in torch.unique(ids[active]).tolist():
        rows = (ids == slot).nonzero(as_tuple=True)[0]
        r = int(live[slot].sum())
        if r == 0:
            continue
        a = lora_A[slot, :r].to(acc)  # [r, in]
        b = lora_B[slot, :, :r].to(acc)  # [out, r]
        s = scales[slot].to(acc)
        xs = x[rows].to(acc) @ a.t()
        xa[rows, :r] = xs
        y[rows] = y[rows] + s * (xs @ b.t())
    return y.to(x.dtype), xa


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
) -> tuple[Tensor, Tensor, Tensor]:
    """Mixed-adapter backward. dA/dB are full [n_slots, ...] stacks, zero for slots absent from
    the batch and on columns beyond a slot's rank; an unneeded gradient is an empty tensor."""
    acc = acc_dtype(x.dtype)
    n_slots, r_max = lora_A.shape[0], lora_A.shape[1]
    dyf = dy.to(acc)
    dx = x.new_empty(0)
    dxf = dyf @ weight.to(acc) if needs_dx else None
    dA = torch.zeros(lora_A.shape, dtype=acc, device=x.device) if needs_dA else None
    dB = torch.zeros(lora_B.shape, dtype=acc, device=x.device) if needs_dB else None
    ids = adapter_ids.to(torch.int64)
    active = (ids >= 0) & (ids < n_slots)  # out-of-range ids act as -1, as in the forward
    if n_slots > 0 and bool(active.any()):
        live = _rank_mask(ranks, n_slots, r_max, x.device)
        for slot in torch.unique(ids[active]).tolist():
            rows = (ids == slot).nonzero(as_tuple=True)[0]
            r = int(live[slot].sum())
            if r == 0:
                continue
            s = scales[slot].to(acc)
            g = dyf[rows]
            ds = s * (g @ lora_B[slot, :, :r].to(acc))  # [m, r]
            if dxf is not None:
                dxf[rows] = dxf[rows] + ds @ lora_A[slot, :r].to(acc)
            if dA is not None:
                dA[slot, :r] = ds.t() @ x[rows].to(acc)
            if dB is not None:
                dB[slot, :, :r] = s * (g.t() @ xa[rows, :r].to(acc))
    if dxf is not None:
        dx = dxf.to(x.dtype)
    dA_out = dA.to(lora_A.dtype) if dA is not None else lora_A.new_empty(0)
    dB_out = dB.to(lora_B.dtype) if dB is not None else lora_B.new_empty(0)
    return dx, dA_out, dB_out


def multi_lora_linear_differentiable(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scales: Tensor,
    adapter_ids: Tensor,
    ranks: Optional[Tensor] = None,
) -> Tensor:
    """Differentiable mixed-adapter forward on 2-D x [M, in] (plain autograd, any order of
    derivatives, forward-mode AD, torch.func): one masked product per slot present. Gradients
    reach x, weight, bias, lora_A, lora_B and scales. Reads the ids on the host (eager only)."""
    acc = acc_dtype(x.dtype)
    n_slots, r_max = lora_A.shape[0], lora_A.shape[1]
    xf = x.to(acc)
    y = xf @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    ids = adapter_ids.reshape(-1).to(torch.int64)
    live = _rank_mask(ranks, n_slots, r_max, x.device).to(acc)
    for slot in torch.unique(ids[(ids >= 0) & (ids < n_slots)]).tolist():
        rows = (ids == slot).to(acc)[:, None]  # [M, 1]: this slot's tokens
        # Columns past the rank are selected away (not multiplied by 0: they may hold NaN).
        a = torch.where(live[slot][:, None] > 0, lora_A[slot].to(acc), 0.0)
        b = torch.where(live[slot][None, :] > 0, lora_B[slot].to(acc), 0.0)
        y = y + rows * (scales[slot].to(acc) * ((xf @ a.t()) @ b.t()))
    return y.to(x.dtype)


def multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scales: Tensor,
    adapter_ids: Tensor,
    ranks: Optional[Tensor] = None,
) -> Tensor:
    """Differentiable per-token reference (any leading dims): a loop over tokens in the
    accumulation dtype. Slow; for tests only."""
    acc = acc_dtype(x.dtype)
    x2d = x.reshape(-1, x.shape[-1])
    ids = adapter_ids.reshape(-1).to(torch.int64)
    rows = []
    for t in range(x2d.shape[0]):
        xt = x2d[t].to(acc)
        yt = xt @ weight.to(acc).t()
        if bias is not None:
            yt = yt + bias.to(acc)
        i = int(ids[t])
        if 0 <= i < lora_A.shape[0]:  # out-of-range ids act as -1
            r = lora_A.shape[1] if ranks is None else min(int(ranks[i]), lora_A.shape[1])
            if r > 0:
                yt = yt + scales[i].to(acc) * (
                    (xt @ lora_A[i, :r].to(acc).t()) @ lora_B[i, :, :r].to(acc).t()
                )
        rows.append(yt)
    y = torch.stack(rows) if rows else x2d.new_zeros(0, weight.shape[0], dtype=acc)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------------------------
# Mixture of experts: y[m] = x[m] W[e]^T + b[e] + s (drop(x[m]) A[e]^T) B[e]^T, e = expert_ids[m]
# (W [E, out, in], b [E, out], A [E, r, in], B [E, out, r]); rows with an id outside [0, E) belong
# to no expert: their y / dx rows are 0 (reachable only with an unvalidated plan).
#
# Adapter banks (A [S, E, r, in], B [S, E, out, r]): an adapter x expert pair is one virtual
# expert, id v = (a + 1) * E + e; ids v in [0, E) are expert v without adapter (base only, the
# same numbers as a batch without adapters). slot_scales [S] multiplies s per adapter.
# topk > 1: x holds one row per token and row m reads x[m // topk] (the op's M = T * topk rows);
# dx sums the topk rows of each token.
# --------------------------------------------------------------------------------------------


def _moe_experts(ids: Tensor, n_experts: int) -> list[int]:
    """The ids in [0, n_experts) present in ``ids`` (one host sync; the reference is the eager CPU
    path)."""
    ids = ids.to(torch.int64)
    return torch.unique(ids[(ids >= 0) & (ids < n_experts)]).tolist()


def _moe_banks(weight: Tensor, lora_A: Tensor, lora_B: Tensor):
    """(A [L, r, in], B [L, out, r], offset): the adapters as a flat list of L virtual experts,
    virtual id v using adapter v - offset (offset 0 with one adapter, E with banks)."""
    E = weight.shape[0]
    if lora_A.dim() == 4:
        return lora_A.reshape(-1, *lora_A.shape[2:]), lora_B.reshape(-1, *lora_B.shape[2:]), E
    return lora_A, lora_B, 0


def _moe_rows(expert_ids: Tensor, weight: Tensor, n_lora: int, off: int):
    """(ids [M] with out-of-range ids as -1, base expert of each row or -1)."""
    E = weight.shape[0]
    ids = expert_ids.reshape(-1).to(torch.int64)
    ids = torch.where((ids >= 0) & (ids < off + n_lora), ids, -1)
    return ids, torch.where(ids >= 0, ids % E, -1)


def _moe_scale(scale, slot_scales: Optional[Tensor], lora: int, E: int, acc: torch.dtype):
    if slot_scales is None:
        return scale
    return scale * slot_scales[lora // E].to(acc)


def _gather(x: Tensor, topk: int) -> Tensor:
    """x's rows as the op's M = T * topk rows (row m = x[m // topk])."""
    return x if topk == 1 else x.repeat_interleave(topk, dim=0)


def _sum_topk(d: Tensor, topk: int) -> Tensor:
    return d if topk == 1 else d.reshape(-1, topk, d.shape[-1]).sum(1)


def moe_lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    expert_ids: Tensor,
    slot_scales: Optional[Tensor] = None,
    topk: int = 1,
) -> tuple[Tensor, Tensor]:
    """MoE forward on 2-D x [T, in], ids [M = T * topk]: a loop over the experts present (base
    GEMM per expert, then the LoRA term per adapter x expert), accumulating in fp32 (fp64 for
    fp64 x). Returns (y [M, out] in x's dtype, xa = drop(x) A[v]^T [M, r] in the accumulation
    dtype, 0 on rows without adapter; backward needs it)."""
    acc = acc_dtype(x.dtype)
    A, B, off = _moe_banks(weight, lora_A, lora_B)
    E, N = weight.shape[0], weight.shape[1]
    ids, base = _moe_rows(expert_ids, weight, A.shape[0], off)
    M = ids.numel()
    xl = _gather(x, topk)
    y = torch.zeros(M, N, dtype=acc, device=x.device)
    xa = torch.zeros(M, A.shape[1], dtype=acc, device=x.device)
    for e in _moe_experts(base, E):
        rows = (base == e).nonzero(as_tuple=True)[0]
        ye = xl[rows].to(acc) @ weight[e].to(acc).t()
        if bias is not None:
            ye = ye + bias[e].to(acc)
        y[rows] = ye
    if any(v >= off for v in _moe_experts(ids, off + A.shape[0])):
        xd = _dropped(xl, dropout_p, seed, acc)
        for v in _moe_experts(ids, off + A.shape[0]):
            if v < off:
                continue
            rows = (ids == v).nonzero(as_tuple=True)[0]
            lv = v - off
            xs = xd[rows] @ A[lv].to(acc).t()
            xa[rows] = xs
            y[rows] = y[rows] + _moe_scale(scale, slot_scales, lv, E, acc) * (xs @ B[lv].to(acc).t())
    return y.to(x.dtype), xa


def moe_lora_linear_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    expert_ids: Tensor,
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
    slot_scales: Optional[Tensor] = None,
    topk: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """MoE backward: (dx [T, in], dA, dB in lora_A / lora_B's shapes); adapters x experts
    without rows get exact zeros, a gradient not asked for is an empty tensor.

    ds = s dy B[v]; dx = dy W[e] + drop'(ds A[v]) (summed over each token's topk rows);
    dA[v] = ds^T drop(x); dB[v] = s dy^T xa."""
    acc = acc_dtype(x.dtype)
    A, B, off = _moe_banks(weight, lora_A, lora_B)
    E = weight.shape[0]
    ids, base = _moe_rows(expert_ids, weight, A.shape[0], off)
    M = ids.numel()
    xl = _gather(x, topk)
    dyf = dy.to(acc)
    dxf = torch.zeros(M, x.shape[1], dtype=acc, device=x.device) if needs_dx else None
    dA = torch.zeros(A.shape, dtype=acc, device=x.device) if needs_dA else None
    dB = torch.zeros(B.shape, dtype=acc, device=x.device) if needs_dB else None
    keep = None
    if dropout_p != 0.0 and needs_dx:
        keep = dropout_keep_mask(seed, M, x.shape[1], dropout_p, device=x.device)
    xd = _dropped(xl, dropout_p, seed, acc) if needs_dA else None
    if dxf is not None:
        for e in _moe_experts(base, E):
            rows = (base == e).nonzero(as_tuple=True)[0]
            dxf[rows] = dyf[rows] @ weight[e].to(acc)
    for v in _moe_experts(ids, off + A.shape[0]):
        if v < off:
            continue
        lv = v - off
        s = _moe_scale(scale, slot_scales, lv, E, acc)
        rows = (ids == v).nonzero(as_tuple=True)[0]
        g = dyf[rows]
        ds = s * (g @ B[lv].to(acc))
        if dxf is not None:
            dxl = ds @ A[lv].to(acc)
            if keep is not None:
                dxl = torch.where(keep[rows], dxl * (1.0 / (1.0 - dropout_p)), torch.zeros((), dtype=acc))
            dxf[rows] = dxf[rows] + dxl
        if dA is not None:
            dA[lv] = ds.t() @ xd[rows]
        if dB is not None:
            dB[lv] = s * (g.t() @ xa[rows].to(acc))
    dx = _sum_topk(dxf, topk).to(x.dtype) if dxf is not None else x.new_empty(0)
    dA_out = dA.reshape(lora_A.shape).to(lora_A.dtype) if dA is not None else lora_A.new_empty(0)
    dB_out = dB.reshape(lora_B.shape).to(lora_B.dtype) if dB is not None else lora_B.new_empty(0)
    return dx, dA_out, dB_out


def moe_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale,
    expert_ids: Tensor,
    dropout_p: float = 0.0,
    seed: int = 0,
    slot_scales: Optional[Tensor] = None,
    topk: int = 1,
) -> Tensor:
    """Differentiable MoE reference on 2-D x [T, in] (plain autograd: double backward, forward
    AD, a scale tensor's gradient; gradients reach every floating input). Reads the ids on the
    host (eager only). Returns [M = T * topk, out]."""
    acc = acc_dtype(x.dtype)
    A, B, off = _moe_banks(weight, lora_A, lora_B)
    ids, base = _moe_rows(expert_ids, weight, A.shape[0], off)
    E, N = weight.shape[0], weight.shape[1]
    xl = _gather(x, topk)
    xf = xl.to(acc)
    xd = _dropped(xl, dropout_p, seed, acc)
    y = torch.zeros(xl.shape[0], N, dtype=acc, device=x.device)
    for e in _moe_experts(base, E):
        rows = (base == e).to(acc)[:, None]  # [M, 1]: this expert's rows
        ye = xf @ weight[e].to(acc).t()
        if bias is not None:
            ye = ye + bias[e].to(acc)
        y = y + rows * ye
    for v in _moe_experts(ids, off + A.shape[0]):
        if v < off:
            continue
        lv = v - off
        rows = (ids == v).to(acc)[:, None]
        s = _moe_scale(scale, slot_scales, lv, E, acc)
        y = y + rows * (s * ((xd @ A[lv].to(acc).t()) @ B[lv].to(acc).t()))
    return y.to(x.dtype)
