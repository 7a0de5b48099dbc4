"""Bad and edge-case inputs at the op and functional level (issue 14): each class fails on the
code before the fix and passes after it.

Silently wrong before: strided 1-D bias/scales/ranks in Triton, ranks past 2**31, raw ops with
mismatched shapes, forward-mode AD, scale tensors that require grad, non-bool `training`, bf16
under the Triton interpreter. Unclear before: meta-device mixed-adapter ops, double backward and
torch.func.grad."""

from __future__ import annotations

import pytest
import torch
from _utils import INTERPRET, TRITON_DEVICE

import fused_lora
from fused_lora import reference as ref
from fused_lora.routing import RoutingPlan

triton_ok = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs Triton")


def _single(M=9, K=24, N=20, R=4, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g, dtype=dtype).to(device)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).to(device)
    b = torch.randn(N, generator=g, dtype=dtype).to(device)
    A = (torch.randn(R, K, generator=g) / K**0.5).to(dtype).to(device)
    B = torch.randn(N, R, generator=g, dtype=dtype).to(device)
    return x, w, b, A, B


def _multi(M=11, K=24, N=20, R=4, S=3, device="cpu"):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(M, K, generator=g).to(device)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(device)
    b = torch.randn(N, generator=g).to(device)
    A = (torch.randn(S, R, K, generator=g) / K**0.5).to(device)
    B = torch.randn(S, N, R, generator=g).to(device)
    scales = torch.rand(S, generator=g).to(device) + 0.5
    ids = torch.randint(-1, S, (M,), generator=g).to(device)
    ranks = torch.tensor([4, 2, 3]).to(device)
    return x, w, b, A, B, scales, ids, ranks


# ----------------------------------------------------------------------------- strided 1-D inputs


@triton_ok
@pytest.mark.interpreter
def test_triton_strided_bias_single():
    x, w, b, A, B = _single(device=TRITON_DEVICE)
    wide = torch.randn(2 * b.shape[0], device=b.device)
    wide[::2] = b
    y = fused_lora.lora_linear(x, w, wide[::2], A, B, 0.5, backend="triton")
    torch.testing.assert_close(y, ref.lora_linear(x, w, b, A, B, 0.5), rtol=1e-4, atol=1e-4)


@triton_ok
@pytest.mark.interpreter
@pytest.mark.parametrize("which", ["bias", "scales", "ranks"])
@pytest.mark.parametrize("backend", ["triton:decode", "triton:prefill"])
def test_triton_strided_1d_multi(which, backend):
    x, w, b, A, B, scales, ids, ranks = _multi(device=TRITON_DEVICE)
    want = ref.multi_lora_linear(x, w, b, A, B, scales, ids, ranks)
    args = dict(bias=b, scales=scales, ranks=ranks)
    t = args[which]
    fill = 7 if t.dtype == torch.int64 else 3.0  # garbage between the strided elements
    wide = torch.zeros(2 * t.shape[0], dtype=t.dtype, device=t.device) + fill
    wide[::2] = t
    args[which] = wide[::2]
    assert not args[which].is_contiguous()
    y = fused_lora.multi_lora_linear(x, w, args["bias"], A, B, args["scales"], ids, ranks=args["ranks"],
                                     backend=backend)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


@triton_ok
@pytest.mark.interpreter
def test_triton_ranks_past_int32_clamp_not_wrap():
    """ranks = 2**32 + 1 with validate=False must clamp to r_max, not wrap to 1 in int32."""
    x, w, b, A, B, scales, ids, ranks = _multi(device=TRITON_DEVICE)
    big = torch.full_like(ranks, (1 << 32) + 1)
    y = fused_lora.multi_lora_linear(x, w, b, A, B, scales, ids, ranks=big, backend="triton", validate=False)
    want = ref.multi_lora_linear(x, w, b, A, B, scales, ids, torch.full_like(ranks, A.shape[1]))
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- raw ops


@pytest.mark.parametrize("impl", ["torch",
                                  pytest.param("triton", marks=[triton_ok, pytest.mark.interpreter])])
def test_raw_ops_check_the_shapes_they_rely_on(impl):
    dev = TRITON_DEVICE if impl == "triton" else "cpu"
    x, w, b, A, B = _single(device=dev)
    op = torch.ops.fused_lora.lora_linear_fwd
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
    xm, wm, bm, Am, Bm, sc, ids, rk = _multi(device=dev)
    plan = RoutingPlan.build(ids, Am.shape[0]).data
    mop = torch.ops.fused_lora.multi_lora_linear_fwd
    with pytest.raises(ValueError, match="scales must be"):
        mop(xm, wm, bm, Am, Bm, sc[:-1], rk, plan, impl)
    with pytest.raises(ValueError, match="plan must be"):
        mop(xm[:-1], wm, bm, Am, Bm, sc, rk, plan, impl)  # a plan for another batch size
    with pytest.raises(ValueError, match="lora_B must be"):
        mop(xm, wm, bm, Am, Bm[:, :-1], sc, rk, plan, impl)


# ----------------------------------------------------------------------------- autograd features


def test_forward_mode_ad_gives_the_tangent():
    import torch.autograd.forward_ad as fwAD

    x, w, b, A, B = _single(dtype=torch.float64)
    tx = torch.randn_like(x)
    with fwAD.dual_level():
        y = fused_lora.lora_linear(fwAD.make_dual(x, tx), w, b, A, B, 0.5, backend="auto")
        tangent = fwAD.unpack_dual(y).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, tx @ w.t() + 0.5 * (tx @ A.t()) @ B.t())
    xm, wm, bm, Am, Bm, sc, ids, rk = _multi()
    xm, wm, bm, Am, Bm, sc = (t.double() for t in (xm, wm, bm, Am, Bm, sc))
    tA = torch.randn_like(Am)
    with fwAD.dual_level():
        y = fused_lora.multi_lora_linear(xm, wm, bm, fwAD.make_dual(Am, tA), Bm, sc, ids, ranks=rk)
        tangent = fwAD.unpack_dual(y).tangent
    assert tangent is not None and tangent.abs().sum() > 0


def test_double_backward_and_torch_func_grad():
    x, w, b, A, B = (t.double() for t in _single())
    x.requires_grad_(True)
    A.requires_grad_(True)

    def f(x_, A_):
        return fused_lora.lora_linear(x_, w, b, A_, B, 0.5, backend="torch")

    torch.autograd.gradgradcheck(f, (x, A))
    gx = torch.func.grad(lambda x_: f(x_, A).square().sum())(x)
    want = torch.autograd.grad(ref.lora_linear(x, w, b, A, B, 0.5).square().sum(), x)[0]
    torch.testing.assert_close(gx, want)
    xm, wm, bm, Am, Bm, sc, ids, rk = (t.double() if t.is_floating_point() else t for t in _multi())
    Am.requires_grad_(True)
    def fm(A_):
        return fused_lora.multi_lora_linear(xm, wm, bm, A_, Bm, sc, ids, ranks=rk, backend="torch")

    torch.autograd.gradgradcheck(fm, (Am,))


def test_scale_tensors_that_require_grad_get_their_gradient():
    x, w, b, A, B = (t.double() for t in _single())
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    fused_lora.lora_linear(x, w, b, A, B, s).sum().backward()
    assert s.grad is not None
    torch.testing.assert_close(s.grad, ((x @ A.t()) @ B.t()).sum())
    xm, wm, bm, Am, Bm, sc, ids, rk = _multi()
    sc = sc.clone().requires_grad_(True)
    fused_lora.multi_lora_linear(xm, wm, bm, Am, Bm, sc, ids, ranks=rk).sum().backward()
    assert sc.grad is not None and sc.grad.abs().sum() > 0


def test_training_must_be_a_bool():
    x, w, b, A, B = _single()
    with pytest.raises(TypeError, match="training must be a bool"):
        fused_lora.lora_linear(x, w, b, A, B, 1.0, dropout_p=0.5, training="no")
    xm, wm, bm, Am, Bm, sc, ids, rk = _multi()
    with pytest.raises(TypeError, match="validate must be a bool"):
        fused_lora.multi_lora_linear(xm, wm, bm, Am, Bm, sc, ids, validate="yes")


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's limit")
def test_bf16_under_the_interpreter_is_refused():
    x, w, b, A, B = _single(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 arithmetic is wrong under the Triton interpreter"):
        fused_lora.lora_linear(x, w, b, A, B, 1.0, backend="triton")
    # "auto" never picks it on CPU.
    y = fused_lora.lora_linear(x, w, b, A, B, 1.0, backend="auto")
    assert y.dtype == torch.bfloat16


def test_meta_device_mixed_adapter_ops_and_bank():
    x, w, b, A, B, sc, ids, rk = (t.to("meta") for t in _multi())
    y = fused_lora.multi_lora_linear(x, w, b, A, B, sc, ids, ranks=rk)
    assert y.device.type == "meta" and y.shape == (x.shape[0], w.shape[0])
    base = torch.nn.Linear(24, 20, device="meta")  # how large models are built before loading
    bank = fused_lora.MultiLoRALinear(base, n_slots=3, max_rank=4)
    assert bank(x, ids).shape == (x.shape[0], 20)
