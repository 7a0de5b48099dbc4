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

from fused_lora import backends, ops, reference, routing
from fused_lora.checks import check_moe_shapes, check_tensor, moe_n_virtual
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


def _check_ids(name: str, ids: object) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a RoutingPlan, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"{name} must be an integer tensor (int64 preferred), got {ids.dtype}")
    return ids


def moe_routing_plan(expert_ids: Tensor, n_experts: int, *, adapter_ids: Optional[Tensor] = None,
                     n_slots: Optional[int] = None, validate: bool = True) -> RoutingPlan:
    """The routing plan of a batch's rows over ``n_experts`` experts: build it once per MoE layer
    and batch and pass it to every projection of that layer (gate_up and down; their backward
    reuses it). Id -1 routes a row to no expert (its output row is 0, e.g. a token dropped by
    expert capacity). ``expert_ids`` of shape [..., k] (a token's top-k experts) routes x of
    shape [..., in] without copying its rows k times.

    adapter_ids (with n_slots, the bank size): mixed-adapter serving over one frozen MoE; one id
    per token (``expert_ids``' shape without its last dim, broadcast over the top-k choices) or
    per row (``expert_ids``' shape), in [-1, n_slots), -1 = the base model. Adapter a on expert e
    is one virtual expert, id (a + 1) * E + e; ids below E are the experts without adapter.

    Raises ValueError for ids out of range when validate (eager only: one host sync)."""
    expert_ids = _check_ids("expert_ids", expert_ids)
    if not isinstance(n_experts, int) or isinstance(n_experts, bool) or n_experts < 1:
        raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
    E = n_experts
    if validate and expert_ids.numel() and routing._host_checks_allowed(expert_ids):
        e64 = expert_ids.to(torch.int64)
        bad = (e64 < -1) | (e64 >= E)
        if bool(bad.any()):
            raise ValueError(f"expert_ids must be in [-1, E={E}) (-1 = no expert), got {int(e64[bad][0])}")
    if adapter_ids is None:
        if n_slots is not None:
            raise ValueError("n_slots is the adapter bank size: pass it with adapter_ids")
        return RoutingPlan.build(expert_ids, E, validate=False)
    a = _check_ids("adapter_ids", adapter_ids)
    if not isinstance(n_slots, int) or isinstance(n_slots, bool) or n_slots < 1:
        raise ValueError(f"n_slots (the adapter bank size) must be an int >= 1 with adapter_ids, got "
                         f"{n_slots!r}")
    if a.device != expert_ids.device:
        raise ValueError(f"adapter_ids is on {a.device} but expert_ids is on {expert_ids.device}")
    shape = tuple(expert_ids.shape)
    if tuple(a.shape) == shape[:-1] and len(shape) >= 1:
        a = a.unsqueeze(-1).expand(shape)
    elif tuple(a.shape) != shape:
        raise ValueError(f"adapter_ids must have one id per token {shape[:-1]} or per row {shape} "
                         f"(expert_ids' shape), got {tuple(a.shape)}")
    a64, e64 = a.to(torch.int64), expert_ids.to(torch.int64)
    if validate and a64.numel() and routing._host_checks_allowed(a64):
        bad = (a64 < -1) | (a64 >= n_slots)
        if bool(bad.any()):
            raise ValueError(f"adapter_ids must be in [-1, n_slots={n_slots}) (-1 = base model), got "
                             f"{int(a64[bad][0])}")
    a64 = torch.where((a64 >= -1) & (a64 < n_slots), a64, -1)  # unchecked out-of-range: base only
    v = torch.where((e64 >= 0) & (e64 < E), (a64 + 1) * E + e64, -1)
    return RoutingPlan.build(v, (n_slots + 1) * E, validate=False)


def _plan_topk(plan: RoutingPlan, lead: tuple, n_ids: int, E: int, S: Optional[int], device) -> int:
    """Rows of the op per row of x (1, or k for a plan of shape [..., k] over x [..., in]);
    ValueError when the plan does not fit x or the experts / adapter bank."""
    if plan.n_slots != n_ids:
        bank = f"E={E} experts and a bank of S={S} adapters ({n_ids} ids: (S + 1) * E)" if S else f"E={E}"
        how = "moe_routing_plan(expert_ids, E" + (", adapter_ids=..., n_slots=S)" if S else ")")
        built = f"{plan.n_slots} ids" if S else f"E={plan.n_slots} experts"
        raise ValueError(f"expert_ids is a RoutingPlan built over {built} but the layer has {bank}: build it "
                         f"with {how}")
    if device != plan.device:
        raise ValueError(f"expert_ids (a RoutingPlan) is on {plan.device} but x is on {device}")
    if len(plan.shape) == len(lead) + 1 and tuple(plan.shape[:-1]) == tuple(lead):
        return plan.shape[-1]
    try:
        plan.check_for(lead, n_ids, device)
    except ValueError as err:
        raise ValueError(str(err).replace("adapter_ids", "expert_ids") + " (or x's leading shape plus a "
                         "top-k dim)") from None
    return 1


def moe_lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: Union[float, Tensor],
    expert_ids: Union[Tensor, RoutingPlan],
    *,
    bias: Optional[Tensor] = None,
    adapter_ids: Optional[Tensor] = None,
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
        lora_A: (E, r, in_features), x's dtype or fp32; with ``adapter_ids`` a bank
            (S, E, r, in_features) of S adapters.
        lora_B: (E, out_features, r), lora_A's dtype; with a bank (S, E, out_features, r).
        scale: the LoRA scaling s (lora_alpha / r); with a bank also an (S,) tensor, one scaling
            per adapter. A tensor that requires grad gets its gradient (through the
            differentiable reference).
        expert_ids: an integer tensor of x's leading shape (one expert per row, ids in [0, E),
            -1: the row belongs to no expert and its output row is 0) or of x's leading shape
            plus a top-k dim [..., k] (each row of x goes to k experts, read in place: y is
            (..., k, out_features)), or a :class:`~fused_lora.routing.RoutingPlan` of such ids
            (see :func:`moe_routing_plan`; build one per MoE layer and batch and pass it to both
            projections).
        bias: (E, out_features) or None, x's dtype.
        adapter_ids: mixed-adapter serving with a bank: one adapter per token (x's leading shape)
            or per row (expert_ids' shape), in [-1, S), -1 = base only (the same numbers as a
            batch without adapters). With a RoutingPlan, build it with adapter_ids instead.
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1) (the same elements
            are dropped by every backend for a given seed).
        training: dropout applies only when True.
        backend: "auto", "torch", "triton", "cuda" or a variant ("cuda:mma", "cuda:wgmma",
            "cuda:wgmma256"; see :mod:`fused_lora.backends`).
        validate: with raw ids, check their range (one host sync; skipped under torch.compile).

    Returns:
        (..., out_features), or (..., k, out_features) with top-k expert_ids, in x's dtype.
        Gradients reach x, lora_A and lora_B (experts / adapters without rows get exact zeros),
        and weight / bias if they require grad.
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
    S = lora_A.shape[0] if lora_A.dim() == 4 else None
    n_ids = moe_n_virtual(weight, lora_A)
    if isinstance(expert_ids, RoutingPlan):
        if adapter_ids is not None:
            raise ValueError("adapter_ids goes into the RoutingPlan: moe_routing_plan(expert_ids, E, "
                             "adapter_ids=..., n_slots=S)")
        plan = expert_ids
    else:
        expert_ids = _check_ids("expert_ids", expert_ids)
        shape = tuple(expert_ids.shape)
        if shape != lead and shape[:-1] != lead:
            raise ValueError(
                f"expert_ids must have x's leading shape {lead} (one expert per row) or {lead} + (k,) "
                f"(top-k experts per row), got {shape}"
            )
        if expert_ids.device != x.device:
            raise ValueError(f"expert_ids is on {expert_ids.device} but x is on {x.device}")
        if S is not None and adapter_ids is None:
            raise ValueError(f"lora_A is a bank of S={S} adapters [S, E, r, in]: pass adapter_ids (one per "
                             "token, -1 = base only)")
        if S is None and adapter_ids is not None:
            raise ValueError("adapter_ids needs adapter banks: lora_A [S, E, r, in], lora_B [S, E, out, r]")
        if adapter_ids is not None:
            adapter_ids = _check_ids("adapter_ids", adapter_ids)
            if tuple(adapter_ids.shape) == lead and shape != lead:
                pass  # per token: moe_routing_plan broadcasts over the top-k dim
            elif tuple(adapter_ids.shape) != shape:
                raise ValueError(f"adapter_ids must have x's leading shape {lead} (one adapter per token) or "
                                 f"expert_ids' shape {shape}, got {tuple(adapter_ids.shape)}")
        plan = moe_routing_plan(expert_ids, E, adapter_ids=adapter_ids, n_slots=S, validate=validate)
    topk = _plan_topk(plan, lead, n_ids, E, S, x.device)
    x2d = x.reshape(-1, x.shape[-1])
    out_lead = lead + (topk,) if topk > 1 else lead
    slot_scales = None
    if isinstance(scale, Tensor) and (scale.numel() != 1 or (S is not None and scale.dim() == 1)):
        if S is None or scale.numel() != S:
            raise ValueError("scale must be a number or a 1-element tensor" + (
                f" or one per adapter [S={S}]" if S else "") + f", got shape {tuple(scale.shape)}")
        slot_scales, scale = scale.reshape(S), 1.0
    scale_grad = any(isinstance(t, Tensor) and t.requires_grad for t in (scale, slot_scales))
    if scale_grad or _needs_differentiable(x, weight, bias, lora_A, lora_B, scale, slot_scales):
        seed = int(draw_seed()) if p > 0.0 else 0
        s = scale.reshape(()) if isinstance(scale, Tensor) else scale
        with no_autocast:
            y = reference.moe_lora_linear(x2d, weight, bias, lora_A, lora_B, s, plan.ids, p, seed,
                                          slot_scales, topk)
        return _unflatten(y, torch.Size(out_lead))
    scale = _check_scalar("scale", scale)
    if slot_scales is not None:
        slot_scales = slot_scales.detach().to(torch.float32)
    impl = backends.select("moe_lora_linear", backend, x.device, x.dtype,
                           _mode(x, weight, bias, lora_A, lora_B), _rows(x) * topk)
    seed_t = draw_seed() if p > 0.0 else None
    with no_autocast:
        y, _ = ops.moe_lora_linear_fwd(x2d, weight, bias, lora_A, lora_B, scale, p, seed_t, plan.data, impl,
                                       slot_scales, topk)
    return _unflatten(y, torch.Size(out_lead))


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
    if getattr(base, "_is_expert_parallel", False):
        return f"{type(base).__name__} is expert-parallel (sharded experts): not supported"
    if getattr(base, "has_bias", False):
        for p in _PROJS:
            b = getattr(base, f"{p}_bias", None)
            if not isinstance(b, Tensor) or b.dim() != 2:
                return f"{type(base).__name__} has has_bias=True but no 2-D {p}_bias [E, out]"
    E = base.gate_up_proj.shape[0]
    if base.down_proj.shape[0] != E:
        return f"{type(base).__name__}'s gate_up_proj and down_proj hold different numbers of experts"
    return ""


class _FusedExperts(torch.nn.Module):
    """What both MoE LoRA modules share: transformers' fused experts module taken over (its
    parameters, same names and objects, frozen; its attributes; its gate function), its
    projections as [E, out, in] views (transposed layouts read in place), and the forward:
    gate_up (each token's row read once for its top-k experts), the gate, down, the routing
    weights, the sum over a token's top-k rows."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        why = fused_experts_reason(base)
        if why:
            raise TypeError(f"base must be a transformers fused experts module: {why}")
        for k, v in vars(base).items():  # plain attributes (config, alpha / limit of GPT-OSS, ...)
            if not k.startswith("_") and k != "training":
                object.__setattr__(self, k, v)
        self._base_type = type(base)
        self.num_experts = base.gate_up_proj.shape[0]
        self.is_transposed = bool(getattr(base, "is_transposed", False))
        self.has_bias = bool(getattr(base, "has_bias", False))
        if isinstance(getattr(base, "act_fn", None), torch.nn.Module):
            self.act_fn = base.act_fn
        # The base's parameter registration order (PEFT nests target_parameters wrappers in it).
        order = [n for n, _ in base.named_parameters(recurse=False) if n in _PROJS]
        self.proj_order = tuple(order) if set(order) == set(_PROJS) else _PROJS
        names = [n for n, _ in base.named_parameters(recurse=False)]
        for n in names + [p for p in _PROJS if p not in names]:
            if n in _PROJS or (self.has_bias and n in (f"{p}_bias" for p in _PROJS)):
                w = getattr(base, n)
                w.requires_grad_(False)
                self.register_parameter(n, w if isinstance(w, torch.nn.Parameter)
                                        else torch.nn.Parameter(w, requires_grad=False))

    def weight_of(self, proj: str) -> Tensor:
        """The projection's expert weights as [E, out, in] (a transposed view of an [E, in, out]
        parameter with is_transposed: read in place by the kernels, never copied)."""
        w = getattr(self, proj)
        return w.transpose(1, 2) if self.is_transposed else w

    def bias_of(self, proj: str) -> Optional[Tensor]:
        return getattr(self, f"{proj}_bias") if self.has_bias else None

    def proj_shape(self, proj: str) -> tuple[int, int, int]:
        """(E, out_features, in_features) of a projection."""
        return tuple(self.weight_of(proj).shape)

    def _gate(self, gate_up: Tensor) -> Tensor:
        fn = getattr(self._base_type, "_apply_gate", None)  # transformers' (default or the model's)
        if fn is None:
            gate, up = gate_up.chunk(2, dim=-1)
            return self.act_fn(gate) * up
        return fn(self, gate_up)

    def _proj(self, name: str, x: Tensor, plan: RoutingPlan) -> Tensor:
        raise NotImplementedError

    def _experts(self, hidden_states: Tensor, top_k_weights: Tensor, plan: RoutingPlan) -> Tensor:
        T, k = plan.shape
        gu = self._proj("gate_up_proj", hidden_states, plan)  # [T, k, 2I]: x read in place
        h = self._gate(gu.reshape(T * k, gu.shape[-1]))
        out = self._proj("down_proj", h, plan)  # [T * k, H]
        out = out * top_k_weights.reshape(-1, 1).to(out.dtype)
        # A token's top-k rows summed in a fixed order (no index_add_ atomics).
        return out.view(T, k, -1).sum(1).to(hidden_states.dtype)

    @staticmethod
    def _expert_ids(top_k_index: Tensor, E: int) -> Tensor:
        ids = top_k_index.to(torch.int64)
        return torch.where((ids >= 0) & (ids < E), ids, -1)  # expert E: transformers' padding slot


class MoELoRAExperts(_FusedExperts):
    """A drop-in replacement of transformers 5's fused experts module (``Qwen3MoeExperts``,
    ``MixtralExperts``: ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], each applied as
    ``F.linear(x, W[e])``; GPT-OSS's ``GptOssExperts`` with its transposed [E, in, out] layout,
    biases and interleaved clamped gate) with a LoRA adapter per expert on the targeted
    projections.

    forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H], as the
    original: every (token, choice) pair is one row routed to its expert; gate_up with LoRA
    (each token's hidden state read in place for its k experts, never copied k times), the
    module's gate (``act(gate) * up``, or the model's own ``_apply_gate``), down with LoRA, rows
    weighted by their routing weight and summed per token. One routing plan per call is shared
    by both projections and their backward. Ids equal to E (transformers' padding expert)
    contribute nothing, as in the original.

    The base weights are the original module's parameters (same names: state dicts load as
    before), frozen. LoRA: ``lora_A_<proj>`` [E, r, in] (kaiming-uniform, as PEFT),
    ``lora_B_<proj>`` [E, out, r] (zeros: at creation outputs equal the original module's), on
    the [E, out, in] view of the projection whatever its storage; PEFT's ``target_parameters``
    layout is the same adapter (see :mod:`fused_lora.integrations.moe_io`). A projection that
    is not targeted runs the same op with a frozen rank-1 zero adapter (a buffer): 1/in of the
    projection's extra work, one code path.

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
        targets = tuple(targets)
        for t in targets:
            if t not in _PROJS:
                raise ValueError(f"targets must be among {_PROJS}, got {t!r}")
        ranks = _per_proj("r", r, targets, _check_r)
        alphas = _per_proj("lora_alpha", lora_alpha, targets, _check_alpha)
        if not isinstance(use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")
        dropout = float(dropout)
        if not (0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        backend = backends.check_name("moe_lora_linear", backend)
        super().__init__(base)
        self.r = r if not isinstance(r, Mapping) else max(ranks.values(), default=1)
        self.lora_alpha = float(lora_alpha) if not isinstance(lora_alpha, Mapping) else None
        self.ranks, self.alphas = ranks, {t: float(a) for t, a in alphas.items()}
        self.use_rslora, self.dropout, self.targets = use_rslora, dropout, targets
        self.backend = backend
        for p in _PROJS:
            E, out_f, in_f = self.proj_shape(p)
            w = getattr(self, p)
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

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [getattr(self, f"lora_{ab}_{t}") for t in self.targets for ab in "AB"]

    def _proj(self, name: str, x: Tensor, plan: RoutingPlan) -> Tensor:
        on = name in self.targets
        return moe_lora_linear(x, self.weight_of(name), getattr(self, f"lora_A_{name}"),
                               getattr(self, f"lora_B_{name}"), self.scale_of(name) if on else 0.0, plan,
                               bias=self.bias_of(name), dropout_p=self.dropout if on else 0.0,
                               training=self.training, backend=self.backend)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        ids = self._expert_ids(top_k_index, self.num_experts)
        plan = moe_routing_plan(ids, self.num_experts, validate=False)  # both projections + backward
        return self._experts(hidden_states, top_k_weights, plan)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, targets={self.targets}, ranks={self.ranks}, "
                f"transposed={self.is_transposed}, backend={self.backend!r}")


class MoEMultiLoRAExperts(_FusedExperts):
    """Mixed-adapter serving over one frozen MoE: transformers' fused experts module with a bank
    of ``n_slots`` LoRA adapters on both projections, one adapter chosen per token.

    An adapter x expert pair is one virtual expert of :func:`moe_lora_linear`'s banks; tokens
    with adapter -1 get the base experts' output (the same numbers as a batch without adapters).
    The routing plan is built once per layer call from the token's experts and adapter and
    shared by both projections (and a backward). Banks: ``lora_A_<proj>`` [S, E, max_rank, in],
    ``lora_B_<proj>`` [S, E, out, max_rank] (rank padded with zeros), ``scales_<proj>`` [S]
    float32; empty slots are zero (base output).

    forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k], adapter_ids=None):
    ``adapter_ids`` one per token [T], or per sequence [batch] / per token [batch, seq] of the
    model's input (T = batch * seq, as transformers flattens it); default
    ``default_adapter_ids`` (set for a whole model by :func:`fused_lora.adapter_ids`).
    """

    def __init__(self, base: torch.nn.Module, n_slots: int, max_rank, *,
                 adapter_dtype: Optional[torch.dtype] = None, trainable: bool = False,
                 backend: str = "auto") -> None:
        if not isinstance(n_slots, int) or isinstance(n_slots, bool) or n_slots < 1:
            raise ValueError(f"n_slots must be an int >= 1, got {n_slots!r}")
        ranks = _per_proj("max_rank", max_rank, _PROJS, _check_r)
        _check_bool("trainable", trainable)
        backend = backends.check_name("moe_lora_linear", backend)
        super().__init__(base)
        self.n_slots, self.max_ranks, self.backend = n_slots, ranks, backend
        for p in _PROJS:
            E, out_f, in_f = self.proj_shape(p)
            w = getattr(self, p)
            dt = adapter_dtype or w.dtype
            R = ranks[p]
            self.register_parameter(f"lora_A_{p}", torch.nn.Parameter(
                torch.zeros(n_slots, E, R, in_f, dtype=dt, device=w.device), requires_grad=trainable))
            self.register_parameter(f"lora_B_{p}", torch.nn.Parameter(
                torch.zeros(n_slots, E, out_f, R, dtype=dt, device=w.device), requires_grad=trainable))
            self.register_buffer(f"scales_{p}", torch.zeros(n_slots, dtype=torch.float32, device=w.device))
        self.default_adapter_ids = None

    def _check_slot(self, slot: int) -> int:
        if not isinstance(slot, int) or isinstance(slot, bool) or not (0 <= slot < self.n_slots):
            raise ValueError(f"slot must be an int in [0, n_slots={self.n_slots}), got {slot!r}")
        return slot

    @torch.no_grad()
    def load_adapter(self, slot: int, adapters: Mapping[str, tuple]) -> None:
        """Load one adapter into ``slot``: {projection: (lora_A [E, r, in], lora_B [E, out, r],
        scale)}; a projection it does not name is left empty in that slot (base output there).
        Everything is checked before the slot changes."""
        self._check_slot(slot)
        if not isinstance(adapters, Mapping):
            raise TypeError(f"adapters must be a mapping {{projection: (lora_A, lora_B, scale)}}, got "
                            f"{type(adapters).__name__}")
        staged = {}
        for p, v in adapters.items():
            if p not in _PROJS:
                raise ValueError(f"adapters keys must be among {_PROJS}, got {p!r}")
            A, B, scale = v
            E, out_f, in_f = self.proj_shape(p)
            R = self.max_ranks[p]
            for name, t in (("lora_A", A), ("lora_B", B)):
                if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 3:
                    raise TypeError(f"{p} {name} must be a 3-D floating tensor, got {t!r:.80}")
            r = A.shape[1]
            if not (1 <= r <= R) or tuple(A.shape) != (E, r, in_f) or tuple(B.shape) != (E, out_f, r):
                raise ValueError(f"{p}: lora_A must be [E={E}, r <= {R}, in={in_f}] and lora_B "
                                 f"[E, out={out_f}, r], got {tuple(A.shape)} and {tuple(B.shape)}")
            scale = _check_scalar("scale", scale)
            a = torch.zeros_like(getattr(self, f"lora_A_{p}")[slot])
            b = torch.zeros_like(getattr(self, f"lora_B_{p}")[slot])
            a[:, :r].copy_(A)
            b[:, :, :r].copy_(B)
            staged[p] = (a, b, scale)
        self.unload_adapter(slot)
        for p, (a, b, scale) in staged.items():
            getattr(self, f"lora_A_{p}")[slot].copy_(a)
            getattr(self, f"lora_B_{p}")[slot].copy_(b)
            getattr(self, f"scales_{p}")[slot] = scale

    @torch.no_grad()
    def unload_adapter(self, slot: int) -> None:
        self._check_slot(slot)
        for p in _PROJS:
            getattr(self, f"lora_A_{p}")[slot].zero_()
            getattr(self, f"lora_B_{p}")[slot].zero_()
            getattr(self, f"scales_{p}")[slot] = 0.0

    def _token_ids(self, ids, T: int) -> Tensor:
        if isinstance(ids, routing.BatchRouting):
            ids = ids.ids
        if not isinstance(ids, Tensor):
            raise TypeError(f"adapter_ids must be a tensor, got {type(ids).__name__}")
        if ids.dim() == 1 and ids.shape[0] == T:
            return ids
        if ids.dim() == 2 and ids.numel() == T:
            return ids.reshape(T)
        if ids.dim() == 1 and ids.shape[0] >= 1 and T % ids.shape[0] == 0:
            return ids.repeat_interleave(T // ids.shape[0])  # per sequence: [batch] over batch * seq
        raise ValueError(f"adapter_ids has shape {tuple(ids.shape)}; for {T} tokens it must be one id per "
                         f"token [{T}], per sequence [batch] or per token [batch, seq]")

    def _proj(self, name: str, x: Tensor, plan: RoutingPlan) -> Tensor:
        return moe_lora_linear(x, self.weight_of(name), getattr(self, f"lora_A_{name}"),
                               getattr(self, f"lora_B_{name}"), getattr(self, f"scales_{name}"), plan,
                               bias=self.bias_of(name), training=self.training, backend=self.backend)

    def routing_plan(self, top_k_index: Tensor, adapter_ids) -> RoutingPlan:
        """The layer's plan for a batch: one virtual expert per (adapter, expert) pair."""
        E = self.num_experts
        a = self._token_ids(adapter_ids, top_k_index.shape[0]).to(top_k_index.device)
        return moe_routing_plan(self._expert_ids(top_k_index, E), E, adapter_ids=a, n_slots=self.n_slots,
                                validate=False)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                adapter_ids=None) -> Tensor:
        ids = adapter_ids if adapter_ids is not None else self.default_adapter_ids
        if ids is None:
            raise ValueError("adapter_ids is required (one adapter per token, -1 = base model): pass it or "
                             "use fused_lora.adapter_ids(model, ...)")
        plan = self.routing_plan(top_k_index, ids)  # once per layer: both projections + backward
        return self._experts(hidden_states, top_k_weights, plan)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, n_slots={self.n_slots}, max_ranks={self.max_ranks}, "
                f"transposed={self.is_transposed}, backend={self.backend!r}")


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


__all__ += ["MoELoRAExperts", "MoEMultiLoRAExperts", "inject_moe_lora", "moe_layers"]
