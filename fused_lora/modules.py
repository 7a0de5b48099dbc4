"""nn.Modules: FusedLoRALinear (one adapter, training and inference)."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from fused_lora import backends
from fused_lora.functional import _check_scalar, lora_linear, multi_lora_linear
from fused_lora.routing import BatchRouting, RoutingPlan

__all__ = ["FusedLoRALinear", "MultiLoRALinear"]


class FusedLoRALinear(nn.Module):
    """A linear layer with a LoRA adapter whose forward and backward each run fused kernels.

    ``y = x W0^T + b + s * (dropout(x) A^T) B^T`` with ``s = lora_alpha / r`` (``lora_alpha /
    sqrt(r)`` when ``use_rslora``). Parameters follow PEFT: ``weight`` [out, in] and ``bias``
    [out] are the frozen base; ``lora_A.weight`` [r, in] (kaiming-uniform) and
    ``lora_B.weight`` [out, r] (zeros, so a fresh layer equals its base) are trained.

    Args:
        in_features, out_features: the base layer's sizes.
        r: adapter rank (>= 1).
        lora_alpha: scaling numerator.
        lora_dropout: dropout on the adapter's input, active in train() mode only.
        bias: whether the base layer has a bias.
        use_rslora: s = lora_alpha / sqrt(r) instead of lora_alpha / r.
        backend: "auto", "triton", "cuda" or "torch".
        device, dtype: for the base weight; adapters take the same dtype unless
            ``adapter_dtype`` is given (e.g. torch.float32 for PEFT's fp32 adapters).
        fan_in_fan_out: the base ``weight`` is stored transposed, [in, out], as in
            transformers' GPT-2 ``Conv1D`` (PEFT's ``fan_in_fan_out``). The kernels get the
            strided view ``weight.t()`` (no copy); merge/unmerge update the stored layout.
            ``lora_A``/``lora_B`` keep PEFT's [r, in] / [out, r] either way.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        backend: str = "auto",
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        adapter_dtype: Optional[torch.dtype] = None,
        fan_in_fan_out: bool = False,
        *,
        _base: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        if not (0.0 <= float(lora_dropout) < 1.0):
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        backends.check_name("lora_linear", backend)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.lora_dropout = float(lora_dropout)
        self.backend = backend
        self.fan_in_fan_out = bool(fan_in_fan_out)
        if _base is not None:
            # Share the base parameters (same Parameter objects), frozen, not copied.
            want = (in_features, out_features) if self.fan_in_fan_out else (out_features, in_features)
            if tuple(_base.weight.shape) != want:
                raise ValueError(
                    f"base weight must be {list(want)} (fan_in_fan_out={self.fan_in_fan_out}), "
                    f"got {list(_base.weight.shape)}"
                )
            self.weight = _base.weight
            self.bias = _base.bias
        else:
            shape = (in_features, out_features) if self.fan_in_fan_out else (out_features, in_features)
            self.weight = nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))
            self.bias = (
                nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
            )
            self._reset_base()
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        wdev, wdt = self.weight.device, self.weight.dtype
        adt = adapter_dtype or wdt
        self.lora_A = nn.Linear(in_features, r, bias=False, device=wdev, dtype=adt)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=wdev, dtype=adt)
        self.reset_lora_parameters()
        self.merged = False
        # Exact-unmerge record (see merge()): None, ("dense", W0) or ("sparse", idx, vals).
        self._restore: Optional[tuple] = None

    # ---------------------------------------------------------------- construction helpers
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        backend: str = "auto",
        adapter_dtype: Optional[torch.dtype] = None,
    ) -> FusedLoRALinear:
        """Wrap an existing nn.Linear: its weight and bias are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(
            linear.in_features, linear.out_features, r=r, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, bias=linear.bias is not None, use_rslora=use_rslora,
            backend=backend, adapter_dtype=adapter_dtype, _base=linear,
        )

    @classmethod
    def from_conv1d(
        cls,
        conv1d: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        backend: str = "auto",
        adapter_dtype: Optional[torch.dtype] = None,
    ) -> FusedLoRALinear:
        """Wrap a transformers ``Conv1D`` (GPT-2 style: ``y = x @ weight + bias`` with weight
        [in, out]): weight and bias are shared (not copied) and frozen; fan_in_fan_out=True."""
        w = getattr(conv1d, "weight", None)
        if type(conv1d).__name__ != "Conv1D" or not isinstance(w, Tensor) or w.dim() != 2:
            raise TypeError(
                f"conv1d must be a transformers Conv1D (2-D weight [in, out]), got {type(conv1d).__name__}"
            )
        in_f, out_f = w.shape
        return cls(
            in_f, out_f, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            bias=getattr(conv1d, "bias", None) is not None, use_rslora=use_rslora, backend=backend,
            adapter_dtype=adapter_dtype, fan_in_fan_out=True, _base=conv1d,
        )

    def base_weight(self) -> Tensor:
        """W0 as [out, in]: the stored weight, or its transposed view when fan_in_fan_out."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _reset_base(self) -> None:
        # kaiming_uniform_ reads fans from the shape: init the [out, in] view in place.
        nn.init.kaiming_uniform_(self.base_weight(), a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_lora_parameters(self) -> None:
        """PEFT's init: A kaiming-uniform(a=sqrt(5)), B zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            # The merged layer is one plain GEMM: no LoRA cost at all (the paper's point).
            return nn.functional.linear(x, self.base_weight(), self.bias)
        return lora_linear(
            x, self.base_weight(), self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
            dropout_p=self.lora_dropout, training=self.training, backend=self.backend,
        )

    # ---------------------------------------------------------------- merge / unmerge
    def delta_weight(self) -> Tensor:
        """s * B A in fp32 (fp64 for fp64 weights): the update merge() adds to the stored
        weight, in its layout ([in, out], i.e. (s B A)^T, when fan_in_fan_out, as PEFT's
        get_delta_weight)."""
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        delta = self.scaling * (self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc))
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, exact_unmerge: bool = True) -> None:
        """Fold the adapter into the base weight: W0 <- round(W0 + s B A), computed in fp32 and
        rounded once to W0's dtype, in place (the Parameter object is kept, so optimizers and
        tied references stay valid). Afterwards forward() is one plain F.linear.

        exact_unmerge=True (default): unmerge() restores W0 bit-for-bit. The cost is memory for
        only the elements that subtraction would not restore: merge() computes
        round(W' - s B A), compares it with W0 and keeps (int64 index, original value) for
        each mismatch (10 bytes each in bf16/fp16). Measured on weights of std 0.02 in bf16:
        0.7% / 4.6% / 22% of elements mismatch for |s B A| ~ 1e-4 / 1e-3 / 1e-2, i.e. 0.07 /
        0.46 / 2.2 bytes per element; when the sparse record would outgrow a dense copy of W0
        (more than 20% mismatches in bf16/fp16) a dense copy is kept instead.

        exact_unmerge=False: no extra memory; unmerge() gives round(W' - s B A), within one
        rounding of W0 at the merged weight's magnitude (|W'' - W0| <= ulp(max(|W0|, |W'|))).
        Repeated cycles do not accumulate error: once unmerged, W'' and W' map to each other
        exactly under merge/unmerge (tests/test_module.py checks 10 cycles), so the error stays
        that of the first cycle.
        """
        if self.merged:
            return
        w = self.weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        delta = self.delta_weight().to(w.device)
        merged = (w.to(acc) + delta).to(w.dtype)
        self._restore = None
        if exact_unmerge:
            back = (merged.to(acc) - delta).to(w.dtype)
            wrong = (back != w) & ~(torch.isnan(back) & torch.isnan(w))
            n_wrong = int(wrong.sum())
            if n_wrong * (8 + w.element_size()) > w.numel() * w.element_size():
                self._restore = ("dense", w.detach().clone())
            elif n_wrong > 0:
                idx = wrong.flatten().nonzero().squeeze(1)
                self._restore = ("sparse", idx, w.detach().flatten()[idx].clone())
            else:
                self._restore = ("sparse", None, None)
        w.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W0 <- round(W' - s B A) in fp32, then patch the recorded elements
        (bit-exact restore when merge(exact_unmerge=True))."""
        if not self.merged:
            return
        w = self.weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        if self._restore is not None and self._restore[0] == "dense":
            w.copy_(self._restore[1])
        else:
            w.copy_((w.to(acc) - self.delta_weight().to(w.device)).to(w.dtype))
            if self._restore is not None and self._restore[1] is not None:
                w.view(-1)[self._restore[1]] = self._restore[2]
        self._restore = None
        self.merged = False

    def train(self, mode: bool = True) -> FusedLoRALinear:
        # Training updates A and B, which would silently diverge from a merged W0: unmerge first.
        if mode and self.merged:
            self.unmerge()
        return super().train(mode)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
            f"bias={self.bias is not None}, use_rslora={self.use_rslora}, backend={self.backend!r}, "
            f"merged={self.merged}" + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
        )


class MultiLoRALinear(nn.Module):
    """A linear layer serving (and training) a bank of LoRA adapters, one chosen per token.

    ``y[t] = x[t] W0^T + b + scales[i] (x[t] A[i, :r_i]^T) B[i, :, :r_i]^T`` with
    ``i = adapter_ids[t]`` (-1: base only), via :func:`fused_lora.multi_lora_linear`.

    The base ``weight`` / ``bias`` are the wrapped nn.Linear's own Parameters (shared, not
    copied) and frozen. The bank: ``lora_A`` [n_slots, max_rank, in] and ``lora_B``
    [n_slots, out, max_rank] are Parameters (trainable unless ``trainable=False``: one
    backward gives each adapter present in the batch its own gradient, absent slots get exact
    zeros), ``scales`` [n_slots] float32 and ``ranks`` [n_slots] int64 are buffers. Empty slots
    have rank 0 (a token routed there gets the base output).

    Args:
        base: the nn.Linear to wrap.
        n_slots: number of adapter slots (>= 1).
        max_rank: the largest rank a slot can hold (>= 1); smaller ranks cost only their rank.
        adapter_dtype: bank dtype (default: the base weight's; torch.float32 for PEFT-style
            fp32 adapters).
        trainable: whether lora_A / lora_B require grad.
        backend: "auto", "triton", "cuda" or "torch".
    """

    def __init__(
        self,
        base: nn.Linear,
        n_slots: int,
        max_rank: int,
        *,
        adapter_dtype: Optional[torch.dtype] = None,
        trainable: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        for name, v in (("n_slots", n_slots), ("max_rank", max_rank)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        backends.check_name("multi_lora_linear", backend)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.n_slots, self.max_rank, self.backend = n_slots, max_rank, backend
        # Shared, frozen base (same Parameter objects as `base`).
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev, adt = self.weight.device, adapter_dtype or self.weight.dtype
        self.lora_A = nn.Parameter(
            torch.zeros(n_slots, max_rank, self.in_features, device=dev, dtype=adt), requires_grad=trainable
        )
        self.lora_B = nn.Parameter(
            torch.zeros(n_slots, self.out_features, max_rank, device=dev, dtype=adt), requires_grad=trainable
        )
        self.register_buffer("scales", torch.zeros(n_slots, device=dev, dtype=torch.float32))
        self.register_buffer("ranks", torch.zeros(n_slots, device=dev, dtype=torch.int64))
        # Ids used when forward() gets none (set by model-level helpers for a whole model).
        self.default_adapter_ids: Optional[Tensor] = None

    def _check_slot(self, slot: int) -> int:
        if not isinstance(slot, int) or isinstance(slot, bool) or not (0 <= slot < self.n_slots):
            raise ValueError(f"slot must be an int in [0, n_slots={self.n_slots}), got {slot!r}")
        return slot

    @torch.no_grad()
    def load_adapter(self, slot: int, lora_A: Tensor, lora_B: Tensor, scale: float) -> None:
        """Copy an adapter (lora_A [r, in], lora_B [out, r], r <= max_rank) into ``slot``,
        zero-padding the unused rank columns; ``scale`` is its scaling (e.g. alpha / r)."""
        self._check_slot(slot)
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 2:
                raise TypeError(f"{name} must be a 2-D floating tensor, got {t!r:.80}")
        r = lora_A.shape[0]
        if not (1 <= r <= self.max_rank):
            raise ValueError(f"adapter rank must be in [1, max_rank={self.max_rank}], got lora_A of "
                             f"shape {tuple(lora_A.shape)}")
        if lora_A.shape[1] != self.in_features:
            raise ValueError(f"lora_A must be [r, in_features={self.in_features}], got {tuple(lora_A.shape)}")
        if tuple(lora_B.shape) != (self.out_features, r):
            raise ValueError(
                f"lora_B must be [out_features={self.out_features}, r={r}], got {tuple(lora_B.shape)}"
            )
        scale = _check_scalar("scale", scale)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :r].copy_(lora_A)
        self.lora_B[slot, :, :r].copy_(lora_B)
        self.scales[slot] = scale
        self.ranks[slot] = r

    @torch.no_grad()
    def unload_adapter(self, slot: int) -> None:
        """Empty ``slot``: zero weights, rank 0 (tokens routed to it get the base output)."""
        self._check_slot(slot)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scales[slot] = 0.0
        self.ranks[slot] = 0

    def forward(self, x: Tensor, adapter_ids: Optional[Union[Tensor, RoutingPlan]] = None) -> Tensor:
        ids = adapter_ids if adapter_ids is not None else self.default_adapter_ids
        if ids is None:
            raise ValueError("adapter_ids is required (one id per token, -1 = base only, or a RoutingPlan)")
        if isinstance(ids, BatchRouting):  # set once per model forward: one plan for every layer
            ids = ids.plan_for(tuple(x.shape[:-1]))
        return multi_lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scales, ids,
            ranks=self.ranks, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"n_slots={self.n_slots}, max_rank={self.max_rank}, bias={self.bias is not None}, "
            f"backend={self.backend!r}"
        )
