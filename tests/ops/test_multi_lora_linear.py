"""fused_lora::multi_lora_linear (mixed adapters, one per token): fused_lora.multi_lora_linear,
the custom ops fused_lora::multi_lora_linear_fwd / _bwd, and every backend's kernels, against a
per-token float64 loop (fused_lora.reference).

Backends (tests/ops/conftest.py): torch, triton_decode / triton_prefill / triton_hybrid (each
Triton path at any batch size; triton: the path chosen from shapes), cuda_cpu (the C++ CPU
kernels), sim* (the CUDA kernels under the SIMT emulator), cuda* (the CUDA kernels, gpu).

Tolerance: the 2x rule of tests/_utils.py -- a kernel's max error against fp64 is at most 2x
the error of PyTorch's own gather + bmm chain in the same dtype (+ a small atol); the raw-op
tests hold each backend to Backend.check (tests/ops/conftest.py). Exact properties beside the
tolerance: rows with id -1 (or an id out of range) give bit for bit the output of an all -1
batch, xa is exactly 0 on those rows and past a row's rank, dA / dB are exactly 0 for slots
absent from the batch and past a slot's rank, columns past a slot's rank (NaN in the bank) are
never read, and the kernels are deterministic.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _fuzz import FUZZ_GEMMS, N_FUZZ, fuzz_check, fuzz_draw, fuzz_layout
from _utils import INTERPRET, TRITON_DTYPES, assert_close_2x, close, multi_inputs, relayout

import fused_lora
from fused_lora import ops
from fused_lora import reference as ref
from fused_lora.routing import RoutingPlan

OP = "multi_lora_linear"
DEFAULT_BACKENDS = ("torch", "triton_decode", "triton_prefill", "cuda_cpu", "cuda")

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
         (False, True, True), (False, False, False)]
PATTERNS = ["distinct", "uniform", "zipf", "identical", "skewed"]
# Interpreter-sized problem: Triton tiles are 16 rows x 32 cols there, so M=24 spans two row
# tiles and K=40 / N=36 leave partial column tiles; r_max=20 (not a power of two) leaves a
# partial rank chunk.
M0, K0, N0, R0, S0 = 24, 40, 36, 20, 6


def _needs_id(n):
    return "".join("1" if e else "0" for e in n)


# ============================================================================ functional API


def _small(device="cpu", dtype=F32):
    """11 tokens over 3 slots of rank <= 4 (ranks 4, 2, 3; no NaN padding), ids in [-1, 3)."""
    ids = torch.randint(-1, 3, (11,))
    x, w, b, A, B, sc, ids, _ = multi_inputs(11, 24, 20, 3, 4, dtype, device=device, ranks=None, ids=ids)
    return x, w, b, A, B, sc, ids, torch.tensor([4, 2, 3], device=device)


def _eager_chain(x, w, b, A, B, scales, ids, ranks):
    """PyTorch's own mixed-adapter LoRA in the inputs' dtypes: gather the bank per token, bmm."""
    S, R = A.shape[0], A.shape[1]
    x2d = x.reshape(-1, x.shape[-1])
    flat = ids.reshape(-1)
    if ranks is not None:
        live = torch.arange(R, device=x.device)[None, :] < ranks[:, None]
        A = torch.where(live[:, :, None], A, torch.zeros((), dtype=A.dtype, device=x.device))
        B = torch.where(live[:, None, :], B, torch.zeros((), dtype=B.dtype, device=x.device))
    active = (flat >= 0) & (flat < S)
    slot = torch.where(active, flat, 0)
    xa = torch.bmm(x2d.to(A.dtype)[:, None, :], A[slot].transpose(1, 2))
    yl = torch.bmm(xa, B[slot].transpose(1, 2))[:, 0] * scales[slot].to(A.dtype)[:, None]
    yl = torch.where(active[:, None], yl, torch.zeros((), dtype=yl.dtype, device=x.device))
    y = F.linear(x2d, w, b) + yl.to(x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _run_case(be, x, w, b, A, B, scales, ids, ranks, grads=True):
    """fused_lora.multi_lora_linear on `be`, forward (and backward), against the fp64 per-token
    loop with the 2x rule; absent slots must get exactly zero gradient."""
    be.take(OP, x.dtype)

    def leaf(t):
        return t.detach().clone().requires_grad_(grads)

    x64, A64, B64 = leaf(x.double()), leaf(A.double()), leaf(B.double())
    y64 = ref.multi_lora_linear(x64, w.double(), None if b is None else b.double(), A64, B64,
                                scales, ids, ranks)
    xp, Ap, Bp = leaf(x), leaf(A), leaf(B)
    ypt = _eager_chain(xp, w, b, Ap, Bp, scales, ids, ranks)
    xk, Ak, Bk = leaf(x), leaf(A), leaf(B)
    yk = fused_lora.multi_lora_linear(xk, w, b, Ak, Bk, scales, ids, ranks=ranks, backend=be.impl)
    assert yk.dtype == x.dtype and yk.shape == ypt.shape
    assert_close_2x(yk, y64, ypt, "y")
    if not grads:
        return
    dy = torch.randn_like(y64)
    y64.backward(dy)
    ypt.backward(dy.to(ypt.dtype))
    yk.backward(dy.to(yk.dtype))
    # NaN-padded columns: every backend's gradient there is 0 (the pad is never read).
    for name, tk, tpt, t64 in (("dx", xk, xp, x64), ("dA", Ak, Ap, A64), ("dB", Bk, Bp, B64)):
        assert tk.grad.dtype == tk.dtype
        assert_close_2x(tk.grad, t64.grad, tpt.grad, name)
    S = A.shape[0]
    flat = ids.reshape(-1)
    present = torch.zeros(S, dtype=torch.bool, device=x.device)
    present[flat[(flat >= 0) & (flat < S)]] = True
    assert torch.count_nonzero(Ak.grad[~present]) == 0, "absent slots must get exactly zero dA"
    assert torch.count_nonzero(Bk.grad[~present]) == 0, "absent slots must get exactly zero dB"


def _inputs(be, M, K, N, S, R, dtype, adapter_dtype, pattern="uniform", none_frac=0.0, ranks=True,
            bias=True, lead=None):
    return multi_inputs(M, K, N, S, R, dtype, adapter_dtype, be.device, bias=bias,
                        ranks="mixed" if ranks else None, ids=pattern, none_frac=none_frac, lead=lead)


_ALL_PATTERNS = [(p, f) for p in PATTERNS for f in (0.0, 0.5)]


@pytest.mark.backends(
    args="pattern,none_frac",
    **{n: _ALL_PATTERNS for n in ("torch", "triton_decode", "triton_prefill", "cuda")},
    cuda_cpu=[(p, 0.5) for p in PATTERNS],
    # segmented shrink + gathered GEMM: auto's choice for large M over a large bank
    triton_hybrid=[(p, f) for p in ("zipf", "skewed") for f in (0.0, 0.5)],
)
def test_patterns(backend, pattern, none_frac):
    S = M0 + 4 if pattern == "distinct" else S0
    _run_case(backend, *_inputs(backend, M0, K0, N0, S, R0, F32, F32, pattern, none_frac))


_HALF = [d for d in TRITON_DTYPES if d != F32]
_TORCH_LOW = [(BF16, p, f, False) for p in PATTERNS for f in (0.0, 0.5)]
_TRITON_LOW = [(d, p, 0.5, fp32) for d in _HALF for p in ("uniform", "skewed") for fp32 in (False, True)]


@pytest.mark.backends(
    args="dtype,pattern,none_frac,fp32_adapters",
    torch=_TORCH_LOW, triton_decode=_TRITON_LOW, triton_prefill=_TRITON_LOW,
    cuda_cpu=[(d, p, 0.5, fp32) for d in (F16, BF16) for p in ("uniform", "skewed")
              for fp32 in (False, True)],
    cuda=[(d, p, 0.5, fp32) for d in (F16, BF16) for p in ("uniform", "skewed") for fp32 in (False, True)],
)
def test_low_precision(backend, dtype, pattern, none_frac, fp32_adapters):
    S = M0 + 4 if pattern == "distinct" else S0
    adt = F32 if fp32_adapters else dtype
    _run_case(backend, *_inputs(backend, M0, K0, N0, S, R0, dtype, adt, pattern, none_frac))


def test_3d_fp32_adapters(backend):
    args = _inputs(backend, 0, K0, N0, S0, 8, BF16, F32, "zipf", 0.5, lead=(2, 3, 5))
    _run_case(backend, *args)


def test_rank_over_64_and_rank_zero_slot(backend):
    # r_max = 80: rank chunks of 64 (two chunks for slots of rank > 64, one for the others);
    # slot 0 has rank 0 (loaded-then-emptied slot): its tokens get the base output.
    S, R = 4, 80
    ranks = torch.tensor([0, 80, 65, 7])
    x, w, b, A, B, scales, ids, ranks = multi_inputs(20, 24, 20, S, R, device=backend.device, ranks=ranks,
                                                     ids="uniform", none_frac=0.25)
    ids[:4] = torch.tensor([0, 1, 2, 3])
    _run_case(backend, x, w, b, A, B, scales, ids, ranks)


def test_3d_input_no_bias_no_ranks(backend):
    args = _inputs(backend, 0, K0, N0, S0, 8, F32, F32, "zipf", 0.5, ranks=False, bias=False, lead=(3, 7))
    assert args[6].shape == (3, 7)
    _run_case(backend, *args)


def test_many_slots_small_batch(backend):
    # A bank far bigger than the batch (S = 300): grids are sized by min(S + 1, M), not S.
    _run_case(backend, *_inputs(backend, 12, 24, 20, 300, 8, F32, F32, "distinct", 0.0))


def test_none_rows_bit_exact(backend):
    """Rows with id -1 are bit-for-bit what the same backend gives when every id is -1, and a
    batch without adapters equals the base layer (NaN-free even though the bank's padding and
    the scales of unused slots are NaN)."""
    x, w, b, A, B, scales, ids, ranks = _inputs(backend, 40, K0, N0, S0, R0, F32, F32, "uniform", 0.5)
    y = fused_lora.multi_lora_linear(x, w, b, A, B, scales, ids, ranks=ranks, backend=backend.impl)
    none = torch.full_like(ids, -1)
    y0 = fused_lora.multi_lora_linear(x, w, b, A, B, scales, none, ranks=ranks, backend=backend.impl)
    rows = ids == -1
    assert rows.any() and (~rows).any()
    if INTERPRET and backend.name == "triton_prefill":
        # The interpreter's tl.dot is numpy's sgemm, whose rounding depends on a row's position
        # in the tile (OpenBLAS micro-kernel remainders: 1-3 ulp seen); tile positions differ
        # between the sorted mixed batch and the all -1 batch. A GPU MMA computes every row
        # alike, so the bit-exact check below runs there.
        torch.testing.assert_close(y[rows], y0[rows], rtol=5e-7, atol=5e-7)
    else:
        assert torch.equal(y[rows], y0[rows])
    # All -1: no adapter touched, even with a poisoned bank.
    y0n = fused_lora.multi_lora_linear(x, w, b, A * float("nan"), B, scales * float("nan"), none,
                                       ranks=ranks, backend=backend.impl)
    assert torch.equal(y0n, y0)
    torch.testing.assert_close(y0, F.linear(x, w, b))


def test_out_of_range_ids_unvalidated_act_as_none(backend):
    dev = backend.device
    x, w, b, A, B, scales, ids, ranks = _inputs(backend, 20, K0, N0, S0, R0, F32, F32, "uniform", 0.0)
    bad = ids.clone()
    bad[::3] = torch.tensor([S0, -2, 10**9, -(10**9), S0 + 1, -7, 2**40], device=dev)
    with pytest.raises(ValueError, match="adapter_ids must be in"):
        fused_lora.multi_lora_linear(x, w, b, A, B, scales, bad, ranks=ranks, backend=backend.impl)
    good = torch.where((bad >= 0) & (bad < S0), bad, torch.full_like(bad, -1))
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    As = [A.clone().requires_grad_(), A.clone().requires_grad_()]
    y_bad = fused_lora.multi_lora_linear(xs[0], w, b, As[0], B, scales, bad, ranks=ranks,
                                         backend=backend.impl, validate=False)
    y_good = fused_lora.multi_lora_linear(xs[1], w, b, As[1], B, scales, good, ranks=ranks,
                                          backend=backend.impl)
    assert torch.equal(y_bad, y_good)
    dy = torch.randn_like(y_bad)
    y_bad.backward(dy)
    y_good.backward(dy)
    assert torch.equal(xs[0].grad, xs[1].grad)
    assert torch.equal(As[0].grad, As[1].grad)


def test_empty_batch(backend):
    x, w, b, A, B, scales, ids, ranks = _inputs(backend, 0, 16, 24, 3, 4, F32, F32)
    x.requires_grad_(True)
    y = fused_lora.multi_lora_linear(x, w, b, A, B, scales, ids, ranks=ranks, backend=backend.impl)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


@pytest.mark.parametrize("which", ["bias", "scales", "ranks"])
def test_strided_1d_inputs(backend, which):
    # Strided 1-D bias / scales / ranks (views of every other element) are read with their stride.
    x, w, b, A, B, scales, ids, ranks = _small(backend.device)
    want = ref.multi_lora_linear(x, w, b, A, B, scales, ids, ranks)
    args = dict(bias=b, scales=scales, ranks=ranks)
    t = args[which]
    fill = 7 if t.dtype == torch.int64 else 3.0  # garbage between the strided elements
    wide = torch.zeros(2 * t.shape[0], dtype=t.dtype, device=t.device) + fill
    wide[::2] = t
    args[which] = wide[::2]
    assert not args[which].is_contiguous()
    y = fused_lora.multi_lora_linear(x, w, args["bias"], A, B, args["scales"], ids, ranks=args["ranks"],
                                     backend=backend.impl)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


def test_ranks_past_int32_clamp_not_wrap(backend):
    """ranks = 2**32 + 1 with validate=False must clamp to r_max, not wrap to 1 in int32."""
    x, w, b, A, B, scales, ids, ranks = _small(backend.device)
    big = torch.full_like(ranks, (1 << 32) + 1)
    y = fused_lora.multi_lora_linear(x, w, b, A, B, scales, ids, ranks=big, backend=backend.impl,
                                     validate=False)
    want = ref.multi_lora_linear(x, w, b, A, B, scales, ids, torch.full_like(ranks, A.shape[1]))
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


@pytest.mark.backends("cuda_cpu")
def test_same_as_torch_backend(backend):
    # Through the package: the same outputs and gradients as backend="torch".
    x, w, b, a, bb, scales, ids, rk = multi_inputs(23, 37, 29, 3, 17, device=backend.device, ranks=None)
    ids = ids.clamp(-1, 2)  # the functional API validates ids by default
    grads = {}
    for impl in (backend.impl, "torch"):
        xi, ai, bi = (t.detach().clone().requires_grad_(True) for t in (x, a, bb))
        y = fused_lora.multi_lora_linear(xi, w, b, ai, bi, scales, ids, backend=impl)
        y.square().sum().backward()
        grads[impl] = (y, xi.grad, ai.grad, bi.grad)
    for g, r, name in zip(grads[backend.impl], grads["torch"], ("y", "dx", "dA", "dB")):
        torch.testing.assert_close(g, r, msg=name)


def test_reference_ops_match_per_token_loop():
    # The op-level reference (grouped by slot) against the per-token loop, both fp64.
    x, w, b, A, B, scales, ids, ranks = multi_inputs(M0, K0, N0, S0, R0, F64, ids="zipf", none_frac=0.5)
    y, xa = ref.multi_lora_linear_fwd(x, w, b, A, B, scales, ids, ranks)
    torch.testing.assert_close(y, ref.multi_lora_linear(x, w, b, A, B, scales, ids, ranks),
                               rtol=1e-12, atol=1e-12)
    assert not torch.isnan(xa).any()


# ============================================================================ custom ops


def _op_plan_args(device, bias=True, ranks=True):
    """Op-level arguments: (x, w, b, A, B, scales, ranks, routing-plan tensor), and the ids."""
    x, w, b, A, B, scales, ids, rk = multi_inputs(13, 20, 18, 4, 6, device=device, bias=bias,
                                                  ranks="mixed" if ranks else None, ids="uniform",
                                                  none_frac=0.3)
    return (x, w, b, A, B, scales, rk, RoutingPlan.build(ids, A.shape[0]).data), ids


@pytest.mark.backends("torch", "triton", "cuda_cpu", "cuda")
@pytest.mark.parametrize("bias,ranks", [(True, True), (False, False)])
def test_opcheck_fwd(backend, bias, ranks):
    (x, w, b, A, B, scales, rk, plan), ids = _op_plan_args(backend.device, bias=bias, ranks=ranks)
    # opcheck's autograd checks differentiate through the bank: no NaN padding here.
    A, B = torch.nan_to_num(A), torch.nan_to_num(B)
    if backend.is_cpp:  # the backend's own C++ op (takes the ids, not the plan)
        torch.library.opcheck(backend.ops.multi_lora_linear_fwd.default, (x, w, b, A, B, scales, ids, rk))
        if not bias:  # the custom op, the same registration whatever the impl: once
            return
    for t in (x, A, B):
        t.requires_grad_(True)
    torch.library.opcheck(ops.multi_lora_linear_fwd, (x, w, b, A, B, scales, rk, plan, backend.impl))


@pytest.mark.backends("torch", "triton", "cuda_cpu", "cuda")
@pytest.mark.parametrize("needs", [(True, True, True), (False, True, False), (True, False, False)],
                         ids=_needs_id)
def test_opcheck_bwd(backend, needs):
    (x, w, b, A, B, scales, rk, plan), ids = _op_plan_args(backend.device)
    y, xa = ops.multi_lora_linear_fwd(x, w, b, A, B, scales, rk, plan, backend.impl)
    dy = torch.randn_like(y)
    if backend.is_cpp:
        torch.library.opcheck(backend.ops.multi_lora_linear_bwd.default,
                              (dy, x, w, A, B, scales, ids, rk, xa, *needs))
        if needs != (True, True, True):  # the custom op: once (see test_opcheck_fwd)
            return
    torch.library.opcheck(ops.multi_lora_linear_bwd,
                          (dy, x, w, A, B, scales, rk, plan, xa, *needs, backend.impl))


def test_fake_impl_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(7, 20, dtype=torch.float16)
        w = torch.empty(18, 20, dtype=torch.float16)
        A = torch.empty(5, 4, 20, dtype=torch.float32)
        B = torch.empty(5, 18, 4, dtype=torch.float32)
        sc = torch.empty(5)
        from fused_lora.routing import sizes

        S, T = sizes(7, 5)
        plan = torch.empty(3 * 7 + 3 * S + 3 * T, dtype=torch.int64)
        y, xa = ops.multi_lora_linear_fwd(x, w, None, A, B, sc, None, plan, "torch")
        assert y.shape == (7, 18) and y.dtype == torch.float16
        assert xa.shape == (7, 4) and xa.dtype == torch.float32
        dx, dA, dB = ops.multi_lora_linear_bwd(y, x, w, A, B, sc, None, plan, xa, True, False, True,
                                               "torch")
        assert dx.shape == x.shape and dA.numel() == 0 and dB.shape == B.shape


@pytest.mark.backends(args="compiler", torch=["inductor"], triton=["aot_eager"], cuda_cpu=["aot_eager"])
def test_compile_fullgraph(backend, compiler):
    torch._dynamo.reset()
    x, w, b, A, B, scales, ids, rk = multi_inputs(13, 20, 18, 4, 6, device=backend.device, ids="uniform",
                                                  none_frac=0.3)
    A.requires_grad_(True)
    B.requires_grad_(True)

    def fwd(inp, i):
        return fused_lora.multi_lora_linear(inp, w, b, A, B, scales, i, ranks=rk, backend=backend.impl)

    def step(f, inp, i):
        out = f(inp, i)
        out.square().mean().backward()  # AOT autograd compiled the backward graph too
        return out

    compiled = torch.compile(fwd, fullgraph=True, backend=compiler)
    out_c = step(compiled, x, ids)
    gA_c, gB_c = A.grad.clone(), B.grad.clone()
    A.grad = B.grad = None
    out_e = step(fwd, x, ids)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(gA_c, A.grad)
    torch.testing.assert_close(gB_c, B.grad)
    # Other ids, same shapes: no host-side id check or routing baked into the graph.
    ids2 = torch.roll(ids, 3)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, ids2), fwd(x, ids2))


@pytest.mark.backends("torch", "triton", "cuda_cpu", "cuda")
def test_raw_ops_check_the_shapes_they_rely_on(backend):
    xm, wm, bm, Am, Bm, sc, ids, rk = _small(backend.device)
    plan = RoutingPlan.build(ids, Am.shape[0]).data
    mop = torch.ops.fused_lora.multi_lora_linear_fwd
    impl = backend.impl
    with pytest.raises(ValueError, match="scales must be"):
        mop(xm, wm, bm, Am, Bm, sc[:-1], rk, plan, impl)
    with pytest.raises(ValueError, match="plan must be"):
        mop(xm[:-1], wm, bm, Am, Bm, sc, rk, plan, impl)  # a plan for another batch size
    with pytest.raises(ValueError, match="lora_B must be"):
        mop(xm, wm, bm, Am, Bm[:, :-1], sc, rk, plan, impl)


# ============================================================================ raw kernels
# The C++ ops' convention (adapter ids; optionally the routing plan's order and keys): the C++
# CPU kernels (cuda_cpu), the CUDA kernels under the emulator (sim*) and on a GPU (cuda*).


def _routing(ids, n_slots):
    """The routing plan's (order, keys) for ids: the stable argsort of key, key[t] = ids[t] if
    0 <= ids[t] < n_slots else -1 (rows without an adapter first), and the sorted keys."""
    key = torch.where((ids >= 0) & (ids < n_slots), ids, torch.full_like(ids, -1))
    keys, order = torch.sort(key, stable=True)
    return order, keys


def _check_fwd_bwd(be, args, needs=(True, True, True)):
    """Forward, then backward from the backend's xa, each against the reference."""
    x, w, b, a, bb, scales, ids, rk = args
    y, xa = be.multi_fwd(*args)
    be.check((y, xa), ref.multi_lora_linear_fwd, args, ("y", "xa"))
    dy = torch.randn(x.shape[0], w.shape[0]).to(x.dtype).to(x.device)
    bargs = (dy, x, w, a, bb, scales, ids, rk, xa, *needs)
    got = be.multi_bwd(*bargs)
    be.check(got, ref.multi_lora_linear_bwd, bargs, ("dx", "dA", "dB"))
    return y, xa, dy, got


# (M, K, N, S, R): decode (GEMV M <= 8; one tile with up to S slots: more than the GEMM's 4 slot
# passes -> the gather fallback), prefill (rows sorted by slot through row_map), R = 1 / 17 / 33.
SIM_SHAPES = [(6, 67, 33, 4, 17), (40, 64, 136, 12, 16), (129, 67, 129, 5, 1), (300, 72, 257, 6, 33)]
# dtype labels: activations and adapters
DTYPES = {"f32": (F32, None), "f16": (F16, None), "bf16": (BF16, None), "bf16-f32adapters": (BF16, F32)}
# decode-sized (M < 65: unsorted rows, up to S slots in a tile -> past the 4 slot passes the
# per-element gather), prefill (rows sorted by slot through row_map), on the wgmma GEMM.
WGMMA_SHAPES = [(40, 130, 136, 12, 16), (300, 700, 257, 6, 33)]
GPU_SHAPES = [(1, 64, 96, 4, 16), (7, 67, 33, 4, 17), (150, 136, 200, 4, 8)]
# BK = 64 edges, K odd, split-K, ragged tiles, one training-sized case (both GEMMs).
GEMM_SHAPES = [(9, 64, 128, 5, 16), (20, 1000, 40, 5, 16), (64, 4096, 4096, 5, 16), (129, 67, 129, 5, 1),
               (257, 700, 256, 5, 16), (300, 136, 700, 5, 33), (2048, 4096, 4096, 5, 16)]


def _gemm_cases(shapes):
    return [(s, d, False, True) for s in shapes for d in ("f16", "bf16")]


@pytest.mark.backends(
    args="shape,dtypes,ranks,bias",
    cuda_cpu=[((23, 37, 29, 3, 17), d, r, b) for d in ("f32", "f16") for b in (True, False)
              for r in (True, False)],
    sim=[(s, d, r, s[0] % 2 == 0) for s in SIM_SHAPES for d in DTYPES for r in (True, False)],
    # every block's threads first run in reverse order (a missing __syncthreads() shows)
    sim_rev=[((M, 72, 136, 6, 33), "f16", True, True) for M in (6, 300)],
    sim_wgmma=[(s, d, True, True) for s in WGMMA_SHAPES for d in ("f16", "bf16")],
    sim_wgmma256=[(s, d, True, True) for s in WGMMA_SHAPES for d in ("f16", "bf16")],
    cuda=[(s, d, r, True) for d in ("f16", "bf16", "f32") for s in GPU_SHAPES for r in (True, False)]
    # a 128-row GEMM tile serves up to 4 slots by r-deep passes and gathers the rest per element;
    # M >= 65 sorts rows by slot first (row_map). (40, 12): unsorted tile, > 4 slots; (150, 40):
    # sorted, still > 4 slots per tile; (300, 3) and (129, 1): one or two per tile.
    + [((M, 72, 136, S, 16), d, False, True) for d in ("f16", "bf16")
       for M, S in ((40, 12), (150, 40), (300, 3), (129, 1))],
    cuda_mma=_gemm_cases(GEMM_SHAPES), cuda_wgmma=_gemm_cases(GEMM_SHAPES),
    cuda_wgmma256=_gemm_cases(GEMM_SHAPES),
)
def test_raw_multi_fwd_bwd(backend, shape, dtypes, ranks, bias):
    M, K, N, S, R = shape
    dtype, adapter_dtype = DTYPES[dtypes]
    absent = (S - 1,) if S > 1 else ()  # a slot no row uses: exact zero gradients
    args = multi_inputs(M, K, N, S, R, dtype, adapter_dtype, backend.device, ranks="mixed" if ranks else None,
                        bias=bias, absent=absent)
    x, w, b, a, bb, scales, ids, rk = args
    before = backend.wgmma_count() if backend.kind == "sim" else 0
    y, xa, dy, got = _check_fwd_bwd(backend, args)
    # Rows without an adapter (id -1 or out of range) get exactly the base output.
    none = (ids < 0) | (ids >= S)
    y0, xa0 = backend.multi_fwd(x, w, b, a, bb, scales, torch.full_like(ids, -1), rk)
    assert torch.equal(y[none], y0[none])
    assert torch.equal(xa[none], torch.zeros_like(xa[none]))
    # The precomputed routing (order, keys) gives the same outputs, bit for bit.
    order, keys = _routing(ids, S)
    y_p, xa_p = backend.multi_fwd(*args, order, keys)
    assert torch.equal(y, y_p) and torch.equal(xa, xa_p)
    got_p = backend.multi_bwd(dy, x, w, a, bb, scales, ids, rk, xa, True, True, True, order, keys)
    for t, tp in zip(got, got_p):
        assert torch.equal(t, tp)
    _, dA, dB = got
    for s in absent:
        assert torch.equal(dA[s], torch.zeros_like(dA[s])) and torch.equal(dB[s], torch.zeros_like(dB[s]))
    if rk is not None:
        for s in range(S):
            assert not torch.isnan(dA[s]).any() and not torch.isnan(dB[s]).any()
            assert torch.equal(dA[s, int(rk[s]):], torch.zeros_like(dA[s, int(rk[s]):]))
    if backend.kind == "sim" and backend.gemm >= 2:
        assert backend.wgmma_count() > before, "the wgmma GEMM did not run"


@pytest.mark.backends(args="M", cuda_cpu=[6, 23, 129], sim=[6, 129], cuda=[6, 129])
@pytest.mark.parametrize("needs", NEEDS, ids=_needs_id)
def test_raw_multi_bwd_needs(backend, needs, M):
    args = multi_inputs(M, 37, 29, 3, 17, F16, F32, backend.device)
    x, w, b, a, bb, scales, ids, rk = args
    _, xa = ref.multi_lora_linear_fwd(*args)
    dy = torch.randn(M, 29).half().to(backend.device)
    bargs = (dy, x, w, a, bb, scales, ids, rk, xa, *needs)
    backend.check(backend.multi_bwd(*bargs), ref.multi_lora_linear_bwd, bargs, ("dx", "dA", "dB"))


@pytest.mark.backends("sim", "cuda")
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("K", [1031, 2056, 3080])
def test_raw_multi_gemv_unrolled_k_loop(backend, dtype, K):
    """The decode GEMV reads W in groups of 4 chunks (1024 k per lane group): K = 1031 is one
    group + a 7-element tail, 2056 one group + 4 single chunks, 3080 three groups + a chunk."""
    margs = multi_inputs(6, K, 40, 3, 16, dtype, device=backend.device)
    backend.check(backend.multi_fwd(*margs), ref.multi_lora_linear_fwd, margs, ("y", "xa"))


@pytest.mark.backends("sim", "cuda")
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("shape", [(20, 520, 40), (70, 517, 40), (20, 40, 520), (9, 300, 300)],
                         ids=lambda s: "x".join(map(str, s)))
def test_raw_multi_split_k_gemm(backend, shape, dtype):
    # Split-K of the tensor-core GEMM (tiles < SMs; the emulator reports 4 SMs); M >= 65: rows
    # sorted by slot, partials at the physical rows.
    M, K, N = shape
    _check_fwd_bwd(backend, multi_inputs(M, K, N, 5, 16, dtype, device=backend.device))


@pytest.mark.backends("sim", "cuda")
@pytest.mark.parametrize("ids_kind", ["one-slot", "sorted"])
def test_raw_multi_sorted_and_single_slot(backend, ids_kind):
    # Prefill with all rows of one slot, and rows already sorted by slot.
    ids = torch.full((257,), 2) if ids_kind == "one-slot" else torch.arange(257) * 4 // 257
    _check_fwd_bwd(backend, multi_inputs(257, 64, 130, 4, 16, F16, device=backend.device, ids=ids))


@pytest.mark.backends("sim", "cuda_cpu", "cuda")
@pytest.mark.parametrize("M,K,N,S", [(5, 8, 16, 0), (0, 8, 16, 2), (4, 0, 16, 2), (4, 8, 0, 2)])
def test_raw_multi_no_slots_and_degenerate(backend, M, K, N, S):
    x, w, _, a, bb, scales, ids, _ = multi_inputs(M, K, N, S, 4, F16, device=backend.device, ranks=None,
                                                  ids="none")
    _check_fwd_bwd(backend, (x, w, None, a, bb, torch.ones(S, device=backend.device), ids, None))


@pytest.mark.backends("sim", "cuda_cpu", "cuda")
@pytest.mark.parametrize("S,R", [(0, 4), (3, 0)])
@pytest.mark.parametrize("M", [3, 70])
def test_raw_multi_empty_bank(backend, S, R, M):
    # No slots / r_max = 0: y is the base output, xa and dA / dB are empty (no 0-block launch).
    dev = backend.device
    x, w = torch.randn(M, 600).to(dev), (torch.randn(8, 600) / 600**0.5).to(dev)
    A, B = torch.randn(S, R, 600).to(dev), torch.randn(S, 8, R).to(dev)
    sc, ids = torch.ones(S, device=dev), torch.randint(-1, max(S, 1), (M,)).to(dev)
    y, xa = backend.multi_fwd(x, w, None, A, B, sc, ids, None)
    y_r, xa_r = ref.multi_lora_linear_fwd(x, w, None, A, B, sc, ids, None)
    _close_rel(y, y_r, "y")
    assert xa.shape == xa_r.shape
    dy = torch.randn(M, 8).to(dev)
    out = backend.multi_bwd(dy, x, w, A, B, sc, ids, None, xa, True, True, True)
    want = ref.multi_lora_linear_bwd(dy, x, w, A, B, sc, ids, None, xa_r, True, True, True)
    _close_rel(out[0], want[0], "dx")
    assert out[1].shape == want[1].shape and out[2].shape == want[2].shape


# ---- the mixed-adapter CUDA kernels' paths (csrc/multi_lora_cuda.cu; the emulator reports 4 SMs):
# * split-K shrink: decode rows (M < 65) with K >= 512 split K in 256-k passes (2-3 splits here),
#   so partials + finalize run; K odd or K % 8 != 0 takes the scalar loads, K % 8 == 0 the
#   16-byte ones. M >= 65 takes the tile shrink over rows sorted by slot (tiles with one and
#   with several slots).
# * sorted per-slot reductions: M >= 64 with few column blocks cuts the sorted rows into several
#   chunks, so slots span chunks (partials + finalize) next to slots inside one chunk (direct).
# * R = 1, 16, 17 (two rank tiles), ranks < r_max with NaN in the dead columns, ids with -1 and
#   out-of-range values, slots absent from the batch, fp32 adapters with fp16 x.

# Relative to the largest reference value: fp32 summation order, then one output rounding.
TOL = {F32: 2e-5, F16: 2e-3, BF16: 1.6e-2}


def _close_rel(out, want, name):
    assert out.dtype == want.dtype and out.shape == want.shape, name
    assert not torch.isnan(out).any(), f"{name}: NaN (a dead column read or an unwritten element)"
    tol = TOL[out.dtype] * max(1.0, want.double().abs().max().item() if want.numel() else 1.0)
    torch.testing.assert_close(out, want, atol=tol, rtol=TOL[out.dtype], msg=name)


# (dtype, adapter dtype, M, K, N, n_slots, r_max, ranks, ids pattern, bias)
#   ranks: "full" (None), "partial" (some slots below r_max, one at 0)
#   ids:   "mixed" (-1, out-of-range, several slots, slot S - 1 absent), "one" (a single slot),
#          "none" (every row -1)
PATH_CASES = [
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


def _case_id(c):
    return f"{c[0]}-{c[1]}-M{c[2]}-K{c[3]}-R{c[6]}-{c[7]}-{c[8]}".replace("torch.", "")


def _path_inputs(be, dtype, adt, M, K, N, S, R, ranks_kind, ids_kind, bias):
    ranks = None
    if ranks_kind == "partial":
        ranks = torch.tensor([R, max(R - 3, 1), 0, max(R // 2, 1), 1, R][:S], dtype=torch.int64)
    absent = (S - 1,) if ids_kind == "mixed" else ()
    args = list(multi_inputs(M, K, N, S, R, dtype, adt, bias=bias, ranks=ranks, ids=ids_kind, absent=absent))
    if ids_kind == "mixed":
        args[6][0] = 0
    return tuple(t.to(be.device) if t is not None else None for t in args)


@pytest.mark.backends("sim", "sim_rev", "cuda_cpu", "cuda")
@pytest.mark.parametrize("case", PATH_CASES, ids=[_case_id(c) for c in PATH_CASES])
def test_raw_multi_paths(backend, case):
    dtype, adt, M, K, N, S, R, ranks_kind, ids_kind, bias = case
    x, w, b, A, B, scales, ids, ranks = _path_inputs(backend, *case)
    y, xa = backend.multi_fwd(x, w, b, A, B, scales, ids, ranks)
    y_ref, xa_ref = ref.multi_lora_linear_fwd(x, w, b, A, B, scales, ids, ranks)
    _close_rel(y, y_ref, "y")
    _close_rel(xa, xa_ref, "xa")
    # Exact: xa is 0 past the row's rank and on rows acting as -1.
    valid = (ids >= 0) & (ids < S)
    live = ref._rank_mask(ranks, S, R, x.device)
    live_rows = torch.zeros(M, R, dtype=torch.bool, device=x.device)
    live_rows[valid] = live[ids[valid]]
    assert (xa[~live_rows] == 0).all(), "xa: nonzero past the rank / on a -1 row"
    # Rows acting as -1: bit for bit the all -1 batch's output.
    y_none, _ = backend.multi_fwd(x, w, b, A, B, scales, torch.full_like(ids, -1), ranks)
    assert torch.equal(y[~valid], y_none[~valid]), "y: a -1 row differs from the base output"
    # Deterministic.
    y2, xa2 = backend.multi_fwd(x, w, b, A, B, scales, ids, ranks)
    assert torch.equal(y, y2) and torch.equal(xa, xa2), "forward not bitwise reproducible"

    dy = torch.randn(M, N).to(dtype).to(x.device)
    dx, dA, dB = backend.multi_bwd(dy, x, w, A, B, scales, ids, ranks, xa, True, True, True)
    dx_r, dA_r, dB_r = ref.multi_lora_linear_bwd(dy, x, w, A, B, scales, ids, ranks, xa_ref, True, True, True)
    _close_rel(dx, dx_r, "dx")
    _close_rel(dA, dA_r, "dA")
    _close_rel(dB, dB_r, "dB")
    present = torch.zeros(S, dtype=torch.bool, device=x.device)
    present[ids[valid]] = True
    assert (dA[~present] == 0).all() and (dB[~present] == 0).all(), "absent slot: nonzero grad"
    assert (dA[~live] == 0).all(), "dA: nonzero past the rank"
    assert (dB.transpose(1, 2)[~live] == 0).all(), "dB: nonzero past the rank"
    dx2, dA2, dB2 = backend.multi_bwd(dy, x, w, A, B, scales, ids, ranks, xa, True, True, True)
    assert torch.equal(dx, dx2) and torch.equal(dA, dA2) and torch.equal(dB, dB2), (
        "backward not bitwise reproducible")


@pytest.mark.backends("sim", "cuda_cpu", "cuda")
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True)], ids=_needs_id)
def test_raw_multi_bwd_needs_strided(backend, needs):
    # Decode rows with split-K ds, and a strided (non-contiguous) x / dy.
    x, w, b, A, B, scales, ids, ranks = _path_inputs(backend, F16, F32, 5, 520, 24, 4, 16, "partial",
                                                     "mixed", False)
    x, dy = relayout(x, "transposed"), relayout(torch.randn(5, 24).to(F16).to(x.device), "transposed")
    _, xa = ref.multi_lora_linear_fwd(x, w, b, A, B, scales, ids, ranks)
    out = backend.multi_bwd(dy, x, w, A, B, scales, ids, ranks, xa, *needs)
    want = ref.multi_lora_linear_bwd(dy, x, w, A, B, scales, ids, ranks, xa, *needs)
    for name, o, r, need in zip(("dx", "dA", "dB"), out, want, needs):
        if need:
            _close_rel(o, r, name)
        else:
            assert o.numel() == 0, f"{name}: not needed but returned {tuple(o.shape)}"


# ---- the precomputed routing (order, keys: the batch's plan, shared by every layer) --------


def _sorts(fn) -> int:
    """aten::sort calls made by fn() (CPU ops: the profiler sees them)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "aten::sort")


_PLAN_SIM = [((9, 600, 24, 6, 17), F16, F16, "partial", True),  # decode
             ((70, 72, 136, 5, 16), BF16, F32, "partial", True),  # prefill
             ((200, 40, 16, 6, 16), F16, F16, "partial", False)]


# decode (M < 65: gathered per row, the backward's segments from the plan) and prefill (M >= 65:
# the plan's order is the GEMMs' row_map and the tile shrink's rows), on both GEMMs.
@pytest.mark.backends(
    args="shape,dtype,adapter_dtype,ranks_kind,bias",
    sim=_PLAN_SIM, sim_wgmma=_PLAN_SIM,
    cuda_cpu=[((M, 37, 29, 4, 17), d, d, "partial", True) for M in (5, 150) for d in (F32, F16)],
)
def test_raw_routing_plan_matches_unplanned(backend, shape, dtype, adapter_dtype, ranks_kind, bias):
    M, K, N, S, R = shape
    x, w, b, A, B, scales, ids, ranks = _path_inputs(backend, dtype, adapter_dtype, M, K, N, S, R, ranks_kind,
                                                     "mixed", bias)
    order, keys = _routing(ids, S)
    fwd = (x, w, b, A, B, scales, ids, ranks)
    y, xa = backend.multi_fwd(*fwd)
    y_p, xa_p = backend.multi_fwd(*fwd, order, keys)
    assert torch.equal(y, y_p) and torch.equal(xa, xa_p)  # same kernels, same rows: bit for bit
    dy = torch.randn(M, N).to(x.dtype)
    bwd = (dy, x, w, A, B, scales, ids, ranks, xa, True, True, True)
    got = backend.multi_bwd(*bwd)
    got_p = backend.multi_bwd(*bwd, order, keys)
    for g, gp, name in zip(got, got_p, ("dx", "dA", "dB")):
        assert torch.equal(g, gp), name
    if backend.kind == "sim":
        # With the plan, no sort at all; without it the backward (and the prefill forward) sorts.
        assert _sorts(lambda: backend.multi_fwd(*fwd, order, keys)) == 0
        assert _sorts(lambda: backend.multi_bwd(*bwd, order, keys)) == 0
        assert _sorts(lambda: backend.multi_bwd(*bwd)) == 1
        assert _sorts(lambda: backend.multi_fwd(*fwd)) == (1 if M >= 65 else 0)
    # The plan is followed, not recomputed (trusted input, see csrc/lora.h): keys routing every
    # row to no adapter leave the per-slot reductions nothing to sum; the C++ CPU kernels route
    # their forward by the keys too (base layer, xa = 0), the CUDA decode forward by the ids.
    none = torch.full_like(keys, -1)
    if backend.name == "cuda_cpu":
        y_n, xa_n = backend.multi_fwd(*fwd, order, none)
        close(y_n, ref.lora_linear_fwd(x, w, b, A[0], B[0] * 0, 0.0, 0.0, 0)[0], "y")
        assert not xa_n.any()
    _, dA0, dB0 = backend.multi_bwd(*bwd, order, none)
    assert not dA0.any() and not dB0.any() and got[1].any()


@pytest.mark.backends("cuda_cpu", "sim")
@pytest.mark.parametrize("M", [23, 70])
def test_raw_routing_checks_name_the_argument(backend, M):
    x, w, b, A, B, scales, ids, ranks = multi_inputs(M, 37, 9, 3, 17, ranks=None, bias=False)
    order, keys = _routing(ids, 3)
    fwd = (x, w, b, A, B, scales, ids, ranks)
    _, xa = backend.multi_fwd(*fwd)
    bwd = (torch.randn(M, 9), x, w, A, B, scales, ids, ranks, xa, True, True, True)
    for op, args in ((backend.multi_fwd, fwd), (backend.multi_bwd, bwd)):
        with pytest.raises(RuntimeError, match=rf"order must be int64 \[M={M}\], got Long \[{M - 1}\]"):
            op(*args, order[:-1], keys)
        with pytest.raises(RuntimeError, match=rf"keys must be int64 \[M={M}\], got Long \[{M + 1}\]"):
            op(*args, order, torch.cat([keys, keys[:1]]))
        with pytest.raises(RuntimeError, match=rf"order must be int64 \[M={M}\], got Int"):
            op(*args, order.int(), keys)
        with pytest.raises(RuntimeError, match=rf"keys must be int64 \[M={M}\], got Int"):
            op(*args, order, keys.int())
        with pytest.raises(RuntimeError, match="order and keys must be given together"):
            op(*args, None, keys)
        with pytest.raises(RuntimeError, match="order and keys must be given together"):
            op(*args, order, None)
        with pytest.raises(RuntimeError, match="order must be contiguous"):
            op(*args, torch.stack([order, order], 1)[:, 0], keys)
        with pytest.raises(RuntimeError, match="keys must be contiguous"):
            op(*args, order, torch.stack([keys, keys], 1)[:, 0])


# ---- seeded random cases (the emulator; tests/ops/_fuzz.py)


@pytest.mark.backends("sim")
@pytest.mark.parametrize("seed", range(N_FUZZ))
def test_raw_fuzz(backend, seed):
    sim = backend.with_gemm(FUZZ_GEMMS[seed % 4])
    c = fuzz_draw(10_000 + seed)
    rng, M, K, N, R, dt = c["rng"], c["M"], c["K"], c["N"], c["R"], c["dtype"]
    S = rng.choice([1, 2, 5, 12])
    g = torch.Generator().manual_seed(seed)
    x, w, b, a, bb, scales, _, _ = multi_inputs(M, K, N, S, R, dt, c["adapter_dtype"], bias=c["bias"],
                                                ranks=None, ids="none", generator=g)
    x = fuzz_layout(x, rng)
    # ids: -1, slots (sometimes all one slot, sometimes already sorted), out of range both ways
    pattern = rng.choice(["mixed", "one", "sorted"])
    if pattern == "one":
        ids = torch.full((M,), rng.randrange(S), dtype=torch.int64)
    else:
        ids = torch.randint(-1, S + 2, (M,), generator=g)
        ids[torch.rand(M, generator=g) < 0.1] = -7
        if pattern == "sorted":
            ids = ids.sort().values
    rk = None
    if rng.random() < 0.5:
        rk = torch.randint(0, R + 1, (S,), generator=g)
        for i in range(S):  # dead columns hold NaN: reading them fails the test
            a[i, int(rk[i]):] = float("nan")
            bb[i, :, int(rk[i]):] = float("nan")
    fwd = (x, w, b, a, bb, scales, ids, rk)
    y, xa = sim.multi_fwd(*fwd)
    fuzz_check((y, xa), ref.multi_lora_linear_fwd, fwd, ("y", "xa"))
    dy = fuzz_layout(torch.randn(M, N, generator=g).to(dt), rng)
    bwd = (dy, x, w, a, bb, scales, ids, rk, xa, *c["needs"])
    fuzz_check(sim.multi_bwd(*bwd), ref.multi_lora_linear_bwd, bwd, ("dx", "dA", "dB"))


# ============================================================================ autograd features


def _f64_inputs():
    return _small(dtype=F64)


def test_forward_mode_ad_gives_the_tangent():
    import torch.autograd.forward_ad as fwAD

    xm, wm, bm, Am, Bm, sc, ids, rk = _f64_inputs()
    sc = sc.double()
    tA = torch.randn_like(Am)
    with fwAD.dual_level():
        y = fused_lora.multi_lora_linear(xm, wm, bm, fwAD.make_dual(Am, tA), Bm, sc, ids, ranks=rk)
        tangent = fwAD.unpack_dual(y).tangent
    assert tangent is not None and tangent.abs().sum() > 0


@pytest.mark.backends("torch")
def test_double_backward(backend):
    xm, wm, bm, Am, Bm, sc, ids, rk = _f64_inputs()
    sc = sc.double()
    Am.requires_grad_(True)

    def fm(A_):
        return fused_lora.multi_lora_linear(xm, wm, bm, A_, Bm, sc, ids, ranks=rk, backend=backend.impl)

    torch.autograd.gradgradcheck(fm, (Am,))


def test_scales_that_require_grad_get_their_gradient():
    xm, wm, bm, Am, Bm, sc, ids, rk = _small()
    sc = sc.clone().requires_grad_(True)
    fused_lora.multi_lora_linear(xm, wm, bm, Am, Bm, sc, ids, ranks=rk).sum().backward()
    assert sc.grad is not None and sc.grad.abs().sum() > 0


def test_meta_device_ops_and_bank():
    x, w, b, A, B, sc, ids, rk = (t.to("meta") for t in _small())
    y = fused_lora.multi_lora_linear(x, w, b, A, B, sc, ids, ranks=rk)
    assert y.device.type == "meta" and y.shape == (x.shape[0], w.shape[0])
    base = torch.nn.Linear(24, 20, device="meta")  # how large models are built before loading
    bank = fused_lora.MultiLoRALinear(base, n_slots=3, max_rank=4)
    assert bank(x, ids).shape == (x.shape[0], 20)


# ============================================================================ bad input


def _good():
    x, w, b, A, B, scales, ids, rk = multi_inputs(13, 20, 18, 4, 6, ids="uniform", none_frac=0.3)
    return dict(x=x, weight=w, bias=b, lora_A=A, lora_B=B, scales=scales, adapter_ids=ids, ranks=rk)


def _call(**over):
    a = _good()
    a.update(over)
    return fused_lora.multi_lora_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"],
                                        a["scales"], a["adapter_ids"], ranks=a["ranks"],
                                        **{k: a[k] for k in ("backend", "validate") if k in a})


@pytest.mark.parametrize("over,exc,match", [
    ({"adapter_ids": torch.full((13,), 4)}, ValueError, r"adapter_ids must be in \[-1, n_slots=4\)"),
    ({"adapter_ids": torch.full((13,), -2)}, ValueError, "adapter_ids must be in"),
    ({"adapter_ids": torch.zeros(13, dtype=torch.int8) + 100}, ValueError, "adapter_ids must be in"),
    ({"adapter_ids": torch.zeros(13)}, TypeError, "adapter_ids must be an integer"),
    ({"adapter_ids": torch.zeros(12, dtype=torch.int64)}, ValueError, "adapter_ids must have x's leading"),
    ({"adapter_ids": [0] * 13}, TypeError, "adapter_ids must be a torch.Tensor"),
    ({"lora_A": torch.randn(4, 6, 19)}, ValueError, "lora_A must be"),
    ({"lora_A": torch.randn(6, 20)}, ValueError, "lora_A must be 3-D"),
    ({"lora_B": torch.randn(4, 18, 5)}, ValueError, "lora_B must be"),
    ({"lora_B": torch.randn(3, 18, 6)}, ValueError, "lora_B must be"),
    ({"lora_A": torch.randn(0, 6, 20), "lora_B": torch.randn(0, 18, 6), "scales": torch.ones(0),
      "ranks": None}, ValueError, "at least one slot"),
    ({"lora_A": torch.randn(4, 0, 20), "lora_B": torch.randn(4, 18, 0), "ranks": None}, ValueError,
     "r_max must be"),
    ({"scales": torch.ones(3)}, ValueError, "scales must be"),
    ({"scales": torch.ones(4, dtype=torch.int64)}, TypeError, "scales must be a floating"),
    ({"scales": 1.0}, TypeError, "scales must be a torch.Tensor"),
    ({"ranks": torch.tensor([1, 2, 7, 1])}, ValueError, r"ranks must be in \[0, r_max=6\]"),
    ({"ranks": torch.tensor([1, 2, -1, 1])}, ValueError, "ranks must be in"),
    ({"ranks": torch.tensor([1, 2, 3])}, ValueError, "ranks must be"),
    ({"ranks": torch.tensor([1.0, 2, 3, 4])}, TypeError, "ranks must be an integer"),
    ({"x": torch.randn(13, 19)}, ValueError, "x's last dim"),
    ({"weight": torch.randn(18, 20, dtype=torch.float64)}, TypeError, "weight dtype"),
    ({"bias": torch.randn(17)}, ValueError, "bias must be"),
    ({"lora_A": torch.randn(4, 6, 20).half(), "lora_B": torch.randn(4, 18, 6).half()}, TypeError,
     "lora_A/lora_B dtype"),
    ({"backend": "nope"}, ValueError, "backend must be one of"),
])
def test_bad_input_raises(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_validate_false_skips_value_checks_only():
    _call(adapter_ids=torch.full((13,), 99), validate=False)  # acts as -1, no error
    with pytest.raises(ValueError, match="lora_B must be"):
        _call(lora_B=torch.randn(4, 18, 5), validate=False)


def test_validate_must_be_a_bool():
    with pytest.raises(TypeError, match="validate must be a bool"):
        _call(validate="yes")


# ============================================================================ Triton's paths


def test_auto_path_heuristic():
    from fused_lora.kernels.multi_lora import _SEG_BLOCK_M, _choose_path

    assert _choose_path(64, 4096, "auto") == ("bgmv", "gather")
    big = 64 * _SEG_BLOCK_M
    assert _choose_path(big, 8, "auto") == ("sgmv", "segmented")
    assert _choose_path(big, 10 * big, "auto") == ("sgmv", "gather")
    with pytest.raises(ValueError, match="path must be"):
        _choose_path(8, 8, "fast")


@pytest.mark.backends("triton")
def test_triton_backward_deterministic_and_split_k(backend):
    from fused_lora.kernels.multi_lora import multi_lora_linear_bwd, multi_lora_linear_fwd

    x, w, b, A, B, scales, ids, ranks = _inputs(backend, M0, K0, N0, S0, R0, F32, F32, "zipf", 0.25)
    plan = RoutingPlan.build(ids, S0).view()
    y1, xa1 = multi_lora_linear_fwd(x, w, b, A, B, scales, ranks, plan, path="decode", split_k=1)
    y3, xa3 = multi_lora_linear_fwd(x, w, b, A, B, scales, ranks, plan, path="decode", split_k=3)
    torch.testing.assert_close(y1, y3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa1, xa3, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y1)
    for p in ("decode", "prefill", "hybrid"):
        g1 = multi_lora_linear_bwd(dy, x, w, A, B, scales, ranks, plan, xa1, True, True, True, path=p)
        g2 = multi_lora_linear_bwd(dy, x, w, A, B, scales, ranks, plan, xa1, True, True, True, path=p)
        for t1, t2 in zip(g1, g2):
            assert torch.equal(t1, t2)  # no atomics: bitwise repeatable
    # Only some gradients asked for: the others come back empty.
    dx, dA, dB = multi_lora_linear_bwd(dy, x, w, A, B, scales, ranks, plan, xa1, False, False, True)
    assert dx.numel() == 0 and dA.numel() == 0 and dB.shape == B.shape
    dx, dA, dB = multi_lora_linear_bwd(dy, x, w, A, B, scales, ranks, plan, xa1, True, False, False)
    assert dx.shape == x.shape and dA.numel() == 0 and dB.numel() == 0


# ============================================================================ GPU only


@pytest.mark.gpu
@pytest.mark.backends("triton_decode", "triton_prefill", "cuda")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gpu_bf16_patterns(backend, pattern):
    S = 80 if pattern == "distinct" else 8
    _run_case(backend, *_inputs(backend, 64, 256, 192, S, 16, BF16, BF16, pattern, 0.5))


@pytest.mark.gpu
@pytest.mark.backends("triton", "cuda")
@pytest.mark.parametrize("M,S", [(1, 128), (64, 128), (1024, 8)])
def test_gpu_large_shapes(backend, M, S):
    # Auto path choice; mixed ranks up to 128 (two 64-wide chunks), K/N not multiples of 64.
    _run_case(backend, *_inputs(backend, M, 1000, 1500, S, 128, BF16, BF16, "uniform", 0.25), grads=M <= 64)


@pytest.mark.gpu
@pytest.mark.backends("triton_decode", "triton_prefill", "cuda")
def test_gpu_cuda_graph_replay_bit_exact(backend):
    x, w, b, A, B, scales, ids, ranks = _inputs(backend, 48, 256, 192, 8, 16, BF16, BF16, "zipf", 0.25)

    def f(x_, ids_):
        return fused_lora.multi_lora_linear(x_, w, b, A, B, scales, ids_, ranks=ranks, backend=backend.impl)

    eager = f(x, ids)  # also runs autotuning outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        f(x, ids)
    torch.cuda.current_stream().wait_stream(s)
    sx, sids = x.clone(), ids.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = f(sx, sids)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    # New ids copied into the captured buffer: the graph follows them (no baked-in routing).
    ids2 = torch.roll(ids, 5)
    sids.copy_(ids2)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, f(x, ids2))


def _raw_graph_replay(be, args, dy, new_ids, planned=False):
    """Capture the raw ops' fwd + bwd once; replays with new ids and x (read on the device) equal
    eager runs bit for bit. planned: the routing plan (order, keys) is computed inside the
    capture too, once, and shared by forward and backward, as the Python routing plan does."""
    x, w, b, a, bb, scales, ids, rk = args
    needs = (True, True, True)
    S = a.shape[0]
    plan = (lambda: _routing(ids, S)) if planned else (lambda: (None, None))
    be.multi_fwd(*args, *plan())
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        order, keys = plan()
        y, xa = be.multi_fwd(*args, order, keys)
        grads = be.multi_bwd(dy, x, w, a, bb, scales, ids, rk, xa, *needs, order, keys)
    for i in range(2):
        ids.copy_(new_ids(i))
        x.copy_(torch.randn_like(x))
        g.replay()
        y_e, xa_e = be.multi_fwd(*args)
        grads_e = be.multi_bwd(dy, x, w, a, bb, scales, ids, rk, xa_e, *needs)
        assert torch.equal(y, y_e) and torch.equal(xa, xa_e)
        for t, e in zip(grads, grads_e):
            assert torch.equal(t, e)


@pytest.mark.backends("cuda")
def test_gpu_raw_cuda_graph_replay(backend):
    args = multi_inputs(5, 64, 48, 3, 16, BF16, F32, "cuda")
    ids = args[6]
    _raw_graph_replay(backend, args, torch.randn(5, 48, device="cuda").bfloat16(), lambda i: ids.roll(1 + i))


@pytest.mark.backends(args="planned", cuda=[False, True], cuda_wgmma=[True], cuda_wgmma256=[True])
def test_gpu_raw_prefill_cuda_graph_replay(backend, planned):
    """The prefill path's on-device sort (or the plan's) is captured too: new ids replay
    correctly."""
    M, S = 150, 6
    args = multi_inputs(M, 64, 48, S, 16, BF16, None, "cuda", ids=torch.randint(-1, S, (M,)))
    _raw_graph_replay(backend, args, torch.randn(M, 48, device="cuda").bfloat16(),
                      lambda i: torch.randint(-1, S, (M,), device="cuda"), planned)

