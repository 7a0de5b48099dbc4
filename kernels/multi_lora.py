"""Triton kernels for mixed-adapter batches: every token t picks adapter i = ids[t] (or none).

Math (W0 = weight [N, K], A = lora_A [S, R, K], B = lora_B [S, N, R], s = scales [S],
r_i = ranks[i] <= R, x [M, K]):

    forward   xa[t]  = x[t] A[i, :r_i]^T                      shrink   (fp32 [M, R])
              y[t]   = x[t] W0^T + b + s_i xa[t] B[i, :, :r_i]^T  fused base GEMM + expand
    backward  ds[t]  = s_i dy[t] B[i, :, :r_i]                 shrink of dy against B
              dx[t]  = dy[t] W0 + ds[t] A[i, :r_i]             fused GEMM + expand (W0^T, A)
              dA[i]  = sum_{t: ids[t]=i} ds[t]^T x[t]          per-segment weight grads
              dB[i]  = s_i sum_{t: ids[t]=i} dy[t]^T xa[t]      (deterministic, no atomics)

Two shrink kernels and two GEMM modes, the same math ("hybrid" pairs the segmented shrink with
the gathered GEMM, for large batches over large banks):

* "decode" (BGMV-like; few tokens, many distinct adapters). The shrink is one program per
  (token, K-split): a gathered GEMV over A[ids[t]] (r is tiny, so no tensor cores: the kernel
  is bound by reading A[i], r x K elements per token). With few tokens a grid of M programs
  cannot fill the GPU (M = 1 -> 1 program), so K is split into SPLIT_K slices whose fp32
  partials go to a [SPLIT_K, M, R] buffer summed by torch (deterministic, no atomics).
  The expand is fused into the base GEMM in token order, after its K loop: each row of a
  [BM, BN] tile gathers its own B[ids[t]] slice, BLOCK_RV rank columns at a time as a
  [BM, BN, RV] block (16-byte loads along r, B's contiguous dim; an outer-product FMA on CUDA
  cores, r/K = 16/4096 of the GEMM's work). Narrow N tiles (BN = 16 / 32) give a full wave of
  CTAs at decode sizes (N = 4096: 256 / 128 CTAs).
* "prefill" (SGMV-like; many tokens per adapter). Tokens are grouped by adapter on the device
  (stable argsort of the ids; segments and a tile table by searchsorted; no host sync, no
  data-dependent shape). Every segment is cut into BLOCK_M-row tiles (so one huge group is
  spread over many programs instead of idling the GPU), and each tile shares one adapter: the
  shrink and the expand are tensor-core tl.dot's on gathered rows, the expand again going into
  the base GEMM's accumulator after its K loop. The grid is sized by the upper bound
  cdiv(M, BM) + min(n_slots + 1, M) tiles (each segment adds at most one partial tile);
  programs past the real tile count exit at once.

Ranks: loops over r run to ranks[i] (chunks of <= 64 columns; BLOCK_RV in the gathered
expand), so chunks wholly beyond a slot's rank are never visited, and padding columns (which
may hold NaN) never reach an output: loads are masked at the rank, except the decode kernels'
vector loads, masked at the bank's width and zeroed (or left in unstored rows) after.
Ids outside [0, n_slots) --
-1 by contract, anything else only with validate=False -- are treated as -1 in every kernel:
rank 0, slot index clamped to 0 for address arithmetic, all adapter loads masked off.

Rows without an adapter get exactly the base GEMM: their LoRA accumulator is an exact 0 (every
gathered load masked to 0, and scale applied only where the rank is > 0), and a row's tl.dot
result does not depend on the other rows of its tile, so they are bit-for-bit what the same
path gives with every id = -1.

Path choice (_choose_path, from shapes only; the crossovers need GPU measurement):
"decode" (BGMV shrink + gathered GEMM) for M <= 64; for larger M the segmented shrink (each
adapter's A read once per 64-token tile instead of once per token) with the segmented GEMM when
the worst case (every slot present, each adding a partial tile) at most doubles the GEMM's
tile count, else with the gathered GEMM ("hybrid"). Override with the ``path`` argument (the
registry entries triton:decode / triton:prefill / triton:hybrid).

The tokens' grouping (stable sort, segments, tile table) is not computed here: it comes from
the batch's routing plan (fused_lora.routing), built once for every layer and the backward.

A batch without adapters does no LoRA work: shrink programs return after loading one id (or
one tile-table entry), expand loops run zero times. Backward: ds reuses the shrink kernels
(B[i] read as an r x N operand through strides), dx the fused GEMM (W0^T and A[i]^T through
strides), and dA / dB come from one launch of _mlora_bwd_weight_kernel over the segments,
each gradient block owned by one program (deterministic; a single-adapter batch of M tokens
gives cdiv(K, BK) * cdiv(r, BR) + cdiv(N, BN) * cdiv(r, BR) programs that each loop over all
M, like the single-adapter backward; splitting M across programs would need atomics or a
second reduction pass -- left for the GPU measurement to justify).

Not yet measured (no GPU in the session that wrote this): the decode roofline ratio, prefill
vs the base layer, whether fusing the expand into the GEMM beats base GEMM + in-place add, the
path crossovers and the autotune config lists. Every kernel and config here compiles for
sm_90 without a GPU (triton.compile to cubin, ptxas): with bf16 activations and 16- or 64-wide
rank chunks none spills registers; with fp32 activations and 64-wide chunks the segmented GEMM
and weight-gradient configs spill 24-1264 stack bytes (fp32 is not the performance target).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_lora.kernels.lora_linear import (
    INTERPRET,
    _block_r,
    _fp32_precision,
    _grouped_pid,
    _lora_dot,
    _m_key,
    lora_precision,
)
from fused_lora.kernels.target import gpu_of
from fused_lora.routing import BLOCK_M as ROUTING_BLOCK_M
from fused_lora.routing import RoutingView

__all__ = ["multi_lora_linear_fwd", "multi_lora_linear_bwd"]

# Decode-path batches: up to 64 tokens (vLLM's / Punica's BGMV regime).
_DECODE_MAX_M = 64
# Rows per prefill tile: the routing plan's tile table is cut at fused_lora.routing.BLOCK_M.
_SEG_BLOCK_M = ROUTING_BLOCK_M
# BGMV shrink: 16 rank columns x BLOCK_K elements of A per step, 8 warps: one step is 16 KB of
# bf16 A in 16-byte loads issued together. At decode sizes a slice is one step (M = 16 tokens,
# r = 16, K = 4096 is 2 MB of A over 128 programs: all of it in flight at once); HBM latency
# needs ~32 KB in flight per SM, which 16 KB per program with 2+ programs per SM gives.
_BGMV_BLOCK_R = 16
_BGMV_BLOCK_K = 32 if INTERPRET else 512
_BGMV_WARPS = 4 if INTERPRET else 8


# --------------------------------------------------------------------------------------------
# Configs (single config under the interpreter: autotune with several needs a GPU to time)
# --------------------------------------------------------------------------------------------


def _gather_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "BLOCK_RV": 4})]
    # (BM, BN, BK, stages, warps): narrow M for decode batches, wide K for bandwidth; BN = 16 / 32
    # so that M <= 16 tokens at N = 4096 still launch 256 / 128 CTAs (BN = 64 gave 64 CTAs on 132
    # SMs; _prune_gather_configs keeps the full-wave ones on the GPU at hand). BLOCK_RV (rank
    # columns per gathered-B step) keeps the [BM, BN, RV] block at <= 64 values per thread: 8
    # (16-byte loads) on the small tiles.
    cfgs = [
        (16, 16, 256, 4, 4), (16, 16, 128, 4, 4), (16, 32, 256, 3, 4), (16, 32, 128, 4, 4),
        (16, 64, 128, 4, 4), (16, 128, 64, 4, 8), (32, 64, 128, 4, 8),
        (32, 128, 64, 3, 8), (64, 64, 64, 4, 8), (16, 64, 256, 3, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                           "BLOCK_RV": max(1, min(8, 64 * 32 * w // (bm * bn)))},
                          num_stages=s, num_warps=w) for bm, bn, bk, s, w in cfgs]


def _prune_gather_configs(configs, named_args, **kwargs):
    """Decode on a GPU: keep the configs whose grid fills every SM at least once (one full
    wave), when any does; a 64-CTA grid on 132 SMs leaves half the HBM bandwidth unused."""
    g = gpu_of(named_args.get("x_ptr"))
    if g is None:
        return configs
    return _full_wave(configs, named_args["M"], named_args["N"], g.sms)


def _full_wave(configs, M: int, N: int, n_sms: int):
    def ctas(c):
        return triton.cdiv(M, c.kwargs["BLOCK_M"]) * triton.cdiv(N, c.kwargs["BLOCK_N"])

    full = [c for c in configs if ctas(c) >= n_sms]
    return full or [c for c in configs if ctas(c) == max(ctas(c) for c in configs)]


def _seg_gemm_configs():
    # BLOCK_M is fixed by the launcher (_SEG_BLOCK_M): the tile table depends on it.
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    cfgs = [(256, 64, 3, 8), (128, 64, 4, 8), (128, 32, 4, 8), (64, 64, 4, 4), (256, 32, 4, 8)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bn, bk, s, w in cfgs]


def _seg_small_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_K": 32})]
    return [triton.Config({"BLOCK_K": bk}, num_stages=s, num_warps=w)
            for bk, s, w in [(64, 4, 4), (128, 3, 8), (64, 3, 8)]]


def _weight_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32})]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w)
            for bn, bk, s, w in [(64, 64, 3, 8), (128, 128, 3, 8), (128, 64, 3, 8)]]


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _slot_rank(ranks_ptr, slot, valid, R_MAX, HAS_RANKS: tl.constexpr):
    """Live rank of ``slot`` (scalar or vector): ranks[slot] clamped to [0, R_MAX], 0 where
    not ``valid``. ``slot`` must already be clamped in-bounds."""
    if HAS_RANKS:
        # Clamp in the stored (int64) width first: casting 2**32 + 1 to int32 first would make it 1.
        r = tl.load(ranks_ptr + slot, mask=valid, other=0)
        r = tl.minimum(tl.maximum(r, 0), R_MAX).to(tl.int32)
        r = tl.where(valid, r, 0)
    else:
        r = tl.where(valid, R_MAX, 0)
    return r


# --------------------------------------------------------------------------------------------
# Shrink: out[t, r] = (s_i *) sum_k in[t, k] P[i, r, k]   (P = A for xa; P = B^T for ds)
# --------------------------------------------------------------------------------------------


@triton.jit
def _mlora_bgmv_shrink_kernel(
    x_ptr, a_ptr, ids_ptr, ranks_ptr, scales_ptr, out_ptr,
    K, N_SLOTS, R_MAX, K_PER_SPLIT,
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_op, stride_om, stride_or,
    HAS_RANKS: tl.constexpr, APPLY_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Decode shrink, grid (M, SPLIT_K): program (t, p) writes out[p, t, :r_i] for the K slice
    [p * K_PER_SPLIT, (p + 1) * K_PER_SPLIT). Rows without an adapter return at once (the
    launcher zero-fills out)."""
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    slot = tl.load(ids_ptr + pid_m)
    valid = (slot >= 0) & (slot < N_SLOTS)
    slot = tl.where(valid, slot, 0)
    rank = _slot_rank(ranks_ptr, slot, valid, R_MAX, HAS_RANKS)
    k_lo = pid_p * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    a_slot = a_ptr + slot.to(tl.int64) * stride_as
    scale = 1.0
    if APPLY_SCALE:
        scale = tl.load(scales_ptr + slot, mask=rank > 0, other=0.0).to(tl.float32)
    out_row = out_ptr + pid_p.to(tl.int64) * stride_op + pid_m.to(tl.int64) * stride_om
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        # Loads are masked at the bank's width R_MAX (16-divisible: 16-byte vector loads along
        # r when r is P's contiguous dim, as for ds = dy B), not at the slot's rank (a loaded
        # value: the backward's loads of B were 2-byte, audit sm_90a). Columns in [rank, R_MAX)
        # may hold anything (NaN): they only reach rows of acc that are never stored. x is
        # loaded as a [1, BK] tile in a's layout (a 1-D x broadcast against a needed a
        # shared-memory layout conversion in every step).
        mask_rb = offs_r < R_MAX
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_hi
            x = tl.load(x_row + offs_k[None, :] * stride_xk, mask=mask_k[None, :], other=0.0).to(tl.float32)
            a = tl.load(a_slot + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=mask_rb[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            acc += a * x
        part = tl.sum(acc, axis=1) * scale
        tl.store(out_row + offs_r * stride_or, part, mask=mask_r)


@triton.autotune(configs=_seg_small_configs(), key=["M_KEY", "K", "R_MAX"])
@triton.jit
def _mlora_sgmv_shrink_kernel(
    x_ptr, a_ptr, perm_ptr, tile_row0_ptr, tile_row1_ptr, tile_slot_ptr, ranks_ptr, scales_ptr,
    out_ptr,
    K, N_SLOTS, R_MAX, M_KEY,
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_om, stride_or,
    HAS_RANKS: tl.constexpr, APPLY_SCALE: tl.constexpr, A_FP32: tl.constexpr,
    LORA_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Prefill shrink, grid (max tiles, cdiv(R_MAX, BLOCK_R)): tile j holds sorted positions
    [row0, row1) of one adapter; program (j, c) computes rank chunk c of those rows with
    tensor-core dots and scatters it to out[perm[rows]]. Chunks at or past the slot's rank,
    base-only tiles and idle tiles do nothing."""
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    row0 = tl.load(tile_row0_ptr + pid_t)
    row1 = tl.load(tile_row1_ptr + pid_t)
    slot = tl.load(tile_slot_ptr + pid_t)
    valid = (slot >= 0) & (slot < N_SLOTS)
    slot = tl.where(valid, slot, 0)
    rank = _slot_rank(ranks_ptr, slot, valid, R_MAX, HAS_RANKS)
    r0 = pid_r * BLOCK_R
    if r0 < rank:
        offs_p = row0 + tl.arange(0, BLOCK_M)
        mask_m = offs_p < row1
        tok = tl.load(perm_ptr + offs_p, mask=mask_m, other=0)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        a_slot = a_ptr + slot.to(tl.int64) * stride_as
        x_rows = x_ptr + tok[:, None].to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_rows + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            a = tl.load(a_slot + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,  # P^T
                        mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if A_FP32:
                acc = _lora_dot(x, a, acc, LORA_PRECISION)
            else:
                acc = tl.dot(x, a.to(x.dtype), acc)
        if APPLY_SCALE:
            acc = acc * tl.load(scales_ptr + slot).to(tl.float32)
        tl.store(out_ptr + tok[:, None].to(tl.int64) * stride_om + offs_r[None, :] * stride_or,
                 acc, mask=mask_m[:, None] & mask_r[None, :])


# --------------------------------------------------------------------------------------------
# Fused base GEMM + expand: y[t, n] = sum_k x[t, k] W[n, k] (+ b[n]) + (s_i) xa[t, :r_i] . Q[i, n, :r_i]
# (forward: W = W0, Q = B; backward dx: W = W0^T, Q = A^T, xa = ds, no scale, no bias)
# --------------------------------------------------------------------------------------------


@triton.jit
def _mlora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, xa_ptr, b_ptr, y_ptr, ids_ptr, ranks_ptr, scales_ptr,
    perm_ptr, tile_row0_ptr, tile_row1_ptr, tile_slot_ptr,
    M, N, K, N_SLOTS, R_MAX, NUM_TILES, M_KEY,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr,
    stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr, APPLY_SCALE: tl.constexpr,
    SEGMENTED: tl.constexpr, INPUT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_RV: tl.constexpr = 1,
):
    """One [BM, BN] output tile per program, written once; the LoRA expand goes into the base
    GEMM's accumulator after its K loop.

    SEGMENTED=False (decode): tiles of consecutive tokens, each row gathers its own Q[ids[t]].
    SEGMENTED=True (prefill): tile j of the tile table (one adapter, rows perm[row0:row1]); the
    expand is one tensor-core dot per rank chunk. Grid: tiles x cdiv(N, BN), 1-D."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    if SEGMENTED:
        pid_t, pid_n = _grouped_pid(pid, NUM_TILES, num_n, GROUP_M)
        row0 = tl.load(tile_row0_ptr + pid_t)
        row1 = tl.load(tile_row1_ptr + pid_t)
        offs_p = row0 + tl.arange(0, BLOCK_M)
        mask_m = offs_p < row1
        rows = tl.load(perm_ptr + offs_p, mask=mask_m, other=0)
    else:
        pid_m, pid_n = _grouped_pid(pid, tl.cdiv(M, BLOCK_M), num_n, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rows < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows64 = rows.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_ptrs = x_ptr + rows64[:, None] * stride_xm
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptrs + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs + offs_k[:, None].to(tl.int64) * stride_wk,  # W^T tile [BK, BN]
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)

    if not SEGMENTED:
        # Decode: every row gathers its own B[ids[t]] [BN, r] slice, after the main loop (before
        # it, its loads delayed the first W prefetches). The slice is read BLOCK_RV rank columns
        # at a time as a [BM, BN, RV] block, r being B's contiguous dim: 16-byte loads at RV = 8
        # (one rank column per step made them 2-byte loads, audit sm_90a). Loads are masked at
        # the bank's width R_MAX (16-divisible) and the dead columns [rank, R_MAX) zeroed after
        # (they may hold NaN), so the mask does not break the vectors.
        ids = tl.load(ids_ptr + rows, mask=mask_m, other=-1)
        valid = (ids >= 0) & (ids < N_SLOTS)
        slots = tl.where(valid, ids, 0)
        ranks = _slot_rank(ranks_ptr, slots, valid, R_MAX, HAS_RANKS)
        r_hi = tl.max(ranks, axis=0)  # columns past every row's rank are never visited
        sc = tl.full((BLOCK_M,), 1.0, tl.float32)
        if APPLY_SCALE:
            sc = tl.load(scales_ptr + slots, mask=ranks > 0, other=0.0).to(tl.float32)
        b_rows = b_ptr + slots.to(tl.int64)[:, None] * stride_bs + offs_n[None, :] * stride_bn
        for r0 in range(0, r_hi, BLOCK_RV):
            offs_v = r0 + tl.arange(0, BLOCK_RV)
            live = offs_v[None, :] < ranks[:, None]  # [BM, RV]
            s = tl.load(xa_ptr + rows64[:, None] * stride_sm + offs_v[None, :] * stride_sr,
                        mask=live, other=0.0) * sc[:, None]
            b = tl.load(b_rows[:, :, None] + offs_v[None, None, :] * stride_br,
                        mask=mask_n[None, :, None] & (offs_v < R_MAX)[None, None, :], other=0.0)
            b = tl.where(live[:, None, :], b.to(tl.float32), 0.0)
            acc += tl.sum(s[:, None, :] * b, axis=2)
    if SEGMENTED:
        # The tile's one adapter: its expand is tensor-core dots after the main loop, into the
        # same accumulator, with the scale on the [BM, BR] xa tile. Before the loop, with a
        # conditional `acc *= scale`, ptxas serialised the main loop's wgmma (C7515 on all 5
        # configs, audit sm_90a); with APPLY_SCALE=0 (backward's use) it compiled clean.
        slot = tl.load(tile_slot_ptr + pid_t)
        valid = (slot >= 0) & (slot < N_SLOTS)
        slot = tl.where(valid, slot, 0)
        rank = _slot_rank(ranks_ptr, slot, valid, R_MAX, HAS_RANKS)
        b_slot = b_ptr + slot.to(tl.int64) * stride_bs
        sc = 1.0
        if APPLY_SCALE:
            sc = tl.load(scales_ptr + slot).to(tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            s = tl.load(xa_ptr + rows64[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0) * sc
            b = tl.load(b_slot + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,  # Q^T
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc = _lora_dot(s, b, acc, LORA_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_mlora_fwd_gather = triton.autotune(
    configs=_gather_configs(), key=["M_KEY", "N", "K", "R_MAX", "APPLY_SCALE"],
    prune_configs_by={"early_config_prune": _prune_gather_configs},
)(_mlora_fwd_kernel)
_mlora_fwd_segmented = triton.autotune(
    configs=_seg_gemm_configs(), key=["M_KEY", "N", "K", "R_MAX", "APPLY_SCALE"]
)(_mlora_fwd_kernel)


# --------------------------------------------------------------------------------------------
# Backward: per-segment weight gradients
# --------------------------------------------------------------------------------------------


@triton.autotune(configs=_weight_configs(), key=["M_KEY", "N", "K", "R_MAX", "NEED_DA", "NEED_DB"])
@triton.jit
def _mlora_bwd_weight_kernel(
    x_ptr, dy_ptr, ds_ptr, xa_ptr, da_ptr, db_ptr, perm_ptr,
    seg_start_ptr, seg_len_ptr, seg_slot_ptr, ranks_ptr, scales_ptr,
    N, K, N_SLOTS, R_MAX, M_KEY,
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_dsm, stride_dsr, stride_sm, stride_sr,
    stride_das, stride_dar, stride_dak, stride_dbs, stride_dbn, stride_dbr,
    NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, HAS_RANKS: tl.constexpr,
    LORA_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (segments, NUM_DA + NUM_DB), NUM_DA = cdiv(K, BK) * cdiv(R, BR) when NEED_DA.
    Program (j, q) owns one block of adapter seg_slot[j]'s gradient and loops over that
    segment's tokens (sorted positions), so every element is written by exactly one program in
    a fixed order (deterministic):
    q < NUM_DA: dA[i, r-chunk, k-block] = ds[rows, r]^T x[rows, k]
    else:       dB[i, n-block, r-chunk] = s_i dy[rows, n]^T xa[rows, r]
    Slots absent from the batch keep the launcher's zeros; so do columns past the rank."""
    seg = tl.program_id(0)
    q = tl.program_id(1)
    slot = tl.load(seg_slot_ptr + seg)
    valid = (slot >= 0) & (slot < N_SLOTS)
    slot = tl.where(valid, slot, 0)
    rank = _slot_rank(ranks_ptr, slot, valid, R_MAX, HAS_RANKS)
    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    num_r = tl.cdiv(R_MAX, BLOCK_R)
    NUM_DA = 0
    if NEED_DA:
        NUM_DA = tl.cdiv(K, BLOCK_K) * num_r
    if q < NUM_DA:
        pid_k = q // num_r
        r0 = (q % num_r) * BLOCK_R
        if r0 < rank:
            offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_k = offs_k < K
            mask_r = offs_r < rank
            acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            for m0 in range(0, length, BLOCK_M):
                offs_i = m0 + tl.arange(0, BLOCK_M)
                mask_m = offs_i < length
                tok = tl.load(perm_ptr + start + offs_i, mask=mask_m, other=0).to(tl.int64)
                x = tl.load(x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                ds_t = tl.load(ds_ptr + offs_r[:, None] * stride_dsr + tok[None, :] * stride_dsm,
                               mask=mask_r[:, None] & mask_m[None, :], other=0.0)
                acc = _lora_dot(ds_t, x, acc, LORA_PRECISION)
            tl.store(da_ptr + slot.to(tl.int64) * stride_das + offs_r[:, None] * stride_dar
                     + offs_k[None, :] * stride_dak,
                     acc.to(da_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_k[None, :])
    elif NEED_DB:
        qb = q - NUM_DA
        pid_n = qb // num_r
        r0 = (qb % num_r) * BLOCK_R
        if r0 < rank:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_n = offs_n < N
            mask_r = offs_r < rank
            acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
            for m0 in range(0, length, BLOCK_M):
                offs_i = m0 + tl.arange(0, BLOCK_M)
                mask_m = offs_i < length
                tok = tl.load(perm_ptr + start + offs_i, mask=mask_m, other=0).to(tl.int64)
                dy_t = tl.load(dy_ptr + offs_n[:, None] * stride_dyn + tok[None, :] * stride_dym,
                               mask=mask_n[:, None] & mask_m[None, :], other=0.0)
                s = tl.load(xa_ptr + tok[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                            mask=mask_m[:, None] & mask_r[None, :], other=0.0)
                acc = _lora_dot(dy_t, s, acc, LORA_PRECISION)
            acc = acc * tl.load(scales_ptr + slot).to(tl.float32)
            tl.store(db_ptr + slot.to(tl.int64) * stride_dbs + offs_n[:, None] * stride_dbn
                     + offs_r[None, :] * stride_dbr,
                     acc.to(db_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_r[None, :])


# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------


_PATHS = {"decode": ("bgmv", "gather"), "prefill": ("sgmv", "segmented"), "hybrid": ("sgmv", "gather")}


def _choose_path(M: int, n_slots: int, path: Optional[str]) -> tuple[str, str]:
    """(shrink, gemm) kernels from shapes only (looking at the ids would be a host sync).

    M <= 64 ("decode"): per-token BGMV shrink + gathered GEMM; segmented tiles would re-read
    W0 once per adapter present, up to once per token. Larger M: the segmented shrink, and the
    segmented GEMM ("prefill") when its worst-case overhead -- one partial tile per adapter
    present, min(n_slots + 1, M) of them -- at most doubles the cdiv(M, 64) full tiles, else the
    gathered GEMM ("hybrid"). The crossovers are guesses until the GPU benchmark measures them
    (decode 1..256 tokens over 128 slots; prefill 4096 tokens over 8 adapters); the registry's
    entries triton:decode / triton:prefill / triton:hybrid force one."""
    path = path or "auto"
    if path in _PATHS:
        return _PATHS[path]
    if path != "auto":
        raise ValueError(f"path must be 'auto' or one of {tuple(_PATHS)}, got {path!r}")
    if M <= _DECODE_MAX_M:
        return _PATHS["decode"]
    if min(n_slots + 1, M) <= triton.cdiv(M, _SEG_BLOCK_M):
        return _PATHS["prefill"]
    return _PATHS["hybrid"]


def _split_k(M: int, K: int, device: torch.device, split_k: Optional[int]) -> int:
    """K-slices of the decode shrink: enough programs for ~4 per SM, each slice >= 512 of K
    (one 512-wide step, so the partial-sum traffic, 4 * r bytes per slice, stays < 1% of the
    2 * r * 512 bytes of A it reads). Override: split_k."""
    if split_k is not None:
        return max(1, min(int(split_k), K))
    if device.type != "cuda":
        return 1
    return max(1, min(triton.cdiv(4 * _sm_count(device.index), M), triton.cdiv(K, 512)))


@functools.cache
def _sm_count(index: Optional[int]) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                            ).multi_processor_count


def _launch_shrink(inp: Tensor, P: Tensor, stride_ps: int, stride_pr: int, stride_pk: int,
                   ids: Tensor, ranks: Optional[Tensor], scales: Tensor, out: Tensor,
                   n_slots: int, R: int, apply_scale: bool, kind: str, split: int,
                   plan: RoutingView) -> Tensor:
    """out[t, :r_i] = (s_i *) inp[t] P[i]^T (P[i] is r x K through the given strides) into the
    zero-filled fp32 out [M, R]; returns out."""
    M, K = inp.shape
    ranks_t = ranks if ranks is not None else ids
    if kind == "bgmv":
        # Slices are whole BLOCK_K steps; rounding may leave fewer slices than asked for.
        k_per = triton.cdiv(triton.cdiv(K, split), _BGMV_BLOCK_K) * _BGMV_BLOCK_K
        split = triton.cdiv(K, k_per)
        if split > 1:
            part = torch.zeros(split, M, R, device=inp.device, dtype=torch.float32)
        else:
            part = out.unsqueeze(0)
        _mlora_bgmv_shrink_kernel[(M, split)](
            inp, P, ids, ranks_t, scales, part,
            K, n_slots, R, k_per,
            inp.stride(0), inp.stride(1), stride_ps, stride_pr, stride_pk,
            part.stride(0), part.stride(1), part.stride(2),
            HAS_RANKS=ranks is not None, APPLY_SCALE=apply_scale,
            BLOCK_R=_BGMV_BLOCK_R, BLOCK_K=_BGMV_BLOCK_K, num_warps=_BGMV_WARPS,
        )
        if part.shape[0] > 1:
            torch.sum(part, 0, out=out)
        return out
    perm, row0, row1, tslot, T = plan.order, plan.tile_row0, plan.tile_row1, plan.tile_slot, plan.n_tiles
    BLOCK_R = _block_r(R)
    _mlora_sgmv_shrink_kernel[(T, triton.cdiv(R, BLOCK_R))](
        inp, P, perm, row0, row1, tslot, ranks_t, scales, out,
        K, n_slots, R, _m_key(M),
        inp.stride(0), inp.stride(1), stride_ps, stride_pr, stride_pk, out.stride(0), out.stride(1),
        HAS_RANKS=ranks is not None, APPLY_SCALE=apply_scale,
        A_FP32=P.dtype == torch.float32, LORA_PRECISION=lora_precision(inp.dtype, P.dtype),
        BLOCK_R=BLOCK_R, BLOCK_M=_SEG_BLOCK_M,
    )
    return out


def _launch_gemm(x: Tensor, w: Tensor, stride_wn: int, stride_wk: int, N: int, bias: Optional[Tensor],
                 xa: Tensor, Q: Tensor, stride_qs: int, stride_qn: int, stride_qr: int, y: Tensor,
                 ids: Tensor, ranks: Optional[Tensor], scales: Tensor, n_slots: int, R: int,
                 apply_scale: bool, kind: str, plan: RoutingView) -> None:
    """y = x W^T (+ b) + (s_i) xa[t, :r_i] Q[i, :, :r_i]^T, W [N, K] and Q[i] [N, R] through
    strides."""
    M, K = x.shape
    ranks_t = ranks if ranks is not None else ids
    prec = _fp32_precision()
    lora_prec = lora_precision(x.dtype, Q.dtype)
    common = dict(HAS_BIAS=bias is not None, HAS_RANKS=ranks is not None, APPLY_SCALE=apply_scale,
                  INPUT_PRECISION=prec, LORA_PRECISION=lora_prec)
    bias_t = bias if bias is not None else y
    strides = (x.stride(0), x.stride(1), stride_wn, stride_wk, xa.stride(0), xa.stride(1),
               stride_qs, stride_qn, stride_qr, y.stride(0), y.stride(1))
    if kind == "gather":
        _mlora_fwd_gather[lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)](
            x, w, bias_t, xa, Q, y, ids, ranks_t, scales, ids, ids, ids, ids,
            M, N, K, n_slots, R, 0, _m_key(M), *strides,
            SEGMENTED=False, BLOCK_R=16, **common,  # BLOCK_R: unused by the gathered expand
        )
        return
    perm, row0, row1, tslot, T = plan.order, plan.tile_row0, plan.tile_row1, plan.tile_slot, plan.n_tiles
    _mlora_fwd_segmented[lambda META: (T * triton.cdiv(N, META["BLOCK_N"]),)](
        x, w, bias_t, xa, Q, y, ids, ranks_t, scales, perm, row0, row1, tslot,
        M, N, K, n_slots, R, T, _m_key(M), *strides,
        SEGMENTED=True, BLOCK_R=_block_r(R), BLOCK_M=_SEG_BLOCK_M, **common,
    )


# --------------------------------------------------------------------------------------------
# Launchers (same signatures as fused_lora.reference, plus keyword-only tuning knobs)
# --------------------------------------------------------------------------------------------


def _contiguous_1d(t: Optional[Tensor]) -> Optional[Tensor]:
    """The kernels index 1-D tensors (bias, scales, ranks) as ptr + i: a strided view such as
    t[::2] would be read wrong, so pass those few elements contiguous."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def multi_lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scales: Tensor,
    ranks: Optional[Tensor],
    plan: RoutingView,
    *,
    path: Optional[str] = None,
    split_k: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Triton forward; contract of fused_lora.reference.multi_lora_linear_fwd with the tokens'
    routing given by ``plan`` (:mod:`fused_lora.routing`, built once per batch).

    path: "decode" / "prefill" / "hybrid" / None (auto, see _choose_path).
    split_k: K-slices of the decode shrink (None: auto)."""
    M, K = x.shape
    N = weight.shape[0]
    n_slots, R = lora_A.shape[0], lora_A.shape[1]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    # Zero-filled: rows without an adapter and columns past a slot's rank are never written.
    xa = torch.zeros(M, R, device=x.device, dtype=torch.float32)
    if M == 0 or N == 0:
        return y, xa
    if K == 0:
        y.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(y))
        return y, xa
    bias, scales, ranks = _contiguous_1d(bias), _contiguous_1d(scales), _contiguous_1d(ranks)
    ids = plan.ids
    shrink_k, gemm_k = _choose_path(M, n_slots, path)
    lora = R > 0 and n_slots > 0
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if lora:
            _launch_shrink(x, lora_A, lora_A.stride(0), lora_A.stride(1), lora_A.stride(2), ids, ranks,
                           scales, xa, n_slots, R, False, shrink_k, _split_k(M, K, x.device, split_k),
                           plan)
        _launch_gemm(x, weight, weight.stride(0), weight.stride(1), N, bias, xa,
                     lora_B, lora_B.stride(0), lora_B.stride(1), lora_B.stride(2), y,
                     ids, ranks, scales, n_slots if lora else 0, R, True, gemm_k, plan)
    return y, xa


def multi_lora_linear_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scales: Tensor,
    ranks: Optional[Tensor],
    plan: RoutingView,
    xa: Tensor,
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
    *,
    path: Optional[str] = None,
    split_k: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward; contract of fused_lora.reference.multi_lora_linear_bwd, routing from the
    forward's ``plan`` (no sort here).

    Deterministic (no atomics): dA / dB blocks are each owned by one program that walks its
    adapter's tokens in sorted order. dA / dB are zero-filled full stacks (slots absent from the
    batch and columns past a rank stay exactly 0)."""
    M, K = x.shape
    N = weight.shape[0]
    n_slots, R = lora_A.shape[0], lora_A.shape[1]
    dx = torch.empty(M, K, device=x.device, dtype=x.dtype) if needs_dx else x.new_empty(0)
    dA = torch.zeros_like(lora_A) if needs_dA else lora_A.new_empty(0)
    dB = torch.zeros_like(lora_B) if needs_dB else lora_B.new_empty(0)
    if not (needs_dx or needs_dA or needs_dB):
        return dx, dA, dB
    if M == 0 or K == 0 or N == 0:
        if needs_dx:
            dx.zero_()
        return dx, dA, dB
    scales, ranks = _contiguous_1d(scales), _contiguous_1d(ranks)
    ids = plan.ids
    shrink_k, gemm_k = _choose_path(M, n_slots, path)
    lora = R > 0 and n_slots > 0
    need_ds = lora and (needs_dx or needs_dA)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        ds = torch.zeros(M, max(R, 1), device=x.device, dtype=torch.float32)
        if need_ds:
            # ds = s_i dy B[i]: B[i] [N, R] read as an r x N operand through swapped strides.
            _launch_shrink(dy, lora_B, lora_B.stride(0), lora_B.stride(2), lora_B.stride(1), ids, ranks,
                           scales, ds, n_slots, R, True, shrink_k, _split_k(M, N, x.device, split_k), plan)
        if needs_dx:
            # dx = dy W0 + ds A[i]: the forward GEMM with W0^T and A[i]^T [K, R] through strides.
            _launch_gemm(dy, weight, weight.stride(1), weight.stride(0), K, None, ds,
                         lora_A, lora_A.stride(0), lora_A.stride(2), lora_A.stride(1), dx,
                         ids, ranks, scales, n_slots if lora else 0, R, False, gemm_k, plan)
        if lora and (needs_dA or needs_dB):
            S = plan.seg_len.numel()
            ranks_t = ranks if ranks is not None else ids
            BLOCK_R = _block_r(R)
            nr = triton.cdiv(R, BLOCK_R)
            dat = dA if needs_dA else lora_A
            dbt = dB if needs_dB else lora_B

            def grid(META):
                n_da = triton.cdiv(K, META["BLOCK_K"]) * nr if needs_dA else 0
                n_db = triton.cdiv(N, META["BLOCK_N"]) * nr if needs_dB else 0
                return (S, n_da + n_db)

            _mlora_bwd_weight_kernel[grid](
                x, dy, ds, xa, dat, dbt, plan.order, plan.seg_start, plan.seg_len, plan.seg_slot,
                ranks_t, scales,
                N, K, n_slots, R, _m_key(M),
                x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), ds.stride(0), ds.stride(1),
                xa.stride(0), xa.stride(1), dat.stride(0), dat.stride(1), dat.stride(2),
                dbt.stride(0), dbt.stride(1), dbt.stride(2),
                NEED_DA=needs_dA, NEED_DB=needs_dB, HAS_RANKS=ranks is not None,
                LORA_PRECISION=lora_precision(x.dtype, lora_A.dtype),
                BLOCK_R=BLOCK_R, BLOCK_M=_SEG_BLOCK_M,
            )
    return dx, dA, dB
