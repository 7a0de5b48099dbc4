"""The custom ops themselves: opcheck (schema, fake/meta impl, autograd registration, AOT
dispatch), torch.compile(fullgraph=True) and the fake impls' shapes."""

from __future__ import annotations

import pytest
import torch
from _utils import TRITON_DEVICE

import fused_lora
from fused_lora import ops

BACKENDS = [("torch", "cpu"), ("triton", TRITON_DEVICE)]


def _args(device, dtype=torch.float32, M=13, K=20, N=18, R=4, bias=True):
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    b = torch.randn(N, device=device, dtype=dtype) if bias else None
    a = torch.randn(R, K, device=device, dtype=dtype) / K**0.5
    bb = torch.randn(N, R, device=device, dtype=dtype)
    return x, w, b, a, bb


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_lora_linear_fwd(backend, device, dropout, bias):
    x, w, b, a, bb = _args(device, bias=bias)
    for t in (x, a, bb):
        t.requires_grad_(True)
    seed = torch.tensor(7) if dropout else None
    torch.library.opcheck(ops.lora_linear_fwd, (x, w, b, a, bb, 0.5, dropout, seed, backend))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("needs", [(True, True, True), (False, True, True), (True, False, False)])
def test_opcheck_lora_linear_bwd(backend, device, needs):
    x, w, b, a, bb = _args(device)
    y, xa = ops.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.2, torch.tensor(3), backend)
    dy = torch.randn_like(y)
    torch.library.opcheck(
        ops.lora_linear_bwd, (dy, x, w, a, bb, xa, 0.5, 0.2, torch.tensor(3), *needs, backend)
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_compile_fullgraph_train_step(backend, device):
    torch._dynamo.reset()
    layer = fused_lora.FusedLoRALinear(20, 18, r=4, lora_dropout=0.1, backend=backend, device=device)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 20, device=device)

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


def test_compile_inductor_cpu_torch_backend():
    torch._dynamo.reset()
    x, w, b, a, bb = _args("cpu")
    f = torch.compile(lambda x_: fused_lora.lora_linear(x_, w, b, a, bb, 0.5, backend="torch"),
                      fullgraph=True)
    torch.testing.assert_close(f(x), fused_lora.lora_linear(x, w, b, a, bb, 0.5, backend="torch"))


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
