"""The MoE CUDA kernels (csrc/moe_lora_cuda.cu and the grouped GEMM of csrc/gemm.cu) run on CPU
through the SIMT emulator (tools/simt_emu: torch.ops.fused_lora_sim.moe_lora_linear_*) against
fused_lora.reference.

What the shapes reach (the emulator reports 4 SMs unless FUSED_LORA_SIM_SMS says otherwise):
* the tile table (moe_tiles_kernel): experts with no rows, one row, every row; rows of no expert
  (-1 and out-of-range ids) as group -1 tiles; M = 300 over 2 experts cuts one expert into
  several 128-row GEMM tiles (64-row for fp32); idle tiles at the table's end.
* the grouped GEMM on every variant: mma.sync (gemm=1), wgmma 128x128 (2) and 128x256 (3) for
  fp16 / bf16, SIMT for fp32; weight as [E, N, K] (forward k-contiguous, dx n-contiguous) and as
  a transposed view of [E, K, N] (the other two layouts); K % 8 == 0 (16-byte loads) or not.
* the grouped shrink: split-K with partials + finalize at decode sizes (K >= 256 and few live
  blocks), direct otherwise; 32-row sub-tiles of a GEMM tile; lora_A (k inner) and lora_B read
  rank-inner (ds); R = 1, 16, 17 (two rank chunks); dropout keyed by the original row.
* the per-expert reductions (dA, dB): experts inside one chunk (direct) and spanning chunks
  (partials + finalize), absent experts (finalize's zeros), dropout on x for dA.

Adapter banks (lora_A [S, E, r, in]: virtual expert ids over (S + 1) * E, base-only ids, adapter
x expert pairs without rows, slot_scales None or given) and top-k rows (x [T, in] read in place
for M = T * topk rows; dx's fp32 rows summed per token by moe_topk_sum_kernel): the same kernels
on the same GEMM variants, with a virtual expert spanning several GEMM tiles and reduction
chunks, the split-K shrink at decode sizes, and base-only rows bit for bit the base.

Exact properties checked beside the tolerance: rows of no expert give y = 0, xa = 0, dx = 0 bit
for bit; absent experts get dA = dB = 0; the plan's (order, keys) give the same bits as the op's
own sort; two runs are bitwise identical (no float atomics). Every buffer the kernels allocate
comes NaN-filled in the emulator, so an element no kernel writes fails.
"""

from __future__ import annotations

import pytest
import torch
from _utils import check_op_vs_reference

from fused_lora import reference

try:
    from simt_emu import SimUnavailable, build_sim
except ImportError as e:  # the emulator is not in this checkout
    pytest.skip(f"SIMT emulator unavailable: {e}", allow_module_level=True)

try:
    OPS = build_sim()
except SimUnavailable as e:
    pytest.skip(f"SIMT emulator unavailable: {e}", allow_module_level=True)

if not hasattr(OPS, "moe_lora_linear_fwd"):
    pytest.skip("the emulator build has no MoE ops", allow_module_level=True)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
SEED = (4242 << 31) | 99


def _ids(pattern, M, E, seed=3):
    """'mixed': expert 1 absent, expert 0 exactly one row, -1 / out-of-range rows, the rest
    random; 'all': every row on expert E - 1; 'none': every row -1."""
    if pattern == "all":
        return torch.full((M,), E - 1, dtype=torch.int64)
    if pattern == "none":
        return torch.full((M,), -1, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([-1, E, -4] + list(range(2, E)), dtype=torch.int64)
    ids = pool[torch.randint(0, len(pool), (M,), generator=g)]
    ids[M // 2] = 0
    return ids


def _args(dtype, adt, M, K, N, R, E, bias, transposed, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    if transposed:
        w = (torch.randn(E, K, N, generator=g) / K**0.5).to(dtype).transpose(1, 2)
    else:
        w = (torch.randn(E, N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(E, N, generator=g).to(dtype) if bias else None
    A = (torch.randn(E, R, K, generator=g) / K**0.5).to(adt)
    B = torch.randn(E, N, R, generator=g).to(adt)
    return x, w, b, A, B


def _routing(ids, E):
    key = torch.where((ids >= 0) & (ids < E), ids, torch.full_like(ids, -1))
    keys, order = torch.sort(key, stable=True)
    return order, keys


# (dtype, adapter dtype, M, K, N, R, E, ids pattern, bias, transposed weight, dropout, gemms)
CASES = [
    (F32, F32, 3, 520, 24, 16, 6, "mixed", True, False, 0.25, (1,)),     # split-K shrink, SIMT
    (F16, F16, 1, 777, 16, 17, 3, "all", False, True, 0.0, (1, 2)),      # one row, K odd
    (BF16, F32, 9, 264, 40, 1, 5, "mixed", True, False, 0.3, (1, 3)),    # fp32 adapters, R = 1
    (F16, F16, 70, 72, 136, 16, 5, "mixed", True, True, 0.2, (1, 2, 3)),  # chunks span experts
    (BF16, BF16, 300, 40, 24, 8, 2, "all", False, False, 0.0, (1, 2)),   # 3 GEMM tiles, 1 expert
    (F32, F32, 200, 37, 9, 17, 4, "mixed", False, True, 0.25, (1,)),     # SIMT, 64-row tiles
    (F16, F16, 16, 64, 16, 4, 3, "none", True, False, 0.0, (1,)),        # every row of no expert
]


@pytest.fixture(params=[0, 1], ids=["fwd-order", "rev-order"])
def schedule(request):
    # Threads of a block first run 0..n-1 or n-1..0: a missing __syncthreads() shows in one.
    OPS.set_schedule(request.param)
    yield request.param
    OPS.set_schedule(0)


def _case_id(c):
    return (f"{c[0]}-{c[1]}-M{c[2]}-K{c[3]}-N{c[4]}-R{c[5]}-E{c[6]}-{c[7]}"
            f"{'-Wt' if c[9] else ''}{'-drop' if c[10] else ''}").replace("torch.", "")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_moe_fwd_bwd(case, schedule):
    dtype, adt, M, K, N, R, E, pattern, bias, transposed, p, gemms = case
    x, w, b, A, B = _args(dtype, adt, M, K, N, R, E, bias, transposed)
    ids = _ids(pattern, M, E)
    order, keys = _routing(ids, E)
    none = (ids < 0) | (ids >= E)
    present = torch.zeros(E, dtype=torch.bool)
    present[ids[~none]] = True
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(dtype)
    # the reverse schedule runs the first GEMM only (the schedule is the kernels', not the GEMM's)
    for gemm in gemms if schedule == 0 else gemms[:1]:
        fargs = (x, w, b, A, B, 0.7, p, SEED, ids)
        y, xa = OPS.moe_lora_linear_fwd(*fargs, gemm=gemm)
        check_op_vs_reference((y, xa), reference.moe_lora_linear_fwd, fargs, ("y", "xa"),
                              scaled_atol=True)
        assert (y[none] == 0).all() and (xa[none] == 0).all(), "a row of no expert is nonzero"
        y_p, xa_p = OPS.moe_lora_linear_fwd(*fargs, order, keys, gemm=gemm)
        assert torch.equal(y, y_p) and torch.equal(xa, xa_p), "plan vs own sort differ"

        bargs = (dy, x, w, A, B, xa, 0.7, p, SEED, ids, True, True, True)
        got = OPS.moe_lora_linear_bwd(*bargs, gemm=gemm)
        check_op_vs_reference(got, reference.moe_lora_linear_bwd, bargs, ("dx", "dA", "dB"),
                              scaled_atol=True)
        dx, dA, dB = got
        assert (dx[none] == 0).all(), "dx: a row of no expert is nonzero"
        assert (dA[~present] == 0).all() and (dB[~present] == 0).all(), "absent expert: nonzero grad"
        again = OPS.moe_lora_linear_bwd(*bargs, order, keys, gemm=gemm)
        assert all(torch.equal(g, h) for g, h in zip(got, again)), "backward not reproducible"


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True)])
def test_moe_bwd_needs_strided(needs):
    # Decode rows with split-K ds, a strided (non-contiguous) x and dy.
    M, K, N, R, E = 5, 520, 24, 16, 4
    _, w, _, A, B = _args(F16, F32, M, K, N, R, E, False, False, seed=2)
    x = torch.randn(K, M).to(F16).t()
    dy = torch.randn(N, M).to(F16).t()
    ids = _ids("mixed", M, E)
    _, xa = reference.moe_lora_linear_fwd(x, w, None, A, B, 0.5, 0.2, SEED, ids)
    bargs = (dy, x, w, A, B, xa, 0.5, 0.2, SEED, ids, *needs)
    check_op_vs_reference(OPS.moe_lora_linear_bwd(*bargs), reference.moe_lora_linear_bwd, bargs,
                          ("dx", "dA", "dB"), scaled_atol=True)


@pytest.mark.parametrize("M,K,N", [(0, 8, 4), (3, 0, 4), (3, 8, 0)])
def test_moe_degenerate_sizes(M, K, N):
    x, w, b, A, B = _args(F16, F16, M, K, N, 2, 3, True, False) if K else (
        torch.randn(M, 0).half(), torch.randn(3, N, 0).half(), torch.randn(3, N).half(),
        torch.randn(3, 2, 0).half(), torch.randn(3, N, 2).half())
    ids = torch.tensor([0, -1, 2][:M], dtype=torch.int64)
    y, xa = OPS.moe_lora_linear_fwd(x, w, b, A, B, 0.5, 0.0, 0, ids)
    y_r, xa_r = reference.moe_lora_linear_fwd(x, w, b, A, B, 0.5, 0.0, 0, ids)
    torch.testing.assert_close(y, y_r)
    torch.testing.assert_close(xa, xa_r)
    dy = torch.randn(M, N).half()
    got = OPS.moe_lora_linear_bwd(dy, x, w, A, B, xa, 0.5, 0.0, 0, ids, True, True, True)
    ref = reference.moe_lora_linear_bwd(dy, x, w, A, B, xa_r, 0.5, 0.0, 0, ids, True, True, True)
    for g, r, name in zip(got, ref, ("dx", "dA", "dB")):
        torch.testing.assert_close(g, r, msg=name)


def test_moe_plan_is_followed():
    # The routing is trusted, not recomputed: keys routing every row to no expert give y = 0 and
    # nothing to sum for dA / dB.
    M, K, N, R, E = 40, 32, 16, 4, 3
    x, w, b, A, B = _args(BF16, BF16, M, K, N, R, E, True, False)
    ids = _ids("mixed", M, E)
    order, keys = _routing(ids, E)
    none_keys = torch.full_like(keys, -1)
    y, xa = OPS.moe_lora_linear_fwd(x, w, b, A, B, 0.5, 0.0, 0, ids, order, none_keys)
    assert not y.any() and not xa.any()
    dy = torch.randn(M, N).to(BF16)
    _, dA, dB = OPS.moe_lora_linear_bwd(dy, x, w, A, B, xa, 0.5, 0.0, 0, ids, False, True, True,
                                        order, none_keys)
    assert not dA.any() and not dB.any()


# ----------------------------------------------------------------------------- banks, top-k rows


def _bank_ids(pattern, M, E, S, seed=5):
    """Virtual ids [M] over (S + 1) * E. 'mixed': adapter 0 never on expert E - 1 and adapter 1
    never on expert 0 (pairs without rows), base-only ids, rows of no expert (-1, (S + 1) * E,
    -7); 'skew': three rows in four on adapter 0 x expert 1 (one id over several GEMM tiles and
    reduction chunks), the rest 'mixed'."""
    g = torch.Generator().manual_seed(seed)
    nv = (S + 1) * E
    pool = [v for v in range(nv) if v not in (2 * E - 1, 2 * E)] + [-1, nv, -7]
    ids = torch.tensor(pool, dtype=torch.int64)[torch.randint(0, len(pool), (M,), generator=g)]
    if pattern == "skew":
        ids[torch.rand(M, generator=g) < 0.75] = E + 1
    ids[0] = E
    ids[-1] = 1
    return ids


def _bank_args(dtype, adt, T, K, N, R, E, S, bias, transposed, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to(dtype)
    if transposed:
        w = (torch.randn(E, K, N, generator=g) / K**0.5).to(dtype).transpose(1, 2)
    else:
        w = (torch.randn(E, N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(E, N, generator=g).to(dtype) if bias else None
    A = (torch.randn(S, E, R, K, generator=g) / K**0.5).to(adt)
    B = torch.randn(S, E, N, R, generator=g).to(adt)
    return x, w, b, A, B


# (dtype, adapter dtype, T, topk, K, N, R, E, S, ids pattern, slot_scales, bias, transposed weight,
#  dropout, gemms)
BANK_CASES = [
    (F16, F16, 9, 2, 72, 40, 16, 3, 2, "mixed", True, True, False, 0.2, (1, 2, 3)),
    (F32, F32, 20, 3, 37, 9, 17, 2, 3, "mixed", False, False, True, 0.25, (1,)),     # SIMT, K odd
    (BF16, F32, 100, 2, 40, 24, 8, 2, 2, "skew", True, True, False, 0.0, (1, 2)),     # 150-row id
    (F16, F16, 2, 2, 520, 16, 16, 3, 2, "mixed", True, False, False, 0.3, (1,)),      # split-K shrink
    (F16, F16, 12, 1, 64, 24, 4, 2, 3, "mixed", False, True, True, 0.0, (1,)),        # banks, topk 1
]


def _bank_case_id(c):
    name = (f"{c[0]}-{c[1]}-T{c[2]}-k{c[3]}-K{c[4]}-N{c[5]}-R{c[6]}-E{c[7]}-S{c[8]}-{c[9]}"
            f"{'-ss' if c[10] else ''}{'-Wt' if c[12] else ''}{'-drop' if c[13] else ''}")
    return name.replace("torch.", "")


@pytest.mark.parametrize("case", BANK_CASES, ids=[_bank_case_id(c) for c in BANK_CASES])
def test_moe_banks_topk_fwd_bwd(case, schedule):
    dtype, adt, T, topk, K, N, R, E, S, pattern, use_ss, bias, transposed, p, gemms = case
    x, w, b, A, B = _bank_args(dtype, adt, T, K, N, R, E, S, bias, transposed)
    M, nv = T * topk, (S + 1) * E
    ids = _bank_ids(pattern, M, E, S)
    ss = torch.tensor([0.5, 2.0, -1.25][:S]) if use_ss else None
    kw = dict(slot_scales=ss, topk=topk)
    order, keys = _routing(ids, nv)
    none = (ids < 0) | (ids >= nv)
    base = (ids >= 0) & (ids < E)
    present = torch.zeros(S, E, dtype=torch.bool)
    lv = ids[(ids >= E) & (ids < nv)]
    present[lv // E - 1, lv % E] = True
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(dtype)
    for gemm in gemms if schedule == 0 else gemms[:1]:
        fargs = (x, w, b, A, B, 0.7, p, SEED, ids)
        y, xa = OPS.moe_lora_linear_fwd(*fargs, gemm=gemm, **kw)
        check_op_vs_reference((y, xa), reference.moe_lora_linear_fwd, fargs + (ss, topk), ("y", "xa"),
                              scaled_atol=True)
        assert (y[none] == 0).all() and (xa[none | base] == 0).all(), "no-expert / base-only row"
        y_p, xa_p = OPS.moe_lora_linear_fwd(*fargs, order, keys, gemm=gemm, **kw)
        assert torch.equal(y, y_p) and torch.equal(xa, xa_p), "plan vs own sort differ"
        # Base-only rows: the base bit for bit (the same rows with every adapter removed), and
        # no bank entry is read for them: NaN banks and scales leave every output finite.
        base_ids = torch.where(none, ids, ids % E)
        nan_kw = dict(slot_scales=ss * float("nan") if use_ss else None, topk=topk)
        nA, nB = torch.full_like(A, float("nan")), torch.full_like(B, float("nan"))
        y0, xa0 = OPS.moe_lora_linear_fwd(x, w, b, nA, nB, 0.7, p, SEED, base_ids, gemm=gemm, **nan_kw)
        assert torch.equal(y[base], y0[base]), "a base-only row differs from the base"
        assert not y0.isnan().any() and not xa0.any(), "a base-only row read the bank"
        g0 = OPS.moe_lora_linear_bwd(dy, x, w, nA, nB, xa0, 0.7, p, SEED, base_ids, True, True, True,
                                     gemm=gemm, **nan_kw)
        assert not g0[0].isnan().any() and not g0[1].any() and not g0[2].any(), "base-only bwd read the bank"

        bargs = (dy, x, w, A, B, xa, 0.7, p, SEED, ids, True, True, True)
        got = OPS.moe_lora_linear_bwd(*bargs, gemm=gemm, **kw)
        check_op_vs_reference(got, reference.moe_lora_linear_bwd, bargs + (ss, topk), ("dx", "dA", "dB"),
                              scaled_atol=True)
        dx, dA, dB = got
        assert dx.shape == x.shape and dA.shape == A.shape and dB.shape == B.shape
        assert (dx[none.view(T, topk).all(1)] == 0).all(), "dx: a token of no expert is nonzero"
        assert (dA[~present] == 0).all() and (dB[~present] == 0).all(), "pair without rows: nonzero grad"
        again = OPS.moe_lora_linear_bwd(*bargs, order, keys, gemm=gemm, **kw)
        assert all(torch.equal(g, h) for g, h in zip(got, again)), "backward not reproducible"


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_moe_banks_topk_bwd_needs(needs):
    T, topk, K, N, R, E, S = 6, 3, 48, 24, 8, 2, 2
    x, w, _, A, B = _bank_args(BF16, F32, T, K, N, R, E, S, False, False, seed=2)
    ids = _bank_ids("mixed", T * topk, E, S)
    ss = torch.tensor([1.5, 0.25])
    _, xa = reference.moe_lora_linear_fwd(x, w, None, A, B, 0.5, 0.2, SEED, ids, ss, topk)
    dy = torch.randn(T * topk, N).to(BF16)
    bargs = (dy, x, w, A, B, xa, 0.5, 0.2, SEED, ids, *needs)
    check_op_vs_reference(OPS.moe_lora_linear_bwd(*bargs, slot_scales=ss, topk=topk),
                          reference.moe_lora_linear_bwd, bargs + (ss, topk), ("dx", "dA", "dB"),
                          scaled_atol=True)
