"""LoRA on mixture-of-experts layers: every row uses its own expert's weight and adapter.

    y[m] = x[m] W[e]^T + b[e] + s * (drop(x[m]) A[e]^T) B[e]^T,   e = expert_ids[m]

:func:`moe_lora_linear` is the functional op (fused_lora::moe_lora_linear_fwd / _bwd, Triton
kernels in kernels/moe_lora.py, reference in fused_lora.reference). The rows are grouped by
expert once per MoE layer and batch in a :class:`~fused_lora.routing.RoutingPlan`: pass the
plan to both projections of the layer (gate_up and down) and their backward reuses it.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from fused_lora import backends, ops, reference
from fused_lora.checks import check_moe_shapes, check_tensor
from fused_lora.functional import (
    _autocast,
    _check_bool,
    _check_scalar,
    _mode,
    _needs_differentiable,
    _rows,
    _unflatten,
    draw_seed,
)
from fused_lora.routing import RoutingPlan

__all__ = ["moe_lora_linear", "moe_routing_plan"]


def moe_routing_plan(expert_ids: Tensor, n_experts: int, *, validate: bool = True) -> RoutingPlan:
    """The routing plan of a batch's rows over ``n_experts`` experts (build it once per MoE layer
    and pass it to every projection of that layer). Id -1 routes a row to no expert (its output
    row is 0, e.g. a token dropped by expert capacity). Raises ValueError for ids outside
    [-1, n_experts) when validate (eager only: one host sync)."""
    return RoutingPlan.build(expert_ids, n_experts, validate=validate)


def moe_lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: Union[float, Tensor],
    expert_ids: Union[Tensor, RoutingPlan],
    *,
    bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    """MoE LoRA linear: ``y[m] = x[m] W[e]^T + b[e] + scale * (dropout(x[m]) A[e]^T) B[e]^T``.

    Args:
        x: (..., in_features) activations, fp16 / bf16 / fp32 (fp64 on backend="torch").
        weight: (E, out_features, in_features) frozen expert weights, x's dtype; any strides (a
            transposed view of an (E, in, out) tensor is read in place, never copied).
        lora_A: (E, r, in_features), x's dtype or fp32.
        lora_B: (E, out_features, r), lora_A's dtype.
        scale: the LoRA scaling s (lora_alpha / r); a tensor that requires grad gets its
            gradient (through the differentiable reference).
        expert_ids: a :class:`~fused_lora.routing.RoutingPlan` built over E experts (see
            :func:`moe_routing_plan`; build one per MoE layer and batch and pass it to both
            projections), or an integer tensor of x's leading shape with ids in [0, E) (-1: the
            row belongs to no expert and its output row is 0).
        bias: (E, out_features) or None, x's dtype.
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1) (the same elements
            are dropped by every backend for a given seed).
        training: dropout applies only when True.
        backend: "auto", "torch" or "triton".
        validate: with raw ids, check their range (one host sync; skipped under torch.compile).

    Returns:
        (..., out_features) in x's dtype. Gradients reach x, lora_A and lora_B (experts without
        rows get exact zeros), and weight / bias if they require grad.
    """
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., in_features], got a 0-d tensor")
    check_tensor("weight", weight)
    x, weight, bias, no_autocast = _autocast(x, weight, bias)
    validate = _check_bool("validate", validate)
    dropout_p = _check_scalar("dropout_p", dropout_p)
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    p = dropout_p if _check_bool("training", training) else 0.0
    check_moe_shapes(x, weight, bias, lora_A, lora_B, None, x_ndim=None)
    E, lead = weight.shape[0], tuple(x.shape[:-1])
    if isinstance(expert_ids, RoutingPlan):
        plan = expert_ids
        try:
            plan.check_for(lead, E, x.device)
        except ValueError as err:
            raise ValueError(str(err).replace("adapter_ids", "expert_ids").replace("n_slots", "E")) from None
    else:
        if not isinstance(expert_ids, Tensor):
            raise TypeError(
                f"expert_ids must be a torch.Tensor or a RoutingPlan, got {type(expert_ids).__name__}"
            )
        if expert_ids.is_floating_point() or expert_ids.dtype == torch.bool or expert_ids.is_complex():
            raise TypeError(f"expert_ids must be an integer tensor (int64 preferred), got {expert_ids.dtype}")
        if tuple(expert_ids.shape) != lead:
            raise ValueError(
                f"expert_ids must have x's leading shape {lead} (one expert per row), got "
                f"{tuple(expert_ids.shape)}"
            )
        if expert_ids.device != x.device:
            raise ValueError(f"expert_ids is on {expert_ids.device} but x is on {x.device}")
        try:
            plan = moe_routing_plan(expert_ids, E, validate=validate)
        except ValueError as err:
            raise ValueError(str(err).replace("adapter_ids", "expert_ids").replace("n_slots", "E")
                             .replace("no adapter", "no expert")) from None
    x2d = x.reshape(-1, x.shape[-1])
    scale_grad = isinstance(scale, Tensor) and scale.requires_grad
    if scale_grad or _needs_differentiable(x, weight, bias, lora_A, lora_B, scale):
        if isinstance(scale, Tensor) and scale.numel() != 1:
            raise ValueError(f"scale must be a number or a 1-element tensor, got shape {tuple(scale.shape)}")
        seed = int(draw_seed()) if p > 0.0 else 0
        s = scale.reshape(()) if isinstance(scale, Tensor) else scale
        with no_autocast:
            y = reference.moe_lora_linear(x2d, weight, bias, lora_A, lora_B, s, plan.ids, p, seed)
        return _unflatten(y, torch.Size(lead))
    scale = _check_scalar("scale", scale)
    impl = backends.select("moe_lora_linear", backend, x.device, x.dtype,
                           _mode(x, weight, bias, lora_A, lora_B), _rows(x))
    seed_t = draw_seed() if p > 0.0 else None
    with no_autocast:
        y, _ = ops.moe_lora_linear_fwd(x2d, weight, bias, lora_A, lora_B, scale, p, seed_t, plan.data, impl)
    return _unflatten(y, torch.Size(lead))
