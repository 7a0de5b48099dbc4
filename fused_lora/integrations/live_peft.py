"""Conversion of a live ``PeftModel``: :func:`from_peft` replaces its PEFT LoRA ``Linear`` layers
with :class:`~fused_lora.FusedLoRALinear` in place, keeping PEFT's parameter objects. The same
feature table as the folder loaders (:mod:`fused_lora.integrations.features`) decides what
converts.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping

from torch import Tensor, nn

from fused_lora.integrations import features
from fused_lora.integrations.inject import _transaction, _wrap
from fused_lora.integrations.matching import _check_base_module, _check_rank_alpha


def from_peft(peft_model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every PEFT LoRA ``Linear`` layer of a live ``PeftModel`` (or of a model that PEFT
    injected into) with a :class:`FusedLoRALinear`, in place, keeping the same parameter objects
    (base weight/bias, ``lora_A``/``lora_B`` modules: optimizer state stays valid), scaling
    (set_scale included), dropout rate and train/eval mode. Merged PEFT layers are unmerged first.
    Returns ``peft_model``; its forward and outputs are unchanged (dropout masks aside). PEFT's
    own layer methods (merge_and_unload, disable_adapter, set_adapter, save_pretrained) do not
    know the fused layers: use :func:`merge_lora`, :func:`save_peft_adapter` and friends.
    Models built with a base-modifying init (PiSSA, OLoRA, ...) convert as they are: PEFT has
    already rewritten their base weights. MiCA converts too (plain LoRA forward, lora_B stays
    frozen). Every layer is checked before any is converted: on an error nothing has changed.

    Raises:
        ValueError: more than one active adapter, disabled adapters, a feature of
            :mod:`fused_lora.integrations.features` (DoRA, KaSA, lora_bias, embedding / conv /
            MultiheadAttention LoRA, ...), a bad rank / alpha / scaling, quantized bases (bnb,
            GPTQ, ...), or non-LoRA PEFT tuners.
    """
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as e:  # pragma: no cover - peft is a test/optional dependency
        raise ImportError("from_peft needs the peft package (pip install peft)") from e
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be an nn.Module, got {type(peft_model).__name__}")
    cfgs = getattr(peft_model, "peft_config", None)
    if isinstance(cfgs, Mapping):
        for an, c in cfgs.items():
            features.refuse_config(c.to_dict() if hasattr(c, "to_dict") else vars(c), f"adapter {an!r}",
                                   live=True)

    todo = []
    for name, m in peft_model.named_modules():
        if not isinstance(m, BaseTunerLayer):
            continue
        if not isinstance(m, LoraLayer):
            raise ValueError(
                f"module {name!r} is a {type(m).__name__}: only PEFT LoRA layers can be converted"
            )
        kind = type(m).__name__
        if kind != "Linear" or not hasattr(m, "lora_A"):
            feature = features.LAYER_FEATURES.get(kind, f"LoRA on {kind}")
            raise ValueError(f"{feature} is not supported by fused_lora (module {name!r} is a PEFT "
                             f"LoRA {kind}; only LoRA Linear layers are converted)")
        active = list(m.active_adapters)
        if len(active) != 1:
            raise ValueError(
                f"module {name!r} has {len(active)} active adapters {active}: from_peft converts "
                "exactly one active adapter (set_adapter(name) first)"
            )
        if getattr(m, "disable_adapters", False):
            raise ValueError(f"module {name!r} has its adapters disabled; enable them before from_peft")
        a = active[0]
        if a not in m.lora_A:
            raise ValueError(f"module {name!r} has no LoRA weights for active adapter {a!r}")
        if getattr(m, "use_dora", {}).get(a, False):
            raise ValueError(f"module {name!r}: DoRA (use_dora=True) is not supported by fused_lora")
        variant = getattr(m, "lora_variant", {}).get(a)
        if variant is not None and features.variant_refusal(variant) is not None:
            raise ValueError(f"module {name!r}: {features.variant_refusal(variant)}")
        if getattr(m, "lora_bias", {}).get(a, False):
            raise ValueError(f"module {name!r}: lora_bias=True (a bias on lora_B) is not supported by "
                             "fused_lora")
        extra = [k for k in m.lora_A if k != a]
        base = m.get_base_layer()
        _check_base_module(name + ".base_layer", base)
        r, alpha = m.r[a], m.lora_alpha[a]
        rs_map = getattr(m, "use_rslora", None)  # a per-adapter dict in PEFT >= 0.13
        rs = bool(rs_map.get(a, False)) if isinstance(rs_map, Mapping) else False
        scale = m.scaling[a]
        scale = float(scale.item() if isinstance(scale, Tensor) else scale)
        where = f" (module {name!r}, adapter {a!r})"
        _check_rank_alpha(r, alpha, where)
        if not math.isfinite(scale):
            raise ValueError(f"scaling must be a finite number, got {scale!r}{where}")
        if r != m.lora_A[a].weight.shape[0]:
            raise ValueError(f"r={r} but lora_A has shape {tuple(m.lora_A[a].weight.shape)}{where}")
        # set_scale / scale_layer may have changed scaling since init: keep the live value.
        if not math.isclose(scale, alpha / (math.sqrt(r) if rs else r), rel_tol=1e-6):
            alpha = scale * (math.sqrt(r) if rs else r)
        drop = m.lora_dropout[a]
        p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
        todo.append((name, m, a, base, extra, r, alpha, rs, p))
    if not todo:
        raise ValueError("peft_model has no PEFT LoRA layers to convert")

    # Everything is checked: from here on only an unexpected failure can stop the conversion, and
    # the transaction then puts back the PEFT layers and their (re-merged) weights.
    with _transaction(peft_model) as tx:
        for name, m, a, base, _extra, r, alpha, rs, p in todo:
            if m.merged:
                tx.save_tensor(base.weight)  # unmerge subtracts the delta in place
                tx.set_attr(m, "merged_adapters", list(m.merged_adapters))
                m.unmerge()
            A, B = m.lora_A[a], m.lora_B[a]
            fused = _wrap(base, r=r, lora_alpha=alpha, lora_dropout=p, use_rslora=rs, backend=backend,
                          adapter_dtype=A.weight.dtype)
            # Keep PEFT's own lora_A / lora_B modules (same Parameters) rather than copies.
            fused.lora_A, fused.lora_B = A, B
            fused.train(m.training)
            tx.replace(name, fused)
    for name, _m, _a, _b, extra, *_ in todo:
        if extra:
            warnings.warn(f"from_peft: module {name!r} drops inactive adapters {extra}", stacklevel=2)
    return peft_model
