"""Helpers shared by the tests: devices, the self-calibrating tolerance, random inputs."""

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


def lora_args(dtype, M, K, N, R, adapter_dtype=None, bias=True):
    """Random single-adapter inputs (x, weight, bias, lora_A, lora_B) on the CPU."""
    ad = adapter_dtype or dtype
    x = torch.randn(M, K).to(dtype)
    w = (torch.randn(N, K) / K**0.5).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    a = (torch.randn(R, K) / K**0.5).to(ad)
    bb = torch.randn(N, R).to(ad)
    return x, w, b, a, bb


def multi_lora_args(dtype, M, K, N, S, R, adapter_dtype=None, bias=True, ranks=True, absent=()):
    """Random mixed-adapter inputs (x, weight, bias, lora_A, lora_B, scales, ids, ranks) on the
    CPU: ids of every kind, ranks below R with NaN in the dead columns (when ranks)."""
    ad = adapter_dtype or dtype
    x = torch.randn(M, K).to(dtype)
    w = (torch.randn(N, K) / K**0.5).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    a = (torch.randn(S, R, K) / K**0.5).to(ad)
    bb = torch.randn(S, N, R).to(ad)
    scales = torch.rand(S) + 0.5
    # every kind of id: -1, the slots (but `absent`), out of range both ways (act as -1)
    pool = torch.tensor([-1, S, S + 5, -7] + [s for s in range(S) if s not in absent])
    ids = pool[torch.randint(0, len(pool), (M,))]
    rk = None
    if ranks:
        rk = torch.tensor([R, 0, max(1, R // 3)] + [(R - s) % (R + 1) or R for s in range(3, S)])[:S]
        for i in range(S):  # dead columns hold NaN: a kernel that reads them fails
            a[i, int(rk[i]):] = float("nan")
            bb[i, :, int(rk[i]):] = float("nan")
    return x, w, b, a, bb, scales, ids, rk
