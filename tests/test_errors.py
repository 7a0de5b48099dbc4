"""Bad input gets a clear TypeError / ValueError naming the argument -- never a crash, a hang
or silently wrong output."""

from __future__ import annotations

import pytest
import torch

import fused_lora


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


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from fused_lora import backends
    from fused_lora.kernels import lora_linear as L

    monkeypatch.setattr(L, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        backends.select("lora_linear", "triton", torch.device("cpu"), torch.float32)


def test_fp64_needs_torch_backend():
    d = torch.float64
    a = _ok(x=torch.randn(5, 8, dtype=d), weight=torch.randn(6, 8, dtype=d), bias=None,
            lora_A=torch.randn(2, 8, dtype=d), lora_B=torch.randn(6, 2, dtype=d))
    y = fused_lora.lora_linear(a["x"], a["weight"], None, a["lora_A"], a["lora_B"], 1.0, backend="torch")
    assert y.dtype == d
    with pytest.raises(TypeError, match="only supported by backend='torch'"):
        fused_lora.lora_linear(a["x"], a["weight"], None, a["lora_A"], a["lora_B"], 1.0,
                               backend="triton")
