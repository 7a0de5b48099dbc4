"""Helpers shared by the tests: devices, the self-calibrating tolerance, the one input builder
of the op tests (lora_inputs, multi_inputs)."""

from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Where the Triton kernels run in this session: CUDA tensors on a GPU, CPU tensors under the
# interpreter (bf16 is silently wrong in the interpreter: fp32/fp16 only there).
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

# Absolute floor added to the 2x rule, per dtype (errors of exactly representable sums can be 0).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_2x(out: torch.Tensor, ref64: torch.Tensor, out_pt: torch.Tensor, name: str = "out",
                    factor: float = 2.0) -> None:
    """flash-attention's rule: max|out - ref| <= factor * max|out_pt - ref| + atol, where ref is
    computed in fp64 and out_pt is PyTorch's own computation in out's dtype."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output (unwritten or poisoned elements?)"
    err = max_err(out, ref64)
    pt_err = max_err(out_pt, ref64)
    atol = ATOL[out.dtype]
    assert err <= factor * pt_err + atol, (
        f"{name}: max err {err:.3e} > {factor} x torch err {pt_err:.3e} + {atol:.1e}"
    )


# Fixed tolerance (atol = rtol) of a kernel that does the reference's arithmetic (the C++ CPU
# kernels: fp32 accumulation, one rounding) against the reference run in the same dtype.
CLOSE_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def close(out: torch.Tensor, ref: torch.Tensor, name: str = "out") -> None:
    """out equals ref (same dtype and shape) within CLOSE_TOL."""
    tol = CLOSE_TOL[out.dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape, name
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol, msg=name)


def _f64(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def check_op_vs_reference(got, ref_fn, args, names, scaled_atol: bool = False,
                          fp32_factor: float = 2.0) -> None:
    """Each output of an op call ``got`` against ``ref_fn(*args)`` in fp64, by the 2x rule
    (against ref_fn's own error in the args' dtypes). Empty reference outputs (gradients not
    asked for) must be empty with the reference's dtype. scaled_atol: the absolute floor grows
    with the output's magnitude; fp32_factor: the factor for fp32 outputs."""
    pt = ref_fn(*args)
    ref64 = ref_fn(*[_f64(a) for a in args])
    for g, p, r, name in zip(got, pt, ref64, names):
        if p.numel() == 0:
            assert g.numel() == 0 and g.dtype == p.dtype, name
            continue
        assert g.dtype == p.dtype and g.shape == p.shape, name
        assert not torch.isnan(g).any(), f"{name}: NaN in output (unwritten or poisoned elements?)"
        err, pt_err = max_err(g, r), max_err(p, r)
        atol = ATOL[g.dtype] * (max(1.0, r.abs().max().item()) if scaled_atol else 1.0)
        factor = fp32_factor if g.dtype == torch.float32 else 2.0
        assert err <= factor * pt_err + atol, (
            f"{name}: max err {err:.3e} > {factor} x torch err {pt_err:.3e} + {atol:.1e}")


# ----------------------------------------------------------------------------- inputs
# The one input builder of the op tests: every op test draws its tensors here (on the CPU, from
# torch's global generator, which tests/conftest.py seeds per test, or from `generator`), then
# moves them to `device`, so a CPU and a GPU run of a case see the same values.

LAYOUTS = ("contiguous", "transposed", "sliced", "padded", "padded8", "window", "window_b", "misaligned")


def relayout(t: torch.Tensor, layout: str = "contiguous") -> torch.Tensor:
    """The values of the 2-D tensor t in another memory layout: "contiguous" (t itself);
    "transposed" (column-major: inner stride != 1); "sliced" (every other column of a matrix
    twice as wide: stride 2 along the last dim); "padded" / "padded8" (unit inner stride, row
    pitch cols + 1 / cols + 8: rows not / still 16-byte aligned); "window" / "window_b" (row
    pitch cols + 5 / cols + 3, base 3 / 1 elements in: no 16-byte loads); "misaligned"
    (contiguous strides, base pointer one element off)."""
    if layout == "contiguous":
        return t
    if layout == "misaligned":
        flat = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = flat[1:].view(t.shape)
        view.copy_(t)
        return view
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "sliced":
        big = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        big[:, ::2] = t
        return big[:, ::2]
    pad, off = {"padded": (1, 0), "padded8": (8, 0), "window": (5, 3), "window_b": (3, 1)}[layout]
    big = torch.zeros(t.shape[0], t.shape[1] + pad, dtype=t.dtype, device=t.device)
    view = big[:, off: off + t.shape[1]]
    view.copy_(t)
    return view


def _randn(*shape, generator=None):
    return torch.randn(*shape, generator=generator)


def lora_inputs(M, K, N, R, dtype=torch.float32, adapter_dtype=None, device="cpu", *, bias=True,
                lead=None, layout="contiguous", generator=None):
    """Single-adapter inputs (x, weight, bias, lora_A, lora_B): x [*lead or M, K] (layout: see
    relayout, 2-D x only), weight [N, K], bias [N] or None, lora_A [R, K] and lora_B [N, R] in
    adapter_dtype (default: dtype)."""
    ad = adapter_dtype or dtype
    g = generator
    x = _randn(*(lead or (M,)), K, generator=g).to(dtype)
    w = (_randn(N, K, generator=g) / max(K, 1) ** 0.5).to(dtype)
    b = _randn(N, generator=g).to(dtype)  # drawn either way: x, W, A, B do not depend on `bias`
    a = (_randn(R, K, generator=g) / max(K, 1) ** 0.5).to(ad)
    bb = _randn(N, R, generator=g).to(ad)
    b = b if bias else None
    x, w, b, a, bb = (t.to(device) if t is not None else None for t in (x, w, b, a, bb))
    return relayout(x, layout) if layout != "contiguous" else x, w, b, a, bb


# Adapter-id patterns of a mixed-adapter batch (multi_inputs' `ids`).
ID_PATTERNS = ("mixed", "distinct", "uniform", "zipf", "identical", "skewed", "one", "none")


def adapter_ids(pattern, M, S, none_frac=0.0, absent=(), generator=None):
    """int64 ids [M] over S slots: "mixed" (every kind: -1, the slots but `absent`, out of range
    both ways, which act as -1), "distinct" (S >= M), "uniform", "zipf", "identical" (all S - 1),
    "skewed" (one token on slot 0, the rest on slot 1), "one" (all S - 1), "none" (all -1); then
    a fraction none_frac of the rows set to -1."""
    g = generator
    if pattern == "mixed":
        pool = torch.tensor([-1, S, S + 5, -7] + [s for s in range(S) if s not in absent])
        ids = pool[torch.randint(0, len(pool), (M,), generator=g)]
    elif pattern == "distinct":
        assert S >= M
        ids = torch.randperm(S, generator=g)[:M]
    elif pattern == "uniform":
        ids = torch.randint(0, S, (M,), generator=g)
    elif pattern == "zipf":
        p = 1.0 / torch.arange(1, S + 1, dtype=torch.float64) ** 1.2
        ids = torch.multinomial(p, M, replacement=True, generator=g)
    elif pattern in ("identical", "one"):
        ids = torch.full((M,), S - 1, dtype=torch.int64)
    elif pattern == "skewed":  # one token on one adapter, M - 1 on another
        ids = torch.full((M,), 1, dtype=torch.int64)
        ids[M // 2] = 0
    elif pattern == "none":
        ids = torch.full((M,), -1, dtype=torch.int64)
    else:
        raise ValueError(pattern)
    if none_frac:
        ids[torch.randperm(M, generator=g)[: int(M * none_frac)]] = -1
    return ids.to(torch.int64)


def mixed_ranks(S, R):
    """int64 [S] ranks below r_max = R, with a rank-0 slot (loaded, then emptied)."""
    return torch.tensor([R, 0, max(1, R // 3)] + [(R - s) % (R + 1) or R for s in range(3, S)])[:S]


def multi_inputs(M, K, N, S, R, dtype=torch.float32, adapter_dtype=None, device="cpu", *, bias=True,
                 ranks="mixed", ids="mixed", none_frac=0.0, absent=(), lead=None, layout="contiguous",
                 generator=None):
    """Mixed-adapter inputs (x, weight, bias, lora_A [S, R, K], lora_B [S, N, R], scales [S],
    ids, ranks): ids of x's leading shape (a pattern of adapter_ids, or a tensor); ranks "mixed"
    (mixed_ranks), None (every slot has R) or a tensor. Columns past a slot's rank hold NaN, so
    a kernel that reads them fails."""
    ad = adapter_dtype or dtype
    g = generator
    x = _randn(*(lead or (M,)), K, generator=g).to(dtype)
    M = x.numel() // K if K else M
    w = (_randn(N, K, generator=g) / max(K, 1) ** 0.5).to(dtype)
    b = _randn(N, generator=g).to(dtype) if bias else None
    a = (_randn(S, R, K, generator=g) / max(K, 1) ** 0.5).to(ad)
    bb = _randn(S, N, R, generator=g).to(ad)
    scales = torch.rand(S, generator=g) + 0.5
    if isinstance(ids, str):
        ids = adapter_ids(ids, M, S, none_frac, absent, g)
    ids = ids.reshape(x.shape[:-1])
    rk = mixed_ranks(S, R) if isinstance(ranks, str) and ranks == "mixed" else ranks
    if rk is not None:
        for i in range(S):  # dead columns hold NaN: a kernel that reads them fails
            a[i, int(rk[i]):] = float("nan")
            bb[i, :, int(rk[i]):] = float("nan")
    out = [t.to(device) if t is not None else None for t in (x, w, b, a, bb, scales, ids, rk)]
    if layout != "contiguous":
        out[0] = relayout(out[0], layout)
    return tuple(out)
