"""LoRA on mixture-of-experts layers: every row uses its own expert's weight and adapter.

    y[m] = x[m] W[e]^T + b[e] + s * (drop(x[m]) A[e]^T) B[e]^T,   e = expert_ids[m]

:func:`moe_lora_linear` is the functional op (fused_lora::moe_lora_linear_fwd / _bwd, Triton
kernels in kernels/moe_lora.py, reference in fused_lora.reference). The rows are grouped by
expert once per MoE layer and batch in a :class:`~fused_lora.routing.RoutingPlan`: pass the
plan to both projections of the layer (gate_up and down) and their backward reuses it.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Union

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


def _per_proj(name: str, v, targets: tuple, check) -> dict:
    """``v`` (one value, or a mapping {projection: value}) as {projection: value} over targets."""
    if isinstance(v, Mapping):
        bad = [k for k in v if k not in _PROJS]
        if bad:
            raise ValueError(f"{name} keys must be among {_PROJS}, got {bad[0]!r}")
        out = {t: v[t] for t in targets if t in v}
        missing = [t for t in targets if t not in out]
        if missing:
            raise ValueError(f"{name} has no value for targeted projection {missing[0]!r}")
    else:
        out = {t: v for t in targets}
    for t, x in out.items():
        check(t, x)
    return out


def _check_r(t: str, r) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}" + (f" for {t}" if t else ""))


def _check_alpha(t: str, a) -> None:
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
        raise ValueError(f"lora_alpha must be a finite number, got {a!r}" + (f" for {t}" if t else ""))


def fused_experts_reason(base: object) -> str:
    """Why ``base`` is not a transformers fused experts module that :class:`MoELoRAExperts`
    can take ('' when it is)."""
    if not isinstance(base, torch.nn.Module):
        return f"expected an nn.Module, got {type(base).__name__}"
    for p in _PROJS:
        w = getattr(base, p, None)
        if not isinstance(w, Tensor) or w.dim() != 3:
            return (f"{type(base).__name__} has no 3-D {p} parameter [E, out, in] (transformers' fused "
                    "experts)")
    if getattr(base, "has_gate", True) is not True:
        return f"{type(base).__name__} has no gate (has_gate=False): not supported"
    if getattr(base, "has_post_expert_norm", False):
        return f"{type(base).__name__} has a post-expert norm (has_post_expert_norm=True): not supported"
    if getattr(base, "is_transposed", False):
        return f"{type(base).__name__} stores transposed experts (is_transposed=True): not supported yet"
    return ""


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
    ``lora_B_<proj>`` [E, out, r] (zeros: at creation outputs equal the original module's);
    PEFT's ``target_parameters`` layout is the same adapter (see
    :mod:`fused_lora.integrations.moe_io`). A projection that is not targeted runs the same op
    with a frozen rank-1 zero adapter (a buffer): 1/in of the projection's extra work, one code
    path.

    Args:
        base: the fused experts module.
        r, lora_alpha: rank and alpha, one value or {projection: value} (e.g. a PEFT
            rank_pattern); scaling lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).
        targets: the projections that get LoRA.
        dropout: LoRA dropout on the experts' inputs (PEFT refuses it on target_parameters).
        backend: kernel backend of :func:`moe_lora_linear`.
        adapter_dtype: dtype of the LoRA weights (default: the base weights').
    """

    def __init__(self, base: torch.nn.Module, *, r, lora_alpha, targets=_PROJS,
                 dropout: float = 0.0, use_rslora: bool = False, backend: str = "auto",
                 adapter_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        targets = tuple(targets)
        for t in targets:
            if t not in _PROJS:
                raise ValueError(f"targets must be among {_PROJS}, got {t!r}")
        why = fused_experts_reason(base)
        if why:
            raise TypeError(f"base must be a transformers fused experts module: {why}")
        ranks = _per_proj("r", r, targets, _check_r)
        alphas = _per_proj("lora_alpha", lora_alpha, targets, _check_alpha)
        if not isinstance(use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")
        dropout = float(dropout)
        if not (0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_experts = base.gate_up_proj.shape[0]
        self.act_fn = base.act_fn
        self.r = r if not isinstance(r, Mapping) else max(ranks.values(), default=1)
        self.lora_alpha = float(lora_alpha) if not isinstance(lora_alpha, Mapping) else None
        self.ranks, self.alphas = ranks, {t: float(a) for t, a in alphas.items()}
        self.use_rslora, self.dropout, self.targets = use_rslora, dropout, targets
        self.backend = backends.check_name("moe_lora_linear", backend)
        # The base's parameter registration order (PEFT nests target_parameters wrappers in it).
        order = [n for n, _ in base.named_parameters(recurse=False) if n in _PROJS]
        self.proj_order = tuple(order) if set(order) == set(_PROJS) else _PROJS
        for p in _PROJS:
            w = getattr(base, p)
            w.requires_grad_(False)
            self.register_parameter(p, w if isinstance(w, torch.nn.Parameter)
                                    else torch.nn.Parameter(w, requires_grad=False))
            E, out_f, in_f = w.shape
            dt = adapter_dtype or w.dtype
            if p in targets:
                a = torch.empty(E, ranks[p], in_f, dtype=dt, device=w.device)
                for e in range(E):
                    torch.nn.init.kaiming_uniform_(a[e], a=5 ** 0.5)
                self.register_parameter(f"lora_A_{p}", torch.nn.Parameter(a))
                self.register_parameter(f"lora_B_{p}", torch.nn.Parameter(
                    torch.zeros(E, out_f, ranks[p], dtype=dt, device=w.device)))
            else:
                self.register_buffer(f"lora_A_{p}", torch.zeros(E, 1, in_f, dtype=dt, device=w.device))
                self.register_buffer(f"lora_B_{p}", torch.zeros(E, out_f, 1, dtype=dt, device=w.device))

    def scale_of(self, proj: str) -> float:
        """The LoRA scaling of a targeted projection (lora_alpha / r, or / sqrt(r) with rsLoRA)."""
        r = self.ranks[proj]
        return self.alphas[proj] / (math.sqrt(r) if self.use_rslora else r)

    @property
    def scaling(self) -> float:
        """The scaling shared by the targeted projections (ValueError if they differ)."""
        s = {self.scale_of(t) for t in self.targets}
        if len(s) != 1:
            raise ValueError(f"the projections have different scalings {sorted(s)}: use scale_of(proj)")
        return s.pop()

    def proj_shape(self, proj: str) -> tuple[int, int, int]:
        """(E, out_features, in_features) of a projection."""
        return tuple(getattr(self, proj).shape)

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [getattr(self, f"lora_{ab}_{t}") for t in self.targets for ab in "AB"]

    def _proj(self, name: str, x: Tensor, plan: RoutingPlan) -> Tensor:
        on = name in self.targets
        return moe_lora_linear(x, getattr(self, name), getattr(self, f"lora_A_{name}"),
                               getattr(self, f"lora_B_{name}"), self.scale_of(name) if on else 0.0, plan,
                               dropout_p=self.dropout if on else 0.0,
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
                    dropout: float = 0.0, use_rslora: bool = False, backend: str = "auto",
                    rank_pattern: Optional[Mapping[str, int]] = None,
                    alpha_pattern: Optional[Mapping[str, float]] = None,
                    adapter_dtype: Optional[torch.dtype] = None) -> list[str]:
    """Replace every fused experts module of ``model`` whose parameter matches one of
    ``target_parameters`` (PEFT's ``target_parameters`` naming: a parameter's full name or a
    suffix after a ".", e.g. "mlp.experts.gate_up_proj") by a :class:`MoELoRAExperts` with LoRA
    on the matched projections. ``rank_pattern`` / ``alpha_pattern`` keys are matched against
    the end of the parameter's full name, as PEFT does. Every module is checked before any is
    replaced. Freezes nothing else. Returns the replaced modules' names (ValueError when
    nothing matched)."""
    from fused_lora.integrations.inject import _transaction
    from fused_lora.integrations.matching import _pattern_value
    from fused_lora.integrations.moe_io import param_targets

    targets = param_targets(model, target_parameters, "target_parameters")
    built = {}
    for mod, leaves in targets.items():
        ranks = {t: _pattern_value(rank_pattern or {}, f"{mod}.{t}", r) for t in leaves}
        alphas = {t: _pattern_value(alpha_pattern or {}, f"{mod}.{t}", lora_alpha) for t in leaves}
        for t in leaves:
            _check_r(f"{mod}.{t}", ranks[t])
            _check_alpha(f"{mod}.{t}", alphas[t])
        built[mod] = (leaves, ranks, alphas)
    with _transaction(model) as tx:
        for mod, (leaves, ranks, alphas) in built.items():
            base = model.get_submodule(mod)
            tx.replace(mod, MoELoRAExperts(base, r=ranks, lora_alpha=alphas, targets=leaves, dropout=dropout,
                                           use_rslora=use_rslora, backend=backend,
                                           adapter_dtype=adapter_dtype))
    return sorted(targets)


def moe_layers(model: torch.nn.Module):
    """(name, module) of every :class:`MoELoRAExperts` in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, MoELoRAExperts):
            yield name, m


__all__ += ["MoELoRAExperts", "inject_moe_lora", "moe_layers"]
