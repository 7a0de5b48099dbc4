"""Mixed-adapter batches (issue 3): fused_lora.multi_lora_linear, its custom ops, the Triton
kernels (decode / prefill paths) and MultiLoRALinear, against a per-token float64 loop.

Tolerance: the 2x rule of tests/_utils.py -- the kernel's max error against fp64 is at most 2x
the error of PyTorch's own gather + bmm chain in the same dtype (+ a small atol).
On CPU the Triton kernels run under TRITON_INTERPRET=1 (fp32, fp16; small shapes); on a GPU
the same tests run on CUDA tensors with bf16 added, plus the tests marked gpu.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from _utils import INTERPRET, TRITON_DEVICE, TRITON_DTYPES, assert_close_2x

import fused_lora
from fused_lora import ops
from fused_lora import reference as ref
from fused_lora.routing import RoutingPlan

PATTERNS = ["distinct", "uniform", "zipf", "identical", "skewed"]
PATHS = ["decode", "prefill"]  # "hybrid" (segmented shrink + gathered GEMM): its own test
# Interpreter-sized problem: tiles are 16 rows x 32 cols there, so M=24 spans two row tiles
# and K=40 / N=36 leave partial column tiles; r_max=20 (not a power of two) leaves a partial
# rank chunk.
M0, K0, N0, R0, S0 = 24, 40, 36, 20, 6


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Force the Triton path for backend="triton" (decode: split-K 2 so the partial-sum reduction
    is exercised; the split is 1 on CPU otherwise)."""
    from fused_lora.kernels import multi_lora as ML

    choose, split = ML._choose_path, ML._split_k
    monkeypatch.setattr(ML, "_choose_path", lambda M, S, p: choose(M, S, p or request.param))
    monkeypatch.setattr(ML, "_split_k", lambda M, K, dev, sk: split(M, K, dev, 2 if sk is None else sk))
    return request.param


def _ids(pattern: str, M: int, S: int, none_frac: float, device) -> torch.Tensor:
    # crc32, not hash(): str hashes change per process (PYTHONHASHSEED), which made cases vary.
    g = torch.Generator().manual_seed(zlib.crc32(repr((pattern, M, S, none_frac)).encode()))
    if pattern == "distinct":
        assert S >= M
        ids = torch.randperm(S, generator=g)[:M]
    elif pattern == "uniform":
        ids = torch.randint(0, S, (M,), generator=g)
    elif pattern == "zipf":
        p = 1.0 / torch.arange(1, S + 1, dtype=torch.float64) ** 1.2
        ids = torch.multinomial(p, M, replacement=True, generator=g)
    elif pattern == "identical":
        ids = torch.full((M,), S - 1, dtype=torch.int64)
    elif pattern == "skewed":  # one token on one adapter, M - 1 on another
        ids = torch.full((M,), 1, dtype=torch.int64)
        ids[M // 2] = 0
    else:
        raise ValueError(pattern)
    if none_frac:
        ids[torch.randperm(M, generator=g)[: int(M * none_frac)]] = -1
    return ids.to(torch.int64).to(device)


def _bank(S, R, K, N, ranks, adapter_dtype, device, nan_pad=True):
    """lora_A [S, R, K], lora_B [S, N, R] with NaN in every column past a slot's rank."""
    A = torch.randn(S, R, K, device=device) / K**0.5
    B = torch.randn(S, N, R, device=device) / max(R, 1) ** 0.5
    if ranks is not None and nan_pad:
        live = torch.arange(R, device=device)[None, :] < ranks.to(device)[:, None]  # [S, R]
        A = torch.where(live[:, :, None], A, torch.full_like(A, float("nan")))
        B = torch.where(live[:, None, :], B, torch.full_like(B, float("nan")))
    return A.to(adapter_dtype), B.to(adapter_dtype)


def _inputs(M, K, N, R, S, dtype, adapter_dtype, device, pattern="uniform", none_frac=0.0,
            mixed_ranks=True, bias=True, lead=None):
    x = torch.randn(*(lead or (M,)), K, device=device).to(dtype)
    M = x.numel() // K
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    ranks = torch.randint(1, R + 1, (S,)).to(device) if mixed_ranks else None
    A, B = _bank(S, R, K, N, ranks, adapter_dtype, device)
    scales = (torch.rand(S, device=device) + 0.5).float()
    ids = _ids(pattern, M, S, none_frac, device).reshape(x.shape[:-1])
    return x, w, b, A, B, scales, ids, ranks


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


def _run_case(x, w, b, A, B, scales, ids, ranks, backend, grads=True):
    """Forward (and backward) against the fp64 per-token loop with the 2x rule; absent slots
    must get exactly zero gradient."""

    def leaf(t):
        return t.detach().clone().requires_grad_(grads)

    x64, A64, B64 = leaf(x.double()), leaf(A.double()), leaf(B.double())
    y64 = ref.multi_lora_linear(x64, w.double(), None if b is None else b.double(), A64, B64,
                                scales, ids, ranks)
    xp, Ap, Bp = leaf(x), leaf(A), leaf(B)
    ypt = _eager_chain(xp, w, b, Ap, Bp, scales, ids, ranks)
    xk, Ak, Bk = leaf(x), leaf(A), leaf(B)
    yk = fused_lora.multi_lora_linear(xk, w, b, Ak, Bk, scales, ids, ranks=ranks, backend=backend)
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


# ----------------------------------------------------------------------------- Triton kernels


@pytest.mark.interpreter
@pytest.mark.parametrize("none_frac", [0.0, 0.5])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_triton_patterns_fp32(pattern, none_frac, path):
    S = M0 + 4 if pattern == "distinct" else S0
    args = _inputs(M0, K0, N0, R0, S, torch.float32, torch.float32, TRITON_DEVICE, pattern, none_frac)
    _run_case(*args, "triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("adapter_fp32", [False, True], ids=["half-adapters", "fp32-adapters"])
@pytest.mark.parametrize("pattern", ["uniform", "skewed"])
@pytest.mark.parametrize("dtype", [d for d in TRITON_DTYPES if d != torch.float32], ids=str)
def test_triton_half(dtype, pattern, adapter_fp32, path):
    adt = torch.float32 if adapter_fp32 else dtype
    args = _inputs(M0, K0, N0, R0, S0, dtype, adt, TRITON_DEVICE, pattern, 0.5)
    _run_case(*args, "triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("none_frac", [0.0, 0.5])
@pytest.mark.parametrize("pattern", ["zipf", "skewed"])
def test_triton_hybrid_path(pattern, none_frac):
    # Segmented shrink + gathered GEMM: auto's choice for large M over a large bank.
    _run_case(*_inputs(M0, K0, N0, R0, S0, torch.float32, torch.float32, TRITON_DEVICE, pattern,
                       none_frac), "triton:hybrid")


def test_auto_path_heuristic():
    from fused_lora.kernels.multi_lora import _SEG_BLOCK_M, _choose_path

    assert _choose_path(64, 4096, "auto") == ("bgmv", "gather")
    big = 64 * _SEG_BLOCK_M
    assert _choose_path(big, 8, "auto") == ("sgmv", "segmented")
    assert _choose_path(big, 10 * big, "auto") == ("sgmv", "gather")
    with pytest.raises(ValueError, match="path must be"):
        _choose_path(8, 8, "fast")


@pytest.mark.interpreter
def test_triton_rank_over_64_and_rank_zero_slot(path):
    # r_max = 80: rank chunks of 64 (two chunks for slots of rank > 64, one for the others);
    # slot 0 has rank 0 (loaded-then-emptied slot): its tokens get the base output.
    S, R = 4, 80
    x, w, b, A, B, scales, ids, _ = _inputs(20, 24, 20, R, S, torch.float32, torch.float32,
                                            TRITON_DEVICE, "uniform", 0.25, mixed_ranks=False)
    ranks = torch.tensor([0, 80, 65, 7], device=TRITON_DEVICE)
    A, B = _bank(S, R, 24, 20, ranks, torch.float32, TRITON_DEVICE)
    ids[:4] = torch.tensor([0, 1, 2, 3])
    _run_case(x, w, b, A, B, scales, ids, ranks, "triton")


@pytest.mark.interpreter
def test_triton_3d_input_no_bias_no_ranks(path):
    x, w, b, A, B, scales, ids, ranks = _inputs(0, K0, N0, 8, S0, torch.float32, torch.float32,
                                                TRITON_DEVICE, "zipf", 0.5, mixed_ranks=False,
                                                bias=False, lead=(3, 7))
    assert ids.shape == (3, 7)
    _run_case(x, w, b, A, B, scales, ids, ranks, "triton")


@pytest.mark.interpreter
def test_triton_many_slots_small_batch(path):
    # A bank far bigger than the batch (S = 300): grids are sized by min(S + 1, M), not S.
    args = _inputs(12, 24, 20, 8, 300, torch.float32, torch.float32, TRITON_DEVICE, "distinct", 0.0)
    _run_case(*args, "triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_none_rows_bit_exact(backend, path):
    """Rows with id -1 are bit-for-bit what the same backend gives when every id is -1, and a
    batch without adapters equals the base layer (NaN-free even though the bank's padding and
    the scales of unused slots are NaN)."""
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    x, w, b, A, B, scales, ids, ranks = _inputs(40, K0, N0, R0, S0, torch.float32, torch.float32, dev,
                                                "uniform", 0.5)
    y = fused_lora.multi_lora_linear(x, w, b, A, B, scales, ids, ranks=ranks, backend=backend)
    none = torch.full_like(ids, -1)
    y0 = fused_lora.multi_lora_linear(x, w, b, A, B, scales, none, ranks=ranks, backend=backend)
    rows = ids == -1
    assert rows.any() and (~rows).any()
    if INTERPRET and backend == "triton" and path == "prefill":
        # The interpreter's tl.dot is numpy's sgemm, whose rounding depends on a row's position
        # in the tile (OpenBLAS micro-kernel remainders: 1-3 ulp seen); tile positions differ
        # between the sorted mixed batch and the all -1 batch. A GPU MMA computes every row
        # alike, so the bit-exact check below runs there.
        torch.testing.assert_close(y[rows], y0[rows], rtol=5e-7, atol=5e-7)
    else:
        assert torch.equal(y[rows], y0[rows])
    # All -1: no adapter touched, even with a poisoned bank.
    y0n = fused_lora.multi_lora_linear(x, w, b, A * float("nan"), B, scales * float("nan"), none,
                                       ranks=ranks, backend=backend)
    assert torch.equal(y0n, y0)
    torch.testing.assert_close(y0, F.linear(x, w, b))


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_of_range_ids_unvalidated_act_as_none(backend, path):
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    x, w, b, A, B, scales, ids, ranks = _inputs(20, K0, N0, R0, S0, torch.float32, torch.float32, dev,
                                                "uniform", 0.0)
    bad = ids.clone()
    bad[::3] = torch.tensor([S0, -2, 10**9, -(10**9), S0 + 1, -7, 2**40], device=dev)
    with pytest.raises(ValueError, match="adapter_ids must be in"):
        fused_lora.multi_lora_linear(x, w, b, A, B, scales, bad, ranks=ranks, backend=backend)
    good = torch.where((bad >= 0) & (bad < S0), bad, torch.full_like(bad, -1))
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    As = [A.clone().requires_grad_(), A.clone().requires_grad_()]
    y_bad = fused_lora.multi_lora_linear(xs[0], w, b, As[0], B, scales, bad, ranks=ranks, backend=backend,
                                         validate=False)
    y_good = fused_lora.multi_lora_linear(xs[1], w, b, As[1], B, scales, good, ranks=ranks, backend=backend)
    assert torch.equal(y_bad, y_good)
    dy = torch.randn_like(y_bad)
    y_bad.backward(dy)
    y_good.backward(dy)
    assert torch.equal(xs[0].grad, xs[1].grad)
    assert torch.equal(As[0].grad, As[1].grad)


@pytest.mark.interpreter
def test_triton_backward_deterministic_and_split_k():
    from fused_lora.kernels.multi_lora import multi_lora_linear_bwd, multi_lora_linear_fwd

    x, w, b, A, B, scales, ids, ranks = _inputs(M0, K0, N0, R0, S0, torch.float32, torch.float32,
                                                TRITON_DEVICE, "zipf", 0.25)
    plan = RoutingPlan.build(ids, S0).view()
    y1, xa1 = multi_lora_linear_fwd(x, w, b, A, B, scales, ranks, plan, path="decode", split_k=1)
    y3, xa3 = multi_lora_linear_fwd(x, w, b, A, B, scales, ranks, plan, path="decode", split_k=3)
    torch.testing.assert_close(y1, y3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa1, xa3, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y1)
    for p in (*PATHS, "hybrid"):
        g1 = multi_lora_linear_bwd(dy, x, w, A, B, scales, ranks, plan, xa1, True, True, True, path=p)
        g2 = multi_lora_linear_bwd(dy, x, w, A, B, scales, ranks, plan, xa1, True, True, True, path=p)
        for t1, t2 in zip(g1, g2):
            assert torch.equal(t1, t2)  # no atomics: bitwise repeatable
    # Only some gradients asked for: the others come back empty.
    dx, dA, dB = multi_lora_linear_bwd(dy, x, w, A, B, scales, ranks, plan, xa1, False, False, True)
    assert dx.numel() == 0 and dA.numel() == 0 and dB.shape == B.shape
    dx, dA, dB = multi_lora_linear_bwd(dy, x, w, A, B, scales, ranks, plan, xa1, True, False, False)
    assert dx.shape == x.shape and dA.numel() == 0 and dB.numel() == 0


@pytest.mark.interpreter
def test_triton_empty_batch():
    x, w, b, A, B, scales, ids, ranks = _inputs(0, 16, 24, 4, 3, torch.float32, torch.float32, TRITON_DEVICE)
    x.requires_grad_(True)
    y = fused_lora.multi_lora_linear(x, w, b, A, B, scales, ids, ranks=ranks, backend="triton")
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


# ----------------------------------------------------------------------------- torch backend


@pytest.mark.parametrize("none_frac", [0.0, 0.5])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_backend_patterns(pattern, none_frac, dtype):
    S = M0 + 4 if pattern == "distinct" else S0
    _run_case(*_inputs(M0, K0, N0, R0, S, dtype, dtype, "cpu", pattern, none_frac), "torch")


def test_torch_backend_3d_fp32_adapters():
    args = _inputs(0, K0, N0, 8, S0, torch.bfloat16, torch.float32, "cpu", "zipf", 0.5, lead=(2, 3, 5))
    _run_case(*args, "torch")


def test_reference_ops_match_per_token_loop():
    # The op-level reference (grouped by slot) against the per-token loop, both fp64.
    x, w, b, A, B, scales, ids, ranks = _inputs(M0, K0, N0, R0, S0, torch.float64, torch.float64, "cpu",
                                                "zipf", 0.5)
    y, xa = ref.multi_lora_linear_fwd(x, w, b, A, B, scales, ids, ranks)
    torch.testing.assert_close(y, ref.multi_lora_linear(x, w, b, A, B, scales, ids, ranks),
                               rtol=1e-12, atol=1e-12)
    assert not torch.isnan(xa).any()


# ----------------------------------------------------------------------------- custom ops


def _op_args(device, dtype=torch.float32, bias=True, ranks=True):
    x, w, b, A, B, scales, ids, rk = _inputs(13, 20, 18, 6, 4, dtype, dtype, device, "uniform", 0.3,
                                             mixed_ranks=ranks, bias=bias)
    return x, w, b, A, B, scales, ids, rk


def _op_plan_args(device, **kw):
    """Op-level arguments: (x, w, b, A, B, scales, ranks, routing-plan tensor)."""
    x, w, b, A, B, scales, ids, rk = _op_args(device, **kw)
    return x, w, b, A, B, scales, rk, RoutingPlan.build(ids, A.shape[0]).data


OP_BACKENDS = [("torch", "cpu"), ("triton", TRITON_DEVICE)]


@pytest.mark.interpreter
@pytest.mark.parametrize("backend,device", OP_BACKENDS)
@pytest.mark.parametrize("bias,ranks", [(True, True), (False, False)])
def test_opcheck_multi_lora_linear_fwd(backend, device, bias, ranks):
    x, w, b, A, B, scales, rk, plan = _op_plan_args(device, bias=bias, ranks=ranks)
    # opcheck's autograd checks differentiate through the bank: no NaN padding here.
    A, B = torch.nan_to_num(A), torch.nan_to_num(B)
    for t in (x, A, B):
        t.requires_grad_(True)
    torch.library.opcheck(ops.multi_lora_linear_fwd, (x, w, b, A, B, scales, rk, plan, backend))


@pytest.mark.interpreter
@pytest.mark.parametrize("backend,device", OP_BACKENDS)
@pytest.mark.parametrize("needs", [(True, True, True), (False, True, False), (True, False, False)])
def test_opcheck_multi_lora_linear_bwd(backend, device, needs):
    x, w, b, A, B, scales, rk, plan = _op_plan_args(device)
    y, xa = ops.multi_lora_linear_fwd(x, w, b, A, B, scales, rk, plan, backend)
    dy = torch.randn_like(y)
    torch.library.opcheck(ops.multi_lora_linear_bwd, (dy, x, w, A, B, scales, rk, plan, xa, *needs, backend))


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


@pytest.mark.interpreter
@pytest.mark.parametrize("backend,device,compiler", [("torch", "cpu", "inductor"),
                                                     ("triton", TRITON_DEVICE, "aot_eager")])
def test_compile_fullgraph(backend, device, compiler):
    torch._dynamo.reset()
    x, w, b, A, B, scales, ids, rk = _op_args(device)
    A.requires_grad_(True)
    B.requires_grad_(True)

    def fwd(inp, i):
        return fused_lora.multi_lora_linear(inp, w, b, A, B, scales, i, ranks=rk, backend=backend)

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


# ----------------------------------------------------------------------------- bad input


def _good():
    x, w, b, A, B, scales, ids, rk = _op_args("cpu")
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


# ----------------------------------------------------------------------------- module


@pytest.mark.parametrize("backend,device", OP_BACKENDS)
def test_module_load_unload_and_train_two_adapters(backend, device):
    base = torch.nn.Linear(20, 18, device=device)
    m = fused_lora.MultiLoRALinear(base, n_slots=5, max_rank=8, backend=backend)
    assert m.weight is base.weight and not m.weight.requires_grad  # shared, frozen
    a1, b1 = torch.randn(8, 20, device=device), torch.randn(18, 8, device=device)
    a2, b2 = torch.randn(3, 20, device=device), torch.randn(18, 3, device=device)
    m.load_adapter(1, a1, b1, 0.5)
    m.load_adapter(3, a2, b2, 2.0)  # smaller rank: zero-padded, rank 3
    assert m.ranks.tolist() == [0, 8, 0, 3, 0]
    x = torch.randn(2, 6, 20, device=device)
    ids = torch.tensor([[1, 3, -1, 1, 0, 3], [3, 3, 1, -1, -1, 1]], device=device)
    y = m(x, ids)
    expect = ref.multi_lora_linear(x.double(), base.weight.double(), base.bias.double(),
                                   m.lora_A.double(), m.lora_B.double(), m.scales, ids, m.ranks)
    torch.testing.assert_close(y, expect.float(), rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    gA, gB = m.lora_A.grad, m.lora_B.grad
    assert gA.abs()[1].sum() > 0 and gA.abs()[3, :3].sum() > 0 and gB.abs()[[1, 3]].sum() > 0
    assert torch.count_nonzero(gA[[0, 2, 4]]) == 0 and torch.count_nonzero(gB[[0, 2, 4]]) == 0
    assert torch.count_nonzero(gA[3, 3:]) == 0 and torch.count_nonzero(gB[3, :, 3:]) == 0
    assert base.weight.grad is None
    m.unload_adapter(1)
    with torch.no_grad():
        y2 = m(x, ids)
        y_base = F.linear(x, base.weight, base.bias)
    keep = (ids == 3)
    torch.testing.assert_close(y2[~keep], y_base[~keep])


def test_module_bad_input():
    base = torch.nn.Linear(8, 6)
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        fused_lora.MultiLoRALinear(torch.nn.Conv1d(1, 1, 1), 2, 4)
    with pytest.raises(ValueError, match="max_rank must be"):
        fused_lora.MultiLoRALinear(base, 2, 0)
    m = fused_lora.MultiLoRALinear(base, 2, 4)
    with pytest.raises(ValueError, match="adapter rank must be"):
        m.load_adapter(0, torch.randn(5, 8), torch.randn(6, 5), 1.0)
    with pytest.raises(ValueError, match="slot must be"):
        m.load_adapter(2, torch.randn(2, 8), torch.randn(6, 2), 1.0)
    with pytest.raises(ValueError, match="lora_B must be"):
        m.load_adapter(0, torch.randn(2, 8), torch.randn(6, 3), 1.0)
    with pytest.raises(ValueError, match="adapter_ids is required"):
        m(torch.randn(3, 8))


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gpu_bf16_patterns(pattern, path):
    S = 80 if pattern == "distinct" else 8
    args = _inputs(64, 256, 192, 16, S, torch.bfloat16, torch.bfloat16, "cuda", pattern, 0.5)
    _run_case(*args, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("M,S", [(1, 128), (64, 128), (1024, 8)])
def test_gpu_large_shapes(M, S):
    # Auto path choice; mixed ranks up to 128 (two 64-wide chunks), K/N not multiples of 64.
    args = _inputs(M, 1000, 1500, 128, S, torch.bfloat16, torch.bfloat16, "cuda", "uniform", 0.25)
    _run_case(*args, "triton", grads=M <= 64)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_bit_exact(path):
    x, w, b, A, B, scales, ids, ranks = _inputs(48, 256, 192, 16, 8, torch.bfloat16, torch.bfloat16,
                                                "cuda", "zipf", 0.25)

    def f(x_, ids_):
        return fused_lora.multi_lora_linear(x_, w, b, A, B, scales, ids_, ranks=ranks, backend="triton")

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
