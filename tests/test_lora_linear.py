"""Fused LoRA linear kernels (Triton; torch reference) against an fp64 reference.

Tolerance: flash-attention's rule -- the kernel's max error against fp64 is at most 2x the
error of PyTorch's own eager LoRA chain in the same dtype (+ a small atol).
On CPU the Triton kernels run under TRITON_INTERPRET=1 (fp32, fp16; small shapes); on a GPU the
same tests run on CUDA tensors with bf16 added, plus the large-shape tests marked gpu.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _utils import HAS_CUDA, TRITON_DEVICE, TRITON_DTYPES, assert_close_2x

import fused_lora
from fused_lora import reference as ref

# (M, in, out, r): tile edges on every dim (block sizes are 32 under the interpreter, >= 16
# on GPU), r = 1 (narrowest), r not a power of two, r > 64 (looped in 64-wide chunks).
SHAPES = [(1, 16, 16, 1), (37, 70, 50, 5), (64, 33, 129, 16), (20, 96, 40, 80)]


def _inputs(M, K, N, R, dtype, adapter_dtype, device, bias=True, lead=None):
    x = torch.randn(*(lead or (M,)), K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    a = (torch.randn(R, K, device=device) / K**0.5).to(adapter_dtype)
    bb = (torch.randn(N, R, device=device) / R**0.5).to(adapter_dtype)
    return x, w, b, a, bb


def _eager_chain(x, w, b, a, bb, scale, p, seed):
    """PyTorch's own LoRA (PEFT-style) in the inputs' dtypes; the mask from the same seed."""
    x2d = x.reshape(-1, x.shape[-1])
    xd = x2d.to(a.dtype)
    if p > 0:
        keep = ref.dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p, device=x.device)
        xd = torch.where(keep, xd / (1 - p), torch.zeros((), dtype=xd.dtype, device=x.device))
    y = F.linear(x2d, w, b) + (scale * F.linear(F.linear(xd, a), bb)).to(x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _run_case(M, K, N, R, dtype, adapter_dtype, backend, device, bias=True, p=0.0, lead=None,
              x_transform=None, grads=("x", "A", "B")):
    scale = 0.75
    x, w, b, a, bb = _inputs(M, K, N, R, dtype, adapter_dtype, device, bias, lead)
    if x_transform is not None:
        x = x_transform(x)
    seed = 123456789 if p > 0 else 0

    def leaf(t, want):
        return t.detach().clone().requires_grad_(want)

    # fp64 reference (plain autograd) and PyTorch's same-dtype chain, with the same mask.
    x64 = leaf(x.double(), "x" in grads)
    a64, b64 = leaf(a.double(), "A" in grads), leaf(bb.double(), "B" in grads)
    y64 = ref.lora_linear(x64, w.double(), None if b is None else b.double(), a64, b64, scale, p, seed)
    xp, ap, bp = leaf(x, "x" in grads), leaf(a, "A" in grads), leaf(bb, "B" in grads)
    ypt = _eager_chain(xp, w, b, ap, bp, scale, p, seed)

    xk, ak, bk = leaf(x, "x" in grads), leaf(a, "A" in grads), leaf(bb, "B" in grads)
    # The kernel draws its seed from torch's CPU generator: make it draw `seed`'s twin by
    # calling the op directly for dropout cases.
    if p > 0:
        x2d = xk.reshape(-1, K)
        y2d, _ = fused_lora.ops.lora_linear_fwd(
            x2d, w, b, ak, bk, scale, p, torch.tensor(seed), backend
        )
        yk = y2d.reshape(*xk.shape[:-1], N)
    else:
        yk = fused_lora.lora_linear(xk, w, b, ak, bk, scale, backend=backend)
    assert yk.dtype == x.dtype and yk.shape == ypt.shape
    assert_close_2x(yk, y64, ypt, "y")

    dy = torch.randn_like(y64)
    y64.backward(dy)
    ypt.backward(dy.to(ypt.dtype))
    yk.backward(dy.to(yk.dtype))
    for name, tk, tpt, t64 in (("dx", xk, xp, x64), ("dA", ak, ap, a64), ("dB", bk, bp, b64)):
        if name[1:] not in grads:
            assert tk.grad is None
            continue
        assert tk.grad.dtype == tk.dtype
        assert_close_2x(tk.grad, t64.grad, tpt.grad, name)


# ----------------------------------------------------------------------------- Triton kernels


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}-r{}".format(*s))
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_matches_reference(shape, dtype):
    _run_case(*shape, dtype, dtype, "triton", TRITON_DEVICE)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_fp32_adapters_half_activations(dtype):
    # PEFT keeps adapters in fp32; the kernels read them as fp32 (no fp32 copy of x).
    if dtype == torch.float32:
        pytest.skip("same dtype")
    _run_case(37, 70, 50, 5, dtype, torch.float32, "triton", TRITON_DEVICE)


@pytest.mark.interpreter
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_dropout(p, dtype):
    _run_case(37, 70, 50, 5, dtype, dtype, "triton", TRITON_DEVICE, p=p)


@pytest.mark.interpreter
def test_triton_no_bias_3d_input():
    _run_case(0, 48, 40, 8, torch.float32, torch.float32, "triton", TRITON_DEVICE, bias=False,
              lead=(3, 7))


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["transposed", "sliced"])
def test_triton_non_contiguous_x(kind):
    if kind == "transposed":
        def tf(x):
            return x.t().contiguous().t()  # column-major [M, K]
    else:
        def tf(x):
            return torch.cat([x, x], dim=-1)[:, ::2]  # stride 2 along K
    _run_case(37, 70, 50, 5, torch.float32, torch.float32, "triton", TRITON_DEVICE, x_transform=tf)


@pytest.mark.interpreter
@pytest.mark.parametrize("grads", [("x",), ("A", "B"), ("B",), ("x", "A")], ids="-".join)
def test_triton_partial_grads(grads):
    # ctx.needs_input_grad decides what is computed: frozen x (first layer), frozen A or B.
    _run_case(37, 70, 50, 5, torch.float32, torch.float32, "triton", TRITON_DEVICE, grads=grads)


@pytest.mark.interpreter
def test_triton_deterministic_db_matches_atomic():
    # Deterministic mode computes dB in extra programs of the main backward kernel (no
    # atomics); the default accumulates it with fp32 atomics in the ds kernel. Same math.
    from fused_lora.kernels.lora_linear import lora_linear_bwd, lora_linear_fwd

    x, w, b, a, bb = _inputs(70, 40, 45, 6, torch.float32, torch.float32, TRITON_DEVICE)
    y, xa = lora_linear_fwd(x, w, b, a, bb, 0.5, 0.2, 99)
    dy = torch.randn_like(y)
    g_atomic = lora_linear_bwd(dy, x, w, a, bb, xa, 0.5, 0.2, 99, True, True, True)
    torch.use_deterministic_algorithms(True)
    try:
        g_det = lora_linear_bwd(dy, x, w, a, bb, xa, 0.5, 0.2, 99, True, True, True)
        g_det2 = lora_linear_bwd(dy, x, w, a, bb, xa, 0.5, 0.2, 99, True, True, True)
    finally:
        torch.use_deterministic_algorithms(False)
    for t1, t2, t3 in zip(g_atomic, g_det, g_det2):
        torch.testing.assert_close(t1, t2, rtol=1e-5, atol=1e-5)
        assert torch.equal(t2, t3)  # bitwise repeatable
    g64 = ref.lora_linear_bwd(dy.double(), x.double(), w.double(), a.double(), bb.double(),
                              xa.double(), 0.5, 0.2, 99, True, True, True)
    for t, t64 in zip(g_det, g64):
        torch.testing.assert_close(t.double(), t64, rtol=1e-4, atol=1e-4)


@pytest.mark.interpreter
def test_triton_empty_batch():
    x, w, b, a, bb = _inputs(0, 16, 24, 4, torch.float32, torch.float32, TRITON_DEVICE)
    x.requires_grad_(True)
    y = fused_lora.lora_linear(x, w, b, a, bb, 1.0, backend="triton")
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


# ----------------------------------------------------------------------------- torch reference


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "M{}-K{}-N{}-r{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_backend_matches_reference(shape, dtype, p):
    _run_case(*shape, dtype, dtype, "torch", "cpu", p=p)


def test_reference_matches_float64_math():
    # The reference in fp64 against literal fp64 math written out by hand.
    M, K, N, R, s, p, seed = 9, 11, 7, 3, 0.5, 0.25, 42
    x, w, b, a, bb = (t.double() for t in _inputs(M, K, N, R, torch.float64, torch.float64, "cpu"))
    keep = ref.dropout_keep_mask(seed, M, K, p).double()
    expect = x @ w.t() + b + s * ((x * keep / (1 - p)) @ a.t()) @ bb.t()
    got, xa = ref.lora_linear_fwd(x, w, b, a, bb, s, p, seed)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xa, (x * keep / (1 - p)) @ a.t(), rtol=1e-12, atol=1e-12)
    # Backward formulas against autograd on the literal expression.
    xr, ar, br = (t.clone().requires_grad_() for t in (x, a, bb))
    yr = xr @ w.t() + b + s * ((xr * keep / (1 - p)) @ ar.t()) @ br.t()
    dy = torch.randn_like(yr)
    yr.backward(dy)
    dx, dA, dB = ref.lora_linear_bwd(dy, x, w, a, bb, xa, s, p, seed, True, True, True)
    for got_g, want in ((dx, xr.grad), (dA, ar.grad), (dB, br.grad)):
        torch.testing.assert_close(got_g, want, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64_torch_backend():
    x, w, b, a, bb = _inputs(5, 6, 4, 2, torch.float64, torch.float64, "cpu")
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))

    def f(x_, a_, b_):
        return fused_lora.lora_linear(x_, w, b, a_, b_, 0.5, backend="torch")

    assert torch.autograd.gradcheck(f, (x, a, bb))


def test_base_weight_and_bias_grads_when_trainable():
    # Frozen in LoRA, but if a caller trains them they get the plain linear gradients.
    x, w, b, a, bb = _inputs(6, 5, 4, 2, torch.float64, torch.float64, "cpu")
    w.requires_grad_(True)
    b.requires_grad_(True)
    y = fused_lora.lora_linear(x, w, b, a, bb, 0.5, backend="torch")
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(w.grad, dy.t() @ x)
    torch.testing.assert_close(b.grad, dy.sum(0))


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(4096, 4096, 4096, 16), (1000, 4095, 1025, 64), (16, 4096, 11008, 8),
                                   (2048, 1024, 1024, 256)], ids=lambda s: "M{}-K{}-N{}-r{}".format(*s))
def test_gpu_large_shapes_autotuned(dtype, shape):
    _run_case(*shape, dtype, dtype, "triton", "cuda")


@pytest.mark.gpu
def test_gpu_bf16_fp32_adapters_dropout():
    _run_case(1000, 1024, 768, 16, torch.bfloat16, torch.float32, "triton", "cuda", p=0.1)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    x, w, b, a, bb = _inputs(256, 512, 384, 16, torch.bfloat16, torch.bfloat16, "cuda")
    eager = fused_lora.lora_linear(x, w, b, a, bb, 0.5, backend="triton")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fused_lora.lora_linear(x, w, b, a, bb, 0.5, backend="triton")  # warm-up / autotune
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fused_lora.lora_linear(x, w, b, a, bb, 0.5, backend="triton")
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_auto_backend_on_cuda_is_a_kernel():
    from fused_lora import backends

    assert backends.select("lora_linear", "auto", torch.device("cuda"), torch.bfloat16) in ("triton", "cuda")


@pytest.mark.interpreter
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(37, 70, 50, 5), (64, 33, 129, 16)], ids=str)
def test_triton_fused_shrink_variant(shape, adapter_dtype):
    # The in-K-loop shrink ("fused") gives the same y and saved xa as the pre-kernel ("pre").
    from fused_lora.kernels.lora_linear import lora_linear_fwd

    M, K, N, R = shape
    x, w, b, a, bb = _inputs(M, K, N, R, torch.float16, adapter_dtype, TRITON_DEVICE)
    y_pre, xa_pre = lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 0, shrink="pre")
    y_fused, xa_fused = lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 0, shrink="fused")
    torch.testing.assert_close(xa_fused, xa_pre, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y_fused, y_pre, rtol=2e-3, atol=2e-3)
    y64, xa64 = ref.lora_linear_fwd(x.double(), w.double(), b.double(), a.double(), bb.double(),
                                    0.5, 0.0, 0)
    ypt = _eager_chain(x, w, b, a, bb, 0.5, 0.0, 0)
    assert_close_2x(y_fused, y64, ypt, "y")
    with pytest.raises(ValueError, match="shrink"):
        lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 0, shrink="bogus")
