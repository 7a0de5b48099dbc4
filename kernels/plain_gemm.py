"""A plain Triton GEMM, c = a @ b, with the structure of Triton's matmul tutorial
(03-matrix-multiplication): grouped program order, one [BM, BN] fp32 accumulator, a K loop of
tl.dot over [BM, BK] x [BK, BN] tiles, masks only on the K tail and the output store.

It is not used by the package: it is the yardstick of the kernel audit
(``python -m fused_lora.kernels.audit``), which compiles it beside the LoRA GEMMs at the same
tile, stages, warps, dtypes and shapes and reports each kernel's main-loop instruction count
as a ratio to this one. Keep it plain: anything added here moves the yardstick.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# the tutorials' grouped tile order, the same function our kernels use
from fused_lora.kernels.lora_linear import _grouped_pid

__all__ = ["plain_gemm"]


@triton.jit
def _tutorial_store(c_ptr, accumulator, m0, n0, M, N, stride_cm, stride_cn,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    c = accumulator.to(c_ptr.dtype.element_ty)
    offs_cm = m0 + tl.arange(0, BLOCK_M)
    offs_cn = n0 + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + stride_cm * offs_cm[:, None] + stride_cn * offs_cn[None, :]
    tl.store(c_ptrs, c, mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))


@triton.jit
def _plain_gemm_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak)
    b_ptrs = b_ptr + (offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn)

    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        accumulator = tl.dot(a, b, accumulator, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    _tutorial_store(c_ptr, accumulator, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, stride_cm, stride_cn,
                    BLOCK_M, BLOCK_N)


def plain_gemm(a: Tensor, b: Tensor, *, block_m: int = 128, block_n: int = 128, block_k: int = 64,
               group_m: int = 8, num_stages: int = 3, num_warps: int = 8,
               input_precision: str = "ieee") -> Tensor:
    """c = a @ b (a [M, K], b [K, N], any strides), one fixed config (no autotuning: the audit
    names the config it compares against)."""
    M, K = a.shape
    K2, N = b.shape
    if K != K2:
        raise ValueError(f"plain_gemm: inner dimensions differ ({K} vs {K2})")
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _plain_gemm_kernel[grid](
        a, b, c, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        INPUT_PRECISION=input_precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        num_stages=num_stages, num_warps=num_warps,
    )
    return c


try:  # Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None


@triton.jit
def _plain_gemm_tma_kernel(
    a_desc, b_desc, c_ptr,
    M, N, K,
    stride_cm, stride_cn,
    INPUT_PRECISION: tl.constexpr, B_KN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # The structure of the TMA tutorial's kernel (09-persistent-matmul, matmul_kernel_tma): a
    # [M, K] and b [N, K] through host descriptors, c = a b^T; pointer store (as ours).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M)
    offs_am = pid_m * BLOCK_M
    offs_bn = pid_n * BLOCK_N
    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([offs_am, k * BLOCK_K])
        if B_KN:  # b [K, N] row-major (the dx GEMM's W0): tiles [BK, BN] as stored
            b = b_desc.load([k * BLOCK_K, offs_bn])
            accumulator = tl.dot(a, b, accumulator, input_precision=INPUT_PRECISION)
        else:
            b = b_desc.load([offs_bn, k * BLOCK_K])
            accumulator = tl.dot(a, b.T, accumulator, input_precision=INPUT_PRECISION)
    _tutorial_store(c_ptr, accumulator, offs_am, offs_bn, M, N, stride_cm, stride_cn, BLOCK_M, BLOCK_N)


@triton.jit
def _plain_gemm_tma_persistent_kernel(
    a_desc, b_desc, c_ptr,
    M, N, K,
    stride_cm, stride_cn,
    INPUT_PRECISION: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # The structure of the tutorial's persistent TMA kernel (09-persistent-matmul,
    # matmul_kernel_tma_persistent): min(NUM_SMS, tiles) programs walking the tiles; pointer
    # store, and the tile loop not flattened into the K loop (no flatten=True), as ours: a
    # flattened loop holds the epilogue too, and its instruction count is not per K step.
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(start, num_pid_m * num_pid_n, NUM_SMS):
        pid_m, pid_n = _grouped_pid(tile_id, num_pid_m, num_pid_n, GROUP_M)
        offs_am = pid_m * BLOCK_M
        offs_bn = pid_n * BLOCK_N
        accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, k_tiles):
            a = a_desc.load([offs_am, k * BLOCK_K])
            b = b_desc.load([offs_bn, k * BLOCK_K])
            accumulator = tl.dot(a, b.T, accumulator, input_precision=INPUT_PRECISION)
        _tutorial_store(c_ptr, accumulator, offs_am, offs_bn, M, N, stride_cm, stride_cn, BLOCK_M, BLOCK_N)


def plain_gemm_tma(a: Tensor, b_nk: Tensor, *, block_m: int = 128, block_n: int = 128, block_k: int = 64,
                   group_m: int = 8, num_stages: int = 3, num_warps: int = 8,
                   input_precision: str = "ieee", num_sms: int = 0, b_kn: bool = False) -> Tensor:
    """c = a @ b_nk^T with TMA tile loads (a [M, K], b_nk [N, K], unit last strides), one fixed
    config: the yardstick of the TMA forwards in the audit (_lora_fwd_tma_kernel; with
    num_sms > 0 the persistent one, _lora_fwd_tma_persistent_kernel, on that many programs).
    b_kn: b_nk is [K, N] instead and c = a @ b_nk (the TMA dx GEMM's yardstick)."""
    M, K = a.shape
    N = b_nk.shape[1] if b_kn else b_nk.shape[0]
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [block_m, block_k])
    b_desc = TensorDescriptor(b_nk, list(b_nk.shape), list(b_nk.stride()),
                              [block_k, block_n] if b_kn else [block_n, block_k])
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    common = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
                  num_stages=num_stages, num_warps=num_warps)
    if num_sms:
        _plain_gemm_tma_persistent_kernel[(min(num_sms, tiles),)](
            a_desc, b_desc, c, M, N, K, c.stride(0), c.stride(1),
            INPUT_PRECISION=input_precision, NUM_SMS=num_sms, **common)
    else:
        _plain_gemm_tma_kernel[(tiles,)](
            a_desc, b_desc, c, M, N, K, c.stride(0), c.stride(1), INPUT_PRECISION=input_precision, B_KN=b_kn,
            **common)
    return c
