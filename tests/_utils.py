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
