"""nn.Modules: FusedLoRALinear (one adapter, training and inference)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from fused_lora import dispatch
from fused_lora.functional import lora_linear

__all__ = ["FusedLoRALinear"]


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
        *,
        _base: Optional[nn.Linear] = None,
    ) -> None:
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        if not (0.0 <= float(lora_dropout) < 1.0):
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if backend not in ("auto",) + dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + dispatch.BACKENDS}, got {backend!r}")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.lora_dropout = float(lora_dropout)
        self.backend = backend
        if _base is not None:
            # Share the base parameters (same Parameter objects), frozen, not copied.
            self.weight = _base.weight
            self.bias = _base.bias
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
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

    def _reset_base(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
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
            return nn.functional.linear(x, self.weight, self.bias)
        return lora_linear(
            x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
            dropout_p=self.lora_dropout, training=self.training, backend=self.backend,
        )

    # ---------------------------------------------------------------- merge / unmerge
    def delta_weight(self) -> Tensor:
        """s * B A in fp32 (fp64 for fp64 weights): the update merge() adds to W0."""
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return self.scaling * (self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc))

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
            f"merged={self.merged}"
        )
