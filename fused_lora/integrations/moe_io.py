"""PEFT ``target_parameters`` adapters on fused MoE experts: which parameters a config targets,
the checkpoint keys PEFT gives them, and PEFT's tensor layout, shared by the folder loaders
(:func:`~fused_lora.load_peft_adapter`, :func:`~fused_lora.load_peft_adapters_multi`), the
saver (:func:`~fused_lora.save_peft_adapter`) and :func:`~fused_lora.from_peft`.

PEFT's layout (``peft.tuners.lora.layer.ParamWrapper``): an experts parameter of E experts,
stored [E, out, in] (or [E, in, out] when its module has ``is_transposed=True``), gets

* ``lora_A``: ``nn.Linear(in, E * r)``, weight [E*r, in]; row ``e * r + j`` is ``A[e, j, :]``
  (PEFT reshapes it to [E, r, in]);
* ``lora_B``: ``nn.Linear(E * r, out)``, weight [out, E*r]; column ``j * E + e`` is
  ``B[e, :, j]`` (PEFT reshapes it to [out, r, E] and permutes to [E, out, r]: the expert index
  is the fast one here, the slow one in lora_A);

and the delta of expert e on the [out, in] view is ``scaling * B[e] @ A[e]`` with scaling
``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); lora_dropout must be 0 (PEFT refuses it).
rank_pattern / alpha_pattern keys match the parameter's full name ("...experts.gate_up_proj").

Several targeted parameters of one module nest: PEFT wraps them in the module's parameter
registration order, each wrapper around the previous one, so the last is outermost and the
checkpoint keys of the i-th of n are ``<module>`` + ``".base_layer"`` * (n - 1 - i) +
``".lora_A.weight"`` / ``".lora_B.weight"`` (with PEFT's ``base_model.model.`` prefix).
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["param_targets", "peft_key_prefixes", "from_peft_layout", "to_peft_layout", "proj_dims",
           "split_param_keys"]

_PROJS = ("gate_up_proj", "down_proj")


def _experts_order(m: nn.Module) -> List[str]:
    """The fused projections of an experts module in PEFT's nesting order (registration order;
    a MoELoRAExperts keeps its base's)."""
    order = getattr(m, "proj_order", None)
    if order is not None:
        return list(order)
    return [n for n, _ in m.named_parameters(recurse=False) if n in _PROJS]


def param_targets(model: nn.Module, target_parameters: object, where: str) -> Dict[str, List[str]]:
    """{experts module name: [targeted projections, in nesting order]} for PEFT's
    ``target_parameters`` (each entry matches a parameter whose full name equals it or ends with
    "." + it, as PEFT matches). Raises ValueError for an entry that matches nothing, or a match
    that is not a fused experts projection (gate_up_proj / down_proj of a transformers fused
    experts module) -- fused_lora computes LoRA on those only."""
    from fused_lora.moe import MoELoRAExperts, fused_experts_reason

    if isinstance(target_parameters, str) or not isinstance(target_parameters, Sequence) or not all(
            isinstance(t, str) and t for t in target_parameters) or not target_parameters:
        raise TypeError(f"{where}: target_parameters must be a non-empty list of parameter names, got "
                        f"{target_parameters!r:.120}")
    tps = list(target_parameters)
    hit = {t: False for t in tps}
    out: Dict[str, List[str]] = {}
    for mod_name, m in model.named_modules():
        inner = isinstance(m, MoELoRAExperts)
        for pname, p in m.named_parameters(recurse=False):
            key = f"{mod_name}.{pname}" if mod_name else pname
            matched = [t for t in tps if key == t or key.endswith("." + t)]
            if not matched:
                continue
            for t in matched:
                hit[t] = True
            if inner and pname not in _PROJS:
                raise ValueError(f"{where}: target_parameters {matched} match {key!r}, a LoRA weight of "
                                 "fused_lora's own MoELoRAExperts")
            why = "" if inner else fused_experts_reason(m)
            if pname not in _PROJS or why:
                raise ValueError(
                    f"{where}: target_parameters {matched} match parameter {key!r} "
                    f"({type(m).__name__}.{pname}, shape {tuple(p.shape)}), which fused_lora cannot adapt: "
                    "it computes LoRA on the gate_up_proj / down_proj of transformers' fused MoE experts"
                    + (f" ({why})" if why else "")
                )
            out.setdefault(mod_name, []).append(pname)
    missing = [t for t, h in hit.items() if not h]
    if missing:
        raise ValueError(f"{where}: target_parameters {missing} match no parameter of the base model "
                         f"({type(model).__name__}); is this the adapter's base model?")
    for mod_name, leaves in out.items():
        order = _experts_order(model.get_submodule(mod_name))
        out[mod_name] = [p for p in order if p in leaves]
    return out


def peft_key_prefixes(module_name: str, leaves: Sequence[str]) -> Dict[str, str]:
    """{projection: its PEFT checkpoint key prefix (without base_model.model.)} for the
    targeted projections of one experts module, in nesting order (see the module docstring)."""
    n = len(leaves)
    return {leaf: module_name + ".base_layer" * (n - 1 - i) for i, leaf in enumerate(leaves)}


def split_param_keys(sd: Mapping[str, Tensor], targets: Mapping[str, Sequence[str]], prefix: str,
                     where: str) -> Tuple[Dict[str, Dict[str, Dict[str, Tensor]]], Dict[str, Tensor]]:
    """Split a PEFT state dict into ({module: {projection: {"A": [E*r, in], "B": [out, E*r]}}} for
    the target parameters, the other keys). A targeted projection without both weights raises."""
    key_of: Dict[str, Tuple[str, str]] = {}
    for mod, leaves in targets.items():
        for leaf, pre in peft_key_prefixes(mod, leaves).items():
            key_of[pre] = (mod, leaf)
    found: Dict[str, Dict[str, Dict[str, Tensor]]] = {}
    rest: Dict[str, Tensor] = {}
    for key, t in sd.items():
        k = key[len(prefix):] if key.startswith(prefix) else key
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", k)
        if m is not None and m.group(1) in key_of:
            mod, leaf = key_of[m.group(1)]
            found.setdefault(mod, {}).setdefault(leaf, {})[m.group(2)] = t
        else:
            rest[key] = t
    for mod, leaves in targets.items():
        for leaf, pre in peft_key_prefixes(mod, leaves).items():
            have = found.get(mod, {}).get(leaf, {})
            for ab in "AB":
                if ab not in have:
                    raise ValueError(
                        f"{where}: target parameter {mod}.{leaf} has no lora_{ab} weight in the checkpoint "
                        f"(expected key {prefix}{pre}.lora_{ab}.weight; PEFT nests the wrappers of one "
                        "module's parameters in their registration order)"
                    )
    return found, rest


def proj_dims(m: nn.Module, leaf: str) -> Tuple[int, int, int]:
    """(E, out_features, in_features) of projection ``leaf`` of an experts module (stored
    [E, out, in], or [E, in, out] with is_transposed)."""
    shape_of = getattr(m, "proj_shape", None)
    if callable(shape_of):
        return tuple(shape_of(leaf))
    E, d1, d2 = getattr(m, leaf).shape
    return (E, d2, d1) if getattr(m, "is_transposed", False) else (E, d1, d2)


def from_peft_layout(A: Tensor, B: Tensor, n_experts: int) -> Tuple[Tensor, Tensor]:
    """PEFT's lora_A [E*r, in], lora_B [out, E*r] -> (A [E, r, in], B [E, out, r]) (views)."""
    E = n_experts
    r = A.shape[0] // E
    return A.reshape(E, r, A.shape[1]), B.reshape(B.shape[0], r, E).permute(2, 0, 1)


def to_peft_layout(A: Tensor, B: Tensor) -> Tuple[Tensor, Tensor]:
    """(A [E, r, in], B [E, out, r]) -> PEFT's lora_A [E*r, in], lora_B [out, E*r] (contiguous)."""
    E, r, in_f = A.shape
    return A.reshape(E * r, in_f).contiguous(), B.permute(1, 2, 0).reshape(B.shape[1], r * E).contiguous()


def check_param_weights(name: str, dims: Tuple[int, int, int], A: Tensor, B: Tensor, where: str) -> int:
    """The rank of PEFT weights lora_A / lora_B for projection ``name`` of (E, out, in) dims;
    ValueError for shapes or dtypes that do not fit."""
    E, out_f, in_f = dims
    for ab, t in (("lora_A", A), ("lora_B", B)):
        if t.dim() != 2:
            raise ValueError(f"{where}: {name} {ab} has shape {tuple(t.shape)}; PEFT's target_parameters "
                             "weights are 2-D")
        if not t.is_floating_point():
            raise ValueError(f"{where}: {name} {ab} has dtype {t.dtype}; LoRA weights are floating point")
    if A.shape[0] == 0 or A.shape[0] % E or A.shape[1] != in_f or tuple(B.shape) != (out_f, A.shape[0]):
        raise ValueError(
            f"{where}: {name} has {E} experts of [{out_f} out, {in_f} in] but lora_A is {tuple(A.shape)} "
            f"and lora_B {tuple(B.shape)} (PEFT's layout: lora_A [E*r, in], lora_B [out, E*r])"
        )
    return A.shape[0] // E


def copy_into(layer: nn.Module, leaf: str, A: Tensor, B: Tensor) -> None:
    """Copy PEFT-layout weights into a MoELoRAExperts' lora_A_<leaf> / lora_B_<leaf>."""
    a, b = from_peft_layout(A, B, layer.num_experts)
    with torch.no_grad():
        getattr(layer, f"lora_A_{leaf}").copy_(a)
        getattr(layer, f"lora_B_{leaf}").copy_(b)
