"""Functional API: argument checking, autocast, flattening, backend resolution, dropout seed."""

from __future__ import annotations

import contextlib
import numbers
from typing import Optional

import torch
from torch import Tensor

from fused_lora import dispatch, ops

__all__ = ["lora_linear", "check_lora_args", "multi_lora_linear", "check_multi_lora_args"]

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


def _check_devices_dtypes(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
    others: Optional[dict[str, Optional[Tensor]]] = None,
) -> None:
    """One device for every tensor; weight/bias in x's dtype; adapters in x's dtype or fp32."""
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B,
               **(others or {})}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
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
    _check_devices_dtypes(x, weight, bias, lora_A, lora_B)
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _unflatten(y: Tensor, lead: torch.Size) -> Tensor:
    """[M, N] kernel output -> [..., N] without making it an autograd *view* (as F.linear does
    with aten::_unsafe_view): FSDP2 and in-place ops downstream must not see a view of an
    intermediate (FSDP2 warns that an in-place op on such a view drops its pre-backward hook)."""
    if len(lead) == 1:
        return y
    return torch.ops.aten._unsafe_view(y.contiguous(), (*lead, y.shape[-1]))


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``device``, or None."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _mode(*tensors: Optional[Tensor]) -> str:
    """"fwd+bwd" when autograd will run a backward through the op, else "fwd" (dispatch)."""
    grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)
    return "fwd+bwd" if grad else "fwd"


def _rows(x: Tensor) -> int:
    """Tokens in the call, for the dispatch table; 0 (unknown) for a symbolic size under
    torch.compile with dynamic shapes, which must not be specialized on for a backend choice."""
    rows = 1
    for d in x.shape[:-1]:
        if not isinstance(d, int):
            return 0
        rows *= d
    return rows


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
    be = dispatch.resolve(backend, x.device, "lora_linear", _mode(x, weight, bias, lora_A, lora_B),
                          _rows(x), x.dtype)
    if be != "torch" and x.dtype not in _KERNEL_FLOATS:
        raise TypeError(f"x dtype {x.dtype} is only supported by backend='torch'")
    p = dropout_p if training else 0.0
    seed = draw_seed() if p > 0.0 else None
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    with torch.autocast(x.device.type, enabled=False) if ac is not None else contextlib.nullcontext():
        y, _ = ops.lora_linear_fwd(x2d, weight, bias, lora_A, lora_B, scale, p, seed, be)
    return _unflatten(y, lead)


# --------------------------------------------------------------------------------------------
# Mixed adapters: one adapter id per token
# --------------------------------------------------------------------------------------------

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _value_checks_allowed(device: torch.device) -> bool:
    """Checks on tensor *values* need a device-to-host copy: skipped under torch.compile
    tracing and CUDA-graph capture (the kernels then treat bad ids as -1 instead)."""
    if torch.compiler.is_compiling():
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_multi_lora_args(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scales: Tensor,
    adapter_ids: Tensor,
    ranks: Optional[Tensor],
    check_values: bool = True,
) -> None:
    """Raise TypeError / ValueError naming the offending argument. Shapes, dtypes and devices
    always; with ``check_values`` also the id and rank ranges (a host sync)."""
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., in_features], got a 0-d tensor")
    _check_tensor("weight", weight, 2)
    _check_tensor("lora_A", lora_A, 3)
    _check_tensor("lora_B", lora_B, 3)
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(
            f"x's last dim ({x.shape[-1]}) must equal weight's in_features (weight is {tuple(weight.shape)})"
        )
    n_slots, r_max = lora_A.shape[0], lora_A.shape[1]
    if n_slots < 1:
        raise ValueError(
            f"lora_A must hold at least one slot [n_slots, r_max, in], got {tuple(lora_A.shape)}"
        )
    if r_max < 1:
        raise ValueError(f"max rank r_max must be >= 1, got lora_A of shape {tuple(lora_A.shape)}")
    if lora_A.shape[2] != in_f:
        raise ValueError(
            f"lora_A must be [n_slots, r_max, in_features={in_f}], got {tuple(lora_A.shape)}"
        )
    if tuple(lora_B.shape) != (n_slots, out_f, r_max):
        raise ValueError(
            f"lora_B must be [n_slots={n_slots}, out_features={out_f}, r_max={r_max}], "
            f"got {tuple(lora_B.shape)}"
        )
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != out_f:
            raise ValueError(f"bias must be [out_features={out_f}], got {tuple(bias.shape)}")
    if not isinstance(scales, Tensor):
        raise TypeError(f"scales must be a torch.Tensor [n_slots], got {type(scales).__name__}")
    if not scales.is_floating_point():
        raise TypeError(f"scales must be a floating tensor (float32), got {scales.dtype}")
    if tuple(scales.shape) != (n_slots,):
        raise ValueError(f"scales must be [n_slots={n_slots}], got {tuple(scales.shape)}")
    if not isinstance(adapter_ids, Tensor):
        raise TypeError(f"adapter_ids must be a torch.Tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype not in _INT_DTYPES:
        raise TypeError(f"adapter_ids must be an integer tensor (int64 preferred), got {adapter_ids.dtype}")
    if tuple(adapter_ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"adapter_ids must have x's leading shape {tuple(x.shape[:-1])} (one id per token), "
            f"got {tuple(adapter_ids.shape)}"
        )
    if ranks is not None:
        if not isinstance(ranks, Tensor):
            raise TypeError(f"ranks must be a torch.Tensor [n_slots] or None, got {type(ranks).__name__}")
        if ranks.dtype not in _INT_DTYPES:
            raise TypeError(f"ranks must be an integer tensor, got {ranks.dtype}")
        if tuple(ranks.shape) != (n_slots,):
            raise ValueError(f"ranks must be [n_slots={n_slots}], got {tuple(ranks.shape)}")
    _check_devices_dtypes(x, weight, bias, lora_A, lora_B,
                          {"scales": scales, "adapter_ids": adapter_ids, "ranks": ranks})
    if check_values:
        ids64 = adapter_ids.to(torch.int64)  # int8 ids vs n_slots > 127 must not overflow
        bad = (ids64 < -1) | (ids64 >= n_slots)
        if bool(bad.any()):
            v = int(ids64[bad].flatten()[0])
            raise ValueError(
                f"adapter_ids must be in [-1, n_slots={n_slots}) (-1 = no adapter), got {v}"
            )
        if ranks is not None and ranks.numel():
            lo, hi = int(ranks.min()), int(ranks.max())
            if lo < 0 or hi > r_max:
                raise ValueError(f"ranks must be in [0, r_max={r_max}], got values in [{lo}, {hi}]")


def multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scales: Tensor,
    adapter_ids: Tensor,
    *,
    ranks: Optional[Tensor] = None,
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    """Mixed-adapter LoRA linear: every token uses its own adapter from a stacked bank.

    ``y[t] = x[t] W0^T + b + scales[i] (x[t] A[i, :r_i]^T) B[i, :, :r_i]^T`` with
    ``i = adapter_ids[t]``; ``y[t] = x[t] W0^T + b`` when ``i == -1``.

    Args:
        x: (..., in_features) activations, fp16 / bf16 / fp32 (fp64 on backend="torch").
        weight: (out_features, in_features) frozen base weight, x's dtype.
        bias: (out_features,) or None, x's dtype.
        lora_A: (n_slots, r_max, in_features), x's dtype or fp32.
        lora_B: (n_slots, out_features, r_max), lora_A's dtype.
        scales: (n_slots,) per-adapter scaling (e.g. alpha / r), used as float32; not trained.
        adapter_ids: integer tensor of x's leading shape, one id per token in [-1, n_slots).
        ranks: optional (n_slots,) integer true ranks in [0, r_max]; columns past a slot's rank
            are never read (they may hold anything, NaN included). None: every slot has r_max.
        backend: "auto", "triton", "cuda" or "torch" (see :mod:`fused_lora.dispatch`).
        validate: check id / rank *values* (one host sync). Skipped automatically under
            torch.compile and CUDA-graph capture; unchecked out-of-range ids act as -1 (never
            an out-of-bounds access).

    Returns:
        (..., out_features) in x's dtype. Gradients flow to x, lora_A and lora_B (only the
        slots present in the batch get non-zero gradient), and to weight / bias if they
        require grad.
    """
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    ac = autocast_dtype(x.device)
    if ac is not None:
        x, weight = x.to(ac), weight.to(ac)
        bias = bias.to(ac) if isinstance(bias, Tensor) else bias
    check_multi_lora_args(
        x, weight, bias, lora_A, lora_B, scales, adapter_ids, ranks,
        check_values=bool(validate) and _value_checks_allowed(x.device),
    )
    be = dispatch.resolve(backend, x.device, "multi_lora_linear",
                          _mode(x, weight, bias, lora_A, lora_B), _rows(x), x.dtype)
    if be != "torch" and x.dtype not in _KERNEL_FLOATS:
        raise TypeError(f"x dtype {x.dtype} is only supported by backend='torch'")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    ids = adapter_ids.reshape(-1).to(torch.int64)
    rk = ranks.to(torch.int64) if ranks is not None else None
    sc = scales.to(torch.float32)
    with torch.autocast(x.device.type, enabled=False) if ac is not None else contextlib.nullcontext():
        y, _ = ops.multi_lora_linear_fwd(x2d, weight, bias, lora_A, lora_B, sc, ids, rk, be)
    return _unflatten(y, lead)
