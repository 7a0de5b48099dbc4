"""fused_lora::lora_linear (one adapter): fused_lora.lora_linear, the custom ops
fused_lora::lora_linear_fwd / _bwd, and every backend's kernels, against fused_lora.reference.

Backends (tests/ops/conftest.py): torch, triton (the interpreter on CPU), cuda_cpu (the C++ CPU
kernels), sim* (the CUDA kernels under the SIMT emulator), cuda* (the CUDA kernels, gpu).

Tolerance: flash-attention's rule (tests/_utils.py) -- a kernel's max error against an fp64
reference is at most 2x the error of PyTorch's own computation in the same dtype (+ a small
atol). The raw-op tests hold each backend to Backend.check: the C++ CPU kernels to a fixed
tolerance of the reference in the same dtype, the emulator to the 2x rule, CUDA tensors to the
2x rule with the absolute floor scaled by the output's magnitude. Every torch.empty* called by
the package returns NaN during tests (tests/conftest.py): an unwritten output element fails.

Sections: the functional API against fp64 (autograd); the custom ops (opcheck, compile, fake
impls); the raw kernels (fwd / bwd of each backend; the emulator's tile edges, split-K, the
backward's engines, the Hopper GEMM, seeded random cases); autograd features; bad input; the
Triton kernels' own variants; GPU only.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from _fuzz import FUZZ_GEMMS, N_FUZZ, fuzz_check, fuzz_draw, fuzz_layout
from _utils import INTERPRET, assert_close_2x, lora_inputs, relayout

import fused_lora
from fused_lora import ops
from fused_lora import reference as ref

OP = "lora_linear"
DEFAULT_BACKENDS = ("torch", "triton", "cuda_cpu", "cuda")

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
SEED = (12345 << 31) | 678  # both 31-bit hash keys of the dropout mask nonzero
ALL = (True, True, True)
NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
         (False, True, True), (False, False, False)]


def _shape_id(s):
    return "M{}-K{}-N{}-r{}".format(*s)


# ============================================================================ functional API

# (M, in, out, r): tile edges on every dim (Triton blocks are 32 under the interpreter, >= 16
# on GPU), r = 1 (narrowest), r not a power of two, r > 64 (looped in 64-wide chunks).
SHAPES = [(1, 16, 16, 1), (37, 70, 50, 5), (64, 33, 129, 16), (20, 96, 40, 80)]


def _eager_chain(x, w, b, a, bb, scale, p, seed):
    """PyTorch's own LoRA (PEFT-style) in the inputs' dtypes; the mask from the same seed."""
    x2d = x.reshape(-1, x.shape[-1])
    xd = x2d.to(a.dtype)
    if p > 0:
        keep = ref.dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p, device=x.device)
        xd = torch.where(keep, xd / (1 - p), torch.zeros((), dtype=xd.dtype, device=x.device))
    y = F.linear(x2d, w, b) + (scale * F.linear(F.linear(xd, a), bb)).to(x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _run_case(be, M, K, N, R, dtype, adapter_dtype, bias=True, p=0.0, lead=None, layout="contiguous",
              grads=("x", "A", "B")):
    """fused_lora.lora_linear on `be` (forward and autograd backward) against the fp64 reference,
    by the 2x rule against PyTorch's eager chain in the same dtypes."""
    be.take(OP, dtype)
    scale = 0.75
    x, w, b, a, bb = lora_inputs(M, K, N, R, dtype, adapter_dtype, be.device, bias=bias, lead=lead,
                                 layout=layout)
    seed = 123456789 if p > 0 else 0

    def leaf(t, want):
        return t.detach().clone().requires_grad_(want)

    # fp64 reference (plain autograd) and PyTorch's same-dtype chain, with the same mask.
    x64 = leaf(x.double(), "x" in grads)
    a64, b64 = leaf(a.double(), "A" in grads), leaf(bb.double(), "B" in grads)
    y64 = ref.lora_linear(x64, w.double(), None if b is None else b.double(), a64, b64, scale, p, seed)
    xp, ap, bp = leaf(x, "x" in grads), leaf(a, "A" in grads), leaf(bb, "B" in grads)
    ypt = _eager_chain(xp, w, b, ap, bp, scale, p, seed)

    # x keeps its layout (a clone of a non-dense view is contiguous)
    xk = relayout(x.detach().clone(), layout).requires_grad_("x" in grads)
    ak, bk = leaf(a, "A" in grads), leaf(bb, "B" in grads)
    # The kernel draws its seed from torch's CPU generator: make it draw `seed`'s twin by
    # calling the op directly for dropout cases.
    if p > 0:
        x2d = xk.reshape(-1, K)
        y2d, _ = ops.lora_linear_fwd(x2d, w, b, ak, bk, scale, p, torch.tensor(seed), be.impl)
        yk = y2d.reshape(*xk.shape[:-1], N)
    else:
        yk = fused_lora.lora_linear(xk, w, b, ak, bk, scale, backend=be.impl)
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


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_matches_reference(backend, shape, dtype, p):
    _run_case(backend, *shape, dtype, dtype, p=p)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_fp32_adapters_half_activations(backend, dtype):
    # PEFT keeps adapters in fp32; the kernels read them as fp32 (no fp32 copy of x).
    _run_case(backend, 37, 70, 50, 5, dtype, F32)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_dropout(backend, p, dtype):
    _run_case(backend, 37, 70, 50, 5, dtype, dtype, p=p)


def test_no_bias_3d_input(backend):
    _run_case(backend, 0, 48, 40, 8, F32, F32, bias=False, lead=(3, 7))


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_non_contiguous_x(backend, layout):
    # column-major [M, K]; stride 2 along K
    _run_case(backend, 37, 70, 50, 5, F32, F32, layout=layout)


@pytest.mark.parametrize("grads", [("x",), ("A", "B"), ("B",), ("x", "A")], ids="-".join)
def test_partial_grads(backend, grads):
    # ctx.needs_input_grad decides what is computed: frozen x (first layer), frozen A or B.
    _run_case(backend, 37, 70, 50, 5, F32, F32, grads=grads)


def test_empty_batch(backend):
    x, w, b, a, bb = lora_inputs(0, 16, 24, 4, F32, F32, backend.device)
    x.requires_grad_(True)
    y = fused_lora.lora_linear(x, w, b, a, bb, 1.0, backend=backend.impl)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


def test_strided_bias(backend):
    # A strided 1-D bias (a view of every other element) is read with its stride.
    x, w, b, A, B = lora_inputs(9, 24, 20, 4, device=backend.device)
    wide = torch.randn(2 * b.shape[0], device=b.device)
    wide[::2] = b
    y = fused_lora.lora_linear(x, w, wide[::2], A, B, 0.5, backend=backend.impl)
    torch.testing.assert_close(y, ref.lora_linear(x, w, b, A, B, 0.5), rtol=1e-4, atol=1e-4)


@pytest.mark.backends("triton", "cuda_cpu")
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_same_as_torch_backend(backend, dropout):
    # Through the package, 3-D x, the same dropout seed drawn for both backends.
    x, w, b, a, bb = lora_inputs(10, 24, 16, 4, device=backend.device)
    x = x.reshape(2, 5, 24)
    grads = {}
    for impl in (backend.impl, "torch"):
        xi, ai, bi = (t.detach().clone().requires_grad_(True) for t in (x, a, bb))
        torch.manual_seed(5)  # same dropout seed drawn for both backends
        y = fused_lora.lora_linear(xi, w, b, ai, bi, 0.5, dropout_p=dropout, backend=impl)
        y.square().sum().backward()
        grads[impl] = (y, xi.grad, ai.grad, bi.grad)
    for g, r, name in zip(grads[backend.impl], grads["torch"], ("y", "dx", "dA", "dB")):
        torch.testing.assert_close(g, r, msg=name)


def test_reference_matches_float64_math():
    # The reference in fp64 against literal fp64 math written out by hand.
    M, K, N, R, s, p, seed = 9, 11, 7, 3, 0.5, 0.25, 42
    x, w, b, a, bb = lora_inputs(M, K, N, R, F64)
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


@pytest.mark.backends("torch")
def test_gradcheck_float64(backend):
    x, w, b, a, bb = lora_inputs(5, 6, 4, 2, F64)
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))

    def f(x_, a_, b_):
        return fused_lora.lora_linear(x_, w, b, a_, b_, 0.5, backend=backend.impl)

    assert torch.autograd.gradcheck(f, (x, a, bb))


@pytest.mark.backends("torch")
def test_base_weight_and_bias_grads_when_trainable(backend):
    # Frozen in LoRA, but if a caller trains them they get the plain linear gradients.
    x, w, b, a, bb = lora_inputs(6, 5, 4, 2, F64)
    w.requires_grad_(True)
    b.requires_grad_(True)
    y = fused_lora.lora_linear(x, w, b, a, bb, 0.5, backend=backend.impl)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(w.grad, dy.t() @ x)
    torch.testing.assert_close(b.grad, dy.sum(0))


# ============================================================================ custom ops


def _op_args(device, bias=True):
    return lora_inputs(13, 20, 18, 4, F32, F32, device, bias=bias)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_fwd(backend, dropout, bias):
    """opcheck (schema, fake/meta impl, autograd registration, AOT dispatch) of the custom op
    with this backend's impl, and of the backend's own C++ op where it has one (there the custom
    op, the same registration whatever the impl, is checked at one combination only)."""
    x, w, b, a, bb = _op_args(backend.device, bias=bias)
    if backend.is_cpp:
        torch.library.opcheck(backend.ops.lora_linear_fwd.default, (x, w, b, a, bb, 0.5, dropout, 7))
        if (dropout, bias) != (0.2, True):
            return
    for t in (x, a, bb):
        t.requires_grad_(True)
    seed = torch.tensor(7) if dropout else None
    torch.library.opcheck(ops.lora_linear_fwd, (x, w, b, a, bb, 0.5, dropout, seed, backend.impl))


@pytest.mark.parametrize("needs", [(True, True, True), (False, True, True), (True, False, False),
                                   (False, True, False)], ids=lambda n: "".join("1" if e else "0" for e in n))
def test_opcheck_bwd(backend, needs):
    x, w, b, a, bb = _op_args(backend.device)
    if backend.is_cpp:
        _, xa = backend.ops.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.2, 3)
        dy = torch.randn(x.shape[0], w.shape[0], device=x.device)
        torch.library.opcheck(backend.ops.lora_linear_bwd.default, (dy, x, w, a, bb, xa, 0.5, 0.2, 3, *needs))
        if needs != (True, True, True):  # the custom op: once (see test_opcheck_fwd)
            return
    y, xa = ops.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.2, torch.tensor(3), backend.impl)
    dy = torch.randn_like(y)
    torch.library.opcheck(
        ops.lora_linear_bwd, (dy, x, w, a, bb, xa, 0.5, 0.2, torch.tensor(3), *needs, backend.impl)
    )


@pytest.mark.backends("torch", "triton", "cuda_cpu", "cuda")
def test_compile_fullgraph_train_step(backend):
    torch._dynamo.reset()
    layer = fused_lora.FusedLoRALinear(20, 18, r=4, lora_dropout=0.1, backend=backend.impl,
                                       device=backend.device)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 20, device=backend.device)

    def step(fwd, inp):
        out = fwd(inp)
        out.square().mean().backward()  # AOT autograd compiled the backward graph too
        return out

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.manual_seed(11)
    out_c = step(compiled, x)
    gA_c = layer.lora_A.weight.grad.clone()
    layer.zero_grad()
    torch.manual_seed(11)
    out_e = step(layer, x)
    # Same seed drawn inside and outside the compiled graph -> same mask, same result.
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(gA_c, layer.lora_A.weight.grad)


@pytest.mark.backends("torch")
def test_compile_inductor_cpu(backend):
    torch._dynamo.reset()
    x, w, b, a, bb = _op_args("cpu")
    f = torch.compile(lambda x_: fused_lora.lora_linear(x_, w, b, a, bb, 0.5, backend=backend.impl),
                      fullgraph=True)
    torch.testing.assert_close(f(x), fused_lora.lora_linear(x, w, b, a, bb, 0.5, backend=backend.impl))


def test_fake_impl_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(7, 20, dtype=torch.float16)
        w = torch.empty(18, 20, dtype=torch.float16)
        a = torch.empty(4, 20, dtype=torch.float32)
        bb = torch.empty(18, 4, dtype=torch.float32)
        y, xa = ops.lora_linear_fwd(x, w, None, a, bb, 1.0, 0.0, None, "torch")
        assert y.shape == (7, 18) and y.dtype == torch.float16
        assert xa.shape == (7, 4) and xa.dtype == torch.float32
        dx, dA, dB = ops.lora_linear_bwd(y, x, w, a, bb, xa, 1.0, 0.0, None, True, False, True,
                                         "torch")
        assert dx.shape == x.shape and dA.numel() == 0 and dB.shape == bb.shape
        assert dB.dtype == torch.float32


@pytest.mark.backends("torch", "triton", "cuda_cpu", "cuda")
def test_raw_ops_check_the_shapes_they_rely_on(backend):
    x, w, b, A, B = lora_inputs(9, 24, 20, 4, device=backend.device)
    op = torch.ops.fused_lora.lora_linear_fwd
    impl = backend.impl
    with pytest.raises(ValueError, match="lora_A must be"):
        op(x, w, b, A[:, :-1], B, 1.0, 0.0, None, impl)
    with pytest.raises(ValueError, match="bias must be"):
        op(x, w, b[:-1], A, B, 1.0, 0.0, None, impl)
    with pytest.raises(ValueError, match="x's last dim"):
        op(x[:, :-1], w, b, A, B, 1.0, 0.0, None, impl)
    y, xa = op(x, w, b, A, B, 1.0, 0.0, None, impl)
    bwd = torch.ops.fused_lora.lora_linear_bwd
    with pytest.raises(ValueError, match="dy must be"):
        bwd(y[:, :-1], x, w, A, B, xa, 1.0, 0.0, None, True, True, True, impl)
    with pytest.raises(ValueError, match="xa must be"):
        bwd(y, x, w, A, B, xa[:-1], 1.0, 0.0, None, True, True, True, impl)


# ============================================================================ raw kernels
# The C++ ops' convention (int seed): the extension's CPU kernels (cuda_cpu), the CUDA kernels
# under the emulator (sim*) and on a GPU (cuda*). Shapes are the tile edges of the CUDA kernels
# (tensor-core 128x128x32 tiles, SIMT 64x64x16 for fp32, the decode GEMV for M <= 8, shrink 32
# rows x 16 ranks x 64 k, reduce 64 cols x 16 ranks x 32 rows): ragged M, N across 128 / 64, K
# odd (scalar loads) or a multiple of 8 (16-byte cp.async), R = 1, 16, 17, 33 (rank chunks).


def _fwd_bwd(be, x, w, b, a, bb, scale=0.7, p=0.3, seed=SEED, needs=ALL, dy=None):
    """Forward, then backward from the backend's own xa, each against the reference."""
    fargs = (x, w, b, a, bb, scale, p, seed)
    y, xa = be.fwd(*fargs)
    be.check((y, xa), ref.lora_linear_fwd, fargs, ("y", "xa"))
    if dy is None:
        dy = torch.randn(y.shape).to(x.dtype).to(x.device)
    bargs = (dy, x, w, a, bb, xa, scale, p, seed, *needs)
    got = be.bwd(*bargs)
    be.check(got, ref.lora_linear_bwd, bargs, ("dx", "dA", "dB"))
    return y, xa, got


CPU_SHAPES = [(1, 1, 1, 1), (13, 20, 18, 4), (37, 67, 33, 17)]
SIM_SHAPES = [(1, 1, 1, 1), (5, 67, 33, 17), (8, 64, 40, 16), (129, 67, 129, 1), (257, 72, 136, 33),
              (300, 40, 257, 16)]
# M <= 8 (decode GEMV, 16-byte and scalar loads), M, N across 128 (TC) and 64 (SIMT).
GPU_SHAPES = [(1, 8, 8, 1), (8, 264, 136, 16), (5, 67, 33, 3), (37, 67, 33, 17), (130, 264, 200, 16),
              (257, 136, 129, 8)]


@pytest.mark.backends(
    args="shape,dtype,bias,dropout",
    cuda_cpu=list(itertools.product(CPU_SHAPES, [F32, F16, BF16, F64], [True, False], [0.0, 0.3])),
    sim=[(s, d, b, p) for s in SIM_SHAPES for d in (F32, F16, BF16)
         for b, p in ((True, 0.0), (False, 0.3), (True, 0.3))],
    # every block's threads first run in reverse order: a missing __syncthreads() between a
    # write and another thread's read shows up in one of the two orders
    sim_rev=[((257, 72, 136, 33), d, True, 0.3) for d in (F16, F32)],
    cuda=list(itertools.product(GPU_SHAPES, [F16, BF16, F32], [True, False], [0.0, 0.3])),
)
def test_raw_fwd_bwd(backend, shape, dtype, bias, dropout):
    M, K, N, R = shape
    _fwd_bwd(backend, *lora_inputs(M, K, N, R, dtype, bias=bias, device=backend.device), p=dropout)


@pytest.mark.backends(
    args="shape,dtype,adapter_dtype,dropout",
    cuda_cpu=[((37, 67, 33, 17), d, d, p) for d in (F32, F16) for p in (0.0, 0.25)],
    sim=[((129, 67, 129, 17), d, d, 0.25) for d in (F32, BF16)],
    cuda=[((70, 96, 72, 16), d, F32, 0.2) for d in (F16, BF16)],
)
@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: "".join("1" if e else "0" for e in n))
def test_raw_bwd_needs(backend, shape, dtype, adapter_dtype, dropout, needs):
    # A gradient not asked for comes back empty and does not disturb the others.
    M, K, N, R = shape
    x, w, _, a, bb = lora_inputs(M, K, N, R, dtype, adapter_dtype, backend.device)
    _fwd_bwd(backend, x, w, None, a, bb, 0.6, dropout, SEED, needs)


@pytest.mark.backends(
    args="shape,dtype",
    cuda_cpu=[((21, 35, 19, 5), F16)],
    sim=[((M, 72, 40, 17), d) for d in (F16, BF16) for M in (6, 129)],
)
def test_raw_fp32_adapters(backend, shape, dtype):
    x, w, b, a, bb = lora_inputs(*shape, dtype, F32, backend.device)
    _, _, got = _fwd_bwd(backend, x, w, b, a, bb, 0.5, 0.1, 9)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32


@pytest.mark.backends(
    args="dtype,seed,M,K,p",
    cuda_cpu=[(F32, s, 29, 37, 0.4) for s in (0, 1, SEED, (1 << 62) - 1)],
    sim=[(d, s, 29, 37, 0.4) for d in (F32, F16, BF16) for s in (0, SEED, (1 << 62) - 1)],
    cuda=[(d, SEED, 77, 45, 0.35) for d in (F16, BF16, F32)],
)
def test_raw_dropout_mask_bit_exact(backend, dtype, seed, M, K, p):
    # With A = I (r = K) and x = 1, xa = keep / (1 - p): its support is the keep mask.
    dev = backend.device
    x = torch.ones(M, K, device=dev, dtype=dtype)
    eye = torch.eye(K, device=dev, dtype=dtype)
    zw = torch.zeros(3, K, device=dev, dtype=dtype)
    _, xa = backend.fwd(x, zw, None, eye, torch.zeros(3, K, device=dev, dtype=dtype), 1.0, p, seed)
    keep = ref.dropout_keep_mask(seed, M, K, p, device=dev)
    assert torch.equal(xa != 0, keep)
    torch.testing.assert_close(xa[keep], torch.full_like(xa[keep], 1.0 / (1.0 - p)))
    # Backward regenerates the same mask: with B = 1 and dy = 1, ds = 3 everywhere, so
    # dA = ds^T drop(x) holds the column sums of the kept, rescaled x.
    dy = torch.ones(M, 3, device=dev, dtype=dtype)
    bb = torch.ones(3, K, device=dev, dtype=dtype)
    _, dA, _ = backend.bwd(dy, x, zw, eye, bb, xa, 1.0, p, seed, False, True, False)
    want = (keep.to(torch.float32) / (1 - p)).sum(0) * 3  # dA[r, k] = 3 sum_m keep[m, k] / (1-p)
    torch.testing.assert_close(dA.float(), want.expand(K, K), atol=0.0, rtol=1e-2)


@pytest.mark.backends("cuda_cpu", "sim", "cuda")
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("M,K,N", [(0, 5, 4), (3, 0, 4), (3, 5, 0)])
def test_raw_degenerate_sizes(backend, M, K, N, dtype):
    x, w, b, a, bb = lora_inputs(M, K, N, 2, dtype, device=backend.device)
    _fwd_bwd(backend, x, w, b, a, bb, 0.5, 0.0, 0)


@pytest.mark.backends("sim", "cuda")
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("K", [1031, 2056, 3080])
def test_raw_gemv_unrolled_k_loop(backend, dtype, K):
    """The decode GEMV (M <= 8) reads W in groups of 4 chunks (1024 k per lane group): K = 1031
    is one group + a 7-element tail, 2056 one group + 4 single chunks, 3080 three groups +
    a chunk (x and W contiguous: 16-byte loads for fp16/bf16; fp32 scalar)."""
    for M in (1, 8):
        args = (*lora_inputs(M, K, 40, 16, dtype, device=backend.device), 0.7, 0.2, SEED)
        backend.check(backend.fwd(*args), ref.lora_linear_fwd, args, ("y", "xa"))


# Split-K of the tensor-core GEMM (tiles < SMs; the emulator reports 4 SMs): (M, K, N) where
# the forward GEMM (reduction K) or the dx GEMM (reduction N) runs 2-4 splits of a k-range that
# is a multiple of 32, the last one ragged (K = 517: odd, scalar loads; 520: cp.async).
SPLIT_K_SHAPES = [(20, 520, 40), (70, 517, 40), (20, 40, 520), (9, 300, 300)]


@pytest.mark.backends("sim", "cuda")
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("shape", SPLIT_K_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_raw_split_k_gemm(backend, shape, dtype):
    M, K, N = shape
    _fwd_bwd(backend, *lora_inputs(M, K, N, 16, dtype, device=backend.device), 0.7, 0.2)


@pytest.mark.backends("sim", "cuda")
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_raw_grouped_tile_order(backend, dtype):
    """9 row tiles x 2 column tiles: the GEMM's grouped order (8 row tiles per column sweep)
    has a full group and a one-tile remainder; every tile must be computed exactly once."""
    args = (*lora_inputs(1100, 24, 136, 4, dtype, device=backend.device), 0.5, 0.0, SEED)
    backend.check(backend.fwd(*args), ref.lora_linear_fwd, args, ("y", "xa"))


@pytest.mark.backends("sim", "cuda_cpu", "cuda")
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("M", [7, 200])
def test_raw_strided_views(backend, dtype, M):
    # x: a transposed view (non-unit inner stride); weight: a column window of a wider matrix
    # (unit inner stride, row pitch K + 5, base 3 elements in: 16-byte loads must be off);
    # lora_B: a transposed view; dy: a transposed view.
    K, N, R = 64, 136, 16
    x, w, b, a, bb = lora_inputs(M, K, N, R, dtype, device=backend.device)
    x, w, bb = relayout(x, "transposed"), relayout(w, "window"), relayout(bb, "transposed")
    dy = relayout(torch.randn(M, N).to(dtype).to(backend.device), "transposed")
    _fwd_bwd(backend, x, w, b, a, bb, 0.8, 0.2, SEED, dy=dy)


@pytest.mark.backends("cuda", "cuda_cpu")
def test_raw_strided_inputs(backend):
    dev = backend.device
    x, w, b, a, bb = lora_inputs(40, 64, 48, 8, F16, device=dev)
    xt = relayout(x, "transposed")  # stride (1, 40)
    wt = relayout(w, "transposed")  # column-major weight
    x_pad = relayout(x, "padded8")  # row pitch 72: 16-byte loads
    x_odd = relayout(x, "padded")  # row pitch 65: scalar loads
    for xi, wi in ((xt, w), (x, wt), (x_pad, w), (x_odd, w), (x_odd[:5], w)):
        y, xa = backend.fwd(xi, wi, b, a, bb, 0.5, 0.0, 0)
        y_ref, xa_ref = ref.lora_linear_fwd(xi, wi, b, a, bb, 0.5, 0.0, 0)
        torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(xa, xa_ref, atol=1e-3, rtol=1e-3)


# ---- the backward's engines (csrc/lora_linear_cuda.cu: bwd_ds_db_kernel / bwd_ds_db_simt_kernel
# + finalize, reduce_m_kernel, the dx GEMM), sized for the emulator's 4 SMs:
#   * tensor-core path (fp16/bf16 dY, N % 8 == 0, 16-byte rows): 512-col chunks x 32-row steps,
#     16-rank chunks; N = 520 gives two col chunks, one of 8 cols; M = 300 gives 4 row chunks of
#     96 rows = 3 pipeline steps each, the last chunk 12 rows; R = 17 / 40 two / three rank chunks.
#   * SIMT path (fp32 dY, N % 8 != 0, non-contiguous or misaligned dY): 256-col chunks x 64-col
#     tiles x 32-row tiles.
# The backward runs from the reference's xa; dropout masks are bit-exact (a wrong mask fails by
# O(1)).

BWD_CASES = [  # (M, K, N, R, dtype, adapter dtype, dropout)
    # tensor-core path
    (300, 19, 520, 16, BF16, None, 0.0),
    (300, 19, 520, 17, BF16, None, 0.3),
    (37, 21, 40, 1, F16, None, 0.3),
    (300, 19, 520, 40, F16, None, 0.0),
    (70, 19, 520, 17, BF16, F32, 0.3),
    (70, 19, 40, 40, F16, F32, 0.0),
    (1, 8, 16, 16, BF16, None, 0.0),  # M = 1
    # SIMT path
    (300, 17, 300, 16, F32, None, 0.3),  # two col chunks, 5 row chunks
    (37, 19, 33, 17, F32, None, 0.0),
    (37, 19, 33, 40, BF16, None, 0.3),  # N % 8 != 0
    (37, 19, 33, 1, F16, F32, 0.0),
    (1, 5, 7, 1, F32, None, 0.3),
]


def _bwd_inputs(be, M, K, N, R, dtype, adapter_dtype, dropout, dy_layout="contiguous"):
    x, w, _, a, b = lora_inputs(M, K, N, R, dtype, adapter_dtype or dtype, be.device, bias=False)
    xa = ref.lora_linear_fwd(x, w, None, a, b, 0.7, dropout, SEED)[1]
    # "transposed": stride (1, M), no vector loads; "misaligned": rows 16-byte aligned in
    # stride, base pointer 2 bytes off
    dy = relayout(torch.randn(M, N).to(dtype).to(be.device), dy_layout)
    return dy, x, w, a, b, xa


def _bwd_check(be, M, K, N, R, dtype, adapter_dtype=None, dropout=0.0, needs=ALL, dy_layout="contiguous"):
    dy, x, w, a, b, xa = _bwd_inputs(be, M, K, N, R, dtype, adapter_dtype, dropout, dy_layout)
    args = (dy, x, w, a, b, xa, 0.7, dropout, SEED, *needs)
    got = be.bwd(*args)
    be.check(got, ref.lora_linear_bwd, args, ("dx", "dA", "dB"))
    return got, args


@pytest.mark.backends("sim", "cuda")
@pytest.mark.parametrize("M,K,N,R,dtype,adapter_dtype,dropout", BWD_CASES)
def test_raw_bwd_engines(backend, M, K, N, R, dtype, adapter_dtype, dropout):
    _bwd_check(backend, M, K, N, R, dtype, adapter_dtype, dropout)


SUBSETS = [n for n in itertools.product([False, True], repeat=3) if n != ALL]


# Every subset of gradients on the tensor-core engine (a skipped ds or dB must not break the
# others), and the ds-only / dB-only launches on the SIMT engine.
@pytest.mark.backends("sim", "cuda_cpu", "cuda")
@pytest.mark.parametrize(
    "needs,dtype",
    [(n, BF16) for n in SUBSETS] + [((True, False, False), F32), ((False, False, True), F32)],
)
def test_raw_bwd_needs_subsets(backend, needs, dtype):
    _bwd_check(backend, 70, 19, 40, 17, dtype, None, 0.3, needs)


@pytest.mark.backends("sim", "cuda_cpu", "cuda")
@pytest.mark.parametrize("layout", ["transposed", "misaligned"])
def test_raw_bwd_dy_layouts(backend, layout):
    # Non-contiguous / misaligned dY falls back to the SIMT engine with strided loads.
    _bwd_check(backend, 37, 19, 40, 17, F16, None, 0.3, (layout == "transposed", True, True),
               dy_layout=layout)


@pytest.mark.backends("sim", "cuda_cpu", "cuda")
def test_raw_bwd_dx_misaligned_dy(backend):
    _bwd_check(backend, 37, 19, 40, 17, F16, None, 0.3, (True, False, False), dy_layout="misaligned")


@pytest.mark.backends(
    args="shape,dtype,adapter_dtype,dropout",
    sim=[((300, 19, 520, 17), BF16, F32, 0.3)],
    cuda_cpu=[((300, 19, 520, 17), BF16, F32, 0.3)],
    cuda=[((300, 256, 192, 16), F16, None, 0.1)],
)
def test_raw_bwd_deterministic(backend, shape, dtype, adapter_dtype, dropout):
    # Fixed-order partial sums, no float atomics: two runs are bitwise equal.
    first, args = _bwd_check(backend, *shape, dtype, adapter_dtype, dropout)
    again = backend.bwd(*args)
    for f, s in zip(first, again):
        assert torch.equal(f, s)


@pytest.mark.backends("sim", "cuda_cpu", "cuda")
def test_raw_bwd_fp16_large_xa_no_overflow(backend):
    # fp16 dY with |xa| ~ 1e6 (beyond fp16's 65504) and lora_B ~ 1e-6 (fp16 subnormals): the
    # tensor-core engine's per-rank power-of-two scaling keeps hi/lo in range.
    dy, x, w, a, b, xa = _bwd_inputs(backend, 70, 19, 40, 17, F16, F32, 0.0)
    xa = xa * 1e6
    b = b * 1e-6
    got = backend.bwd(dy, x, w, a, b, xa, 0.7, 0.0, SEED, *ALL)
    want = ref.lora_linear_bwd(dy, x, w, a, b, xa, 0.7, 0.0, SEED, *ALL)
    for name, g_, r_ in zip(("dx", "dA", "dB"), got, want):
        assert torch.isfinite(g_).all(), name
        scale = r_.abs().max().clamp_min(1e-30)
        assert ((g_.double() - r_.double()).abs().max() / scale).item() < 2e-3, name


# ---- both tensor-core GEMMs (the ops' gemm argument): mma.sync everywhere, the Hopper wgmma
# GEMM (gemm_wgmma_kernel in csrc/gemm.cu) on sm_90a and under the emulator, which queues each
# wgmma.mma_async and performs it only when wgmma_wait retires its group, reading the 128-byte-
# swizzled shared memory through the decoded descriptors: a wrong swizzle or descriptor, a stage
# overwritten while its MMAs are in flight, a wrong accumulator fragment map fail here.

# Emulator: BK = 64, 5 stage slots, loads 3 stages ahead: K or N = 700 is 11 k-stages (every
# slot reused twice while MMAs are in flight); 67 / 701 / 260: scalar loads (K or N % 8 != 0);
# 129 / 257: ragged 128x128 tiles; M = 9: the smallest M the GEMM (not the GEMV) takes;
# (20, 1000, 40) / (20, 40, 1000): split-K of the forward / dx GEMM (tiles < the emulator's 4
# SMs); 1100 rows: the grouped tile order's remainder group.
WGMMA_SHAPES = [(9, 64, 128, 16), (129, 67, 129, 1), (257, 700, 256, 16), (257, 701, 260, 5),
                (130, 136, 700, 33), (20, 1000, 40, 16), (20, 40, 1000, 16), (1100, 24, 136, 4)]
# GPU: BK = 64 edges (K = 64, 700), K odd, split-K (M = 20 and 64), ragged tiles, and one
# training-sized case (2048 x 4096 x 4096).
GEMM_SHAPES = [(9, 64, 128, 16), (20, 1000, 40, 16), (64, 4096, 4096, 16), (129, 67, 129, 1),
               (257, 700, 256, 16), (300, 136, 700, 33), (2048, 4096, 4096, 16)]
WGMMA_SEED = (4242 << 31) | 99


def _gemm_cases(shapes, p):
    return [(s, d, p) for s in shapes for d in (F16, BF16)]


@pytest.mark.backends(
    args="shape,dtype,dropout",
    sim_wgmma=_gemm_cases(WGMMA_SHAPES, 0.3), sim_wgmma256=_gemm_cases(WGMMA_SHAPES, 0.3),
    # threads first run in reverse order: a missing barrier or proxy-fence ordering between the
    # loads of one stage and the MMAs that read it shows in one of the two orders
    sim_wgmma_rev=[((257, 700, 256, 16), F16, 0.3)], sim_wgmma256_rev=[((257, 700, 256, 16), F16, 0.3)],
    cuda_mma=_gemm_cases(GEMM_SHAPES, 0.2), cuda_wgmma=_gemm_cases(GEMM_SHAPES, 0.2),
    cuda_wgmma256=_gemm_cases(GEMM_SHAPES, 0.2),
)
def test_raw_gemm_variants(backend, shape, dtype, dropout):
    """The GEMM variant runs every fp16/bf16 tensor-core GEMM of the op (forward y, dx): 128x128
    tiles (wgmma, m64n128k16) and 128x256 (wgmma256, the GEMM tile parked in shared memory for
    the init)."""
    M, K, N, R = shape
    if backend.kind == "cuda":
        from fused_lora import _ext

        assert _ext.gemm_choice(backend.gemm) == backend.gemm
    before = backend.wgmma_count() if backend.kind == "sim" else 0
    x, w, b, a, bb = lora_inputs(M, K, N, R, dtype, device=backend.device, bias=M % 2 == 1)
    _fwd_bwd(backend, x, w, b, a, bb, 0.7, dropout, WGMMA_SEED)
    if backend.kind == "sim":
        assert backend.wgmma_count() > before, "the wgmma GEMM did not run"


@pytest.mark.backends("sim_wgmma", "sim_wgmma256", "cuda_wgmma", "cuda_wgmma256")
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_raw_wgmma_strided_views(backend, dtype):
    # Row pitches that are not multiples of 8 and a base 3 elements in: every operand chunk goes
    # through the scalar (non-cp.async) loads into the swizzled tiles.
    x, w, b, a, bb = lora_inputs(200, 136, 264, 16, dtype, device=backend.device)
    _fwd_bwd(backend, relayout(x, "window"), relayout(w, "window_b"), b, a, bb, 0.7, 0.3, WGMMA_SEED)


@pytest.mark.backends(
    args="shape,dtype,atol,rtol",
    sim_wgmma=[((257, 700, 256, 16), F16, 2e-3, 2e-3)], sim_wgmma256=[((257, 700, 256, 16), F16, 2e-3, 2e-3)],
    cuda_wgmma=[((1024, 2048, 1536, 16), BF16, 3e-2, 1.6e-2)],
    cuda_wgmma256=[((1024, 2048, 1536, 16), BF16, 3e-2, 1.6e-2)],
)
def test_raw_wgmma_matches_mma(backend, shape, dtype, atol, rtol):
    # Same operands through both GEMMs: fp32 accumulation of exact fp16 products in a different
    # order (init added last here), so the outputs agree to a rounding of the output dtype.
    args = (*lora_inputs(*shape, dtype, device=backend.device), 0.7, 0.0, WGMMA_SEED)
    y_wg, _ = backend.fwd(*args)
    y_mma, _ = backend.with_gemm(1).fwd(*args)
    torch.testing.assert_close(y_wg.float(), y_mma.float(), atol=atol, rtol=rtol)


# ---- seeded random cases (the emulator; tests/ops/_fuzz.py)

@pytest.mark.backends("sim")
@pytest.mark.parametrize("seed", range(N_FUZZ))
def test_raw_fuzz(backend, seed):
    sim = backend.with_gemm(FUZZ_GEMMS[seed % 4])
    c = fuzz_draw(seed)
    rng, M, K, N, R, dt = c["rng"], c["M"], c["K"], c["N"], c["R"], c["dtype"]
    g = torch.Generator().manual_seed(seed)
    x, w, b, a, bb = lora_inputs(M, K, N, R, dt, c["adapter_dtype"], bias=c["bias"], generator=g)
    x, w = fuzz_layout(x, rng), fuzz_layout(w, rng)
    s, p, sd = 0.8, c["dropout"], 1000 + seed
    fwd = (x, w, b, a, bb, s, p, sd)
    y, xa = sim.fwd(*fwd)
    fuzz_check((y, xa), ref.lora_linear_fwd, fwd, ("y", "xa"))
    dy = fuzz_layout(torch.randn(M, N, generator=g).to(dt), rng)
    bwd = (dy, x, w, a, bb, xa, s, p, sd, *c["needs"])
    fuzz_check(sim.bwd(*bwd), ref.lora_linear_bwd, bwd, ("dx", "dA", "dB"))


# ============================================================================ autograd features


def test_forward_mode_ad_gives_the_tangent():
    import torch.autograd.forward_ad as fwAD

    x, w, b, A, B = lora_inputs(9, 24, 20, 4, F64)
    tx = torch.randn_like(x)
    with fwAD.dual_level():
        y = fused_lora.lora_linear(fwAD.make_dual(x, tx), w, b, A, B, 0.5, backend="auto")
        tangent = fwAD.unpack_dual(y).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, tx @ w.t() + 0.5 * (tx @ A.t()) @ B.t())


@pytest.mark.backends("torch")
def test_double_backward_and_torch_func_grad(backend):
    x, w, b, A, B = lora_inputs(9, 24, 20, 4, F64)
    x.requires_grad_(True)
    A.requires_grad_(True)

    def f(x_, A_):
        return fused_lora.lora_linear(x_, w, b, A_, B, 0.5, backend=backend.impl)

    torch.autograd.gradgradcheck(f, (x, A))
    gx = torch.func.grad(lambda x_: f(x_, A).square().sum())(x)
    want = torch.autograd.grad(ref.lora_linear(x, w, b, A, B, 0.5).square().sum(), x)[0]
    torch.testing.assert_close(gx, want)


def test_scale_tensor_that_requires_grad_gets_its_gradient():
    x, w, b, A, B = lora_inputs(9, 24, 20, 4, F64)
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    fused_lora.lora_linear(x, w, b, A, B, s).sum().backward()
    assert s.grad is not None
    torch.testing.assert_close(s.grad, ((x @ A.t()) @ B.t()).sum())


# ============================================================================ bad input
# A clear TypeError / ValueError naming the argument -- never a crash, a hang or silently wrong
# output.


def _ok(**over):
    args = dict(
        x=torch.randn(5, 8), weight=torch.randn(6, 8), bias=torch.randn(6),
        lora_A=torch.randn(2, 8), lora_B=torch.randn(6, 2), scale=1.0,
    )
    args.update(over)
    return args


def _call(**over):
    a = _ok(**over)
    kw = {k: a.pop(k) for k in ("dropout_p", "backend", "training") if k in a}
    return fused_lora.lora_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"],
                                  a["scale"], **kw)


@pytest.mark.parametrize("over,exc,match", [
    ({"x": torch.randn(5, 7)}, ValueError, "x's last dim"),
    ({"weight": torch.randn(6, 8, 1)}, ValueError, "weight must be 2-D"),
    ({"lora_A": torch.randn(2, 7)}, ValueError, "lora_A must be"),
    ({"lora_B": torch.randn(6, 3)}, ValueError, "lora_B's rank"),
    ({"lora_B": torch.randn(5, 2)}, ValueError, "lora_B must be"),
    ({"lora_A": torch.randn(0, 8), "lora_B": torch.randn(6, 0)}, ValueError, "rank r must be"),
    ({"bias": torch.randn(5)}, ValueError, "bias must be"),
    ({"x": torch.randint(0, 3, (5, 8))}, TypeError, "x must be a floating"),
    ({"weight": torch.randn(6, 8, dtype=torch.float64)}, TypeError, "weight dtype"),
    ({"bias": torch.randn(6, dtype=torch.float16)}, TypeError, "bias dtype"),
    ({"lora_A": torch.randn(2, 8, dtype=torch.float16)}, TypeError, "lora_B dtype"),
    ({"lora_A": torch.randn(2, 8).half(), "lora_B": torch.randn(6, 2).half()}, TypeError,
     "lora_A/lora_B dtype"),
    ({"x": [1.0]}, TypeError, "x must be a torch.Tensor"),
    ({"scale": "1"}, TypeError, "scale"),
    ({"scale": float("nan")}, ValueError, "scale must be finite"),
    ({"dropout_p": 1.0}, ValueError, "dropout_p"),
    ({"dropout_p": -0.1}, ValueError, "dropout_p"),
    ({"backend": "cuBLAS"}, ValueError, "backend must be one of"),
    ({"x": torch.tensor(1.0)}, ValueError, "at least 1 dimension"),
])
def test_bad_inputs(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_device_mismatch_is_named():
    x = torch.randn(5, 8, device="meta")
    with pytest.raises(ValueError, match="all must share a device|supports CPU and CUDA"):
        _call(x=x)


def test_training_must_be_a_bool():
    with pytest.raises(TypeError, match="training must be a bool"):
        _call(dropout_p=0.5, training="no")


def test_fp64_needs_torch_backend():
    d = torch.float64
    a = _ok(x=torch.randn(5, 8, dtype=d), weight=torch.randn(6, 8, dtype=d), bias=None,
            lora_A=torch.randn(2, 8, dtype=d), lora_B=torch.randn(6, 2, dtype=d))
    y = fused_lora.lora_linear(a["x"], a["weight"], None, a["lora_A"], a["lora_B"], 1.0, backend="torch")
    assert y.dtype == d
    with pytest.raises(TypeError, match="only supported by backend='torch'"):
        fused_lora.lora_linear(a["x"], a["weight"], None, a["lora_A"], a["lora_B"], 1.0,
                               backend="triton")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from fused_lora import backends
    from fused_lora.kernels import lora_linear as L

    monkeypatch.setattr(L, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        backends.select("lora_linear", "triton", torch.device("cpu"), torch.float32)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's limit")
def test_bf16_under_the_interpreter_is_refused():
    x, w, b, A, B = lora_inputs(9, 24, 20, 4, BF16)
    with pytest.raises(ValueError, match="bf16 arithmetic is wrong under the Triton interpreter"):
        fused_lora.lora_linear(x, w, b, A, B, 1.0, backend="triton")
    # "auto" never picks it on CPU.
    y = fused_lora.lora_linear(x, w, b, A, B, 1.0, backend="auto")
    assert y.dtype == torch.bfloat16


# ============================================================================ Triton's variants


@pytest.mark.backends("triton")
def test_triton_deterministic_db_matches_atomic(backend):
    # Deterministic mode computes dB in extra programs of the main backward kernel (no
    # atomics); the default accumulates it with fp32 atomics in the ds kernel. Same math.
    from fused_lora.kernels.lora_linear import lora_linear_bwd, lora_linear_fwd

    x, w, b, a, bb = lora_inputs(70, 40, 45, 6, F32, F32, backend.device)
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


@pytest.mark.backends("triton")
@pytest.mark.parametrize("adapter_dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("shape", [(37, 70, 50, 5), (64, 33, 129, 16)], ids=str)
def test_triton_fused_shrink_variant(backend, shape, adapter_dtype):
    # The in-K-loop shrink ("fused", entry triton:inloop) gives the same y and saved xa as the
    # pre-kernel ("pre").
    from fused_lora.kernels.lora_linear import lora_linear_fwd

    M, K, N, R = shape
    x, w, b, a, bb = lora_inputs(M, K, N, R, F16, adapter_dtype, backend.device)
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


# ============================================================================ GPU only


@pytest.mark.gpu
@pytest.mark.backends("triton")
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("shape", [(4096, 4096, 4096, 16), (1000, 4095, 1025, 64), (16, 4096, 11008, 8),
                                   (2048, 1024, 1024, 256)], ids=_shape_id)
def test_gpu_large_shapes_autotuned(backend, dtype, shape):
    _run_case(backend, *shape, dtype, dtype)


@pytest.mark.gpu
@pytest.mark.backends("triton")
def test_gpu_bf16_fp32_adapters_dropout(backend):
    _run_case(backend, 1000, 1024, 768, 16, BF16, F32, p=0.1)


@pytest.mark.gpu
@pytest.mark.backends("triton", "cuda")
def test_gpu_cuda_graph_replay(backend):
    x, w, b, a, bb = lora_inputs(256, 512, 384, 16, BF16, device="cuda")
    eager = fused_lora.lora_linear(x, w, b, a, bb, 0.5, backend=backend.impl)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fused_lora.lora_linear(x, w, b, a, bb, 0.5, backend=backend.impl)  # warm-up / autotune
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fused_lora.lora_linear(x, w, b, a, bb, 0.5, backend=backend.impl)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.backends("cuda", "cuda_wgmma", "cuda_wgmma256")
def test_gpu_raw_cuda_graph_replay(backend):
    # The raw ops' forward and backward captured once; replays with new x and dy (read on the
    # device) equal eager runs bit for bit (deterministic kernels).
    x, w, b, a, bb = lora_inputs(96, 128, 80, 16, BF16, F32, "cuda")
    dy = torch.randn(96, 80, device="cuda").bfloat16()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up off the capture
        backend.fwd(x, w, b, a, bb, 0.5, 0.1, 11)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y, xa = backend.fwd(x, w, b, a, bb, 0.5, 0.1, 11)
        dx, dA, dB = backend.bwd(dy, x, w, a, bb, xa, 0.5, 0.1, 11, True, True, True)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        dy.copy_(torch.randn_like(dy))
        g.replay()
        torch.cuda.synchronize()
        y_e, xa_e = backend.fwd(x, w, b, a, bb, 0.5, 0.1, 11)
        got_e = backend.bwd(dy, x, w, a, bb, xa_e, 0.5, 0.1, 11, True, True, True)
        assert torch.equal(y, y_e) and torch.equal(xa, xa_e)
        for gg, ee in zip((dx, dA, dB), got_e):
            assert torch.equal(gg, ee)  # deterministic kernels: bitwise equal
