"""Which modules of a model get adapters, and whether they can: PEFT's ``target_modules`` /
``exclude_modules`` / ``rank_pattern`` / ``alpha_pattern`` matching rules, and the checks that
refuse bases fused_lora cannot wrap (embeddings, convs, quantized or subclassed Linears).

Module matching follows PEFT: ``target_modules`` is a list of names, each matching a module whose
qualified name equals it or ends with ``"." + name``, or a single string that is a regular
expression which must match the whole qualified name, or ``"all-linear"`` (every Linear/Conv1D
except the model's output layer). ``rank_pattern`` / ``alpha_pattern`` keys are regular
expressions matched against the end of the qualified name (``(.*\\.)?(key)$``), first key wins.
"""

from __future__ import annotations

import math
import re
from typing import Any, List, Mapping, Optional, Sequence, Union

from torch import Tensor, nn

from fused_lora.modules import FusedLoRALinear

TargetModules = Union[str, Sequence[str]]

# Class-module prefixes of quantized Linear subclasses (bitsandbytes, GPTQ, AWQ, HQQ, ...): their
# ``weight`` is not the dense W0 the kernels read, so wrapping them would compute garbage.
_QUANT_MODULE_PREFIXES = ("bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "optimum", "torchao",
                          "eetq", "aqlm", "transformer_engine")


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D (y = x @ W + b, W [in, out]), detected without importing
    transformers (slow, optional): class name and module, plus a 2-D weight."""
    t = type(m)
    return (
        t.__name__ == "Conv1D"
        and t.__module__.startswith("transformers")
        and isinstance(getattr(m, "weight", None), Tensor)
        and m.weight.dim() == 2
    )


def _is_quantized(m: nn.Module) -> bool:
    mod = type(m).__module__
    if any(mod.startswith(p) for p in _QUANT_MODULE_PREFIXES):
        return True
    w = getattr(m, "weight", None)
    return isinstance(w, Tensor) and not w.is_floating_point()


def _check_base_module(name: str, m: nn.Module) -> None:
    """Raise ValueError when ``m`` (matched by the target patterns) cannot be wrapped."""
    if isinstance(m, FusedLoRALinear):
        raise ValueError(
            f"module {name!r} already has a fused LoRA adapter (a FusedLoRALinear from inject_lora or "
            "load_peft_adapter); target the plain base model"
        )
    if _is_quantized(m):
        raise ValueError(
            f"module {name!r} is a quantized layer ({type(m).__module__}.{type(m).__name__}): "
            "quantized bases (bitsandbytes 4/8-bit, GPTQ, AWQ, ...) are not supported by fused_lora"
        )
    if type(m) is nn.Linear or _is_conv1d(m):
        return
    if isinstance(m, nn.Linear):
        # e.g. nn.MultiheadAttention's out_proj: its owner reads .weight directly and never
        # calls forward(), so a wrapped adapter would be silently ignored.
        raise ValueError(
            f"module {name!r} is a subclass of nn.Linear ({type(m).__name__}), which fused_lora does "
            "not wrap (its owner may bypass forward()); target plain nn.Linear / Conv1D layers"
        )
    if isinstance(m, nn.Embedding):
        feature = "embedding LoRA"
    elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        feature = "convolution LoRA"
    elif isinstance(m, nn.MultiheadAttention):
        feature = "MultiheadAttention LoRA"
    else:
        feature = f"LoRA on {type(m).__name__}"
    raise ValueError(
        f"module {name!r} matched target_modules but is a {type(m).__name__}: {feature} is not supported "
        "(fused_lora wraps nn.Linear and transformers Conv1D only)"
    )


def _check_targets(target_modules: object, arg: str = "target_modules") -> TargetModules:
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            try:
                re.compile(target_modules)
            except re.error as e:
                raise ValueError(f"{arg} is not a valid regular expression: {target_modules!r} ({e})") from e
        return target_modules
    if isinstance(target_modules, (list, tuple, set, frozenset)) and target_modules and all(
        isinstance(t, str) and t for t in target_modules
    ):
        return list(target_modules)
    raise TypeError(
        f"{arg} must be a non-empty list of module names, a regex string or 'all-linear', "
        f"got {target_modules!r}"
    )


def _name_matches(name: str, targets: TargetModules) -> bool:
    """PEFT's rule: regex string -> fullmatch; list -> exact name or '.'-suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first key matching the end of ``name`` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _output_layer_names(model: nn.Module) -> set:
    """Names of the model's output projection (excluded by 'all-linear', as in PEFT)."""
    out = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, m in model.named_modules():
        if head is not None and m is head:
            out.add(name)
    return out


def _candidates(model: nn.Module, targets: TargetModules, exclude: Optional[TargetModules]) -> List[str]:
    names = []
    skip = _output_layer_names(model) if targets == "all-linear" else set()
    inside_fused: List[str] = []
    for name, m in model.named_modules():
        if not name:
            continue
        # LoRA's own lora_A/lora_B Linears are never targets.
        if any(name.startswith(p + ".") for p in inside_fused):
            continue
        if isinstance(m, FusedLoRALinear):
            inside_fused.append(name)
        if exclude is not None and _name_matches(name, exclude):
            continue
        if targets == "all-linear":
            if (isinstance(m, nn.Linear) or _is_conv1d(m)) and name not in skip:
                names.append(name)
        elif _name_matches(name, targets):
            names.append(name)
    return names


def _check_rank_alpha(r: object, lora_alpha: object, where: str) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}{where}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(
        lora_alpha
    ):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}{where}")




def _missing_targets(model: nn.Module, targets: TargetModules) -> List[str]:
    """Entries of a target list that match no module of ``model`` at all (PEFT refuses a list
    that matches nothing: "Target modules ... not found in the base model"; one typo among good
    names would otherwise silently give fewer adapters). A regex string must match a module."""
    if targets == "all-linear":
        return []
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
