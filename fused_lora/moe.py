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


# --------------------------------------------------------------------------------------------
# MoELoRAExperts: transformers' fused experts module (Qwen3-MoE, Mixtral, ...) with LoRA
# --------------------------------------------------------------------------------------------

_PROJS = ("gate_up_proj", "down_proj")


class MoELoRAExperts(torch.nn.Module):
    """A drop-in replacement of transformers 5's fused experts module (``Qwen3MoeExperts``,
    ``MixtralExperts``: ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], each applied as
    ``F.linear(x, W[e])``) with a LoRA adapter per expert on the targeted projections.

    forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H], as the
    original: every (token, choice) pair is one row routed to its expert; gate_up with LoRA,
    ``act(gate) * up``, down with LoRA, rows weighted by their routing weight and summed per
    token. One routing plan per call is shared by both projections and their backward. Ids
    equal to E (transformers' padding expert) contribute nothing, as in the original.

    The base weights are the original module's parameters (same names: state dicts load as
    before), frozen. LoRA: ``lora_A_<proj>`` [E, r, in] (kaiming-uniform, as PEFT),
    ``lora_B_<proj>`` [E, out, r] (zeros: at creation outputs equal the original module's).
    A projection that is not targeted runs the same op with a frozen rank-1 zero adapter (a
    buffer): 1/in of the projection's extra work, one code path."""

    def __init__(self, base: torch.nn.Module, *, r: int, lora_alpha: float, targets=_PROJS,
                 dropout: float = 0.0, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        targets = tuple(targets)
        for t in targets:
            if t not in _PROJS:
                raise ValueError(f"targets must be among {_PROJS}, got {t!r}")
        for p in _PROJS:
            w = getattr(base, p, None)
            if not isinstance(w, Tensor) or w.dim() != 3:
                raise TypeError(f"base must have a 3-D {p} parameter [E, out, in] (transformers' fused "
                                f"experts), got {type(base).__name__}")
        if getattr(base, "is_transposed", False):
            raise ValueError("base stores transposed experts (is_transposed=True): not supported yet")
        self.num_experts = base.gate_up_proj.shape[0]
        self.act_fn = base.act_fn
        self.r, self.lora_alpha, self.scaling = r, float(lora_alpha), float(lora_alpha) / r
        self.dropout, self.targets = float(dropout), targets
        self.backend = backends.check_name("moe_lora_linear", backend)
        for p in _PROJS:
            w = getattr(base, p)
            w.requires_grad_(False)
            self.register_parameter(p, w if isinstance(w, torch.nn.Parameter)
                                    else torch.nn.Parameter(w, requires_grad=False))
            E, out_f, in_f = w.shape
            if p in targets:
                a = torch.empty(E, r, in_f, dtype=w.dtype, device=w.device)
                for e in range(E):
                    torch.nn.init.kaiming_uniform_(a[e], a=5 ** 0.5)
                self.register_parameter(f"lora_A_{p}", torch.nn.Parameter(a))
                self.register_parameter(f"lora_B_{p}", torch.nn.Parameter(
                    torch.zeros(E, out_f, r, dtype=w.dtype, device=w.device)))
            else:
                self.register_buffer(f"lora_A_{p}", torch.zeros(E, 1, in_f, dtype=w.dtype, device=w.device))
                self.register_buffer(f"lora_B_{p}", torch.zeros(E, out_f, 1, dtype=w.dtype, device=w.device))

    def _proj(self, name: str, x: Tensor, plan: RoutingPlan) -> Tensor:
        return moe_lora_linear(x, getattr(self, name), getattr(self, f"lora_A_{name}"),
                               getattr(self, f"lora_B_{name}"), self.scaling, plan,
                               dropout_p=self.dropout if name in self.targets else 0.0,
                               training=self.training, backend=self.backend)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        T, k = top_k_index.shape
        E = self.num_experts
        ids = top_k_index.reshape(-1).to(torch.int64)
        ids = torch.where(ids < E, ids, -1)  # expert E: transformers' padding slot, skipped
        tok = torch.arange(T, device=hidden_states.device).repeat_interleave(k)  # row j = (j // k, j % k)
        plan = moe_routing_plan(ids, E)  # one plan: both projections and the backward
        x = hidden_states[tok]
        gate, up = self._proj("gate_up_proj", x, plan).chunk(2, dim=-1)
        h = self._proj("down_proj", self.act_fn(gate) * up, plan)
        h = h * top_k_weights.reshape(-1, 1)
        out = torch.zeros_like(hidden_states)
        return out.index_add_(0, tok, h.to(out.dtype))


def inject_moe_lora(model: torch.nn.Module, target_parameters=("mlp.experts.gate_up_proj",
                    "mlp.experts.down_proj"), *, r: int = 8, lora_alpha: float = 16.0,
                    dropout: float = 0.0, backend: str = "auto") -> list[str]:
    """Replace every fused experts module of ``model`` whose parameter matches one of
    ``target_parameters`` (PEFT's ``target_parameters`` naming: a suffix of the parameter's full
    name, e.g. "mlp.experts.gate_up_proj") by a :class:`MoELoRAExperts` with LoRA on the matched
    projections. Freezes nothing else. Returns the replaced modules' names (ValueError when
    nothing matched)."""
    targets: dict[str, list[str]] = {}
    for pname, _ in model.named_parameters():
        mod, _, leaf = pname.rpartition(".")
        if leaf in _PROJS and any(pname == t or pname.endswith("." + t) for t in target_parameters):
            targets.setdefault(mod, []).append(leaf)
    if not targets:
        raise ValueError(f"target_parameters {list(target_parameters)} matched no fused experts parameter "
                         "(expected names ending in gate_up_proj / down_proj)")
    for mod, leaves in targets.items():
        parent_name, _, child = mod.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, MoELoRAExperts(base, r=r, lora_alpha=lora_alpha, targets=leaves,
                                              dropout=dropout, backend=backend))
    return sorted(targets)


__all__ += ["MoELoRAExperts", "inject_moe_lora"]
