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

The GEMM main loops are the Triton tutorial's (kernels/plain_gemm.py): the kernel audit
(python -m fused_lora.kernels.audit) compiles them beside it for sm_90a and gates on spills,
serialised wgmma, unlaunchable configs and instructions per K step (<= 1.15x the tutorial's).
The LoRA terms enter the GEMM accumulator after the main loop (the dx term with dropout: before
it), so the first prefetches are not delayed and the wgmma chain stays unbroken.

Dropout masks are regenerated from the seed (same hash as fused_lora.reference), never stored.
Accumulation is fp32. fp32 operands use INPUT_PRECISION ("ieee" unless torch allows TF32 for
matmul); the r-deep LoRA dots use lora_precision(): "bf16x3" (hi / lo bf16 splits on the
16-bit tensor-core path) for fp32 adapters with 16-bit activations, "tf32x3" with fp32 ones.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_lora.kernels.target import gpu_of
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


# The r-deep LoRA dots with fp32 operands (PEFT keeps adapters in fp32; xa / ds are fp32) next
# to a 16-bit GEMM. Triton's "tf32x3" for them spilled 200-1504 B and serialised the backward's
# wgmma chain (kernel audit, sm_90a, 8192 x 4096^2, r = 16). "bf16x3" instead splits each fp32
# (or fp16) operand into bf16 hi + lo (t = hi + lo to 2^-16 relative, bf16 keeps fp32's range)
# and sums the three products that matter, small ones first, on the 16-bit tensor-core path
# the GEMM itself uses: ~2^-16 relative error on the LoRA term, 2^7 below the bf16 (2^-9) and
# 2^5 below the fp16 (2^-11) rounding of the outputs it is added to.
# Under the interpreter bf16 dots are wrong, so there the same split products are summed in
# fp32 (the split's rounding is still what is tested).
_EMULATE_BF16_DOT = tl.constexpr(INTERPRET)


@triton.jit
def _bf16_hi_lo(t):
    hi = t.to(tl.bfloat16)
    return hi, (t.to(tl.float32) - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _bf16_dot(a, b, acc):
    if _EMULATE_BF16_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _lora_dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b for LoRA's r-deep dots; PRECISION "bf16x3" (see above) or a tl.dot
    input_precision for fp32 operands ("tf32", "tf32x3", "ieee")."""
    if PRECISION == "bf16x3":
        if a.dtype == tl.bfloat16:
            b_hi, b_lo = _bf16_hi_lo(b)
            acc = _bf16_dot(a, b_lo, acc)
            acc = _bf16_dot(a, b_hi, acc)
        elif b.dtype == tl.bfloat16:
            a_hi, a_lo = _bf16_hi_lo(a)
            acc = _bf16_dot(a_lo, b, acc)
            acc = _bf16_dot(a_hi, b, acc)
        else:
            a_hi, a_lo = _bf16_hi_lo(a)
            b_hi, b_lo = _bf16_hi_lo(b)
            acc = _bf16_dot(a_lo, b_hi, acc)
            acc = _bf16_dot(a_hi, b_lo, acc)
            acc = _bf16_dot(a_hi, b_hi, acc)
        return acc
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)


@triton.jit
def _lora_expand(acc, s_ptr, p_ptr, offs_m, offs_n, mask_m, mask_n, R,
                 stride_sm, stride_sr, stride_pr, stride_pn, scale,
                 PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNKS: tl.constexpr):
    """acc + scale * S[offs_m, :R] P[:R, offs_n], the r-deep LoRA step every GEMM of this file
    adds to its accumulator (forward: S = xa, P = B^T; dx: S = ds, P = A), in R_CHUNKS = cdiv(R,
    BLOCK_R) static steps (1 up to r = 64). The scale goes on the [BM, BR] S tile (1/16 of the
    multiplies of scaling a 128 x 256 accumulator at r = 16, and no non-wgmma write to acc)."""
    for c in tl.static_range(R_CHUNKS):
        offs_r = c * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        t = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0) * scale
        p = tl.load(p_ptr + offs_r[:, None] * stride_pr + offs_n[None, :] * stride_pn,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = _lora_dot(t, p, acc, PRECISION)
    return acc


# The expand's rank chunk (every _lora_expand call): 16, the narrowest tl.dot K, whatever the
# shrink's BLOCK_R. At r = 64 a 64-wide chunk held S / P hi-lo splits of 64 columns at once
# beside the accumulator: 80-680 B of spills in the dx and forward epilogues (audit, sm_90a,
# train-*-r64); 16-wide static chunks keep one quarter of that live.
_EXPAND_R = 16


def lora_precision(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> str:
    """The LoRA dots' precision for activations x_dtype and adapters adapter_dtype: "tf32" when
    torch allows TF32 for matmul or the adapters are 16-bit (their dots then read fp32 xa / ds
    against 16-bit adapters: tf32 keeps both exactly enough at r-deep K), "bf16x3" for fp32
    adapters with 16-bit activations, "tf32x3" for fp32 activations."""
    if torch.backends.cuda.matmul.allow_tf32 or adapter_dtype != torch.float32 and x_dtype != torch.float32:
        return "tf32"
    return "tf32x3" if x_dtype == torch.float32 else "bf16x3"


# --------------------------------------------------------------------------------------------
# Configs. Hopper/Ampere GEMM tiles (Triton matmul tutorial + LoRAFusion's H100 choice
# 128x256x64, 3 stages, 8 warps); the interpreter gets one config (autotune with several
# configs needs a GPU driver to benchmark).
# --------------------------------------------------------------------------------------------


def _tile_configs(cfgs, pre_hook=None):
    """(BM, BN, BK, stages, warps) tuples as autotune configs; the interpreter's one config."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, pre_hook=pre_hook)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_stages=s, num_warps=w, pre_hook=pre_hook)
            for bm, bn, bk, s, w in cfgs]


def _gemm_configs(small_m: bool = False):
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
    return _tile_configs(cfgs)


# The backward's dA / dB programs have tiles of their own, whatever the dx config: [BR, 128]
# of dA and [128, BR] of dB, stepping 64 rows of M (dA reads x [64, 128] per step). Tied to
# the dx tile they grew with it: at the 128 x 256 dx tile dA's [128, 256] x steps took 278 KB
# of shared memory (kernel audit, sm_90a). Under the interpreter: 32, so that small test shapes
# still span several blocks.
WB_BLOCK_M = tl.constexpr(32 if INTERPRET else 64)
DA_BLOCK_K = tl.constexpr(32 if INTERPRET else 128)
DB_BLOCK_N = tl.constexpr(32 if INTERPRET else 128)


def _smem_limit(t) -> Optional[int]:
    """Opt-in shared memory per block of t's GPU (or of the audit's pinned one; None off a GPU:
    nothing to prune against)."""
    g = gpu_of(t)
    return g.smem_optin if g is not None and g.smem_optin else None


def _pipeline_smem(c, elt: int, a_rows: str, b_cols: str, step: str) -> int:
    kw = c.kwargs
    return c.num_stages * (kw[a_rows] * kw[step] + kw[step] * kw[b_cols]) * elt


def _tile(c) -> tuple:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]


# In-loop shrink on sm_80 (HMMA keeps the operands in registers): these forward tiles spilled
# 32-208 B with the [BM, BR] xa accumulator beside acc (audit, sm_80, bf16 / fp16, r = 16); on
# sm_90a (wgmma reads shared memory) all compile clean.
_SM80_FUSED_SPILLS = {(128, 256, 64), (256, 128, 64), (128, 128, 64), (64, 256, 32)}


# fp32 adapters at r > 32 on sm_80: these forward tiles spilled 8-24 B in the expand (the
# bf16 hi / lo parts of four 16-rank B chunks beside 128 accumulators per thread; audit, sm_80).
_SM80_FP32A_WIDE_SPILLS = {(128, 128, 32), (128, 128, 64), (128, 256, 64), (64, 256, 32)}


def _prune_fwd_configs(configs, named_args, **kwargs):
    """Configs whose pipelined x / W0 tiles alone exceed the GPU's shared memory are dropped
    before autotuning (each would cost a compile and fail to launch). At r > 32 the 32x64x128
    decode tile spilled 8 B (the expand's four 16-rank chunks; audit, sm_90a, bf16, r = 64);
    on sm_80 the in-loop shrink drops the tiles of _SM80_FUSED_SPILLS, fp32 adapters at r > 32
    those of _SM80_FP32A_WIDE_SPILLS."""
    x = named_args.get("x_ptr")
    lim, g = _smem_limit(x), gpu_of(x)
    kept = configs
    if lim is not None:
        elt = x.element_size()
        kept = [c for c in kept if _pipeline_smem(c, elt, "BLOCK_M", "BLOCK_N", "BLOCK_K") <= lim]
    if g is None:
        return kept or configs[-1:]
    if named_args.get("R", 0) > 32:
        kept = [c for c in kept if _tile(c) != (32, 64, 128)]
    if kwargs.get("FUSE_SHRINK") and g.major < 9:
        kept = [c for c in kept if _tile(c) not in _SM80_FUSED_SPILLS]
    if g.major < 9 and named_args.get("R", 0) > 32 and _fp32_adapter(named_args):
        kept = [c for c in kept if _tile(c) not in _SM80_FP32A_WIDE_SPILLS]
    return kept or configs[-1:]


def _prune_dx_configs(configs, named_args, **kwargs):
    """Shared memory as _prune_fwd_configs (dy [BM, BN] and W0 [BN, BK] tiles per stage).
    With dropout the dx tile also holds the keep-mask hash of the LoRA term (prologue):
    tiles of more than 64 fp32 accumulators per thread spilled 216-712 B (audit, sm_90a), so
    dropout keeps the smaller tiles; at r > 32 (four 16-rank chunks of that term) the 4-warp
    ones spilled 16-32 B too (audit, sm_90a, bf16 / fp32 adapters, r = 64), so it keeps the
    8-warp tile."""
    dy = named_args.get("dy_ptr")
    lim, g = _smem_limit(dy), gpu_of(dy)
    if lim is not None:
        elt = dy.element_size()
        configs = [c for c in configs
                   if _pipeline_smem(c, elt, "BLOCK_M", "BLOCK_K", "BLOCK_N") <= lim] or configs[-1:]
    if g is not None and g.major < 9:
        configs = _prune_dx_sm80(configs, named_args, bool(kwargs.get("HAS_DROPOUT")))
    if not kwargs.get("HAS_DROPOUT"):
        return configs
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] <= 64 * 32 * c.num_warps]
    if named_args.get("R", 0) > 32:
        kept = [c for c in kept if c.num_warps == 8] or kept
    return kept or configs


def _fp32_adapter(named_args) -> bool:
    """fp32 adapters with 16-bit activations (PEFT's default): the bf16 hi / lo split path."""
    act = named_args.get("x_ptr", named_args.get("dy_ptr"))
    lora = [t for t in (named_args.get("a_ptr"), named_args.get("b_ptr")) if isinstance(t, Tensor)]
    return act.dtype != torch.float32 and any(t.dtype == torch.float32 for t in lora)


def _prune_dx_sm80(configs, named_args, has_dropout: bool):
    """sm_80 only (HMMA, operands in registers; audit, sm_80): without dropout the 4-warp
    128x64x64 and 64x64x128 dx tiles ran 1.16-1.18x the plain GEMM's instructions per K step
    (and 128x64x64 spilled 8 B); with fp32 adapters the 4-warp 128x64x128 / 64x64x256 ones
    spilled 16-24 B at r = 16 (the bf16 hi / lo parts of the A chunk), and at r = 64 all but
    the 64x64x64 one."""
    tile = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps): c for c in configs}
    drop = set()
    if not has_dropout:
        drop |= {(128, 64, 64, 4), (64, 64, 128, 4)}
    if _fp32_adapter(named_args):
        drop |= {(128, 64, 128, 4), (64, 64, 256, 4)}
        if named_args.get("R", 0) > 32:  # every other tile spilled 8-136 B at r = 64
            drop |= {k for k in tile if k != (64, 64, 64, 4)}
    return [c for k, c in tile.items() if k not in drop] or configs


def _prune_small_configs(configs, named_args, **kwargs):
    """The shrink's and the ds kernel's configs at 64-rank blocks (r > 32): the 256-deep
    K tiles spilled 8-264 B (audit, sm_90a, r = 64; the [256, 64] A / B tile, x3 as bf16
    hi / lo parts with fp32 adapters), so they go; with dropout the shrink's 4-warp tiles
    serialised every wgmma (C7515 at 239-249 registers, sm_90a) and it keeps the 8-warp one.
    On sm_80 (audit): fp32 adapters drop the 256-deep tiles at any rank (8 B at r = 16), at
    64-rank blocks the 64x128 tile goes (104 B with bf16 adapters), and the ds kernel with fp32
    B at 32-rank blocks (_rank_block) keeps the 64-deep tiles (8-64 B at 128)."""
    g = gpu_of(named_args.get("x_ptr", named_args.get("dy_ptr")))
    if g is None:
        return configs
    wide = kwargs.get("BLOCK_R", 0) > 32  # one 64-rank block (see _rank_block)
    kept = configs
    if wide or (g.major < 9 and _fp32_adapter(named_args)):
        kept = [c for c in kept if c.kwargs["BLOCK_K"] < 256]
    if wide and g.major < 9:
        kept = [c for c in kept if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]) != (64, 128)]
    ds = "dy_ptr" in named_args
    if g.major < 9 and ds and kwargs.get("BLOCK_R", 0) >= 32 and _fp32_adapter(named_args):
        kept = [c for c in kept if c.kwargs["BLOCK_K"] < 128]  # fp32 B at 32 ranks: 8-64 B
    if wide and kwargs.get("HAS_DROPOUT"):
        kept = [c for c in kept if c.num_warps == 8] or kept
    return kept or configs[-1:]


def _dx_configs(pre_hook=None):
    """The backward's configs. Its main GEMM is dx [M, K] = dy W0: output tile BLOCK_M x BLOCK_K,
    K step BLOCK_N over N. Forward-tuned configs gave it output tiles of 128x64 at best (16x
    m64n64k16 per step, twice the L2 traffic of 128x256) and two configs of 288 / 240 KB of
    shared memory that could never launch; these are its own: up to 128x256 output tiles at a
    64-deep K step (3 stages x 48 KB = 144 KB), down to 64x64. The dA / dB programs of the
    same launch have tiles of their own (WB_BLOCK_M, DA_BLOCK_K, DB_BLOCK_N)."""
    cfgs = [
        # (BM, BN = K step, BK, stages, warps); the first three hold 128 accumulators /
        # thread (no dropout), the others 32-64 (any).
        (128, 64, 256, 3, 8),
        (128, 64, 128, 4, 4),
        (64, 64, 256, 4, 4),
        (128, 64, 128, 3, 8),
        (128, 64, 64, 4, 4),
        (64, 64, 128, 4, 4),
        (64, 64, 64, 4, 4),
    ]
    return _tile_configs(cfgs, pre_hook=pre_hook)


def _small_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32})]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_stages=s, num_warps=w)
        for bm, bk, s, w in [(64, 128, 3, 4), (128, 64, 3, 4), (32, 256, 3, 4), (128, 128, 3, 8),
                             (16, 256, 3, 4)]
    ]


def _block_r(R: int) -> int:
    # tl.dot needs every dim >= 16; r > 64 is looped in 64-wide chunks to bound registers.
    return min(64, max(16, triton.next_power_of_2(R)))


def _rank_block(R: int, x: Tensor, lora: Tensor) -> int:
    """The single-adapter kernels' rank block: _block_r, except 32 on sm_80 with fp32 adapters
    at r > 32. There the bf16 hi / lo parts of a 64-rank operand live in registers (HMMA) and
    every shrink / ds config spilled 8-976 B, the backward's dA programs 8-136 B (audit, sm_80,
    r = 64); 32-rank blocks cost one more read of x (shrink) or dy (ds) per extra block."""
    g = gpu_of(x)
    if R > 32 and g is not None and g.major < 9 and lora.dtype == torch.float32 and x.dtype != torch.float32:
        return 32
    return _block_r(R)


def _tile_safe(t: Tensor) -> Tensor:
    """t, or a contiguous copy when a stride is so large that a tile's 32-bit offsets could
    overflow (_tile_ptrs: tile edge x stride < 2^31 needs strides < 2^22 at 512-wide tiles)."""
    return t if max(t.stride(), default=0) < 2**22 else t.contiguous()


def _m_key(M: int) -> int:
    # Autotune key: a power-of-two bucket of M, so varying sequence lengths don't re-tune.
    return triton.next_power_of_2(max(M, 1))


def _fp32_precision() -> str:
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.autotune(configs=_small_configs(), key=["M_KEY", "K", "R", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_small_configs})
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
            acc = _lora_dot(x, a, acc, LORA_PRECISION)
        else:
            acc = tl.dot(x, a.to(x.dtype), acc)
    if HAS_DROPOUT:
        acc = acc * drop_scale
    tl.store(
        xa_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, acc,
        mask=mask_m[:, None] & mask_r[None, :],
    )


@triton.jit
def _tile_ptrs(a_ptr, b_ptr, m0, n0, M, N, stride_am, stride_ak, stride_bn, stride_bk,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pointers to the first [BM, BK] tile of a (rows m0 + i) and [BK, BN] tile of b^T (rows
    n0 + j of b [N, K]): a 64-bit scalar base at the tile's first row / column and 32-bit
    offsets inside the tile (BM x stride < 2^31 for any row stride below 2^24). Rows and
    columns past M / N wrap to the tile's start (i % (M - m0)), so every load is in bounds
    without an M / N mask (the wrapped rows are never stored), and the offsets stay
    contiguous: M - m0 keeps the 16-divisibility of M, so 16-byte loads survive along a
    contiguous dimension (a clamp to the last row made them 2-byte loads in the dx GEMM)."""
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.arange(0, BLOCK_M) % (M - m0)
    cols = tl.arange(0, BLOCK_N) % (N - n0)
    a_ptrs = (a_ptr + m0.to(tl.int64) * stride_am) + (rows[:, None] * stride_am + offs_k[None, :] * stride_ak)
    b_ptrs = (b_ptr + n0.to(tl.int64) * stride_bn) + (cols[None, :] * stride_bn + offs_k[:, None] * stride_bk)
    return a_ptrs, b_ptrs


@triton.jit
def _fwd_gemm(
    acc, x_ptr, w_ptr, b_ptr, xa_ptr, pid_m, pid_n, M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br,
    scale, INPUT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, EXPAND_R: tl.constexpr, R_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The main loop is the Triton tutorial's GEMM (kernels/plain_gemm.py, the audit's
    # yardstick), addressed by _tile_ptrs: only the K tail is masked, pointers are bumped.
    # Per-load M / N / K masks, 64-bit offset tensors, or offsets added to the pointer in two
    # steps each cost 24-34 more instructions per K step (sm_90a: 133 vs 99 at 128x256x64).
    x_ptrs, w_ptrs = _tile_ptrs(x_ptr, w_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, stride_xm, stride_xk,
                                stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        x = tl.load(x_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)  # W0^T [BK, BN]
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    # The LoRA expand after the main loop, one more r-deep K step into the same accumulator
    # (_lora_expand). Before the loop it delayed the first prefetches by its own loads, and
    # its `acc *= scale` wrote the accumulator between two wgmma chains.
    return _lora_expand(acc, xa_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, R, stride_sm, stride_sr,
                        stride_br, stride_bn, scale, LORA_PRECISION, EXPAND_R, R_CHUNKS)


@triton.jit
def _fwd_gemm_fused_shrink(
    acc, x_ptr, w_ptr, a_ptr, b_ptr, xa_ptr, pid_m, pid_n, M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_sm, stride_sr, stride_bn, stride_br, scale,
    INPUT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr, A_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The main loop of _fwd_gemm plus the r-wide shrink dot on the same x tile. The expand goes
    # into acc itself (with the scale on the [BM, BR] xa): adding a second [BM, BN] dot result
    # to acc doubled the accumulator registers and spilled 256-560 B (audit, sm_90a).
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    x_ptrs, w_ptrs = _tile_ptrs(x_ptr, w_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, stride_xm, stride_xk,
                                stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_k[:, None] * stride_ak + (offs_r % R)[None, :] * stride_ar)  # A^T tile
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        x = tl.load(x_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        a = tl.load(a_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        if A_FP32:
            xa = _lora_dot(x, a, xa, LORA_PRECISION)
        else:
            xa = tl.dot(x, a.to(x.dtype), xa)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
    xa = tl.where(mask_r[None, :], xa, 0.0)  # columns past R read A's rows again (% R)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    if pid_n == 0:
        tl.store(xa_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, xa,
                 mask=mask_m[:, None] & mask_r[None, :])
    b = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                mask=mask_r[:, None] & (offs_n < N)[None, :], other=0.0)
    acc = _lora_dot(xa * scale, b, acc, LORA_PRECISION)
    return acc


@triton.autotune(configs=_gemm_configs(small_m=True), key=["M_KEY", "N", "K", "R", "FUSE_SHRINK"],
                 prune_configs_by={"early_config_prune": _prune_fwd_configs})
@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, xa_ptr, b_ptr, y_ptr,
    M, N, K, R, M_KEY,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br,
    stride_ym, stride_yn,
    scale,
    a_ptr, stride_ar, stride_ak,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    FUSE_SHRINK: tl.constexpr, A_FP32: tl.constexpr, BLOCK_R: tl.constexpr, EXPAND_R: tl.constexpr,
    R_CHUNKS: tl.constexpr,
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
            acc, x_ptr, w_ptr, a_ptr, b_ptr, xa_ptr, pid_m, pid_n, M, N, K, R,
            stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
            stride_sm, stride_sr, stride_bn, stride_br, scale,
            INPUT_PRECISION, LORA_PRECISION, A_FP32, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K,
        )
    else:
        acc = _fwd_gemm(
            acc, x_ptr, w_ptr, b_ptr, xa_ptr, pid_m, pid_n, M, N, K, R,
            stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br,
            scale, INPUT_PRECISION, LORA_PRECISION, BLOCK_R, EXPAND_R, R_CHUNKS, BLOCK_M, BLOCK_N, BLOCK_K,
        )
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


# --------------------------------------------------------------------------------------------
# Forward with TMA loads (registry entry triton:tma; sm_90+)
# --------------------------------------------------------------------------------------------

try:  # host-side TMA descriptors: Triton >= 3.4 (the GPU image's 3.6 and CI's 3.8 have them)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None


def _tma_block_hook(nargs):
    # Autotune pre-hook (the TMA tutorial's pattern): each config's tile is the descriptors'
    # block shape, set before that config launches.
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk]


def _tma_configs():
    return _tile_configs([(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4),
                          (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
                         pre_hook=_tma_block_hook)


@triton.jit
def _fwd_tma_epilogue(acc, bias_ptr, xa_ptr, b_ptr, y_ptr, m0, n0, M, N, R,
                      stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn, scale,
                      HAS_BIAS: tl.constexpr, LORA_PRECISION: tl.constexpr, EXPAND_R: tl.constexpr,
                      R_CHUNKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # The TMA forwards' tile end: + scale * xa B^T (after the K loop), + bias, y written once.
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = _lora_expand(acc, xa_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, R, stride_sm, stride_sr,
                       stride_br, stride_bn, scale, LORA_PRECISION, EXPAND_R, R_CHUNKS)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=_tma_configs(), key=["M_KEY", "N", "K", "R"])
@triton.jit
def _lora_fwd_tma_kernel(
    x_desc, w_desc, bias_ptr, xa_ptr, b_ptr, y_ptr,
    M, N, K, R, M_KEY,
    stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn,
    scale,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, EXPAND_R: tl.constexpr, R_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """_lora_fwd_kernel with the x / W0 tiles loaded by TMA (the tensor-memory accelerator:
    one descriptor-driven copy per tile into shared memory, out-of-bounds rows and columns
    zero-filled, no address arithmetic or masks in the loop), as Triton's TMA matmul tutorial
    (09-persistent-matmul, matmul_kernel_tma) loads them; the expand after the loop and the
    store as in _lora_fwd_kernel. xa comes from _lora_shrink_kernel."""
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_pid(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        x = x_desc.load([m0, k * BLOCK_K])
        w = w_desc.load([n0, k * BLOCK_K])  # W0 tile [BN, BK]
        acc = tl.dot(x, w.T, acc, input_precision=INPUT_PRECISION)
    _fwd_tma_epilogue(acc, bias_ptr, xa_ptr, b_ptr, y_ptr, m0, n0, M, N, R,
                      stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn, scale,
                      HAS_BIAS, LORA_PRECISION, EXPAND_R, R_CHUNKS, BLOCK_M, BLOCK_N)


@triton.autotune(configs=_tma_configs(), key=["M_KEY", "N", "K", "R", "NUM_SMS"])
@triton.jit
def _lora_fwd_tma_persistent_kernel(
    x_desc, w_desc, bias_ptr, xa_ptr, b_ptr, y_ptr,
    M, N, K, R, M_KEY,
    stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn,
    scale,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, EXPAND_R: tl.constexpr, R_CHUNKS: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """_lora_fwd_tma_kernel made persistent, as the tutorial's matmul_kernel_tma_persistent:
    min(NUM_SMS, tiles) programs, each walking the tiles start, start + NUM_SMS, ... in the
    grouped order. At M = 8192, N = 4096 and 128x256 tiles that is 1024 tiles on 132 SMs, 7.8
    per program: the launch and each CTA's set-up are paid once per SM, not once per tile.
    The tile loop is not flattened into the K loop's pipeline (the tutorial's flatten=True):
    flattened, the expand's dots sat inside the pipeline and ptxas serialised every wgmma
    (C7515 on all 6 configs; audit, sm_90a); unflattened the K loop is the TMA kernel's (87
    instructions per step at 128x256x64, none serialised)."""
    start = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(start, num_m * num_n, NUM_SMS):  # not flatten=True (above)
        pid_m, pid_n = _grouped_pid(tile, num_m, num_n, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, k_tiles):
            x = x_desc.load([m0, k * BLOCK_K])
            w = w_desc.load([n0, k * BLOCK_K])
            acc = tl.dot(x, w.T, acc, input_precision=INPUT_PRECISION)
        _fwd_tma_epilogue(acc, bias_ptr, xa_ptr, b_ptr, y_ptr, m0, n0, M, N, R,
                          stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn, scale,
                          HAS_BIAS, LORA_PRECISION, EXPAND_R, R_CHUNKS, BLOCK_M, BLOCK_N)


def tma_unavailable(x: Tensor, weight: Tensor) -> str:
    """Why the TMA forward cannot take (x, weight), or "" when it can."""
    if TensorDescriptor is None:
        return f"Triton {triton.__version__} has no host tensor descriptors (triton.tools.tensor_descriptor)"
    if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9:
        return "TMA needs an sm_90+ GPU (Hopper or newer)"
    for name, t in (("x", x), ("weight", weight)):
        es = t.element_size()
        if t.stride(-1) != 1 or (t.stride(0) * es) % 16 or t.data_ptr() % 16:
            return f"TMA needs {name} with a unit last stride and 16-byte aligned rows and base"
    return ""


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
    tma: bool = False,
    persistent: bool = False,
) -> tuple[Tensor, Tensor]:
    """Triton forward; same contract as fused_lora.reference.lora_linear_fwd.

    shrink: "pre" (xa by _lora_shrink_kernel, then the GEMM) or "fused" (xa inside the GEMM's
    K loop; only without dropout, for r <= 32 and 16-bit adapters, else "pre"; registry entry
    triton:inloop).
    Which is faster is shape-dependent and must be measured on the GPU (`python -m
    fused_lora.bench linear` times both). tma: the GEMM's x / W0 tiles by TMA
    (_lora_fwd_tma_kernel, entry triton:tma) with the pre-kernel shrink; where TMA cannot take
    the operands (tma_unavailable), the pointer GEMM runs. persistent (with tma): one program
    per SM walking the tiles (_lora_fwd_tma_persistent_kernel, entry triton:tma_persistent)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    x, weight = _tile_safe(x), _tile_safe(weight)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    xa = torch.empty(M, R, device=x.device, dtype=torch.float32)
    if M == 0 or N == 0:
        return y, xa
    if K == 0:
        y.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(y))
        return y, xa.zero_()
    key1, key2, thresh, drop_scale = _dropout_args(dropout_p, seed)
    BLOCK_R = _rank_block(R, x, lora_A)
    prec = _fp32_precision()
    a_fp32 = lora_A.dtype == torch.float32
    lora_prec = lora_precision(x.dtype, lora_A.dtype)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()  # the epilogue reads bias as ptr + n: a strided view reads wrong
    if shrink not in ("pre", "fused"):
        raise ValueError(f"shrink must be 'pre' or 'fused', got {shrink!r}")
    # fp32 adapters: the bf16 hi / lo split of every A tile inside the K loop cost 1.8-5.3x the
    # plain GEMM's instructions per step (audit, sm_90a), so they take the pre-kernel; so does
    # r > 32 (the [BM, 64] xa accumulator beside acc spilled 16-88 B at r = 64).
    fuse = shrink == "fused" and dropout_p == 0.0 and R <= 32 and not a_fp32
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if not fuse:
            _lora_shrink_kernel[lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(R, BLOCK_R))](
                x, lora_A, xa, M, K, R, _m_key(M),
                x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), xa.stride(0), xa.stride(1),
                key1, key2, thresh, drop_scale,
                HAS_DROPOUT=dropout_p > 0.0, A_FP32=a_fp32, LORA_PRECISION=lora_prec, BLOCK_R=BLOCK_R,
            )
        if tma and not fuse and not tma_unavailable(x, weight):
            # block shapes are placeholders: the autotune pre-hook sets each config's tile
            x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [32, 32])
            w_desc = TensorDescriptor(weight, list(weight.shape), list(weight.stride()), [32, 32])
            args = (x_desc, w_desc, bias if bias is not None else x, xa, lora_B, y,
                    M, N, K, R, _m_key(M),
                    xa.stride(0), xa.stride(1), lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
                    float(scale))
            meta = dict(HAS_BIAS=bias is not None, INPUT_PRECISION=prec, LORA_PRECISION=lora_prec,
                        BLOCK_R=BLOCK_R, EXPAND_R=_EXPAND_R, R_CHUNKS=triton.cdiv(R, _EXPAND_R))

            def tiles(META):
                return triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"])

            if persistent:
                g = gpu_of(x)
                # Off a GPU (the interpreter) 3 programs, so that each walks several tiles.
                n_sms = g.sms if g is not None else 3
                _lora_fwd_tma_persistent_kernel[lambda META: (min(n_sms, tiles(META)),)](
                    *args, **meta, NUM_SMS=n_sms)
            else:
                _lora_fwd_tma_kernel[lambda META: (tiles(META),)](*args, **meta)
            return y, xa
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
            FUSE_SHRINK=fuse, A_FP32=a_fp32, BLOCK_R=BLOCK_R, EXPAND_R=_EXPAND_R,
            R_CHUNKS=triton.cdiv(R, _EXPAND_R),
        )
    return y, xa


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.autotune(configs=_small_configs(), key=["M_KEY", "N", "R"], reset_to_zero=["db_ptr"],
                 prune_configs_by={"early_config_prune": _prune_small_configs})
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
                acc = _lora_dot(dy, b, acc, LORA_PRECISION)
            else:
                acc = tl.dot(dy, b.to(dy.dtype), acc)
        if COMPUTE_DB:
            part = _lora_dot(tl.trans(dy), s, tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32),
                             LORA_PRECISION) * scale
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
        )
        if HAS_DROPOUT:
            keep = _keep_mask(offs_m, offs_k, K, key1, key2, drop_thresh)
            x = tl.where(keep, x, 0.0)
        ds_t = tl.load(  # ds^T tile [BR, BM]
            ds_ptr + offs_r[:, None] * stride_dsr + offs_m[None, :] * stride_dsm,
            mask=mask_r[:, None] & mask_m[None, :], other=0.0,
        )
        acc = _lora_dot(ds_t, x, acc, LORA_PRECISION)
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
        )
        s = tl.load(xa_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        acc = _lora_dot(dy_t, s, acc, LORA_PRECISION)
    acc = acc * scale
    tl.store(db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
             acc.to(db_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_r[None, :])


@triton.jit
def _dx_lora_term(acc, ds_ptr, a_ptr, offs_m, offs_k, mask_m, mask_k, K, R,
                  stride_dsm, stride_dsr, stride_ar, stride_ak, key1, key2, drop_thresh, drop_scale,
                  HAS_DROPOUT: tl.constexpr, LORA_PRECISION: tl.constexpr, EXPAND_R: tl.constexpr,
                  R_CHUNKS: tl.constexpr, BEFORE_LOOP: tl.constexpr):
    """drop'(ds A) into a dx accumulator, called before and after the main loop; it acts in one
    of them. Without dropout: after the loop, one more r-deep step into the same accumulator
    (before the loop it delayed the first prefetches, and with fp32 adapters ptxas serialised
    the wgmma chain it fed: C7515, kernel audit). With dropout: before it, masked on its own as
    the tile's initial value (a second [BM, BK] fp32 tile after the loop would double the
    accumulator registers)."""
    if HAS_DROPOUT == BEFORE_LOOP:
        acc = _lora_expand(acc, ds_ptr, a_ptr, offs_m, offs_k, mask_m, mask_k, R,
                           stride_dsm, stride_dsr, stride_ar, stride_ak, 1.0, LORA_PRECISION, EXPAND_R,
                           R_CHUNKS)
        if HAS_DROPOUT:
            keep = _keep_mask(offs_m, offs_k, K, key1, key2, drop_thresh)
            acc = tl.where(keep, acc * drop_scale, 0.0)
    return acc


@triton.jit
def _bwd_dx_program(
    pid, dy_ptr, w_ptr, a_ptr, ds_ptr, dx_ptr, M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_dsm, stride_dsr, stride_dxm, stride_dxk,
    key1, key2, drop_thresh, drop_scale,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, EXPAND_R: tl.constexpr, R_CHUNKS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One dx tile [BM, BK] = dy W0 + drop'(ds A), K step BLOCK_N over N; the LoRA term where
    _dx_lora_term places it."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_m, pid_k = _grouped_pid(pid, num_m, num_k, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc = _dx_lora_term(acc, ds_ptr, a_ptr, offs_m, offs_k, mask_m, mask_k, K, R,
                        stride_dsm, stride_dsr, stride_ar, stride_ak, key1, key2, drop_thresh, drop_scale,
                        HAS_DROPOUT, LORA_PRECISION, EXPAND_R, R_CHUNKS, True)
    # main loop: as the forward's (see _tile_ptrs), with the roles dy = a [M, N], W0 = b^T.
    dy_ptrs, w_ptrs = _tile_ptrs(dy_ptr, w_ptr, pid_m * BLOCK_M, pid_k * BLOCK_K, M, K,
                                 stride_dym, stride_dyn, stride_wk, stride_wn, BLOCK_M, BLOCK_K, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        dy = tl.load(dy_ptrs, mask=offs_n[None, :] < N - n * BLOCK_N, other=0.0)
        w = tl.load(w_ptrs, mask=offs_n[:, None] < N - n * BLOCK_N, other=0.0)  # W0 tile [BN, BK]
        acc = tl.dot(dy.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)
        dy_ptrs += BLOCK_N * stride_dyn
        w_ptrs += BLOCK_N * stride_wn
    acc = _dx_lora_term(acc, ds_ptr, a_ptr, offs_m, offs_k, mask_m, mask_k, K, R,
                        stride_dsm, stride_dsr, stride_ar, stride_ak, key1, key2, drop_thresh, drop_scale,
                        HAS_DROPOUT, LORA_PRECISION, EXPAND_R, R_CHUNKS, False)
    tl.store(dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.autotune(configs=_dx_configs(), key=["M_KEY", "N", "K", "R", "NEED_DX", "NEED_DA", "NEED_DB",
                                             "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_dx_configs})
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
    BLOCK_R: tl.constexpr, EXPAND_R: tl.constexpr, R_CHUNKS: tl.constexpr,
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
        num_da = tl.cdiv(K, DA_BLOCK_K) * num_r
    num_db = 0
    if NEED_DB:
        num_db = tl.cdiv(N, DB_BLOCK_N) * num_r
    # Each kind of program is its own function: compiled Triton requires a variable assigned
    # in both arms of a runtime `if` to have one type, and the three tiles differ in shape.
    if pid < num_da:
        _bwd_da_program(
            pid, x_ptr, ds_ptr, da_ptr, M, K, R, num_r,
            stride_xm, stride_xk, stride_dsm, stride_dsr, stride_dar, stride_dak,
            key1, key2, drop_thresh, drop_scale,
            HAS_DROPOUT, LORA_PRECISION, BLOCK_R, WB_BLOCK_M, DA_BLOCK_K,
        )
    elif pid < num_da + num_db:
        _bwd_db_program(
            pid - num_da, dy_ptr, xa_ptr, db_ptr, M, N, R, num_r,
            stride_dym, stride_dyn, stride_sm, stride_sr, stride_dbn, stride_dbr, scale,
            LORA_PRECISION, BLOCK_R, WB_BLOCK_M, DB_BLOCK_N,
        )
    elif NEED_DX:
        _bwd_dx_program(
            pid - num_da - num_db, dy_ptr, w_ptr, a_ptr, ds_ptr, dx_ptr, M, N, K, R,
            stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak,
            stride_dsm, stride_dsr, stride_dxm, stride_dxk,
            key1, key2, drop_thresh, drop_scale,
            HAS_DROPOUT, INPUT_PRECISION, LORA_PRECISION, BLOCK_R, EXPAND_R, R_CHUNKS, BLOCK_M, BLOCK_N,
            BLOCK_K,
            GROUP_M,
        )


def _dx_tma_block_hook(nargs):
    # as _tma_block_hook: dy tiles [BM, BN] (BN = the K step over N), W0 tiles [BN, BK]
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["dy_desc"].block_shape = [bm, bn]
    nargs["w_desc"].block_shape = [bn, bk]


@triton.autotune(configs=_dx_configs(pre_hook=_dx_tma_block_hook),
                 key=["M_KEY", "N", "K", "R", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_dx_configs})
@triton.jit(do_not_specialize=["key1", "key2", "drop_thresh"])
def _lora_bwd_dx_tma_kernel(
    dy_desc, w_desc, a_ptr, ds_ptr, dx_ptr, dy_ptr,
    M, N, K, R, M_KEY,
    stride_ar, stride_ak, stride_dsm, stride_dsr, stride_dxm, stride_dxk,
    key1, key2, drop_thresh, drop_scale,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    EXPAND_R: tl.constexpr, R_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """_bwd_dx_program with the dy / W0 tiles loaded by TMA (registry entries triton:tma and
    triton:tma_persistent; the dA / dB programs run in _lora_bwd_kernel with NEED_DX=False):
    dx tile [BM, BK] = dy W0 + drop'(ds A), K step BLOCK_N over N, the LoRA term placed as
    there (after the loop; the initial value with dropout). dy_ptr: the dy tensor itself, only
    for the dx configs' prune (its dtype and GPU)."""
    pid = tl.program_id(0)
    pid_m, pid_k = _grouped_pid(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    m0 = pid_m * BLOCK_M
    k0 = pid_k * BLOCK_K
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc = _dx_lora_term(acc, ds_ptr, a_ptr, offs_m, offs_k, mask_m, mask_k, K, R,
                        stride_dsm, stride_dsr, stride_ar, stride_ak, key1, key2, drop_thresh, drop_scale,
                        HAS_DROPOUT, LORA_PRECISION, EXPAND_R, R_CHUNKS, True)
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        g = dy_desc.load([m0, n * BLOCK_N])  # dy tile [BM, BN]
        w = w_desc.load([n * BLOCK_N, k0])  # W0 tile [BN, BK], read as stored (no transpose)
        acc = tl.dot(g, w, acc, input_precision=INPUT_PRECISION)
    acc = _dx_lora_term(acc, ds_ptr, a_ptr, offs_m, offs_k, mask_m, mask_k, K, R,
                        stride_dsm, stride_dsr, stride_ar, stride_ak, key1, key2, drop_thresh, drop_scale,
                        HAS_DROPOUT, LORA_PRECISION, EXPAND_R, R_CHUNKS, False)
    tl.store(dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


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
    *,
    tma: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward; same contract as fused_lora.reference.lora_linear_bwd.

    dB is deterministic when torch.are_deterministic_algorithms_enabled(); otherwise the ds
    kernel accumulates it with fp32 atomics, saving one read of dy. tma: the dx GEMM's dy / W0
    tiles by TMA in a launch of its own (_lora_bwd_dx_tma_kernel), where TMA can take them
    (tma_unavailable); dA / dB stay in _lora_bwd_kernel."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    dy, weight = _tile_safe(dy), _tile_safe(weight)
    dx = torch.empty(M, K, device=x.device, dtype=x.dtype) if needs_dx else x.new_empty(0)
    dA = torch.empty_like(lora_A) if needs_dA else lora_A.new_empty(0)
    dB = torch.empty_like(lora_B) if needs_dB else lora_B.new_empty(0)
    if not (needs_dx or needs_dA or needs_dB):
        return dx, dA, dB
    if M == 0 or K == 0 or N == 0:
        # Degenerate sizes: every gradient is an empty sum.
        return dx.zero_(), dA.zero_(), dB.zero_()
    key1, key2, thresh, drop_scale = _dropout_args(dropout_p, seed)
    BLOCK_R = _rank_block(R, x, lora_B)
    prec = _fp32_precision()
    b_fp32 = lora_B.dtype == torch.float32
    lora_prec = lora_precision(x.dtype, lora_B.dtype)
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
        if needs_dx and tma and not tma_unavailable(dy, weight):
            dy_desc = TensorDescriptor(dy, list(dy.shape), list(dy.stride()), [32, 32])
            w_desc = TensorDescriptor(weight, list(weight.shape), list(weight.stride()), [32, 32])
            _lora_bwd_dx_tma_kernel[
                lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(K, META["BLOCK_K"]),)
            ](
                dy_desc, w_desc, lora_A, ds, dx, dy, M, N, K, R, _m_key(M),
                lora_A.stride(0), lora_A.stride(1), ds.stride(0), ds.stride(1), dx.stride(0), dx.stride(1),
                key1, key2, thresh, drop_scale,
                HAS_DROPOUT=dropout_p > 0.0, INPUT_PRECISION=prec, LORA_PRECISION=lora_prec,
                EXPAND_R=_EXPAND_R, R_CHUNKS=triton.cdiv(R, _EXPAND_R),
            )
            needs_dx = False  # done: the launch below computes dA / dB only
        if needs_dx or needs_dA or det_db:
            def grid(META):
                nr = triton.cdiv(R, BLOCK_R)
                n = 0
                if needs_dA:
                    n += triton.cdiv(K, DA_BLOCK_K) * nr
                if det_db:
                    n += triton.cdiv(N, DB_BLOCK_N) * nr
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
                BLOCK_R=BLOCK_R, EXPAND_R=_EXPAND_R, R_CHUNKS=triton.cdiv(R, _EXPAND_R),
            )
    if atomic_db:
        dB.copy_(db_acc)
    return dx, dA, dB

