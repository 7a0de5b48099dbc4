"""Triton kernels for LoRA on mixture-of-experts layers: every row m uses its expert e = ids[m].

Math (W = weight [E, N, K], b = bias [E, N], A = lora_A [E, r, K], B = lora_B [E, N, r],
s = scale, x [M, K], drop() the LoRA branch's dropout, drop'() its mask on a gradient):

    forward   xa[m] = drop(x[m]) A[e]^T                        grouped shrink  (fp32 [M, r])
              y[m]  = x[m] W[e]^T + b[e] + s xa[m] B[e]^T       grouped GEMM, expand first
    backward  ds[m] = s dy[m] B[e]                              grouped shrink of dy against B
              dx[m] = dy[m] W[e] + drop'(ds[m] A[e])            grouped GEMM (W^T, A^T by strides)
              dA[e] = sum_{m: ids[m]=e} ds[m]^T drop(x[m])      per-expert weight grads
              dB[e] = s sum_{m: ids[m]=e} dy[m]^T xa[m]          (deterministic, no atomics)

Rows are grouped by expert on the device by the batch's routing plan (fused_lora.routing: a
stable sort, segments and a BLOCK_M-row tile table; no host sync), built once per MoE layer and
shared by both projections and the backward. Every tile holds the rows of one expert, so the
shrink, the expand and the base GEMM are tensor-core dots against that expert's matrices; the
grid is the plan's tile bound cdiv(M, BM) + min(E + 1, M), and idle tiles exit at once. The
delta weight W[e] + s B[e] A[e] is never formed: the expand is the accumulator's first step.

This differs from kernels/multi_lora.py's segmented kernels in three ways, which is why these
are separate kernels rather than calls into that file: the base weight and bias are indexed by
the tile's expert, the LoRA branch has dropout (the counter-based hash of kernels/lora_linear.py,
element (m, k) of x keyed by its original row m, so every backend drops the same elements), and
one scalar scale and one rank serve every expert.

Rows whose id is outside [0, E) (only reachable with an unvalidated plan) belong to no expert:
their y / dx rows are exact zeros and they add nothing to dA / dB.

The grouped GEMM is autotuned over N / K tiles and warps (64 x 64 up to 64 x 256 output tiles,
the plan's 64 rows each); the shrink and weight-gradient kernels keep the Triton matmul
tutorial's 64 x 64 x 64 shape (16 x 32 x 32 under the interpreter so that small CPU tests span
several tiles). No configuration has been timed on a GPU yet.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_lora.kernels.lora_linear import (
    INTERPRET,
    _block_r,
    _dropout_args,
    _fp32_precision,
    _grouped_pid,
    _keep_mask,
    _lora_dot,
    lora_precision,
)
from fused_lora.routing import BLOCK_M as ROUTING_BLOCK_M
from fused_lora.routing import RoutingView

__all__ = ["moe_lora_linear_fwd", "moe_lora_linear_bwd"]

# Rows per tile: the plan's tile table is cut at fused_lora.routing.BLOCK_M.
_BLOCK_M = ROUTING_BLOCK_M
_BLOCK_N = 32 if INTERPRET else 64
_BLOCK_K = 32 if INTERPRET else 64
_GROUP_M = 4 if INTERPRET else 8
_NUM_WARPS = 4
_NUM_STAGES = 1 if INTERPRET else 3


# --------------------------------------------------------------------------------------------
# Grouped shrink: out[m, r] = c * sum_k drop(in)[m, k] P[e, r, k]   (P = A for xa; B^T for ds)
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["scale", "key1", "key2", "drop_thresh"])
def _moe_shrink_kernel(
    in_ptr, p_ptr, perm_ptr, tile_row0_ptr, tile_row1_ptr, tile_slot_ptr, out_ptr, ss_ptr,
    K, R, N_VIRT, N_BASE, LORA_OFF, X_DIV,
    stride_im, stride_ik, stride_pe, stride_pr, stride_pk, stride_om, stride_or,
    scale, key1, key2, drop_thresh,
    HAS_DROPOUT: tl.constexpr, HAS_SS: tl.constexpr, P_FP32: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (max tiles, cdiv(R, BLOCK_R)): tile j holds sorted positions [row0, row1) of one
    (virtual) expert v; program (j, c) computes rank chunk c of those rows with adapter
    v - LORA_OFF (scaled by ss[(v - LORA_OFF) // N_BASE] with HAS_SS) and scatters it to
    out[perm[rows]]; input row m is in[m // X_DIV]. Tiles without adapter (v < LORA_OFF), of no
    expert and idle tiles write nothing (the launcher zero-fills out)."""
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    row0 = tl.load(tile_row0_ptr + pid_t)
    row1 = tl.load(tile_row1_ptr + pid_t)
    slot = tl.load(tile_slot_ptr + pid_t)
    if (slot >= LORA_OFF) & (slot < N_VIRT):
        lora = slot - LORA_OFF
        offs_p = row0 + tl.arange(0, BLOCK_M)
        mask_m = offs_p < row1
        tok = tl.load(perm_ptr + offs_p, mask=mask_m, other=0)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        p_slot = p_ptr + lora.to(tl.int64) * stride_pe
        in_rows = in_ptr + (tok // X_DIV)[:, None].to(tl.int64) * stride_im
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(in_rows + offs_k[None, :] * stride_ik,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if HAS_DROPOUT:  # keyed by the original row: the mask of x [M, K] in row order
                keep = _keep_mask(tok, offs_k, K, key1, key2, drop_thresh)
                x = tl.where(keep, x, 0.0)
            p = tl.load(p_slot + offs_k[:, None] * stride_pk + offs_r[None, :] * stride_pr,  # P^T
                        mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if P_FP32:
                acc = _lora_dot(x, p, acc, LORA_PRECISION)
            else:
                acc = tl.dot(x, p.to(x.dtype), acc)
        if HAS_SS:
            acc = acc * (scale * tl.load(ss_ptr + lora // N_BASE))
        else:
            acc = acc * scale
        tl.store(out_ptr + tok[:, None].to(tl.int64) * stride_om + offs_r[None, :] * stride_or,
                 acc, mask=mask_m[:, None] & mask_r[None, :])


# --------------------------------------------------------------------------------------------
# Grouped GEMM + expand: y[m, n] = sum_k x[m, k] W[e, n, k] (+ b[e, n]) + drop'(c s[m] . Q[e, n, :])
# (forward: W, Q = B, s = xa, c = scale; backward dx: W^T, Q = A^T, s = ds, c = 1/(1-p), mask)
# --------------------------------------------------------------------------------------------


@triton.jit
def _moe_expand(acc, s_ptr, q_ptr, ss_ptr, rows64, offs_n, mask_m, mask_n, slot, R, N_BASE, LORA_OFF,
                stride_sm, stride_sr, stride_qe, stride_qn, stride_qr, lora_scale,
                HAS_SS: tl.constexpr, LORA_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    # acc + (s * ss) xa[rows] Q[l]^T of adapter l = slot - LORA_OFF
    lora = slot - LORA_OFF
    sc = lora_scale
    if HAS_SS:
        sc = lora_scale * tl.load(ss_ptr + lora // N_BASE)
    q_slot = q_ptr + lora.to(tl.int64) * stride_qe
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        s = tl.load(s_ptr + rows64[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0) * sc
        q = tl.load(q_slot + offs_r[:, None] * stride_qr + offs_n[None, :] * stride_qn,  # Q^T
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = _lora_dot(s, q, acc, LORA_PRECISION)
    return acc


def _moe_gemm_configs():
    # The rows of a tile are the plan's 64 (one wgmma M); N / K / warps are tuned: 64 x 64 x 64
    # (the tutorial's shape), wider N tiles for wide projections (Qwen3-30B-A3B gate_up: N = 1536),
    # all without spills and with every wgmma chain unbroken (kernel audit, case moe-qwen3).
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_stages=1, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st, num_warps=w)
            for bn, bk, st, w in [(64, 64, 3, 4), (128, 64, 4, 4), (256, 64, 3, 8)]]


@triton.autotune(configs=_moe_gemm_configs(), key=["N", "K", "R", "HAS_DROPOUT", "HAS_SS"])
@triton.jit(do_not_specialize=["lora_scale", "key1", "key2", "drop_thresh"])
def _moe_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, q_ptr, y_ptr, perm_ptr, tile_row0_ptr, tile_row1_ptr, tile_slot_ptr,
    ss_ptr, N, K, R, N_VIRT, N_BASE, LORA_OFF, X_DIV, NUM_TILES,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_bn,
    stride_sm, stride_sr, stride_qe, stride_qn, stride_qr, stride_ym, stride_yn,
    lora_scale, key1, key2, drop_thresh,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BM, BN] output tile of one (virtual) expert v per program, written once: base
    expert v % N_BASE, adapter v - LORA_OFF when v >= LORA_OFF (else no LoRA term: base only),
    input row m is x[m // X_DIV]. Grid: tiles x cdiv(N, BN), 1-D. Rows of a tile of no expert
    get zeros; idle tiles store nothing. HAS_DROPOUT masks the LoRA term with the keep-mask of an
    [M, N] output (dx's drop'); HAS_SS scales it by ss[(v - LORA_OFF) // N_BASE]."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_t, pid_n = _grouped_pid(pid, NUM_TILES, num_n, GROUP_M)
    row0 = tl.load(tile_row0_ptr + pid_t)
    row1 = tl.load(tile_row1_ptr + pid_t)
    slot = tl.load(tile_slot_ptr + pid_t)
    offs_p = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_p < row1
    rows = tl.load(perm_ptr + offs_p, mask=mask_m, other=0)
    rows64 = rows.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if (slot >= 0) & (slot < N_VIRT):
        if HAS_DROPOUT:  # dx's drop'(ds A): masked on its own, so the accumulator's first value
            if slot >= LORA_OFF:
                acc = _moe_expand(acc, s_ptr, q_ptr, ss_ptr, rows64, offs_n, mask_m, mask_n, slot, R,
                                  N_BASE, LORA_OFF, stride_sm, stride_sr, stride_qe, stride_qn, stride_qr,
                                  lora_scale, HAS_SS, LORA_PRECISION, BLOCK_R)
                keep = _keep_mask(rows, offs_n, N, key1, key2, drop_thresh)
                acc = tl.where(keep, acc, 0.0)
        slot64 = (slot % N_BASE).to(tl.int64)  # the base expert
        x_ptrs = x_ptr + (rows64 // X_DIV)[:, None] * stride_xm
        w_ptrs = w_ptr + slot64 * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptrs + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs + offs_k[:, None].to(tl.int64) * stride_wk,  # W[e]^T tile [BK, BN]
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(x.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)
        if not HAS_DROPOUT:
            # after the main loop, into the same accumulator, the scale on the [BM, BR] xa tile:
            # before it, with `acc *= scale`, ptxas serialised the loop's wgmma (C7515, audit
            # sm_90a, case moe-qwen3)
            if slot >= LORA_OFF:
                acc = _moe_expand(acc, s_ptr, q_ptr, ss_ptr, rows64, offs_n, mask_m, mask_n, slot, R,
                                  N_BASE, LORA_OFF, stride_sm, stride_sr, stride_qe, stride_qn, stride_qr,
                                  lora_scale, HAS_SS, LORA_PRECISION, BLOCK_R)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + slot64 * stride_be + offs_n * stride_bn, mask=mask_n, other=0.0)
            acc = acc + bias.to(tl.float32)[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------
# Backward: per-expert weight gradients
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["scale", "drop_scale", "key1", "key2", "drop_thresh"])
def _moe_bwd_weight_kernel(
    x_ptr, dy_ptr, ds_ptr, xa_ptr, da_ptr, db_ptr, perm_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr,
    ss_ptr, N, K, R, N_VIRT, N_BASE, LORA_OFF, X_DIV,
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_dsm, stride_dsr, stride_sm, stride_sr,
    stride_dae, stride_dar, stride_dak, stride_dbe, stride_dbn, stride_dbr,
    scale, drop_scale, key1, key2, drop_thresh,
    NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SS: tl.constexpr,
    LORA_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (segments, NUM_DA + NUM_DB), NUM_DA = cdiv(K, BK) * cdiv(R, BR) when NEED_DA.
    Program (j, q) owns one block of the gradient of adapter l = seg_slot[j] - LORA_OFF and
    walks that segment's rows in sorted order, so every element is written by one program in a
    fixed order (x row m is x[m // X_DIV]):
    q < NUM_DA: dA[l, r-chunk, k-block] = ds[rows, r]^T drop(x)[rows, k]
    else:       dB[l, n-block, r-chunk] = s dy[rows, n]^T xa[rows, r]  (s * ss[l // N_BASE])
    Adapters without rows keep the launcher's zeros; base-only segments write nothing."""
    seg = tl.program_id(0)
    q = tl.program_id(1)
    slot = tl.load(seg_slot_ptr + seg)
    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    num_r = tl.cdiv(R, BLOCK_R)
    NUM_DA = 0
    if NEED_DA:
        NUM_DA = tl.cdiv(K, BLOCK_K) * num_r
    if (slot >= LORA_OFF) & (slot < N_VIRT):
        lora = slot - LORA_OFF
        slot64 = lora.to(tl.int64)
        if q < NUM_DA:
            offs_k = (q // num_r) * BLOCK_K + tl.arange(0, BLOCK_K)
            offs_r = (q % num_r) * BLOCK_R + tl.arange(0, BLOCK_R)
            mask_k = offs_k < K
            mask_r = offs_r < R
            acc_a = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            for m0 in range(0, length, BLOCK_M):
                offs_i = m0 + tl.arange(0, BLOCK_M)
                mask_m = offs_i < length
                tok = tl.load(perm_ptr + start + offs_i, mask=mask_m, other=0)
                x_rows = x_ptr + (tok // X_DIV)[:, None].to(tl.int64) * stride_xm
                x = tl.load(x_rows + offs_k[None, :] * stride_xk,
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                if HAS_DROPOUT:
                    keep = _keep_mask(tok, offs_k, K, key1, key2, drop_thresh)
                    x = tl.where(keep, x, 0.0)
                ds_t = tl.load(ds_ptr + offs_r[:, None] * stride_dsr + tok[None, :].to(tl.int64) * stride_dsm,
                               mask=mask_r[:, None] & mask_m[None, :], other=0.0)
                acc_a = _lora_dot(ds_t, x, acc_a, LORA_PRECISION)
            # (distinct names for the two arms' accumulators: compiled Triton needs a name
            # assigned in both arms of a runtime `if` to keep one shape)
            acc_a = acc_a * drop_scale
            tl.store(da_ptr + slot64 * stride_dae + offs_r[:, None] * stride_dar
                     + offs_k[None, :] * stride_dak,
                     acc_a.to(da_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_k[None, :])
        elif NEED_DB:
            qb = q - NUM_DA
            offs_n = (qb // num_r) * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_r = (qb % num_r) * BLOCK_R + tl.arange(0, BLOCK_R)
            mask_n = offs_n < N
            mask_r = offs_r < R
            acc_b = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
            for m0 in range(0, length, BLOCK_M):
                offs_i = m0 + tl.arange(0, BLOCK_M)
                mask_m = offs_i < length
                tok = tl.load(perm_ptr + start + offs_i, mask=mask_m, other=0).to(tl.int64)
                dy_t = tl.load(dy_ptr + offs_n[:, None] * stride_dyn + tok[None, :] * stride_dym,
                               mask=mask_n[:, None] & mask_m[None, :], other=0.0)
                s = tl.load(xa_ptr + tok[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                            mask=mask_m[:, None] & mask_r[None, :], other=0.0)
                acc_b = _lora_dot(dy_t, s, acc_b, LORA_PRECISION)
            if HAS_SS:
                acc_b = acc_b * (scale * tl.load(ss_ptr + lora // N_BASE))
            else:
                acc_b = acc_b * scale
            tl.store(db_ptr + slot64 * stride_dbe + offs_n[:, None] * stride_dbn
                     + offs_r[None, :] * stride_dbr,
                     acc_b.to(db_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_r[None, :])


# --------------------------------------------------------------------------------------------
# Launchers (same signatures as fused_lora.reference.moe_lora_linear_fwd / _bwd, routing view
# instead of ids)
# --------------------------------------------------------------------------------------------


class _Banks:
    """The adapters as a flat list of virtual experts (see fused_lora.reference): A [L, r, in],
    B [L, out, r] (views of [S, E, ...] banks), the virtual id range n_virt, the base expert
    count n_base, the id offset of adapter 0 (0 with one adapter per expert, E with banks), the
    per-adapter scales (or None) and x's rows per op row (topk)."""

    def __init__(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, slot_scales: Optional[Tensor],
                 topk: int) -> None:
        E = weight.shape[0]
        if lora_A.dim() == 4:
            self.A = lora_A.reshape(-1, *lora_A.shape[2:])
            self.B = lora_B.reshape(-1, *lora_B.shape[2:])
            self.off = E
        else:
            self.A, self.B, self.off = lora_A, lora_B, 0
        self.n_base, self.n_virt = E, self.off + self.A.shape[0]
        self.ss, self.topk = slot_scales, topk

    def ids(self) -> tuple:
        return self.n_virt, self.n_base, self.off

    def ss_args(self, use: bool, dummy: Tensor) -> tuple:
        """(pointer, HAS_SS) for a kernel whose scale is the LoRA scaling (use) or not."""
        on = use and self.ss is not None
        return (self.ss if on else dummy), on


def _launch_shrink(inp: Tensor, P: Tensor, stride_pe: int, stride_pr: int, stride_pk: int, R: int,
                   out: Tensor, scale: float, drop: tuple, plan: RoutingView, banks: _Banks,
                   x_div: int, slot_scaled: bool) -> None:
    """out[m, :] = scale * drop(inp)[m // x_div] P[v]^T (P[v] is r x K through the given strides;
    times the adapter's slot scale when slot_scaled) into the zero-filled fp32 out [M, R]."""
    K = inp.shape[1]
    key1, key2, thresh = drop
    BLOCK_R = _block_r(R)
    ss, has_ss = banks.ss_args(slot_scaled, out)
    _moe_shrink_kernel[(plan.n_tiles, triton.cdiv(R, BLOCK_R))](
        inp, P, plan.order, plan.tile_row0, plan.tile_row1, plan.tile_slot, out, ss,
        K, R, *banks.ids(), x_div,
        inp.stride(0), inp.stride(1), stride_pe, stride_pr, stride_pk, out.stride(0), out.stride(1),
        scale, key1, key2, thresh,
        HAS_DROPOUT=thresh > 0, HAS_SS=has_ss, P_FP32=P.dtype == torch.float32,
        LORA_PRECISION=lora_precision(inp.dtype, P.dtype),
        BLOCK_M=_BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=_BLOCK_K, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )


def _launch_gemm(x: Tensor, w: Tensor, w_strides: tuple, N: int, bias: Optional[Tensor], s: Tensor,
                 Q: Tensor, q_strides: tuple, R: int, y: Tensor, lora_scale: float, drop: tuple,
                 plan: RoutingView, banks: _Banks, x_div: int, slot_scaled: bool) -> None:
    """y[m] = x[m // x_div] W[e]^T (+ b[e]) + drop'(lora_scale * s[m] Q[v]^T); W[e] [N, K], Q[v]
    [N, R] through strides (e, n, k) and (v, n, r)."""
    K = x.shape[1]
    key1, key2, thresh = drop
    T = plan.n_tiles
    bias_t = bias if bias is not None else y
    bstr = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)
    ss, has_ss = banks.ss_args(slot_scaled, y)
    _moe_gemm_kernel[lambda META: (T * triton.cdiv(N, META["BLOCK_N"]),)](
        x, w, bias_t, s, Q, y, plan.order, plan.tile_row0, plan.tile_row1, plan.tile_slot, ss,
        N, K, R, *banks.ids(), x_div, T,
        x.stride(0), x.stride(1), *w_strides, *bstr, s.stride(0), s.stride(1), *q_strides,
        y.stride(0), y.stride(1),
        lora_scale, key1, key2, thresh,
        HAS_BIAS=bias is not None, HAS_DROPOUT=thresh > 0, HAS_SS=has_ss, INPUT_PRECISION=_fp32_precision(),
        LORA_PRECISION=lora_precision(x.dtype, Q.dtype), BLOCK_R=_block_r(R), BLOCK_M=_BLOCK_M,
    )


def _device(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def moe_lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    plan: RoutingView,
    slot_scales: Optional[Tensor] = None,
    topk: int = 1,
) -> tuple[Tensor, Tensor]:
    """Triton forward; contract of fused_lora.reference.moe_lora_linear_fwd with the rows'
    routing given by ``plan`` (built once per MoE layer and batch). Returns (y [M, N] in x's
    dtype, xa = drop(x) A[v]^T fp32 [M, r], saved for backward), M = T * topk: row m reads
    x[m // topk] in place (a token's top-k rows are never copied)."""
    T, K = x.shape
    M = T * topk
    N = weight.shape[1]
    bk = _Banks(weight, lora_A, lora_B, slot_scales, topk)
    A, B = bk.A, bk.B
    R = A.shape[1]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    # Zero-filled: rows without adapter are never written by the shrink.
    xa = torch.zeros(M, R, device=x.device, dtype=torch.float32)
    if M == 0 or N == 0:
        return y, xa
    key1, key2, thresh, drop_scale = _dropout_args(dropout_p, seed)
    with _device(x):
        if K > 0:
            _launch_shrink(x, A, A.stride(0), A.stride(1), A.stride(2), R, xa,
                           drop_scale, (key1, key2, thresh), plan, bk, topk, False)
        _launch_gemm(x, weight, (weight.stride(0), weight.stride(1), weight.stride(2)), N, bias, xa,
                     B, (B.stride(0), B.stride(1), B.stride(2)), R, y, scale, (0, 0, 0), plan, bk, topk, True)
    return y, xa


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
    plan: RoutingView,
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
    slot_scales: Optional[Tensor] = None,
    topk: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward; contract of fused_lora.reference.moe_lora_linear_bwd, routing from the
    forward's plan (nothing sorted again). Deterministic: every dA / dB block is owned by one
    program; adapters without rows keep exact zeros. With topk > 1 the M rows' dx is formed in
    fp32 and each token's topk rows summed (a reduction, no atomics)."""
    T, K = x.shape
    M = T * topk
    N = weight.shape[1]
    bk = _Banks(weight, lora_A, lora_B, slot_scales, topk)
    A, B = bk.A, bk.B
    E_lora = A.shape[0]
    R = A.shape[1]
    dx = torch.empty(T, K, device=x.device, dtype=x.dtype) if needs_dx else x.new_empty(0)
    dA = torch.zeros(lora_A.shape, device=x.device, dtype=lora_A.dtype) if needs_dA else lora_A.new_empty(0)
    dB = torch.zeros(lora_B.shape, device=x.device, dtype=lora_B.dtype) if needs_dB else lora_B.new_empty(0)
    if not (needs_dx or needs_dA or needs_dB):
        return dx, dA, dB
    if M == 0 or K == 0 or N == 0:
        if needs_dx:
            dx.zero_()
        return dx, dA, dB
    key1, key2, thresh, drop_scale = _dropout_args(dropout_p, seed)
    drop = (key1, key2, thresh)
    with _device(x):
        ds = torch.zeros(M, R, device=x.device, dtype=torch.float32)
        if needs_dx or needs_dA:
            # ds = s dy B[v]: B[v] [N, r] read as an r x N operand through swapped strides.
            _launch_shrink(dy, B, B.stride(0), B.stride(2), B.stride(1), R, ds,
                           scale, (0, 0, 0), plan, bk, 1, True)
        if needs_dx:
            # dx = dy W[e] + drop'(ds A[v]): the forward GEMM with W[e]^T and A[v]^T by strides.
            dxl = dx if topk == 1 else torch.empty(M, K, device=x.device, dtype=torch.float32)
            _launch_gemm(dy, weight, (weight.stride(0), weight.stride(2), weight.stride(1)), K, None, ds,
                         A, (A.stride(0), A.stride(2), A.stride(1)), R, dxl,
                         drop_scale, drop, plan, bk, 1, False)
            if topk > 1:
                dx.copy_(dxl.view(T, topk, K).sum(1))
        if needs_dA or needs_dB:
            S = plan.seg_len.numel()
            BLOCK_R = _block_r(R)
            nr = triton.cdiv(R, BLOCK_R)
            n_da = triton.cdiv(K, _BLOCK_K) * nr if needs_dA else 0
            n_db = triton.cdiv(N, _BLOCK_N) * nr if needs_dB else 0
            dat = dA.view(E_lora, R, K) if needs_dA else A
            dbt = dB.view(E_lora, N, R) if needs_dB else B
            ss, has_ss = bk.ss_args(True, ds)
            _moe_bwd_weight_kernel[(S, n_da + n_db)](
                x, dy, ds, xa, dat, dbt, plan.order, plan.seg_start, plan.seg_len, plan.seg_slot, ss,
                N, K, R, *bk.ids(), topk,
                x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), ds.stride(0), ds.stride(1),
                xa.stride(0), xa.stride(1), dat.stride(0), dat.stride(1), dat.stride(2),
                dbt.stride(0), dbt.stride(1), dbt.stride(2),
                scale, drop_scale, key1, key2, thresh,
                NEED_DA=needs_dA, NEED_DB=needs_dB, HAS_DROPOUT=thresh > 0, HAS_SS=has_ss,
                LORA_PRECISION=lora_precision(x.dtype, A.dtype), BLOCK_R=BLOCK_R,
                BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, num_warps=_NUM_WARPS,
                num_stages=_NUM_STAGES,
            )
    return dx, dA, dB
