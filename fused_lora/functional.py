"""Functional API: argument checking, autocast, flattening, backend resolution, dropout seed."""

from __future__ import annotations

import contextlib
import numbers
from typing import Optional

import torch
from torch import Tensor

from fused_lora import dispatch, ops

__all__ = ["lora_linear", "check_lora_args"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# fp64 runs on the torch reference only (gradcheck); the kernels take fp16/bf16/fp32.
_KERNEL_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check_tensor(name: str, t: object, ndim: Optional[int] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _check_scalar(name: str, v: object) -> float:
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_lora_args(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    dropout_p: float,
) -> None:
    """Raise TypeError / ValueError naming the offending argument for any inconsistent input."""
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., in_features], got a 0-d tensor")
    _check_tensor("weight", weight, 2)
    _check_tensor("lora_A", lora_A, 2)
    _check_tensor("lora_B", lora_B, 2)
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(
            f"x's last dim ({x.shape[-1]}) must equal weight's in_features (weight is {tuple(weight.shape)})"
        )
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"rank r must be >= 1, got lora_A of shape {tuple(lora_A.shape)}")
    if lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A must be [r, in_features={in_f}], got {tuple(lora_A.shape)}")
    if lora_B.shape[1] != r:
        raise ValueError(
            f"lora_B's rank ({lora_B.shape[1]}) must match lora_A's rank ({r}); lora_B must be [out, r]"
        )
    if lora_B.shape[0] != out_f:
        raise ValueError(f"lora_B must be [out_features={out_f}, r], got {tuple(lora_B.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != out_f:
            raise ValueError(f"bias must be [out_features={out_f}], got {tuple(bias.shape)}")
    tensors = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all must share a device")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype ({weight.dtype}) must match x dtype ({x.dtype})")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias dtype ({bias.dtype}) must match x dtype ({x.dtype})")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B dtype ({lora_B.dtype}) must match lora_A dtype ({lora_A.dtype})")
    if lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"lora_A/lora_B dtype ({lora_A.dtype}) must be x's dtype ({x.dtype}) or float32"
        )
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``device``, or None."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def draw_seed() -> Tensor:
    """A dropout seed in [0, 2^62) from torch's CPU generator (so torch.manual_seed and
    activation checkpointing, which saves and restores the CPU RNG state, reproduce it)."""
    return torch.randint(0, 1 << 62, (), dtype=torch.int64)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    *,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Fused LoRA linear: ``y = x W0^T + b + scale * (dropout(x) A^T) B^T``.

    Args:
        x: (..., in_features) activations, fp16 / bf16 / fp32 (fp64 on backend="torch").
        weight: (out_features, in_features) frozen base weight W0, x's dtype.
        bias: (out_features,) or None, x's dtype.
        lora_A: (r, in_features), x's dtype or fp32 (PEFT keeps adapters in fp32).
        lora_B: (out_features, r), lora_A's dtype.
        scale: the LoRA scaling s (lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA).
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1).
        training: dropout applies only when True.
        backend: "auto", "triton", "cuda" or "torch" (see :mod:`fused_lora.dispatch`).

    Returns:
        (..., out_features) in x's dtype. Under torch.autocast, x, weight and bias are cast to
        the autocast dtype first (adapters stay as they are), as F.linear would.

    Equivalent PyTorch (fp32 accumulation)::

        xd = F.dropout(x, dropout_p, training)
        y = F.linear(x, weight, bias) + scale * F.linear(F.linear(xd, lora_A), lora_B)
    """
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    ac = autocast_dtype(x.device)
    if ac is not None:
        x, weight = x.to(ac), weight.to(ac)
        bias = bias.to(ac) if isinstance(bias, Tensor) else bias
    dropout_p = _check_scalar("dropout_p", dropout_p)
    scale = _check_scalar("scale", scale)
    check_lora_args(x, weight, bias, lora_A, lora_B, dropout_p)
    be = dispatch.resolve(backend, x.device, "lora_linear")
    if be != "torch" and x.dtype not in _KERNEL_FLOATS:
        raise TypeError(f"x dtype {x.dtype} is only supported by backend='torch'")
    p = dropout_p if training else 0.0
    seed = draw_seed() if p > 0.0 else None
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    with torch.autocast(x.device.type, enabled=False) if ac is not None else contextlib.nullcontext():
        y, _ = ops.lora_linear_fwd(x2d, weight, bias, lora_A, lora_B, scale, p, seed, be)
    return y.reshape(*lead, weight.shape[0])

