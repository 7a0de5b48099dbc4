"""Functional API: argument handling, autocast, flattening, the backend choice, dropout seed.

The walk from ``backend=`` to a launch: :func:`lora_linear` -> :func:`fused_lora.backends.select`
(the one check and choice) -> :func:`fused_lora.ops.lora_linear_fwd` (schema, shape checks) ->
the registry entry (``backends/<backend>.py``) -> its launcher -> the kernel.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from fused_lora import backends, ops, reference, routing
from fused_lora.checks import check_lora_shapes, check_multi_shapes, check_tensor
from fused_lora.routing import RoutingPlan

__all__ = ["lora_linear", "multi_lora_linear", "draw_seed", "autocast_dtype"]


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


def _check_bool(name: str, v: object) -> bool:
    # bool("no") is True: a non-bool here is a caller's mistake, not a truth value.
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__} {v!r:.40}")
    return v


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


def _autocast(x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Under torch.autocast: x, weight and bias cast to the autocast dtype (adapters stay as they
    are, as F.linear would treat its inputs), and a context that turns autocast off around the
    op (the kernels choose their own precisions). Otherwise the inputs and a null context."""
    ac = autocast_dtype(x.device)
    if ac is None:
        return x, weight, bias, contextlib.nullcontext()
    bias = bias.to(ac) if isinstance(bias, Tensor) else bias
    return x.to(ac), weight.to(ac), bias, torch.autocast(x.device.type, enabled=False)


def _mode(*tensors: Optional[Tensor]) -> str:
    """"fwd+bwd" when autograd will run a backward through the op, else "fwd" (dispatch)."""
    grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)
    return "fwd+bwd" if grad else "fwd"


def _rows(x: Tensor) -> int:
    """Tokens in the call, for the measured dispatch table; 0 (unknown) under torch.compile: a
    backend choice must not specialize the graph on M (a symbolic size would also break the
    constant-folded backends.select), so compiled "auto" follows the fixed order."""
    if torch.compiler.is_compiling():
        return 0
    rows = 1
    for d in x.shape[:-1]:
        if not isinstance(d, int) or isinstance(d, torch.SymInt):
            return 0
        rows *= d
    return rows


def _needs_differentiable(*tensors: object) -> bool:
    """True when autograd features the custom ops do not have are in use: forward-mode AD (dual
    tensors), torch.func transforms, or a scale tensor that requires grad. Those calls run the
    differentiable reference instead (plain torch ops: every derivative exists)."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    for t in tensors:
        if isinstance(t, Tensor):
            if torch._C._functorch.is_functorch_wrapped_tensor(t):
                return True
            if torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
                return True
    return False


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
    scale: Union[float, Tensor],
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
        scale: the LoRA scaling s (lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA); a tensor
            that requires grad gets its gradient (through the differentiable reference).
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1).
        training: dropout applies only when True.
        backend: "auto", a backend ("triton", "cuda", "torch") or a registry entry such as
            "triton:inloop" or "cuda:wgmma256" (see :mod:`fused_lora.backends`).

    Returns:
        (..., out_features) in x's dtype. Under torch.autocast, x, weight and bias are cast to
        the autocast dtype first (adapters stay as they are), as F.linear would.

    Forward-mode AD, torch.func transforms and double backward are supported through the
    differentiable reference (plain torch ops; slower, same numbers).

    Equivalent PyTorch (fp32 accumulation)::

        xd = F.dropout(x, dropout_p, training)
        y = F.linear(x, weight, bias) + scale * F.linear(F.linear(xd, lora_A), lora_B)
    """
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., in_features], got a 0-d tensor")
    check_tensor("weight", weight)
    x, weight, bias, no_autocast = _autocast(x, weight, bias)
    dropout_p = _check_scalar("dropout_p", dropout_p)
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    p = dropout_p if _check_bool("training", training) else 0.0
    scale_grad = isinstance(scale, Tensor) and scale.requires_grad
    if scale_grad or _needs_differentiable(x, weight, bias, lora_A, lora_B, scale):
        check_lora_shapes(x, weight, bias, lora_A, lora_B, x_ndim=None)
        if isinstance(scale, Tensor) and scale.numel() != 1:
            raise ValueError(f"scale must be a number or a 1-element tensor, got shape {tuple(scale.shape)}")
        seed = int(draw_seed()) if p > 0.0 else 0
        with no_autocast:
            return reference.lora_linear(x, weight, bias, lora_A, lora_B, scale.reshape(()) if
                                         isinstance(scale, Tensor) else scale, p, seed)
    scale = _check_scalar("scale", scale)
    impl = backends.select("lora_linear", backend, x.device, x.dtype,
                           _mode(x, weight, bias, lora_A, lora_B), _rows(x))
    seed = draw_seed() if p > 0.0 else None
    lead = x.shape[:-1]
    with no_autocast:
        y, _ = ops.lora_linear_fwd(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scale, p, seed,
                                   impl)
    return _unflatten(y, lead)


# --------------------------------------------------------------------------------------------
# Mixed adapters: one adapter id per token
# --------------------------------------------------------------------------------------------


def multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scales: Tensor,
    adapter_ids: Union[Tensor, RoutingPlan],
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
        scales: (n_slots,) per-adapter scaling (e.g. alpha / r), used as float32; a tensor that
            requires grad gets its gradient (through the differentiable reference).
        adapter_ids: a :class:`~fused_lora.routing.RoutingPlan` built once for the batch (every
            layer reuses it, and the backward too), or an integer tensor of x's leading shape
            (one id per token in [-1, n_slots)), from which a plan is built on the spot.
        ranks: optional (n_slots,) integer true ranks in [0, r_max]; columns past a slot's rank
            are never read (they may hold anything, NaN included). None: every slot has r_max.
        backend: "auto", a backend or a registry entry such as "triton:decode".
        validate: with raw ids, check id / rank *values* (one host sync). Skipped automatically
            under torch.compile, CUDA-graph capture and on the meta device; unchecked
            out-of-range ids act as -1 (never an out-of-bounds access). A plan was checked when
            it was built.

    Returns:
        (..., out_features) in x's dtype. Gradients flow to x, lora_A and lora_B (only the
        slots present in the batch get non-zero gradient), and to weight / bias if they
        require grad.
    """
    check_tensor("x", x)
    check_tensor("weight", weight)
    x, weight, bias, no_autocast = _autocast(x, weight, bias)
    validate = _check_bool("validate", validate)
    check_multi_shapes(x, weight, bias, lora_A, lora_B, scales, ranks, None, x_ndim=None)
    n_slots, lead = lora_A.shape[0], tuple(x.shape[:-1])
    if isinstance(adapter_ids, RoutingPlan):
        plan = adapter_ids
        plan.check_for(lead, n_slots, x.device)
    else:
        if not isinstance(adapter_ids, Tensor):
            raise TypeError(
                f"adapter_ids must be a torch.Tensor or a RoutingPlan, got {type(adapter_ids).__name__}"
            )
        if tuple(adapter_ids.shape) != lead:
            raise ValueError(
                f"adapter_ids must have x's leading shape {lead} (one id per token), got "
                f"{tuple(adapter_ids.shape)}"
            )
        if adapter_ids.device != x.device:
            raise ValueError(f"adapter_ids is on {adapter_ids.device} but x is on {x.device}")
        plan = RoutingPlan.build(adapter_ids, n_slots, validate=validate)
        if validate and ranks is not None and ranks.numel() and routing._host_checks_allowed(ranks):
            lo, hi = (int(v) for v in torch.stack([ranks.min(), ranks.max()]).to(torch.int64).tolist())
            if lo < 0 or hi > lora_A.shape[1]:
                raise ValueError(f"ranks must be in [0, r_max={lora_A.shape[1]}], got values in [{lo}, {hi}]")
    rk = ranks.to(torch.int64) if ranks is not None else None
    if (isinstance(scales, Tensor) and scales.requires_grad) or _needs_differentiable(
            x, weight, bias, lora_A, lora_B, scales):
        with no_autocast:
            y = reference.multi_lora_linear_differentiable(
                x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scales, plan.ids, rk)
        return _unflatten(y, torch.Size(lead))
    impl = backends.select("multi_lora_linear", backend, x.device, x.dtype,
                           _mode(x, weight, bias, lora_A, lora_B), _rows(x))
    with no_autocast:
        y, _ = ops.multi_lora_linear_fwd(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B,
                                         scales.to(torch.float32), rk, plan.data, impl)
    return _unflatten(y, torch.Size(lead))
