"""Triton kernels for one LoRA linear layer: fused forward and fused backward.

Math (W0 = weight [N, K], A = lora_A [R, K], B = lora_B [N, R], s = scale, x [M, K]):

    forward   xa = drop(x) A^T                              _lora_shrink_kernel  (tiny)
              y  = x W0^T + b + s * xa B^T                  _lora_fwd_kernel     (one GEMM)
    backward  ds = s * dy B          (+ dB via atomics)     _lora_bwd_ds_kernel  (tiny)
              dx = dy W0 + drop'(ds A)                      _lora_bwd_kernel     (one GEMM,
              dA = ds^T drop(x)                               plus dA / dB programs
              dB = s * dy^T xa   (deterministic mode)         scheduled first)

Why this split: the LoRA matrices are r-deep (r = 16 against K = 4096), so every LoRA term is
bandwidth-bound and costs what it reads. The forward writes y once, with the expand added to
the GEMM accumulator (no [M, N] intermediate, no extra pass over y); the shrink needs one read of
x that the GEMM's tiled reads cannot share (every N-tile program would recompute it), so it is a
pre-kernel whose [M, r] fp32 output backward reuses. The backward's dx GEMM gets the LoRA term
as an epilogue (no dx re-read), dA and dB are computed by extra programs of the same launch, so
beyond the dx GEMM's own traffic dy is read once by the ds kernel (plus once more by the dB
programs in deterministic mode) and x once by the dA programs. Programs that loop over all M
(dA, dB) take the lowest program ids so they start first and overlap the GEMM tiles.

Dropout masks are regenerated from the seed (same hash as fused_lora.reference), never stored.
Accumulation is fp32. fp32 operands use INPUT_PRECISION ("ieee" unless torch allows TF32 for
matmul; "tf32x3" for the r-deep LoRA dots with fp32 adapters).
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_lora.reference import dropout_keys, dropout_threshold

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["lora_linear_fwd", "lora_linear_bwd"]


# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _hash32(x):
    # lowbias32 on uint32 (see fused_lora.reference.dropout_hash).
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _keep_mask(offs_m, offs_k, K, key1, key2, DROP_THRESH):
    """Keep-mask of the [BM, BK] tile of an [M, K] input: element (m, k) has index m*K + k."""
    idx = offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    lo = idx.to(tl.uint32)
    hi = (idx >> 32).to(tl.uint32)
    h = _hash32(lo ^ key1.to(tl.uint32))
    h = _hash32(h ^ (key2.to(tl.uint32) + hi * 0x9E3779B9))
    return (h >> 8).to(tl.int32) >= DROP_THRESH


@triton.jit
def _grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
    # Tile order that walks GROUP_M row-blocks per column sweep, so a column block of the
    # weight stays in L2 across consecutive programs (Triton matmul tutorial).
    group_size = GROUP_M * num_n
    group_id = pid // group_size
    first_m = group_id * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % size_m
    pid_n = (pid % group_size) // size_m
    return pid_m, pid_n


# --------------------------------------------------------------------------------------------
# Configs. Hopper/Ampere GEMM tiles (Triton matmul tutorial + LoRAFusion's H100 choice
# 128x256x64, 3 stages, 8 warps); the interpreter gets one config (autotune with several
# configs needs a GPU driver to benchmark).
# --------------------------------------------------------------------------------------------


def _gemm_configs(small_m: bool = False):
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    cfgs = [
        # (BM, BN, BK, stages, warps)
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 256, 32, 4, 4),
    ]
    if small_m:  # decode-like M <= 64: narrow M tiles, wide K for bandwidth
        cfgs += [(16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 128, 64, 3, 4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                      num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in cfgs
    ]


def _small_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32})]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_stages=s, num_warps=w)
        for bm, bk, s, w in [(64, 128, 3, 4), (128, 64, 3, 4), (32, 256, 3, 4), (128, 128, 3, 8),
                             (16, 256, 4, 4)]
    ]


def _block_r(R: int) -> int:
    # tl.dot needs every dim >= 16; r > 64 is looped in 64-wide chunks to bound registers.
    return min(64, max(16, triton.next_power_of_2(R)))


def _m_key(M: int) -> int:
    # Autotune key: a power-of-two bucket of M, so varying sequence lengths don't re-tune.
    return triton.next_power_of_2(max(M, 1))


def _fp32_precision() -> str:
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.autotune(configs=_small_configs(), key=["M_KEY", "K", "R"])
@triton.jit(do_not_specialize=["key1", "key2", "drop_thresh"])
def _lora_shrink_kernel(
    x_ptr, a_ptr, xa_ptr,
    M, K, R, M_KEY,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    key1, key2, drop_thresh, drop_scale,
    HAS_DROPOUT: tl.constexpr, A_FP32: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """xa[m, r] = sum_k drop(x)[m, k] A[r, k], fp32 out. Grid (cdiv(M, BM), cdiv(R, BR))."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        if HAS_DROPOUT:
            keep = _keep_mask(offs_m, offs_k, K, key1, key2, drop_thresh)
            x = tl.where(keep, x, 0.0)
        # A^T tile [BK, BR] loaded transposed through strides.
        a = tl.load(
            a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            mask=mask_k[:, None] & mask_r[None, :], other=0.0,
        )
        if A_FP32:
            acc = tl.dot(x.to(tl.float32), a, acc, input_precision=LORA_PRECISION)
        else:
            acc = tl.dot(x, a.to(x.dtype), acc)
    if HAS_DROPOUT:
        acc = acc * drop_scale
    tl.store(
        xa_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, acc,
        mask=mask_m[:, None] & mask_r[None, :],
    )


@triton.jit
def _fwd_gemm(
    acc, x_ptr, w_ptr, b_ptr, xa_ptr, offs_m, offs_n, mask_m, mask_n, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br,
    scale, INPUT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # LoRA expand first, as the GEMM's initial accumulator (an extra r-deep K step).
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        s = tl.load(
            xa_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
            mask=mask_m[:, None] & mask_r[None, :], other=0.0,
        )
        b = tl.load(  # B^T tile [BR, BN]
            b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
            mask=mask_r[:, None] & mask_n[None, :], other=0.0,
        )
        acc = tl.dot(s, b.to(tl.float32), acc, input_precision=LORA_PRECISION)
    acc = acc * scale

    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptrs + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs + offs_k[:, None] * stride_wk,  # W0^T tile [BK, BN]
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _fwd_gemm_fused_shrink(
    acc, x_ptr, w_ptr, a_ptr, b_ptr, xa_ptr, offs_m, offs_n, mask_m, mask_n, pid_n, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_sm, stride_sr, stride_bn, stride_br, scale,
    INPUT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr, A_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptrs + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs + offs_k[:, None] * stride_wk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        a = tl.load(a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,  # A^T tile
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if A_FP32:
            xa = tl.dot(x.to(tl.float32), a, xa, input_precision=LORA_PRECISION)
        else:
            xa = tl.dot(x, a.to(x.dtype), xa)
    b = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    acc += tl.dot(xa, b.to(tl.float32), input_precision=LORA_PRECISION) * scale
    if pid_n == 0:
        tl.store(xa_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, xa,
                 mask=mask_m[:, None] & mask_r[None, :])
    return acc


@triton.autotune(configs=_gemm_configs(small_m=True), key=["M_KEY", "N", "K", "R", "FUSE_SHRINK"])
@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, xa_ptr, b_ptr, y_ptr,
    M, N, K, R, M_KEY,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br,
    stride_ym, stride_yn,
    scale,
    a_ptr, stride_ar, stride_ak,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    FUSE_SHRINK: tl.constexpr, A_FP32: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = x W0^T + b + scale * xa B^T, one [BM, BN] tile per program, y written once.

    FUSE_SHRINK=False: xa comes from _lora_shrink_kernel. FUSE_SHRINK=True (no dropout,
    R <= BLOCK_R): xa = x A^T is accumulated inside the K loop from the x tiles the GEMM loads
    anyway (no second read of x, one launch fewer), at the price of recomputing it in every
    N-tile program: + BLOCK_R / BLOCK_N extra MMA work (12.5% at r=16, BN=128). Programs with
    pid_n == 0 store xa for backward."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _grouped_pid(pid, num_m, num_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSE_SHRINK:
        acc = _fwd_gemm_fused_shrink(
            acc, x_ptr, w_ptr, a_ptr, b_ptr, xa_ptr, offs_m, offs_n, mask_m, mask_n, pid_n, K, R,
            stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
            stride_sm, stride_sr, stride_bn, stride_br, scale,
            INPUT_PRECISION, LORA_PRECISION, A_FP32, BLOCK_R, BLOCK_M, BLOCK_K,
        )
    else:
        acc = _fwd_gemm(
            acc, x_ptr, w_ptr, b_ptr, xa_ptr, offs_m, offs_n, mask_m, mask_n, K, R,
            stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br,
            scale, INPUT_PRECISION, LORA_PRECISION, BLOCK_R, BLOCK_K,
        )
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def _dropout_args(dropout_p: float, seed: int) -> tuple[int, int, int, float]:
    if dropout_p == 0.0:
        return 0, 0, 0, 1.0
    k1, k2 = dropout_keys(seed)
    return k1, k2, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    *,
    shrink: str = "pre",
) -> tuple[Tensor, Tensor]:
    """Triton forward; same contract as fused_lora.reference.lora_linear_fwd.

    shrink: "pre" (xa by _lora_shrink_kernel, then the GEMM) or "fused" (xa inside the GEMM's
    K loop; only without dropout and for r <= 64, else "pre"; registry entry triton:inloop).
    Which is faster is shape-dependent and must be measured on the GPU (`python -m
    fused_lora.bench linear` times both)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    xa = torch.empty(M, R, device=x.device, dtype=torch.float32)
    if M == 0 or N == 0:
        return y, xa
    if K == 0:
        y.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(y))
        return y, xa.zero_()
    key1, key2, thresh, drop_scale = _dropout_args(dropout_p, seed)
    BLOCK_R = _block_r(R)
    prec = _fp32_precision()
    a_fp32 = lora_A.dtype == torch.float32
    lora_prec = "tf32x3" if (a_fp32 or x.dtype == torch.float32) and prec == "ieee" else "tf32"
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()  # the epilogue reads bias as ptr + n: a strided view reads wrong
    if shrink not in ("pre", "fused"):
        raise ValueError(f"shrink must be 'pre' or 'fused', got {shrink!r}")
    fuse = shrink == "fused" and dropout_p == 0.0 and R <= BLOCK_R
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if not fuse:
            _lora_shrink_kernel[lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(R, BLOCK_R))](
                x, lora_A, xa, M, K, R, _m_key(M),
                x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), xa.stride(0), xa.stride(1),
                key1, key2, thresh, drop_scale,
                HAS_DROPOUT=dropout_p > 0.0, A_FP32=a_fp32, LORA_PRECISION=lora_prec, BLOCK_R=BLOCK_R,
            )
        _lora_fwd_kernel[
            lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
        ](
            x, weight, bias if bias is not None else x, xa, lora_B, y,
            M, N, K, R, _m_key(M),
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            xa.stride(0), xa.stride(1), lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
            float(scale),
            lora_A, lora_A.stride(0), lora_A.stride(1),
            HAS_BIAS=bias is not None, INPUT_PRECISION=prec, LORA_PRECISION=lora_prec,
            FUSE_SHRINK=fuse, A_FP32=a_fp32, BLOCK_R=BLOCK_R,
        )
    return y, xa


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.autotune(configs=_small_configs(), key=["M_KEY", "N", "R"], reset_to_zero=["db_ptr"])
@triton.jit
def _lora_bwd_ds_kernel(
    dy_ptr, b_ptr, xa_ptr, ds_ptr, db_ptr,
    M, N, R, M_KEY,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_dsm, stride_dsr, stride_dbn, stride_dbr,
    scale,
    COMPUTE_DS: tl.constexpr, COMPUTE_DB: tl.constexpr, B_FP32: tl.constexpr,
    LORA_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """ds[m, r] = scale * sum_n dy[m, n] B[n, r] (fp32), reading each dy tile once; with
    COMPUTE_DB the same tile also adds scale * dy^T xa into fp32 dB through atomics
    (nondeterministic summation order; the deterministic path computes dB in _lora_bwd_kernel).
    Grid (cdiv(M, BM), cdiv(R, BR)); BLOCK_K is the N-chunk."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if COMPUTE_DB:
        s = tl.load(xa_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    for n0 in range(0, N, BLOCK_K):
        offs_n = n0 + tl.arange(0, BLOCK_K)
        mask_n = offs_n < N
        dy = tl.load(
            dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_n[None, :], other=0.0,
        )
        if COMPUTE_DS:
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            if B_FP32:
                acc = tl.dot(dy.to(tl.float32), b, acc, input_precision=LORA_PRECISION)
            else:
                acc = tl.dot(dy, b.to(dy.dtype), acc)
        if COMPUTE_DB:
            part = tl.dot(tl.trans(dy.to(tl.float32)), s, input_precision=LORA_PRECISION) * scale
            tl.atomic_add(db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
                          part, mask=mask_n[:, None] & mask_r[None, :])
    if COMPUTE_DS:
        tl.store(ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :] * stride_dsr, acc * scale,
                 mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _bwd_da_program(
    pid, x_ptr, ds_ptr, da_ptr, M, K, R, num_r,
    stride_xm, stride_xk, stride_dsm, stride_dsr, stride_dar, stride_dak,
    key1, key2, drop_thresh, drop_scale,
    HAS_DROPOUT: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA[r, k] = sum_m ds[m, r] drop(x)[m, k] for one (K-block, R-block), looping over M."""
    pid_k = pid // num_r
    pid_r = pid % num_r
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        ).to(tl.float32)
        if HAS_DROPOUT:
            keep = _keep_mask(offs_m, offs_k, K, key1, key2, drop_thresh)
            x = tl.where(keep, x, 0.0)
        ds_t = tl.load(  # ds^T tile [BR, BM]
            ds_ptr + offs_r[:, None] * stride_dsr + offs_m[None, :] * stride_dsm,
            mask=mask_r[:, None] & mask_m[None, :], other=0.0,
        )
        acc = tl.dot(ds_t, x, acc, input_precision=LORA_PRECISION)
    if HAS_DROPOUT:
        acc = acc * drop_scale
    tl.store(da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak,
             acc.to(da_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_k[None, :])


@triton.jit
def _bwd_db_program(
    pid, dy_ptr, xa_ptr, db_ptr, M, N, R, num_r,
    stride_dym, stride_dyn, stride_sm, stride_sr, stride_dbn, stride_dbr, scale,
    LORA_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dB[n, r] = scale * sum_m dy[m, n] xa[m, r] for one (N-block, R-block), looping over M
    (the deterministic path: no atomics)."""
    pid_n = pid // num_r
    pid_r = pid % num_r
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        dy_t = tl.load(  # dy^T tile [BN, BM]
            dy_ptr + offs_n[:, None] * stride_dyn + offs_m[None, :].to(tl.int64) * stride_dym,
            mask=mask_n[:, None] & mask_m[None, :], other=0.0,
        ).to(tl.float32)
        s = tl.load(xa_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(dy_t, s, acc, input_precision=LORA_PRECISION)
    acc = acc * scale
    tl.store(db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
             acc.to(db_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_r[None, :])


@triton.jit
def _bwd_dx_program(
    pid, dy_ptr, w_ptr, a_ptr, ds_ptr, dx_ptr, M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_dsm, stride_dsr, stride_dxm, stride_dxk,
    key1, key2, drop_thresh, drop_scale,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One dx tile [BM, BK] = dy W0 + drop'(ds A): the LoRA term is the initial accumulator."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_m, pid_k = _grouped_pid(pid, num_m, num_k, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        ds = tl.load(ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(ds, a.to(tl.float32), acc, input_precision=LORA_PRECISION)
    if HAS_DROPOUT:
        keep = _keep_mask(offs_m, offs_k, K, key1, key2, drop_thresh)
        acc = tl.where(keep, acc * drop_scale, 0.0)
    dy_ptrs = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym
    w_ptrs = w_ptr + offs_k[None, :] * stride_wk
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptrs + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(w_ptrs + offs_n[:, None].to(tl.int64) * stride_wn,  # W0 tile [BN, BK]
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(dy.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)
    tl.store(dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])



@triton.autotune(configs=_gemm_configs(), key=["M_KEY", "N", "K", "R", "NEED_DX", "NEED_DA", "NEED_DB"])
@triton.jit(do_not_specialize=["key1", "key2", "drop_thresh"])
def _lora_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, a_ptr, ds_ptr, xa_ptr, dx_ptr, da_ptr, db_ptr,
    M, N, K, R, M_KEY,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_dsm, stride_dsr, stride_sm, stride_sr, stride_dxm, stride_dxk,
    stride_dar, stride_dak, stride_dbn, stride_dbr,
    scale, key1, key2, drop_thresh, drop_scale,
    NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One launch, three kinds of program (in this pid order):
    [dA programs: one per (K-block, R-block), loop over M]  dA = ds^T drop(x)
    [dB programs: one per (N-block, R-block), loop over M]  dB = scale * dy^T xa
    [dx tiles: one per (M-block, K-block), loop over N]     dx = dy W0 + drop'(ds A)
    """
    pid = tl.program_id(0)
    num_r = tl.cdiv(R, BLOCK_R)
    num_da = 0
    if NEED_DA:
        num_da = tl.cdiv(K, BLOCK_K) * num_r
    num_db = 0
    if NEED_DB:
        num_db = tl.cdiv(N, BLOCK_N) * num_r
    # Each kind of program is its own function: compiled Triton requires a variable assigned
    # in both arms of a runtime `if` to have one type, and the three tiles differ in shape.
    if pid < num_da:
        _bwd_da_program(
            pid, x_ptr, ds_ptr, da_ptr, M, K, R, num_r,
            stride_xm, stride_xk, stride_dsm, stride_dsr, stride_dar, stride_dak,
            key1, key2, drop_thresh, drop_scale,
            HAS_DROPOUT, LORA_PRECISION, BLOCK_R, BLOCK_M, BLOCK_K,
        )
    elif pid < num_da + num_db:
        _bwd_db_program(
            pid - num_da, dy_ptr, xa_ptr, db_ptr, M, N, R, num_r,
            stride_dym, stride_dyn, stride_sm, stride_sr, stride_dbn, stride_dbr, scale,
            LORA_PRECISION, BLOCK_R, BLOCK_M, BLOCK_N,
        )
    elif NEED_DX:
        _bwd_dx_program(
            pid - num_da - num_db, dy_ptr, w_ptr, a_ptr, ds_ptr, dx_ptr, M, N, K, R,
            stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak,
            stride_dsm, stride_dsr, stride_dxm, stride_dxk,
            key1, key2, drop_thresh, drop_scale,
            HAS_DROPOUT, INPUT_PRECISION, LORA_PRECISION, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )


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
    """Triton backward; same contract as fused_lora.reference.lora_linear_bwd.

    dB is deterministic when torch.are_deterministic_algorithms_enabled(); otherwise the ds
    kernel accumulates it with fp32 atomics, saving one read of dy."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    dx = torch.empty(M, K, device=x.device, dtype=x.dtype) if needs_dx else x.new_empty(0)
    dA = torch.empty_like(lora_A) if needs_dA else lora_A.new_empty(0)
    dB = torch.empty_like(lora_B) if needs_dB else lora_B.new_empty(0)
    if not (needs_dx or needs_dA or needs_dB):
        return dx, dA, dB
    if M == 0 or K == 0 or N == 0:
        # Degenerate sizes: every gradient is an empty sum.
        return dx.zero_(), dA.zero_(), dB.zero_()
    key1, key2, thresh, drop_scale = _dropout_args(dropout_p, seed)
    BLOCK_R = _block_r(R)
    prec = _fp32_precision()
    b_fp32 = lora_B.dtype == torch.float32
    lora_prec = "tf32x3" if (b_fp32 or x.dtype == torch.float32) and prec == "ieee" else "tf32"
    need_ds = needs_dx or needs_dA
    deterministic = torch.are_deterministic_algorithms_enabled()
    atomic_db = needs_dB and not deterministic
    ds = torch.empty(M, R, device=x.device, dtype=torch.float32) if need_ds else xa
    db_acc = torch.zeros(N, R, device=x.device, dtype=torch.float32) if atomic_db else dB
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if need_ds or atomic_db:
            _lora_bwd_ds_kernel[lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(R, BLOCK_R))](
                dy, lora_B, xa, ds, db_acc, M, N, R, _m_key(M),
                dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1),
                xa.stride(0), xa.stride(1), ds.stride(0), ds.stride(1),
                db_acc.stride(0) if atomic_db else 0, db_acc.stride(1) if atomic_db else 0,
                float(scale),
                COMPUTE_DS=need_ds, COMPUTE_DB=atomic_db, B_FP32=b_fp32, LORA_PRECISION=lora_prec,
                BLOCK_R=BLOCK_R,
            )
        det_db = needs_dB and deterministic
        if needs_dx or needs_dA or det_db:
            def grid(META):
                nr = triton.cdiv(R, BLOCK_R)
                n = 0
                if needs_dA:
                    n += triton.cdiv(K, META["BLOCK_K"]) * nr
                if det_db:
                    n += triton.cdiv(N, META["BLOCK_N"]) * nr
                if needs_dx:
                    n += triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(K, META["BLOCK_K"])
                return (n,)

            dxt = dx if needs_dx else x
            dat = dA if needs_dA else lora_A
            dbt = dB if det_db else lora_B
            _lora_bwd_kernel[grid](
                dy, x, weight, lora_A, ds, xa, dxt, dat, dbt,
                M, N, K, R, _m_key(M),
                dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
                weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
                ds.stride(0), ds.stride(1), xa.stride(0), xa.stride(1),
                dxt.stride(0), dxt.stride(1), dat.stride(0), dat.stride(1),
                dbt.stride(0), dbt.stride(1),
                float(scale), key1, key2, thresh, drop_scale,
                NEED_DX=needs_dx, NEED_DA=needs_dA, NEED_DB=det_db,
                HAS_DROPOUT=dropout_p > 0.0, INPUT_PRECISION=prec, LORA_PRECISION=lora_prec,
                BLOCK_R=BLOCK_R,
            )
    if atomic_db:
        dB.copy_(db_acc)
    return dx, dA, dB

