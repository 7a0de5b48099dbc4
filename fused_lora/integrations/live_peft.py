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

from fused_lora.integrations import features, moe_io
from fused_lora.integrations.inject import _transaction, _wrap
from fused_lora.integrations.matching import _check_base_module, _check_rank_alpha
from fused_lora.moe import MoELoRAExperts, fused_experts_reason


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
    PEFT ``target_parameters`` wrappers (``ParamWrapper`` on fused MoE experts) become
    :class:`~fused_lora.moe.MoELoRAExperts` whose LoRA weights are *copies* of PEFT's (reshaped
    from PEFT's [E*r, in] / [out, E*r] layout, requires_grad kept): rebuild the optimizer.

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
    experts = []  # (name, wrappers, base experts module, {proj: (A, B, r, alpha)}, use_rslora)
    for name, m in peft_model.named_modules():
        if not isinstance(m, BaseTunerLayer):
            continue
        if not isinstance(m, LoraLayer):
            raise ValueError(
                f"module {name!r} is a {type(m).__name__}: only PEFT LoRA layers can be converted"
            )
        kind = type(m).__name__
        if kind == "ParamWrapper":  # target_parameters (MoE experts); nested wrappers: outermost only
            parent = name.rpartition(".")[0]
            if not (name.endswith(".base_layer") and type(peft_model.get_submodule(parent)).__name__
                    == "ParamWrapper"):
                experts.append(_experts_conversion(name, m))
            continue
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
    if not todo and not experts:
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
        for name, wrappers, base, projs, rs, training in experts:
            for w in wrappers:
                if w.merged:
                    tx.save_tensor(getattr(base, w.parameter_name))  # unmerge subtracts in place
                    tx.set_attr(w, "merged_adapters", list(w.merged_adapters))
                    w.unmerge()
            dt = next(iter(projs.values()))[0].dtype
            layer = MoELoRAExperts(base, r={t: v[2] for t, v in projs.items()},
                                   lora_alpha={t: v[3] for t, v in projs.items()}, targets=tuple(projs),
                                   use_rslora=rs, backend=backend, adapter_dtype=dt)
            for t, (A, B, _r, _a) in projs.items():
                moe_io.copy_into(layer, t, A, B)
                for ab, src in (("A", A), ("B", B)):
                    getattr(layer, f"lora_{ab}_{t}").requires_grad_(src.requires_grad)
            layer.train(training)
            tx.replace(name, layer)
    for name, _m, _a, _b, extra, *_ in todo:
        if extra:
            warnings.warn(f"from_peft: module {name!r} drops inactive adapters {extra}", stacklevel=2)
    return peft_model


def _experts_conversion(name: str, outer: nn.Module) -> tuple:
    """Check a chain of PEFT ParamWrappers (target_parameters, one per projection of a fused
    experts module) and collect what MoELoRAExperts needs; nothing is changed."""
    wrappers = []
    m = outer
    while type(m).__name__ == "ParamWrapper":
        wrappers.append(m)
        m = m.base_layer
    base = m
    why = fused_experts_reason(base)
    if why:
        raise ValueError(f"module {name!r}: target_parameters LoRA on {type(base).__name__} is not supported "
                         f"by fused_lora ({why})")
    projs, rs_set = {}, set()
    for w in reversed(wrappers):  # innermost first: the base's registration order
        leaf = w.parameter_name
        where = f" (module {name!r}, parameter {leaf!r})"
        if leaf not in ("gate_up_proj", "down_proj"):
            raise ValueError(f"target_parameters LoRA on {leaf!r} is not supported by fused_lora{where}: "
                             "only the gate_up_proj / down_proj of fused MoE experts")
        if leaf in projs:
            raise ValueError(f"parameter {leaf!r} is wrapped twice{where}")
        active = list(w.active_adapters)
        if len(active) != 1:
            raise ValueError(f"{len(active)} active adapters {active}{where}: from_peft converts exactly "
                             "one active adapter (set_adapter(name) first)")
        if getattr(w, "disable_adapters", False):
            raise ValueError(f"adapters are disabled{where}; enable them before from_peft")
        a = active[0]
        if a not in w.lora_A:
            raise ValueError(f"no LoRA weights for active adapter {a!r}{where}")
        if getattr(w, "lora_bias", {}).get(a, False):
            raise ValueError(f"lora_bias=True (a bias on lora_B) is not supported by fused_lora{where}")
        extra = [k for k in w.lora_A if k != a]
        if extra:
            warnings.warn(f"from_peft: module {name!r} ({leaf}) drops inactive adapters {extra}",
                          stacklevel=3)
        r, alpha = w.r[a], w.lora_alpha[a]
        _check_rank_alpha(r, alpha, where)
        rs_map = getattr(w, "use_rslora", None)
        rs = bool(rs_map.get(a, False)) if isinstance(rs_map, Mapping) else False
        scale = w.scaling[a]
        scale = float(scale.item() if isinstance(scale, Tensor) else scale)
        if not math.isfinite(scale):
            raise ValueError(f"scaling must be a finite number, got {scale!r}{where}")
        A, B = w.lora_A[a].weight, w.lora_B[a].weight
        E = getattr(w, "num_experts", None) or moe_io.proj_dims(base, leaf)[0]
        dims = moe_io.proj_dims(base, leaf)
        if moe_io.check_param_weights(leaf, dims, A, B, f"module {name!r}") != r:
            raise ValueError(f"r={r} but lora_A has shape {tuple(A.shape)} for {E} experts{where}")
        rs_set.add(rs)
        projs[leaf] = [A, B, r, alpha, scale]
    rs = rs_set.pop() if len(rs_set) == 1 else False
    for v in projs.values():  # keep the live scaling (set_scale may have changed it)
        A, B, r, alpha, scale = v
        if not math.isclose(scale, alpha / (math.sqrt(r) if rs else r), rel_tol=1e-6):
            v[3] = scale * (math.sqrt(r) if rs else r)
    return (name, wrappers, base, {t: tuple(v[:4]) for t, v in projs.items()}, rs, outer.training)
