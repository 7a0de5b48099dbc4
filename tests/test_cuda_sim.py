"""The CUDA kernels of csrc/ run on CPU under the SIMT emulator (tools/simt_emu/).

The same kernel and launcher sources that nvcc builds into fused_lora._C are compiled as host
C++ (-DFUSED_LORA_SIM): every CUDA thread is a fiber, with __syncthreads, warp collectives,
cp.async, ldmatrix and mma.sync emulated from the PTX ISA, shared memory poisoned (0xFF = NaN)
at every block start. Two parts:

* the emulator itself: warp collectives, mma/ldmatrix fragment layouts (exact on integer data),
  cp.async commit-group semantics, shared-memory poison, and the kernel bugs it must report as
  a RuntimeError (divergent collectives, deadlocks, misaligned or non-shared cp.async/ldmatrix,
  launch limits);
* torch.ops.fused_lora_sim.{lora_linear_fwd, lora_linear_bwd, multi_lora_linear_fwd,
  multi_lora_linear_bwd} (the arguments of torch.ops.fused_lora_C.*) against fused_lora.reference:
  fp32 / fp16 / bf16, tile edges (GEMV M <= 8, ragged 128x128 tiles, K odd or not a multiple of
  8, R = 1..33), bias, dropout (bit-exact mask), fp32 adapters, strided views, every needs_*
  combination, mixed adapters with -1 / out-of-range ids, ranks below r_max with NaN past them,
  slots absent from the batch, decode and prefill paths. Tolerance: the 2x rule of
  tests/test_lora_linear.py (max error vs fp64 at most 2x PyTorch's own in the same dtype).

Plus, in subprocesses with gcc's libasan preloaded, a subset of the above under the
AddressSanitizer build of the emulator (FUSED_LORA_SIM_ASAN=1): an out-of-bounds global access in
a kernel is reported there (plain builds read garbage silently).

Skipped when the CUDA toolkit headers or the source checkout are missing (the reason is shown).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _utils import check_op_vs_reference
from _utils import lora_args as _args
from _utils import multi_lora_args as _multi_args
from simt_emu import asan_runtime, build_sim, sim_unavailable_reason

from fused_lora import reference

_REASON = sim_unavailable_reason()
if _REASON is not None:
    pytest.skip(f"SIMT emulator unavailable: {_REASON}", allow_module_level=True)

SEED = (12345 << 31) | 678  # both 31-bit hash keys nonzero
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def sim():
    return build_sim()


@pytest.fixture
def reverse_schedule(sim):
    sim.set_schedule(1)
    yield
    sim.set_schedule(0)


# --------------------------------------------------------------------------------------------
# The emulator
# --------------------------------------------------------------------------------------------


def test_warp_collectives(sim):
    x = torch.tensor([(7 * i * i - 31 * i + 5) % 97 - 40 for i in range(64)], dtype=torch.int32)
    out = sim.selftest_warp(x)
    v = x.tolist()
    for t in range(64):
        w, lane = divmod(t, 32)
        wv = v[32 * w: 32 * w + 32]
        o = out[t].tolist()
        assert o[0] == sum(wv), t
        assert o[1] == wv[5]
        assert o[2] == wv[(lane + 1) % 32]
        assert o[3] == (wv[lane + 3] if lane + 3 < 32 else wv[lane])
        assert o[4] == (wv[lane - 2] if lane >= 2 else wv[lane])
        assert o[5] == wv[(lane // 8) * 8 + 3]
        assert o[6] == sum(1 << i for i in range(32) if wv[i] > 0)
        assert o[7] == int(any(e > 100 for e in wv)) and o[8] == 1
        assert o[9] == sum(wv)
        u = v[t] & 0xFFFFFFFF
        assert o[10] == bin(u).count("1")
        ffs = (u & -u).bit_length()
        clz = 32 - u.bit_length()
        assert o[11] == ffs * 100 + clz
        assert o[12] == (wv[lane ^ 8] if lane < 16 else wv[lane ^ 4])
        assert o[13] == wv[lane ^ 1]
        assert o[14] == sum(v)  # shared atomicAdd over the block
        assert o[15] == max(v[t], 7) + min(v[t], 3)


def _int_matrix(*shape, dtype):
    return torch.randint(-4, 5, shape).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4])
def test_mma_ldmatrix_layouts(sim, dtype, mode):
    # Integer data: every product and sum is exact in fp32, so any fragment-layout error (a
    # wrong element anywhere) changes the result. Mode 0 builds fragments straight from the ISA
    # tables; 1-4 load them with each ldmatrix variant from cp.async-filled shared memory.
    M, N, K = 32, 48, 64
    a = _int_matrix(M, K, dtype=dtype)
    b = _int_matrix(K, N, dtype=dtype)
    a_arg = a.t().contiguous() if mode == 3 else a
    b_arg = b.t().contiguous() if mode in (1, 3) else b
    c = sim.selftest_gemm(a_arg, b_arg, mode, 0)
    assert torch.equal(c, a.double().matmul(b.double()).float())


def test_mma_rounding_fp16(sim):
    a = torch.randn(16, 32).half()
    b = torch.randn(32, 16).half()
    c = sim.selftest_gemm(a, b, 4, 0)
    torch.testing.assert_close(c, a.double().matmul(b.double()).float(), atol=1e-5, rtol=1e-5)


def test_cp_async_wait_before_read_is_needed(sim):
    # A kernel that reads a stage without cp_async_wait reads the poison (NaN) or a stale stage.
    a = _int_matrix(16, 32, dtype=torch.float16)
    b = _int_matrix(32, 16, dtype=torch.float16)
    c = sim.selftest_gemm(a, b, 4, 1)
    assert torch.isnan(c).any()
    assert not torch.equal(torch.nan_to_num(c), a.float() @ b.float())


def test_cp_async_zero_fill_never_reads_source(sim):
    a = _int_matrix(16, 16, dtype=torch.float16)
    c = sim.selftest_gemm(a, a, 4, 3)  # src address 64 (unmapped) with pred = false
    assert torch.equal(c, torch.zeros_like(c))


def test_cp_async_commit_groups(sim):
    src = torch.arange(64, dtype=torch.uint8) + 1
    snaps = sim.selftest_cp_async(src)
    poison = torch.full((16,), 255, dtype=torch.uint8)
    chunk = [src[16 * i: 16 * i + 16] for i in range(4)]

    def at(step, i):
        return snaps[step, 16 * i: 16 * i + 16]

    for step in (0, 1):  # nothing lands before a wait that needs it
        for i in range(4):
            assert torch.equal(at(step, i), poison), (step, i)
    assert torch.equal(at(2, 0), chunk[0]) and torch.equal(at(2, 1), poison)
    assert torch.equal(at(3, 1), chunk[1]) and torch.equal(at(3, 2), poison)  # uncommitted
    assert torch.equal(at(4, 2), chunk[2])
    assert torch.equal(at(5, 3), torch.zeros(16, dtype=torch.uint8))
    assert snaps[6, 0] == 7
    assert torch.equal(at(7, 0), chunk[3])


def test_unwritten_shared_memory_reads_nan(sim):
    out = sim.selftest_smem(0)  # dynamic smem nobody wrote
    assert torch.isnan(out).all()
    out = sim.selftest_smem(1)  # static smem written by block 0 only: poisoned again for block 1
    assert torch.equal(out[0], torch.arange(64, dtype=torch.float32))
    assert torch.isnan(out[1]).all()


def test_schedule_order_changes_what_a_race_reads(sim, reverse_schedule):
    # Thread t reads element t-1 without a barrier: run in reverse order, 63 threads read poison
    # (the default order hides all but one); the op tests below also run in both orders.
    rev = sim.selftest_smem(2)
    assert int(torch.isnan(rev[0]).sum()) == 63
    sim.set_schedule(0)
    fwd = sim.selftest_smem(2)
    assert int(torch.isnan(fwd[0]).sum()) == 1


BUGS = [
    (0, r"lane 16\): exited while lane 0 of its warp waits at __shfl_xor_sync\(mask 0xffffffff\)"),
    (1, r"deadlock.*__shfl_xor_sync.*__syncthreads\(\).*divergent"),
    (2, r"deadlock.*__syncwarp\(mask 0x00000003\).*lane 1 of its mask is at __syncthreads"),
    (3, r"cp_async16: the shared address .* is not 16-byte aligned"),
    (4, r"cp_async16: the global address .* is not 16-byte aligned"),
    (5, r"cp_async16: the destination .* is not in shared memory"),
    (6, r"ldmatrix_x4: the row address .* is not in shared memory"),
    (7, r"lane 0 reads lane 20, which is not in the mask"),
    (8, r"FL_SET_SMEM\(bug_kernel, 233472\): more than"),
    (9, r"65536 bytes of dynamic shared memory, over the kernel's limit of 49152"),
    (10, r"invalid block \(1025,1,1\)"),
    (11, r"thread \(5,0,0\).*the kernel threw: device-side check failed in thread 5"),
    (12, r"the mask does not include the calling lane"),
    (13, r"exited while lane 0 of its warp waits at mma_16816<f16>\(mask 0xffffffff\)"),
    (14, r"a kernel launch from inside a kernel"),
]


@pytest.mark.parametrize("what,match", BUGS, ids=[str(b[0]) for b in BUGS])
def test_kernel_bugs_raise(sim, what, match):
    with pytest.raises(RuntimeError, match=match) as e:
        sim.selftest_bug(what)
    if what not in (8, 9, 10):
        assert "kernel bug_kernel" in str(e.value) or "smem_kernel" in str(e.value)
    # The emulator is usable after the error.
    assert torch.equal(sim.selftest_smem(1)[0], torch.arange(64, dtype=torch.float32))


@pytest.mark.parametrize("bug,match", [
    (2, "cp_async16: the shared address"),
    (4, "ldmatrix_x4: the row address .* of lane 0 is not 16-byte aligned"),
    (5, "exited while lane 0 of its warp waits at mma_16816<f16>"),
])
def test_mini_gemm_bugs_raise(sim, bug, match):
    a = _int_matrix(16, 16, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=match):
        sim.selftest_gemm(a, a, 0 if bug == 5 else 4, bug)


# --------------------------------------------------------------------------------------------
# Single adapter: lora_linear_fwd / _bwd
# --------------------------------------------------------------------------------------------

# (M, K, N, R): the GEMV path (M <= 8) with K odd / K % 8 == 0, tensor-core 128x128x32 tiles
# with ragged edges (M, N = 129, 257, 300), K odd or not a multiple of 8 (scalar loads), K % 8
# == 0 (cp.async), R = 1, 16, 17, 33 (rank chunks of 16), SIMT 64x64x16 tiles for fp32.
SHAPES = [
    (1, 1, 1, 1),
    (5, 67, 33, 17),
    (8, 64, 40, 16),
    (129, 67, 129, 1),
    (257, 72, 136, 33),
    (300, 40, 257, 16),
]


def _check(got, ref_fn, args, names):
    check_op_vs_reference(got, ref_fn, args, names)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias,dropout", [(True, 0.0), (False, 0.3), (True, 0.3)])
def test_fwd(sim, shape, dtype, bias, dropout):
    M, K, N, R = shape
    x, w, b, a, bb = _args(dtype, M, K, N, R, bias=bias)
    got = sim.lora_linear_fwd(x, w, b, a, bb, 0.7, dropout, SEED)
    _check(got, reference.lora_linear_fwd, (x, w, b, a, bb, 0.7, dropout, SEED), ("y", "xa"))


NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
         (False, True, True), (False, False, False)]


@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_bwd(sim, shape, dtype, dropout):
    M, K, N, R = shape
    x, w, _, a, bb = _args(dtype, M, K, N, R)
    _, xa = reference.lora_linear_fwd(x, w, None, a, bb, 0.6, dropout, SEED)
    dy = torch.randn(M, N).to(dtype)
    args = (dy, x, w, a, bb, xa, 0.6, dropout, SEED, True, True, True)
    _check(sim.lora_linear_bwd(*args), reference.lora_linear_bwd, args, ("dx", "dA", "dB"))


@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: "".join("1" if e else "0" for e in n))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bwd_needs(sim, needs, dtype):
    M, K, N, R = 129, 67, 129, 17
    x, w, _, a, bb = _args(dtype, M, K, N, R)
    _, xa = reference.lora_linear_fwd(x, w, None, a, bb, 0.6, 0.25, SEED)
    dy = torch.randn(M, N).to(dtype)
    args = (dy, x, w, a, bb, xa, 0.6, 0.25, SEED, *needs)
    _check(sim.lora_linear_bwd(*args), reference.lora_linear_bwd, args, ("dx", "dA", "dB"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [6, 129])
def test_fp32_adapters(sim, dtype, M):
    x, w, b, a, bb = _args(dtype, M, 72, 40, 17, adapter_dtype=torch.float32)
    fargs = (x, w, b, a, bb, 0.5, 0.1, 9)
    y, xa = sim.lora_linear_fwd(*fargs)
    _check((y, xa), reference.lora_linear_fwd, fargs, ("y", "xa"))
    dy = torch.randn_like(y)
    _, xa_ref = reference.lora_linear_fwd(*fargs)
    bargs = (dy, x, w, a, bb, xa_ref, 0.5, 0.1, 9, True, True, True)
    got = sim.lora_linear_bwd(*bargs)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    _check(got, reference.lora_linear_bwd, bargs, ("dx", "dA", "dB"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [7, 200])
def test_strided_views(sim, dtype, M):
    # x: a transposed view (non-unit inner stride); weight: a column window of a wider matrix
    # (unit inner stride, row pitch K + 5, base 3 elements in: 16-byte loads must be off);
    # lora_B: a transposed view.
    K, N, R = 64, 136, 16
    x = torch.randn(K, M).to(dtype).t()
    w = (torch.randn(N, K + 5) / K**0.5).to(dtype)[:, 3: 3 + K]
    b = torch.randn(N).to(dtype)
    a = (torch.randn(R, K) / K**0.5).to(dtype)
    bb = torch.randn(R, N).to(dtype).t()
    fargs = (x, w, b, a, bb, 0.8, 0.2, SEED)
    y, xa = sim.lora_linear_fwd(*fargs)
    _check((y, xa), reference.lora_linear_fwd, fargs, ("y", "xa"))
    dy = torch.randn(N, M).to(dtype).t()
    bargs = (dy, x, w, a, bb, xa, 0.8, 0.2, SEED, True, True, True)
    _check(sim.lora_linear_bwd(*bargs), reference.lora_linear_bwd, bargs, ("dx", "dA", "dB"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", [0, SEED, (1 << 62) - 1])
def test_dropout_mask_bit_exact(sim, dtype, seed):
    # With A = I (r = K) and x = 1, xa = keep / (1 - p): its support is the keep mask.
    M, K, p = 29, 37, 0.4
    x = torch.ones(M, K).to(dtype)
    eye = torch.eye(K).to(dtype)
    _, xa = sim.lora_linear_fwd(x, torch.zeros(3, K).to(dtype), None, eye, torch.zeros(3, K).to(dtype),
                                1.0, p, seed)
    keep = reference.dropout_keep_mask(seed, M, K, p)
    assert torch.equal(xa != 0, keep)
    torch.testing.assert_close(xa[keep], torch.full_like(xa[keep], 1.0 / (1.0 - p)))


@pytest.mark.parametrize("M,K,N", [(0, 5, 4), (3, 0, 4), (3, 5, 0)])
def test_degenerate_sizes(sim, M, K, N):
    x, w, b, a, bb = _args(torch.float16, M, K, N, 2)
    fargs = (x, w, b, a, bb, 0.5, 0.0, 0)
    y, xa = sim.lora_linear_fwd(*fargs)
    _check((y, xa), reference.lora_linear_fwd, fargs, ("y", "xa"))
    dy = torch.randn(M, N).half()
    bargs = (dy, x, w, a, bb, xa, 0.5, 0.0, 0, True, True, True)
    _check(sim.lora_linear_bwd(*bargs), reference.lora_linear_bwd, bargs, ("dx", "dA", "dB"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1031, 2056, 3080])
def test_gemv_unrolled_k_loop(sim, dtype, K):
    """The decode GEMV (M <= 8) reads W in groups of 4 chunks (1024 k per lane group): K = 1031
    is one group + a 7-element tail, 2056 one group + 4 single chunks, 3080 three groups +
    a chunk (x and W contiguous: 16-byte loads for fp16/bf16; fp32 scalar)."""
    for M in (1, 8):
        x, w, b, a, bb = _args(dtype, M, K, 40, 16)
        args = (x, w, b, a, bb, 0.7, 0.2, SEED)
        _check(sim.lora_linear_fwd(*args), reference.lora_linear_fwd, args, ("y", "xa"))
    margs = _multi_args(dtype, 6, K, 40, 3, 16)
    _check(sim.multi_lora_linear_fwd(*margs), reference.multi_lora_linear_fwd, margs, ("y", "xa"))


def test_reverse_schedule_single(sim, reverse_schedule):
    # Every thread of a block first runs in the reverse order: a missing __syncthreads() between
    # a write and another thread's read shows up in one of the two orders.
    for dtype in (torch.float16, torch.float32):
        x, w, b, a, bb = _args(dtype, 257, 72, 136, 33)
        fargs = (x, w, b, a, bb, 0.7, 0.3, SEED)
        y, xa = sim.lora_linear_fwd(*fargs)
        _check((y, xa), reference.lora_linear_fwd, fargs, ("y", "xa"))
        dy = torch.randn(257, 136).to(dtype)
        bargs = (dy, x, w, a, bb, xa, 0.7, 0.3, SEED, True, True, True)
        _check(sim.lora_linear_bwd(*bargs), reference.lora_linear_bwd, bargs, ("dx", "dA", "dB"))


# --------------------------------------------------------------------------------------------
# Mixed adapters: multi_lora_linear_fwd / _bwd
# --------------------------------------------------------------------------------------------


# (M, K, N, S, R): decode (GEMV M <= 8; one tile with up to S slots: more than the GEMM's 4 slot
# passes -> the gather fallback), prefill (rows sorted by slot through row_map), R = 1 / 17 / 33.
MULTI_SHAPES = [
    (6, 67, 33, 4, 17),
    (40, 64, 136, 12, 16),
    (129, 67, 129, 5, 1),
    (300, 72, 257, 6, 33),
]


@pytest.mark.parametrize("shape", MULTI_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype,adapter_dtype", [
    (torch.float32, None), (torch.float16, None), (torch.bfloat16, None),
    (torch.bfloat16, torch.float32),
], ids=["f32", "f16", "bf16", "bf16-f32adapters"])
@pytest.mark.parametrize("ranks", [True, False], ids=["ranks", "noranks"])
def test_multi_fwd_bwd(sim, shape, dtype, adapter_dtype, ranks):
    M, K, N, S, R = shape
    absent = (S - 1,)  # a slot no row uses: exact zero gradients
    args = _multi_args(dtype, M, K, N, S, R, adapter_dtype=adapter_dtype, ranks=ranks,
                       bias=M % 2 == 0, absent=absent)
    x, w, b, a, bb, scales, ids, rk = args
    y, xa = sim.multi_lora_linear_fwd(*args)
    _check((y, xa), reference.multi_lora_linear_fwd, args, ("y", "xa"))
    # Rows without an adapter (id -1 or out of range) get exactly the base output.
    none = (ids < 0) | (ids >= S)
    y0, xa0 = sim.multi_lora_linear_fwd(x, w, b, a, bb, scales, torch.full_like(ids, -1), rk)
    assert torch.equal(y[none], y0[none])
    assert torch.equal(xa[none], torch.zeros_like(xa[none]))
    dy = torch.randn(M, N).to(dtype)
    bargs = (dy, x, w, a, bb, scales, ids, rk, xa, True, True, True)
    got = sim.multi_lora_linear_bwd(*bargs)
    _check(got, reference.multi_lora_linear_bwd, bargs, ("dx", "dA", "dB"))
    _, dA, dB = got
    for s in absent:
        assert torch.equal(dA[s], torch.zeros_like(dA[s])) and torch.equal(dB[s], torch.zeros_like(dB[s]))
    if rk is not None:
        for s in range(S):
            assert not torch.isnan(dA[s]).any() and not torch.isnan(dB[s]).any()
            assert torch.equal(dA[s, int(rk[s]):], torch.zeros_like(dA[s, int(rk[s]):]))


@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: "".join("1" if e else "0" for e in n))
@pytest.mark.parametrize("M", [6, 129])
def test_multi_bwd_needs(sim, needs, M):
    args = _multi_args(torch.float16, M, 37, 29, 3, 17, adapter_dtype=torch.float32)
    x, w, b, a, bb, scales, ids, rk = args
    _, xa = reference.multi_lora_linear_fwd(*args)
    dy = torch.randn(M, 29).half()
    bargs = (dy, x, w, a, bb, scales, ids, rk, xa, *needs)
    _check(sim.multi_lora_linear_bwd(*bargs), reference.multi_lora_linear_bwd, bargs, ("dx", "dA", "dB"))


def test_multi_sorted_and_single_slot(sim):
    # Prefill with all rows of one slot, and rows already sorted by slot.
    for ids_fn in (lambda M, S: torch.full((M,), 2), lambda M, S: torch.arange(M) * S // M):
        args = list(_multi_args(torch.float16, 257, 64, 130, 4, 16))
        args[6] = ids_fn(257, 4)
        y, xa = sim.multi_lora_linear_fwd(*args)
        _check((y, xa), reference.multi_lora_linear_fwd, args, ("y", "xa"))
        x, w, b, a, bb, scales, ids, rk = args
        dy = torch.randn(257, 130).half()
        bargs = (dy, x, w, a, bb, scales, ids, rk, xa, True, True, True)
        _check(sim.multi_lora_linear_bwd(*bargs), reference.multi_lora_linear_bwd, bargs,
               ("dx", "dA", "dB"))


# Split-K of the tensor-core GEMM (tiles < SMs; the emulator reports 4 SMs): (M, K, N) where
# the forward GEMM (reduction K) or the dx GEMM (reduction N) runs 2-4 splits of a k-range that
# is a multiple of 32, the last one ragged (K = 517: odd, scalar loads; 520: cp.async).
SPLIT_K_SHAPES = [(20, 520, 40), (70, 517, 40), (20, 40, 520), (9, 300, 300)]


@pytest.mark.parametrize("shape", SPLIT_K_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_split_k_gemm(sim, shape, dtype):
    M, K, N = shape
    x, w, b, a, bb = _args(dtype, M, K, N, 16)
    fwd_args = (x, w, b, a, bb, 0.7, 0.2, SEED)
    y, xa = sim.lora_linear_fwd(*fwd_args)
    _check((y, xa), reference.lora_linear_fwd, fwd_args, ("y", "xa"))
    dy = torch.randn(M, N).to(dtype)
    bargs = (dy, x, w, a, bb, xa, 0.7, 0.2, SEED, True, True, True)
    _check(sim.lora_linear_bwd(*bargs), reference.lora_linear_bwd, bargs, ("dx", "dA", "dB"))
    # Mixed adapters (M >= 65: rows sorted by slot, partials at the physical rows).
    margs = _multi_args(dtype, M, K, N, 5, 16)
    my, mxa = sim.multi_lora_linear_fwd(*margs)
    _check((my, mxa), reference.multi_lora_linear_fwd, margs, ("y", "xa"))
    xm, wm, _, am, bm, sc, ids, rk = margs
    mb = (dy, xm, wm, am, bm, sc, ids, rk, mxa, True, True, True)
    _check(sim.multi_lora_linear_bwd(*mb), reference.multi_lora_linear_bwd, mb, ("dx", "dA", "dB"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_grouped_tile_order(sim, dtype):
    """9 row tiles x 2 column tiles: the GEMM's grouped order (8 row tiles per column sweep)
    has a full group and a one-tile remainder; every tile must be computed exactly once."""
    M, K, N = 1100, 24, 136
    x, w, b, a, bb = _args(dtype, M, K, N, 4)
    args = (x, w, b, a, bb, 0.5, 0.0, SEED)
    _check(sim.lora_linear_fwd(*args), reference.lora_linear_fwd, args, ("y", "xa"))


def test_multi_no_slots_and_degenerate(sim):
    for M, K, N, S in [(5, 8, 16, 0), (0, 8, 16, 2), (4, 0, 16, 2), (4, 8, 0, 2)]:
        x = torch.randn(M, K).half()
        w = torch.randn(N, K).half()
        a = torch.randn(S, 4, K).half()
        bb = torch.randn(S, N, 4).half()
        scales = torch.ones(S)
        ids = torch.full((M,), -1)
        args = (x, w, None, a, bb, scales, ids, None)
        y, xa = sim.multi_lora_linear_fwd(*args)
        _check((y, xa), reference.multi_lora_linear_fwd, args, ("y", "xa"))
        dy = torch.randn(M, N).half()
        bargs = (dy, x, w, a, bb, scales, ids, None, xa, True, True, True)
        _check(sim.multi_lora_linear_bwd(*bargs), reference.multi_lora_linear_bwd, bargs,
               ("dx", "dA", "dB"))


def test_reverse_schedule_multi(sim, reverse_schedule):
    for M in (6, 300):
        args = _multi_args(torch.float16, M, 72, 136, 6, 33)
        x, w, b, a, bb, scales, ids, rk = args
        y, xa = sim.multi_lora_linear_fwd(*args)
        _check((y, xa), reference.multi_lora_linear_fwd, args, ("y", "xa"))
        dy = torch.randn(M, 136).half()
        bargs = (dy, x, w, a, bb, scales, ids, rk, xa, True, True, True)
        _check(sim.multi_lora_linear_bwd(*bargs), reference.multi_lora_linear_bwd, bargs,
               ("dx", "dA", "dB"))


def test_fiber_stacks_fit(sim):
    launches, blocks, switches, used, size = sim.sim_stats()[:5]
    assert launches > 0 and blocks > 0 and switches > 0
    assert 0 < used < size // 2, f"fiber stacks: {used} of {size} bytes used"



# --------------------------------------------------------------------------------------------
# AddressSanitizer build (subprocesses: libasan must be preloaded before Python starts)
# --------------------------------------------------------------------------------------------

IN_ASAN = os.environ.get("FUSED_LORA_SIM_ASAN", "0") == "1"
_ROOT = Path(__file__).resolve().parent.parent
# Every kernel, launcher and path once or twice: GEMV / tensor-core / SIMT GEMMs at ragged
# edges, the backward reductions, the mixed-adapter decode and prefill paths, strided views.
ASAN_SUBSET = ("((test_fwd or test_bwd) and (5x67 or 257x72) and not bfloat16) or "
               "(test_multi_fwd_bwd and ranks and (f16 or f32) and not bf16) or "
               "(test_strided_views and float16) or test_kernel_bugs_raise or test_cp_async")


def _asan_env():
    libs = asan_runtime()
    if libs is None:
        pytest.skip("no libasan / libstdc++ of the C++ compiler to preload")
    # The subprocesses import fused_lora from this checkout and simt_emu from its tools/.
    path = [str(_ROOT), str(_ROOT / "tools")] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return dict(os.environ, FUSED_LORA_SIM_ASAN="1", LD_PRELOAD=" ".join(libs),
                ASAN_OPTIONS="detect_leaks=0", PYTHONPATH=os.pathsep.join(path))


@pytest.mark.skipif(IN_ASAN, reason="already under ASan")
def test_asan_reports_out_of_bounds_reads():
    code = (
        "import torch\n"
        "from simt_emu import build_sim\n"
        "ops = build_sim()\n"
        "assert ops.is_asan()\n"
        "ops.selftest_oob(torch.zeros(64), 0)\n"
        "print('in bounds: ok', flush=True)\n"
        "ops.selftest_oob(torch.zeros(64), 1)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=_asan_env(), capture_output=True,
                       text=True, timeout=900)
    assert "in bounds: ok" in r.stdout, r.stderr[-4000:]
    assert r.returncode != 0
    assert "heap-buffer-overflow" in r.stderr and "oob_kernel" in r.stderr, r.stderr[-4000:]


@pytest.mark.skipif(IN_ASAN, reason="already under ASan")
def test_asan_op_subset():
    r = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-x", "-p",
         "no:cacheprovider", "-k", ASAN_SUBSET],
        env=_asan_env(), capture_output=True, text=True, timeout=1200,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    assert r.returncode == 0 and " passed" in r.stdout, (r.stdout[-4000:] + r.stderr[-4000:])


# --------------------------------------------------------------------------------------------
# The emulator is development tooling: not in the runtime package
# --------------------------------------------------------------------------------------------


def test_emulator_is_not_in_the_runtime_package():
    import simt_emu

    import fused_lora

    pkg = Path(fused_lora.__file__).resolve().parent
    assert Path(simt_emu.__file__).resolve().parent == _ROOT / "tools" / "simt_emu"
    assert not (pkg / "_sim.py").exists() and not (_ROOT / "csrc" / "sim").exists()
    for f in pkg.rglob("*.py"):  # nothing of the package imports it
        text = f.read_text()
        assert "simt_emu" not in text and "fused_lora._sim" not in text, f
    setup = (_ROOT / "setup.py").read_text()
    assert "tools" not in setup.split("setup(", 1)[1], "setup() must not ship tools/"
    code = ("import sys, fused_lora, fused_lora._ext, fused_lora.ops\n"
            "bad = [m for m in sys.modules if 'simt_emu' in m or m == 'fused_lora._sim']\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=str(_ROOT))
    assert r.returncode == 0, r.stderr[-4000:]
