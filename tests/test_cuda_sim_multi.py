"""The mixed-adapter CUDA kernels (csrc/multi_lora_cuda.cu) run on CPU through the SIMT emulator
(tools/simt_emu: torch.ops.fused_lora_sim.*) against fused_lora.reference.

What the shapes reach (the emulator reports 4 SMs unless FUSED_LORA_SIM_SMS says otherwise):
* split-K shrink: decode rows (M < 65) with K >= 512 split K in 256-k passes (2-3 splits here),
  so partials + finalize run; K odd or K % 8 != 0 takes the scalar loads, K % 8 == 0 the 16-byte
  ones. M >= 65 takes the tile shrink over rows sorted by slot (tiles with one and with several
  slots).
* sorted per-slot reductions: M >= 64 with few column blocks cuts the sorted rows into several
  chunks, so slots span chunks (partials + finalize) next to slots inside one chunk (direct).
* R = 1, 16, 17 (two rank tiles), ranks < r_max with NaN in the dead columns of A and B, ids
  with -1 and out-of-range values, slots absent from the batch, fp32 adapters with fp16 x, and
  every needs_* combination.

Exact properties checked beside the tolerance: rows with id -1 give bit for bit the output of
an all -1 batch, xa is exactly 0 past a row's rank and on -1 rows, dA / dB are exactly 0 for
absent slots and past a slot's rank, and two runs are bitwise identical (no float atomics).
"""

from __future__ import annotations

import pytest
import torch

from fused_lora import reference

try:
    from simt_emu import SimUnavailable, build_sim
except ImportError as e:  # the emulator is not in this checkout
    pytest.skip(f"SIMT emulator unavailable: {e}", allow_module_level=True)

try:
    OPS = build_sim()
except SimUnavailable as e:
    pytest.skip(f"SIMT emulator unavailable: {e}", allow_module_level=True)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Relative to the largest reference value: fp32 summation order, then one output rounding.
TOL = {F32: 2e-5, F16: 2e-3, BF16: 1.6e-2}

# (dtype, adapter dtype, M, K, N, n_slots, r_max, ranks, ids pattern, bias)
#   ranks: "full" (None), "partial" (some slots below r_max, one at 0)
#   ids:   "mixed" (-1, out-of-range, several slots, some slots absent), "one" (a single slot),
#          "none" (every row -1)
CASES = [
    (F32, F32, 1, 520, 24, 4, 16, "full", "one", True),       # split-K x2, 16-byte loads
    (F16, F16, 1, 777, 16, 3, 16, "partial", "one", False),   # split-K x3, K odd: scalar loads
    (BF16, BF16, 3, 520, 40, 5, 16, "partial", "mixed", True),
    (F16, F32, 3, 517, 24, 4, 17, "partial", "mixed", True),  # fp32 adapters, 2 rank tiles
    (BF16, BF16, 8, 36, 20, 3, 1, "full", "mixed", False),    # K % 8 == 4, R = 1, no split
    (F32, F32, 9, 600, 24, 6, 17, "partial", "mixed", True),
    (F16, F16, 9, 1031, 8, 4, 16, "full", "mixed", True),     # K odd, split-K x3
    (BF16, F32, 70, 72, 24, 5, 16, "partial", "mixed", True),  # prefill sort, slots span chunks
    (F32, F32, 70, 37, 9, 3, 17, "partial", "mixed", False),
    (F16, F16, 200, 40, 16, 6, 16, "partial", "mixed", True),
    (BF16, BF16, 200, 24, 24, 4, 1, "full", "one", False),    # one slot over every chunk
    (F16, F16, 16, 520, 16, 4, 16, "full", "none", True),     # every row -1
    (BF16, BF16, 64, 520, 24, 5, 16, "partial", "mixed", True),  # last decode M: split-K x2
    (F16, F16, 65, 520, 32, 8, 16, "full", "mixed", False),   # first prefill M: tile shrink
    (BF16, BF16, 80, 1030, 16, 4, 16, "partial", "mixed", True),  # tile shrink split-K x2
]


def _inputs(dtype, adt, M, K, N, S, R, ranks_kind, ids_kind, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    A = (torch.randn(S, R, K, generator=g) / K**0.5).to(adt)
    B = torch.randn(S, N, R, generator=g).to(adt)
    scales = torch.rand(S, generator=g) + 0.5
    ranks = None
    if ranks_kind == "partial":
        ranks = torch.tensor([R, max(R - 3, 1), 0, max(R // 2, 1), 1, R][:S], dtype=torch.int64)
        for s in range(S):  # dead columns hold NaN: they must never be read
            A[s, int(ranks[s]):] = float("nan")
            B[s, :, int(ranks[s]):] = float("nan")
    if ids_kind == "one":
        ids = torch.full((M,), S - 1, dtype=torch.int64)
    elif ids_kind == "none":
        ids = torch.full((M,), -1, dtype=torch.int64)
    else:  # slot S - 1 absent; -1, S and -7 (out of range) rows act as -1
        pool = torch.tensor([-1, S, -7] + list(range(S - 1)), dtype=torch.int64)
        ids = pool[torch.randint(len(pool), (M,), generator=g)]
        ids[0] = 0
    return x, w, b, A, B, scales, ids, ranks


def _close(out, ref, name):
    assert out.dtype == ref.dtype and out.shape == ref.shape, name
    assert not torch.isnan(out).any(), f"{name}: NaN (a dead column read or an unwritten element)"
    tol = TOL[out.dtype] * max(1.0, ref.double().abs().max().item() if ref.numel() else 1.0)
    torch.testing.assert_close(out, ref, atol=tol, rtol=TOL[out.dtype], msg=name)


def _live(ranks, S, R):
    return reference._rank_mask(ranks, S, R, "cpu")


@pytest.fixture(params=[0, 1], ids=["fwd-order", "rev-order"])
def schedule(request):
    # Threads of a block first run 0..n-1 or n-1..0: a missing __syncthreads() shows in one.
    OPS.set_schedule(request.param)
    yield request.param
    OPS.set_schedule(0)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-M{c[2]}-K{c[3]}-R{c[6]}-{c[7]}-{c[8]}"
                                             .replace("torch.", "") for c in CASES])
def test_multi_fwd_bwd(case, schedule):
    dtype, adt, M, K, N, S, R, ranks_kind, ids_kind, bias = case
    x, w, b, A, B, scales, ids, ranks = _inputs(*case)
    y, xa = OPS.multi_lora_linear_fwd(x, w, b, A, B, scales, ids, ranks)
    y_ref, xa_ref = reference.multi_lora_linear_fwd(x, w, b, A, B, scales, ids, ranks)
    _close(y, y_ref, "y")
    _close(xa, xa_ref, "xa")
    # Exact: xa is 0 past the row's rank and on rows acting as -1.
    valid = (ids >= 0) & (ids < S)
    live_rows = torch.zeros(M, R, dtype=torch.bool)
    live_rows[valid] = _live(ranks, S, R)[ids[valid]]
    assert (xa[~live_rows] == 0).all(), "xa: nonzero past the rank / on a -1 row"
    # Rows acting as -1: bit for bit the all -1 batch's output.
    y_none, _ = OPS.multi_lora_linear_fwd(x, w, b, A, B, scales, torch.full_like(ids, -1), ranks)
    assert torch.equal(y[~valid], y_none[~valid]), "y: a -1 row differs from the base output"
    # Deterministic.
    y2, xa2 = OPS.multi_lora_linear_fwd(x, w, b, A, B, scales, ids, ranks)
    assert torch.equal(y, y2) and torch.equal(xa, xa2), "forward not bitwise reproducible"

    g = torch.Generator().manual_seed(1)
    dy = torch.randn(M, N, generator=g).to(dtype)
    dx, dA, dB = OPS.multi_lora_linear_bwd(dy, x, w, A, B, scales, ids, ranks, xa, True, True, True)
    dx_r, dA_r, dB_r = reference.multi_lora_linear_bwd(dy, x, w, A, B, scales, ids, ranks, xa_ref,
                                                      True, True, True)
    _close(dx, dx_r, "dx")
    _close(dA, dA_r, "dA")
    _close(dB, dB_r, "dB")
    present = torch.zeros(S, dtype=torch.bool)
    present[ids[valid]] = True
    live = _live(ranks, S, R)
    assert (dA[~present] == 0).all() and (dB[~present] == 0).all(), "absent slot: nonzero grad"
    assert (dA[~live] == 0).all(), "dA: nonzero past the rank"
    assert (dB.transpose(1, 2)[~live] == 0).all(), "dB: nonzero past the rank"
    dx2, dA2, dB2 = OPS.multi_lora_linear_bwd(dy, x, w, A, B, scales, ids, ranks, xa, True, True,
                                              True)
    assert torch.equal(dx, dx2) and torch.equal(dA, dA2) and torch.equal(dB, dB2), (
        "backward not bitwise reproducible")


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False),
                                   (False, False, True), (False, True, True)])
def test_multi_bwd_needs(needs):
    # Decode rows with split-K ds, and a strided (non-contiguous) x / dy.
    case = (F16, F32, 5, 520, 24, 4, 16, "partial", "mixed", False)
    x, w, b, A, B, scales, ids, ranks = _inputs(*case, seed=3)
    x = torch.randn(x.shape[1], x.shape[0]).to(F16).t()  # [M, K] with unit stride along M
    dy = torch.randn(24, 5).to(F16).t()
    _, xa = reference.multi_lora_linear_fwd(x, w, b, A, B, scales, ids, ranks)
    out = OPS.multi_lora_linear_bwd(dy, x, w, A, B, scales, ids, ranks, xa, *needs)
    ref = reference.multi_lora_linear_bwd(dy, x, w, A, B, scales, ids, ranks, xa, *needs)
    for name, o, r, need in zip(("dx", "dA", "dB"), out, ref, needs):
        if need:
            _close(o, r, name)
        else:
            assert o.numel() == 0, f"{name}: not needed but returned {tuple(o.shape)}"


@pytest.mark.parametrize("S,R", [(0, 4), (3, 0)])
@pytest.mark.parametrize("M", [3, 70])
def test_multi_empty_bank(S, R, M):
    # No slots / r_max = 0: y is the base output, xa and dA / dB are empty (no 0-block launch).
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(M, 600, generator=g), torch.randn(8, 600, generator=g) / 600**0.5
    A, B = torch.randn(S, R, 600, generator=g), torch.randn(S, 8, R, generator=g)
    sc, ids = torch.ones(S), torch.randint(-1, max(S, 1), (M,), generator=g)
    y, xa = OPS.multi_lora_linear_fwd(x, w, None, A, B, sc, ids, None)
    y_r, xa_r = reference.multi_lora_linear_fwd(x, w, None, A, B, sc, ids, None)
    _close(y, y_r, "y")
    assert xa.shape == xa_r.shape
    dy = torch.randn(M, 8, generator=g)
    out = OPS.multi_lora_linear_bwd(dy, x, w, A, B, sc, ids, None, xa, True, True, True)
    ref = reference.multi_lora_linear_bwd(dy, x, w, A, B, sc, ids, None, xa_r, True, True, True)
    _close(out[0], ref[0], "dx")
    assert out[1].shape == ref[1].shape and out[2].shape == ref[2].shape


# ---- the precomputed routing (order, keys: the batch's plan, shared by every layer) -------------


def _routing(ids, n_slots):
    """The plan's (order, keys): the stable argsort of key, key[t] = ids[t] if 0 <= ids[t] <
    n_slots else -1 (rows without an adapter first), and the sorted keys."""
    key = torch.where((ids >= 0) & (ids < n_slots), ids, torch.full_like(ids, -1))
    keys, order = torch.sort(key, stable=True)
    return order, keys


def _sorts(fn) -> int:
    """aten::sort calls made by fn() (the emulator's ops run on CPU: the profiler sees them)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "aten::sort")


# decode (M < 65: gathered per row, the backward's segments from the plan) and prefill (M >= 65:
# the plan's order is the GEMMs' row_map and the tile shrink's rows), fp16 on both GEMMs.
@pytest.mark.parametrize("gemm", [1, 2], ids=["mma", "wgmma"])
@pytest.mark.parametrize("case", [(F16, F16, 9, 600, 24, 6, 17, "partial", "mixed", True),
                                  (BF16, F32, 70, 72, 136, 5, 16, "partial", "mixed", True),
                                  (F16, F16, 200, 40, 16, 6, 16, "partial", "mixed", False)],
                         ids=["decode-M9", "prefill-M70", "prefill-M200"])
def test_routing_plan_matches_unplanned(case, gemm):
    x, w, b, A, B, scales, ids, ranks = _inputs(*case)
    M, N, S = x.shape[0], w.shape[0], A.shape[0]
    order, keys = _routing(ids, S)
    fwd = (x, w, b, A, B, scales, ids, ranks)
    y, xa = OPS.multi_lora_linear_fwd(*fwd, gemm=gemm)
    y_p, xa_p = OPS.multi_lora_linear_fwd(*fwd, order, keys, gemm=gemm)
    assert torch.equal(y, y_p) and torch.equal(xa, xa_p)  # same kernels, same rows: bit for bit
    dy = torch.randn(M, N).to(x.dtype)
    bwd = (dy, x, w, A, B, scales, ids, ranks, xa, True, True, True)
    got = OPS.multi_lora_linear_bwd(*bwd, gemm=gemm)
    got_p = OPS.multi_lora_linear_bwd(*bwd, order, keys, gemm=gemm)
    for g, gp, name in zip(got, got_p, ("dx", "dA", "dB")):
        assert torch.equal(g, gp), name
    # With the plan, no sort at all; without it the backward (and the prefill forward) sorts.
    assert _sorts(lambda: OPS.multi_lora_linear_fwd(*fwd, order, keys, gemm=gemm)) == 0
    assert _sorts(lambda: OPS.multi_lora_linear_bwd(*bwd, order, keys, gemm=gemm)) == 0
    assert _sorts(lambda: OPS.multi_lora_linear_bwd(*bwd, gemm=gemm)) == 1
    assert _sorts(lambda: OPS.multi_lora_linear_fwd(*fwd, gemm=gemm)) == (1 if M >= 65 else 0)
    # The plan is followed, not recomputed: keys routing every row to no adapter leave the
    # per-slot reductions nothing to sum (trusted input, see csrc/lora.h).
    _, dA0, dB0 = OPS.multi_lora_linear_bwd(*bwd, order, torch.full_like(keys, -1), gemm=gemm)
    assert not dA0.any() and not dB0.any() and got[1].any()


def test_routing_plan_checks_name_the_argument():
    x, w, b, A, B, scales, ids, ranks = _inputs(F32, F32, 70, 37, 9, 3, 17, "full", "mixed", False)
    order, keys = _routing(ids, 3)
    fwd = (x, w, b, A, B, scales, ids, ranks)
    _, xa = OPS.multi_lora_linear_fwd(*fwd)
    bwd = (torch.randn(70, 9), x, w, A, B, scales, ids, ranks, xa, True, True, True)
    for op, args in ((OPS.multi_lora_linear_fwd, fwd), (OPS.multi_lora_linear_bwd, bwd)):
        with pytest.raises(RuntimeError, match=r"order must be int64 \[M=70\], got Long \[69\]"):
            op(*args, order[:69], keys)
        with pytest.raises(RuntimeError, match=r"keys must be int64 \[M=70\], got Long \[71\]"):
            op(*args, order, torch.cat([keys, keys[:1]]))
        with pytest.raises(RuntimeError, match=r"order must be int64 \[M=70\], got Int"):
            op(*args, order.int(), keys)
        with pytest.raises(RuntimeError, match="order and keys must be given together"):
            op(*args, None, keys)
        with pytest.raises(RuntimeError, match="order must be contiguous"):
            op(*args, torch.stack([order, order], 1)[:, 0], keys)
