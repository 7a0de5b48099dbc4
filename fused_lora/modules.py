"""nn.Modules: FusedLoRALinear (one adapter, training and inference)."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from fused_lora import backends
from fused_lora.functional import _check_scalar, lora_linear, multi_lora_linear
from fused_lora.routing import BatchRouting, RoutingPlan

__all__ = ["FusedLoRALinear", "MultiLoRALinear", "MERGED_KEY", "shared_weight_names"]

# State-dict key a merged FusedLoRALinear adds (only when merged, so unmerged checkpoints keep
# exactly PEFT's keys): its "weight" then holds W0 + s B A, not W0.
MERGED_KEY = "lora_merged"


def _check_bool(name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__} {v!r:.40}")
    return v


def _check_size(name: str, v: object, low: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r:.40}")
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return v


def _check_float_dtype(name: str, v: object) -> None:
    if v is not None and not (isinstance(v, torch.dtype) and v.is_floating_point):
        raise TypeError(f"{name} must be a floating torch.dtype or None, got {v!r:.40}")


def _overlaps(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors share memory (same Parameter, or overlapping byte ranges of one
    storage; the range test is conservative for interleaved strided views)."""
    if a is b:
        return True
    try:
        if a.device != b.device or a.device.type == "meta" or not a.numel() or not b.numel():
            return False
        if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
            return False

        def span(t: Tensor) -> tuple[int, int]:
            lo = t.data_ptr()
            extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
            return lo, lo + extent * t.element_size()

        (a0, a1), (b0, b1) = span(a), span(b)
        return a0 < b1 and b0 < a1
    except (RuntimeError, NotImplementedError):  # tensor subclasses without plain storage
        return False


def shared_weight_names(model: nn.Module, layer: nn.Module) -> list[str]:
    """Names in ``model`` of the parameters and buffers, outside ``layer`` itself, that share
    memory with ``layer.weight`` or ``layer.bias`` (tied weights, e.g. an lm_head tied to the
    input embedding, or a base nn.Linear still registered next to the layer wrapping it).

    Merging ``layer`` rewrites its weight in place, so it would rewrite each of these too. A
    layer cannot see its model: model-level merges call this (or ``layer.merge(model=model)``).
    The same layer registered under several names is not a tie (every use wants the merge)."""
    own = [t for t in (getattr(layer, "weight", None), getattr(layer, "bias", None)) if isinstance(t, Tensor)]
    names = []
    for mname, mod in model.named_modules(remove_duplicate=False):
        if mod is layer:
            continue
        for pname, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if isinstance(t, Tensor) and any(_overlaps(t, o) for o in own):
                name = f"{mname}.{pname}" if mname else pname
                if name not in names:
                    names.append(name)
    return names


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
        # Everything is checked here, not at the first forward (lora_alpha=None used to fail
        # there, as a TypeError from inside `scaling`).
        _check_size("in_features", in_features, 0)
        _check_size("out_features", out_features, 0)
        _check_size("r", r, 1)
        for name, v in (("lora_alpha", lora_alpha), ("lora_dropout", lora_dropout)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name} must be a real number, got {type(v).__name__} {v!r:.40}")
        if not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha must be finite, got {lora_alpha}")
        if not (0.0 <= float(lora_dropout) < 1.0):  # also refuses NaN
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        for name, v in (("bias", bias), ("use_rslora", use_rslora), ("fan_in_fan_out", fan_in_fan_out)):
            _check_bool(name, v)
        _check_float_dtype("adapter_dtype", adapter_dtype)
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
        # What merge() added: (A, B, s) copies, so unmerge() subtracts exactly that even if the
        # adapter or lora_alpha changed while merged. r * (in + out) elements: 0.4% of W0 for
        # r=8 on a 4096 x 4096 layer.
        self._merged_adapter: Optional[tuple] = None
        # Set by _load_from_state_dict for the post-load hook (children load in between).
        self._pending_load: Optional[tuple] = None
        self.register_load_state_dict_post_hook(_after_load_state_dict)

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

    def reset_parameters(self) -> None:
        """Re-initialize everything as a fresh layer: base as nn.Linear, A kaiming, B zero,
        unmerged. For meta-device construction: ``to_empty(device=...)`` leaves memory
        uninitialized, and meta-init frameworks then call ``reset_parameters()``."""
        self._reset_base()
        self.reset_lora_parameters()
        self.merged, self._restore, self._merged_adapter = False, None, None

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            # The merged layer is one plain GEMM: no LoRA cost at all (the paper's point).
            return nn.functional.linear(x, self.base_weight(), self.bias)
        if self.in_features == 0:
            # nn.Linear(0, n) gives the bias (or zeros); the kernels cannot flatten [..., 0].
            # The empty sums make the adapter term exact zeros, and B still gets its (zero)
            # gradient, as it would for any batch. Dropout of an empty x is empty.
            a = nn.functional.linear(x, self.lora_A.weight.to(x.dtype))
            lora = nn.functional.linear(a, self.lora_B.weight.to(x.dtype)) * self.scaling
            return nn.functional.linear(x, self.base_weight(), self.bias) + lora
        return lora_linear(
            x, self.base_weight(), self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
            dropout_p=self.lora_dropout, training=self.training, backend=self.backend,
        )

    # ---------------------------------------------------------------- merge / unmerge
    def delta_weight(self) -> Tensor:
        """s * B A in fp32 (fp64 for fp64 weights): the update merge() adds to the stored
        weight, in its layout ([in, out], i.e. (s B A)^T, when fan_in_fan_out, as PEFT's
        get_delta_weight)."""
        return self._delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def _delta(self, A: Tensor, B: Tensor, s: float) -> Tensor:
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        delta = s * (B.to(acc) @ A.to(acc))
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, exact_unmerge: bool = True, *, model: Optional[nn.Module] = None) -> None:
        """Fold the adapter into the base weight: W0 <- round(W0 + s B A), computed in fp32 and
        rounded once to W0's dtype, in place (the Parameter object is kept, so optimizers and
        tied references stay valid). Afterwards forward() is one plain F.linear.

        Refused (RuntimeError) in train mode: a merged layer's forward has no LoRA term, so
        training would silently stop updating the adapter. Call ``.eval()`` first.

        model: the model holding this layer. When given, merging is refused if the weight (or
        bias) shares memory with another parameter or buffer of the model (tied weights, e.g.
        lm_head tied to the embedding): the in-place merge would rewrite that one too. The
        layer cannot see ties without it (see :func:`shared_weight_names`).

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

        Either way merge() keeps a copy of (A, B, s), so unmerge() subtracts what was added even
        if the adapter changes while merged; a merged layer's state dict carries
        :data:`MERGED_KEY` so that loading it never applies the adapter twice.
        """
        _check_bool("exact_unmerge", exact_unmerge)
        if self.merged:
            return
        if self.training:
            raise RuntimeError(
                "merge() in train mode: a merged layer has no LoRA term in its forward, so the "
                "adapter would get no gradients. Call .eval() first (train() unmerges again)."
            )
        if model is not None:
            tied = shared_weight_names(model, self)
            if tied:
                raise RuntimeError(
                    f"merge(): the weight is shared with {tied} (tied weights); merging in place "
                    "would rewrite those too. Untie it first (give this layer its own copy, e.g. "
                    "layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)) "
                    "or leave this layer unmerged."
                )
        self._merge(exact_unmerge)

    def _merge(self, exact_unmerge: bool) -> None:
        w = self.weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        snap = (self.lora_A.weight.detach().clone(), self.lora_B.weight.detach().clone(), self.scaling)
        delta = self._delta(*snap).to(w.device)
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
        self._merged_adapter = snap
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W0 <- round(W' - s B A) in fp32 with the (A, B, s) merge() used, then
        patch the recorded elements (bit-exact restore when merge(exact_unmerge=True))."""
        if not self.merged:
            return
        w = self.weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        if self._restore is not None and self._restore[0] == "dense":
            w.copy_(self._restore[1])
        else:
            snap = getattr(self, "_merged_adapter", None)
            delta = self.delta_weight() if snap is None else self._delta(*snap)
            w.copy_((w.to(acc) - delta.to(w.device)).to(w.dtype))
            if self._restore is not None and self._restore[1] is not None:
                w.view(-1)[self._restore[1]] = self._restore[2]
        self._restore, self._merged_adapter = None, None
        self.merged = False

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FusedLoRALinear:
        # The unmerge records are plain attributes, not parameters: without this a merged
        # layer moved by .to() / .double() kept them on the old device / dtype, and unmerge()
        # failed (index_put of fp32 values into an fp64 weight).
        out = super()._apply(fn, recurse)

        def conv(t: object) -> object:
            return fn(t) if isinstance(t, Tensor) else t

        if self._restore is not None:
            self._restore = tuple(conv(t) for t in self._restore)
        if getattr(self, "_merged_adapter", None) is not None:
            A, B, s = self._merged_adapter
            self._merged_adapter = (conv(A), conv(B), s)
        return out

    def train(self, mode: bool = True) -> FusedLoRALinear:
        # nn.Module.train refuses a non-bool mode, but only after this override would have
        # unmerged: check first so that a refused call changes nothing.
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be boolean, got {type(mode).__name__}")
        # Training updates A and B, which would silently diverge from a merged W0: unmerge first.
        if mode and self.merged:
            self.unmerge()
        return super().train(mode)

    # ---------------------------------------------------------------- state dict
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            # On CPU whatever the layer's device (a meta flag could not be read back).
            destination[prefix + MERGED_KEY] = torch.tensor(True, device="cpu")

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
        missing_keys: list, unexpected_keys: list, error_msgs: list,
    ) -> None:
        # Loading goes to W0, never on top of a merged weight: a merged layer is unmerged
        # here, before anything (its children lora_A / lora_B included) is loaded, and the
        # post-load hook merges again with whatever was loaded.
        key = prefix + MERGED_KEY
        flag = state_dict.get(key)
        src_merged = False
        if flag is not None:
            if not isinstance(flag, Tensor) or flag.numel() != 1 or flag.device.type == "meta":
                error_msgs.append(f"{key} must be a 1-element tensor with data, got {flag!r:.60}")
            else:
                src_merged = bool(flag.item())
        has_weight = prefix + "weight" in state_dict
        has_adapter = all(prefix + k in state_dict for k in ("lora_A.weight", "lora_B.weight"))
        if src_merged and has_weight and not has_adapter:
            # W0 + s B A without its B and A: W0 cannot be recovered, and using this layer's
            # own adapter would be wrong. Refuse before anything is loaded.
            error_msgs.append(
                f"{prefix}weight is a merged weight ({key}) but {prefix}lora_A.weight / "
                f"{prefix}lora_B.weight are missing: load the full state dict of the merged layer, "
                "or unmerge it before saving"
            )
            return
        was_merged, exact = self.merged, self._restore is not None
        if was_merged:
            self.unmerge()
        self._pending_load = (was_merged, exact, src_merged and has_weight)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if key in unexpected_keys:
            unexpected_keys.remove(key)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
            f"bias={self.bias is not None}, use_rslora={self.use_rslora}, backend={self.backend!r}, "
            f"merged={self.merged}" + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
        )


@torch.no_grad()
def _after_load_state_dict(layer: nn.Module, incompatible_keys: object) -> None:
    # getattr: layers pickled before this attribute existed load without it.
    pending, layer._pending_load = getattr(layer, "_pending_load", None), None
    if pending is None:
        return
    was_merged, exact, src_merged = pending
    if src_merged:
        # The loaded weight is W0 + s B A of the loaded adapter: the layer is merged, exactly
        # as saved (no exact-unmerge record travels: unmerge() is within one rounding).
        layer.merged, layer._restore = True, None
        layer._merged_adapter = (
            layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone(), layer.scaling
        )
        if layer.training:
            layer.unmerge()  # a training layer must not be merged (no LoRA gradients)
    elif was_merged:
        layer._merge(exact)


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
        _check_bool("trainable", trainable)
        _check_float_dtype("adapter_dtype", adapter_dtype)
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

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Base as nn.Linear initializes it, every slot empty (rank 0, zero weights). For
        meta-device construction: ``to_empty(device=...)`` leaves the buffers uninitialized
        (``ranks`` could hold any int64), and meta-init frameworks then call this. Loading a
        state dict instead (``load_state_dict``, ``assign=True`` included) needs no reset."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.lora_A.zero_()
        self.lora_B.zero_()
        self.scales.zero_()
        self.ranks.zero_()

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
        bank_meta = self.lora_A.device.type == "meta"
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if t.device.type == "meta" and not bank_meta:
                raise ValueError(f"{name} is on the meta device (shape only, no data): load real "
                                 "weights, e.g. after to_empty() / from a checkpoint")
        # All-or-nothing: the padded slot is built in temporaries first (a failing copy, say a
        # device or dtype the bank cannot take, raises here and leaves the slot as it was),
        # then committed with copies between tensors of the bank's own device and dtype.
        new_A = torch.zeros_like(self.lora_A[slot])
        new_B = torch.zeros_like(self.lora_B[slot])
        new_A[:r].copy_(lora_A)
        new_B[:, :r].copy_(lora_B)
        self.lora_A[slot].copy_(new_A)
        self.lora_B[slot].copy_(new_B)
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
