"""Use fused LoRA on real models: injection into any ``nn.Module`` tree (Hugging Face transformers
models included), PEFT adapter load/save/convert, and adapter-bank loading for mixed-adapter
serving.

* :func:`inject_lora` replaces matching ``nn.Linear`` layers (and transformers' GPT-2 style
  ``Conv1D``, whose weight is stored [in, out]) with :class:`~fused_lora.FusedLoRALinear`, which
  shares the frozen base parameters; :func:`lora_state_dict`, :func:`merge_lora`,
  :func:`unmerge_lora`.
* :func:`load_peft_adapter` / :func:`save_peft_adapter` read and write the folder format of
  PEFT's ``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``);
  :func:`from_peft` converts a live ``PeftModel`` in place.
* :func:`load_peft_adapters_multi` loads several PEFT adapter folders into ``MultiLoRALinear``
  banks over one base model; :func:`adapter_ids` routes per-row adapter ids through a model's
  ordinary forward.

Module matching follows PEFT: ``target_modules`` is a list of names, each matching a module whose
qualified name equals it or ends with ``"." + name``, or a single string that is a regular
expression which must match the whole qualified name, or ``"all-linear"`` (every Linear/Conv1D
except the model's output layer). ``rank_pattern`` / ``alpha_pattern`` keys are regular
expressions matched against the end of the qualified name (``(.*\\.)?(key)$``), first key wins.

peft, transformers and safetensors are optional: they are imported inside the functions that
need them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from collections import Counter
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fused_lora.modules import FusedLoRALinear

__all__ = [
    "inject_lora",
    "lora_state_dict",
    "merge_lora",
    "unmerge_lora",
    "load_peft_adapter",
    "save_peft_adapter",
    "from_peft",
    "load_peft_adapters_multi",
    "adapter_ids",
]

TargetModules = Union[str, Sequence[str]]

# PEFT's checkpoint keys are the PeftModel's parameter names: base_model (LoraModel) . model.
_PEFT_PREFIX = "base_model.model."
_CONFIG_NAME = "adapter_config.json"
_SAFETENSORS_NAME = "adapter_model.safetensors"
_BIN_NAME = "adapter_model.bin"

# Class-module prefixes of quantized Linear subclasses (bitsandbytes, GPTQ, AWQ, HQQ, ...): their
# ``weight`` is not the dense W0 the kernels read, so wrapping them would compute garbage.
_QUANT_MODULE_PREFIXES = ("bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "optimum", "torchao",
                          "eetq", "aqlm", "transformer_engine")


# -------------------------------------------------------------------------------------------------
# matching
# -------------------------------------------------------------------------------------------------


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
        raise ValueError(f"module {name!r} already has a fused LoRA adapter (inject_lora ran twice?)")
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


def _wrap(m: nn.Module, **kw: Any) -> FusedLoRALinear:
    return FusedLoRALinear.from_conv1d(m, **kw) if _is_conv1d(m) else FusedLoRALinear.from_linear(m, **kw)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_rank_alpha(r: object, lora_alpha: object, where: str) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}{where}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(
        lora_alpha
    ):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}{where}")


# -------------------------------------------------------------------------------------------------
# injection
# -------------------------------------------------------------------------------------------------


def _fused_layers(model: nn.Module) -> Iterator[tuple]:
    for name, m in model.named_modules():
        if isinstance(m, FusedLoRALinear):
            yield name, m


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """A PeftModel's underlying transformers model (names then match PEFT's targets); any other
    module unchanged."""
    get = getattr(model, "get_base_model", None)
    if callable(get) and hasattr(model, "peft_config"):
        return get()
    return model


def inject_lora(
    model: nn.Module,
    target_modules: TargetModules,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    backend: str = "auto",
    rank_pattern: Optional[Mapping[str, int]] = None,
    alpha_pattern: Optional[Mapping[str, float]] = None,
    *,
    exclude_modules: Optional[TargetModules] = None,
    adapter_dtype: Optional[torch.dtype] = None,
    freeze_base: bool = True,
) -> List[str]:
    """Replace each matching ``nn.Linear`` / transformers ``Conv1D`` in ``model`` by a
    :class:`FusedLoRALinear` that shares its (frozen) weight and bias, in place.

    Args:
        model: any module tree, e.g. a transformers ``PreTrainedModel``.
        target_modules: list of module names matched as PEFT does (exact qualified name or
            ``"." + name`` suffix, e.g. ``["q_proj", "v_proj"]``), a regex string that must match
            the whole qualified name, or ``"all-linear"``.
        r, lora_alpha, lora_dropout, use_rslora: as in PEFT's ``LoraConfig``; scaling is
            ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).
        backend: kernel backend of every injected layer ("auto", "triton", "cuda", "torch").
        rank_pattern, alpha_pattern: per-module r / lora_alpha overrides, keys are regexes
            matched against the end of the qualified name (PEFT's semantics).
        exclude_modules: names / regex never wrapped (PEFT's ``exclude_modules``).
        adapter_dtype: dtype of lora_A/lora_B (default: the base weight's). PEFT keeps adapters
            in fp32 on fp16/bf16 models; pass torch.float32 to match it.
        freeze_base: set requires_grad=False on every parameter except the LoRA ones (default),
            as PEFT does with bias="none".

    Returns:
        The qualified names of the replaced modules, in ``named_modules`` order.

    Raises:
        ValueError: nothing matched, or a matched module cannot be wrapped (embedding, conv,
            quantized, nn.Linear subclass, already injected), or a bad r / alpha.
        TypeError: a badly typed argument.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = _check_targets(target_modules)
    exclude = None if exclude_modules is None else _check_targets(exclude_modules, "exclude_modules")
    rank_pattern = dict(rank_pattern or {})
    alpha_pattern = dict(alpha_pattern or {})
    for arg, pat in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for k in pat:
            if not isinstance(k, str):
                raise TypeError(f"{arg} keys must be strings (module-name regexes), got {k!r}")
    _check_rank_alpha(r, lora_alpha, "")
    if not (0.0 <= float(lora_dropout) < 1.0):
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")

    names = _candidates(model, targets, exclude)
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} matched no module of {type(model).__name__}; "
            "names are matched as PEFT does (exact qualified name or '.'-suffix, or a full regex)"
        )
    # Check everything before changing anything, so a refusal leaves the model untouched.
    modules = {}
    for name in names:
        m = model.get_submodule(name)
        _check_base_module(name, m)
        r_i = _pattern_value(rank_pattern, name, r)
        a_i = _pattern_value(alpha_pattern, name, lora_alpha)
        _check_rank_alpha(r_i, a_i, f" (module {name!r} via rank_pattern/alpha_pattern)")
        modules[name] = (m, r_i, a_i)

    for name, (m, r_i, a_i) in modules.items():
        kw = dict(r=r_i, lora_alpha=a_i, lora_dropout=lora_dropout, use_rslora=use_rslora,
                  backend=backend, adapter_dtype=adapter_dtype)
        fused = _wrap(m, **kw)
        fused.train(m.training)
        _set_submodule(model, name, fused)

    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for _, m in _fused_layers(model):
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    return names


def lora_state_dict(model: nn.Module, peft_format: bool = False) -> Dict[str, Tensor]:
    """The LoRA parameters of every FusedLoRALinear in ``model``: ``{"<module>.lora_A.weight":
    [r, in], "<module>.lora_B.weight": [out, r]}`` (detached tensors, not copies). With
    ``peft_format=True`` keys get PEFT's ``"base_model.model."`` prefix, as in
    ``adapter_model.safetensors``. A PeftModel is unwrapped first."""
    model = _unwrap_peft(model)
    prefix = _PEFT_PREFIX if peft_format else ""
    out: Dict[str, Tensor] = {}
    for name, m in _fused_layers(model):
        out[f"{prefix}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{prefix}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def merge_lora(model: nn.Module, exact_unmerge: bool = True) -> List[str]:
    """Fold every adapter into its base weight (see :meth:`FusedLoRALinear.merge`); returns the
    merged module names. Forward is then plain GEMMs."""
    names = []
    for name, m in _fused_layers(_unwrap_peft(model)):
        m.merge(exact_unmerge=exact_unmerge)
        names.append(name)
    return names


def unmerge_lora(model: nn.Module) -> List[str]:
    """Undo :func:`merge_lora` on every FusedLoRALinear; returns the module names."""
    names = []
    for name, m in _fused_layers(_unwrap_peft(model)):
        m.unmerge()
        names.append(name)
    return names


# -------------------------------------------------------------------------------------------------
# PEFT adapter folders
# -------------------------------------------------------------------------------------------------

# LoraConfig fields whose non-default value means a feature fused_lora does not implement: loading
# such an adapter as plain LoRA would compute something else, so it is refused.
_UNSUPPORTED_CONFIG: Dict[str, str] = {
    "use_dora": "DoRA (use_dora=True)",
    "use_qalora": "QA-LoRA (use_qalora=True)",
    "lora_bias": "lora_bias=True (a bias on lora_B)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "target_modules_bd_a": "BD-LoRA (target_modules_bd_a)",
    "target_modules_bd_b": "BD-LoRA (target_modules_bd_b)",
    "arrow_config": "Arrow routing (arrow_config)",
    "trainable_token_indices": "trainable_token_indices (trainable token embeddings)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "target_parameters": "target_parameters (LoRA on bare nn.Parameters, e.g. MoE experts)",
    "layer_replication": "layer_replication",
    "megatron_config": "Megatron tensor-parallel LoRA (megatron_config)",
}


def _refuse_config(cfg: Mapping[str, Any], where: str) -> None:
    peft_type = cfg.get("peft_type", "LORA")
    peft_type = str(getattr(peft_type, "value", peft_type)).upper()  # a PeftType enum when live
    if peft_type != "LORA":
        raise ValueError(
            f"{where}: peft_type={peft_type!r} is not supported (fused_lora loads plain LoRA only; "
            "LoHa, LoKr, IA3, AdaLoRA, ... are different adapters)"
        )
    for key, feature in _UNSUPPORTED_CONFIG.items():
        v = cfg.get(key)
        if v not in (None, False, [], {}, ()):
            raise ValueError(f"{where}: {feature} is not supported by fused_lora")
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise ValueError(f"{where}: bias={bias!r} (trained base biases) is not supported; only bias='none'")


def _read_adapter_folder(path: Union[str, os.PathLike]) -> tuple:
    """(config dict, {key: tensor}) from a PEFT save_pretrained folder."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path must be a folder written by PEFT's save_pretrained, got {path!r}")
    cfg_file = os.path.join(path, _CONFIG_NAME)
    if not os.path.isfile(cfg_file):
        raise ValueError(f"no {_CONFIG_NAME} in {path!r}: not a PEFT adapter folder")
    with open(cfg_file) as f:
        cfg = json.load(f)
    st, bn = os.path.join(path, _SAFETENSORS_NAME), os.path.join(path, _BIN_NAME)
    if os.path.isfile(st):
        from safetensors.torch import load_file

        sd = load_file(st)
    elif os.path.isfile(bn):
        sd = torch.load(bn, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"no {_SAFETENSORS_NAME} or {_BIN_NAME} in {path!r}")
    return cfg, sd


def _parse_peft_state(sd: Mapping[str, Tensor], where: str) -> Dict[str, Dict[str, Tensor]]:
    """{module name: {"A": [r, in], "B": [out, r]}} from PEFT's keys; refuses keys of features
    that plain LoRA does not have."""
    mods: Dict[str, Dict[str, Tensor]] = {}
    # Name the feature first: its checkpoints also hold other keys (e.g. saved embedding layers).
    for key in sd:
        if "lora_magnitude_vector" in key:
            raise ValueError(f"{where}: key {key!r} is a DoRA magnitude vector; DoRA is not supported")
        if "lora_embedding_" in key:
            raise ValueError(f"{where}: key {key!r} is an embedding LoRA; embedding LoRA is not supported")
    for key, t in sd.items():
        k = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.(weight|bias)", k)
        if m is None:
            raise ValueError(
                f"{where}: unexpected key {key!r} (not a LoRA lora_A/lora_B weight); fused_lora "
                "loads plain LoRA adapters without modules_to_save or trained biases"
            )
        if m.group(3) == "bias":
            raise ValueError(f"{where}: key {key!r} is a lora_B bias; lora_bias is not supported")
        if t.dim() != 2:
            raise ValueError(
                f"{where}: {key!r} has shape {tuple(t.shape)}; conv LoRA (non-2-D lora weights) "
                "is not supported"
            )
        mods.setdefault(m.group(1), {})[m.group(2)] = t
    for name, ab in mods.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: module {name!r} has lora_{'AB'.replace(''.join(ab), '')} missing")
        if ab["A"].shape[0] != ab["B"].shape[1]:
            raise ValueError(
                f"{where}: module {name!r}: lora_A {tuple(ab['A'].shape)} and lora_B "
                f"{tuple(ab['B'].shape)} ranks differ"
            )
    if not mods:
        raise ValueError(f"{where}: the adapter has no LoRA weights")
    return mods


def _adapter_dtype_for(m: nn.Module, autocast_adapter_dtype: bool) -> Optional[torch.dtype]:
    # PEFT's autocast_adapter_dtype=True: fp16/bf16 models get fp32 adapters.
    if autocast_adapter_dtype and m.weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return None


def load_peft_adapter(
    model: nn.Module,
    path: Union[str, os.PathLike],
    backend: str = "auto",
    *,
    is_trainable: bool = False,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Load a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``
    or ``adapter_model.bin``, as written by ``PeftModel.save_pretrained``) into ``model``,
    injecting :class:`FusedLoRALinear` layers; returns ``model``.

    The modules that get adapters are those with weights in the checkpoint (the same modules
    PEFT's config matched, including layers_to_transform / exclude_modules selections); each
    one's rank comes from its weights and is checked against ``r`` / ``rank_pattern``, its
    alpha from ``lora_alpha`` / ``alpha_pattern``; ``use_rslora`` and ``lora_dropout`` from the
    config. Conv1D bases are fan_in_fan_out as in PEFT. Outputs equal
    ``PeftModel.from_pretrained(model, path)``'s (dropout masks aside).

    Args:
        model: the base model the adapter was trained on (not a PeftModel).
        path: the adapter folder (local; nothing is downloaded).
        backend: kernel backend of the injected layers.
        is_trainable: leave the LoRA weights trainable (requires_grad=True). The default False
            freezes every parameter, as ``PeftModel.from_pretrained``'s default; the model's
            train/eval mode is left as it was.
        autocast_adapter_dtype: fp32 adapters on fp16/bf16 bases, as PEFT's default.

    Raises:
        ValueError: unsupported adapter features (DoRA, LoHa/LoKr/other peft types, lora_bias,
            embedding/conv LoRA, modules_to_save, trained biases, ...), a module named in the
            checkpoint that the model lacks or that cannot be wrapped, or shapes that disagree.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if hasattr(model, "peft_config"):
        raise ValueError("model is a PeftModel: pass the base model, or use from_peft() to convert it")
    where = f"PEFT adapter {os.fspath(path)!r}"
    cfg, sd = _read_adapter_folder(path)
    _refuse_config(cfg, where)
    mods = _parse_peft_state(sd, where)
    r0, a0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    use_rslora = bool(cfg.get("use_rslora", False))
    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)

    plan = {}
    for name, ab in mods.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{where}: the checkpoint has LoRA weights for {name!r} but the model has no such "
                "module (is this the adapter's base model?)"
            ) from None
        _check_base_module(name, m)
        r = ab["A"].shape[0]
        r_cfg = _pattern_value(rank_pattern, name, r0)
        if r != r_cfg:
            raise ValueError(
                f"{where}: module {name!r} has rank {r} in the weights but {r_cfg} in the config"
            )
        alpha = _pattern_value(alpha_pattern, name, a0)
        fanio = _is_conv1d(m)
        in_f, out_f = m.weight.shape[::-1] if not fanio else m.weight.shape
        if ab["A"].shape[1] != in_f or ab["B"].shape[0] != out_f:
            raise ValueError(
                f"{where}: module {name!r} is [{out_f} out, {in_f} in] but lora_A is "
                f"{tuple(ab['A'].shape)} and lora_B {tuple(ab['B'].shape)}"
            )
        plan[name] = (m, r, alpha)

    for name, (m, r, alpha) in plan.items():
        kw = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora, backend=backend,
                  adapter_dtype=_adapter_dtype_for(m, autocast_adapter_dtype))
        fused = _wrap(m, **kw)
        with torch.no_grad():
            fused.lora_A.weight.copy_(mods[name]["A"])
            fused.lora_B.weight.copy_(mods[name]["B"])
        fused.train(m.training)
        _set_submodule(model, name, fused)
    for p in model.parameters():
        p.requires_grad_(False)
    if is_trainable:
        for _, m in _fused_layers(model):
            m.lora_A.weight.requires_grad_(True)
            m.lora_B.weight.requires_grad_(True)
    return model


def _suffix_targets(model: nn.Module, names: List[str]) -> Union[List[str], str]:
    """PEFT-style short target list (last name components) when it selects exactly ``names``
    among the model's Linear/Conv1D layers, else the exact qualified names."""
    suffixes = sorted({n.rpartition(".")[2] for n in names})
    wanted = set(names)
    for name in dict(model.named_modules()):
        inside = any(name.startswith(n + ".") for n in wanted)
        if name in wanted or inside:
            continue
        if _name_matches(name, suffixes):
            return sorted(names)
    return suffixes


def save_peft_adapter(
    model: nn.Module,
    path: Union[str, os.PathLike],
    base_model_name_or_path: Optional[str] = None,
    safe_serialization: bool = True,
    task_type: Optional[str] = None,
) -> None:
    """Write ``model``'s FusedLoRALinear adapters as a PEFT adapter folder (``adapter_config.json``
    + ``adapter_model.safetensors``, or ``adapter_model.bin`` with ``safe_serialization=False``)
    that ``PeftModel.from_pretrained(base_model, path)`` loads back. Ranks / alphas that differ
    between modules go into ``rank_pattern`` / ``alpha_pattern`` (exact module names).
    ``task_type`` (e.g. "CAUSAL_LM") is written to the config, so that PEFT rebuilds the matching
    ``PeftModelFor...`` class; the checkpoint keys are the same either way.

    Raises:
        ValueError: no FusedLoRALinear in ``model``; modules that mix use_rslora settings or
            dropout rates (PEFT's config has one of each); merged layers (unmerge first).
    """
    model = _unwrap_peft(model)
    layers = dict(_fused_layers(model))
    if not layers:
        raise ValueError("model has no FusedLoRALinear layers to save (call inject_lora first)")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"modules {merged[:3]} are merged: call unmerge_lora(model) before saving")
    rs = {m.use_rslora for m in layers.values()}
    if len(rs) != 1:
        raise ValueError("modules mix use_rslora=True and False; PEFT's config has one use_rslora")
    drops = {m.lora_dropout for m in layers.values()}
    if len(drops) != 1:
        raise ValueError(f"modules use different lora_dropout {sorted(drops)}; PEFT's config has one")
    ranks = Counter(m.r for m in layers.values())
    alphas = Counter(m.lora_alpha for m in layers.values())
    r0 = ranks.most_common(1)[0][0]
    a0 = alphas.most_common(1)[0][0]
    rank_pattern = {n: m.r for n, m in layers.items() if m.r != r0}
    alpha_pattern = {n: m.lora_alpha for n, m in layers.items() if m.lora_alpha != a0}
    cfg = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": a0,
        "lora_dropout": drops.pop(),
        "use_rslora": rs.pop(),
        "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "target_modules": _suffix_targets(model, list(layers)),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "lora_bias": False,
    }
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    sd = {k: v.contiguous() for k, v in lora_state_dict(model, peft_format=True).items()}
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(sd, os.path.join(path, _SAFETENSORS_NAME), metadata={"format": "pt"})
    else:
        torch.save(sd, os.path.join(path, _BIN_NAME))
    with open(os.path.join(path, _CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def from_peft(peft_model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every PEFT LoRA ``Linear`` layer of a live ``PeftModel`` (or of a model that PEFT
    injected into) with a :class:`FusedLoRALinear`, in place, keeping the same parameter objects
    (base weight/bias, ``lora_A``/``lora_B`` modules: optimizer state stays valid), scaling
    (set_scale included), dropout rate and train/eval mode. Merged PEFT layers are unmerged first.
    Returns ``peft_model``; its forward and outputs are unchanged (dropout masks aside). PEFT's
    own layer methods (merge_and_unload, disable_adapter, set_adapter, save_pretrained) do not
    know the fused layers: use :func:`merge_lora`, :func:`save_peft_adapter` and friends.

    Raises:
        ValueError: more than one active adapter, disabled adapters, DoRA or another LoRA variant,
            lora_bias, embedding/conv LoRA layers, quantized bases (bnb, GPTQ, ...), or
            non-LoRA PEFT tuners.
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
            _refuse_config(c.to_dict() if hasattr(c, "to_dict") else vars(c), f"adapter {an!r}")

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
            raise ValueError(f"module {name!r} is a PEFT LoRA {kind}: only LoRA Linear layers are supported "
                             "(embedding / conv / MHA / ParamWrapper LoRA are not)")
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
            raise ValueError(f"module {name!r}: DoRA (use_dora) is not supported")
        if getattr(m, "lora_variant", {}).get(a) is not None:
            variant = type(m.lora_variant[a]).__name__
            raise ValueError(f"module {name!r}: LoRA variant {variant} is not supported")
        if getattr(m, "lora_bias", {}).get(a, False):
            raise ValueError(f"module {name!r}: lora_bias is not supported")
        extra = [k for k in m.lora_A if k != a]
        base = m.get_base_layer()
        _check_base_module(name + ".base_layer", base)
        todo.append((name, m, a, base, extra))
    if not todo:
        raise ValueError("peft_model has no PEFT LoRA layers to convert")

    for name, m, a, base, extra in todo:
        if extra:
            warnings.warn(f"from_peft: module {name!r} drops inactive adapters {extra}", stacklevel=2)
        if m.merged:
            m.unmerge()
        r, alpha = int(m.r[a]), m.lora_alpha[a]
        rs_map = getattr(m, "use_rslora", None)  # a per-adapter dict in PEFT >= 0.13
        rs = bool(rs_map.get(a, False)) if isinstance(rs_map, Mapping) else False
        scale = m.scaling[a]
        scale = float(scale.item() if isinstance(scale, Tensor) else scale)
        # set_scale / scale_layer may have changed scaling since init: keep the live value.
        if not math.isclose(scale, alpha / (math.sqrt(r) if rs else r), rel_tol=1e-6):
            alpha = scale * (math.sqrt(r) if rs else r)
        drop = m.lora_dropout[a]
        p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
        A, B = m.lora_A[a], m.lora_B[a]
        fused = _wrap(base, r=r, lora_alpha=alpha, lora_dropout=p, use_rslora=rs, backend=backend,
                      adapter_dtype=A.weight.dtype)
        # Keep PEFT's own lora_A / lora_B modules (same Parameters) rather than copies.
        fused.lora_A, fused.lora_B = A, B
        fused.train(m.training)
        _set_submodule(peft_model, name, fused)
    return peft_model


# -------------------------------------------------------------------------------------------------
# mixed-adapter serving: several PEFT adapters in MultiLoRALinear banks
# -------------------------------------------------------------------------------------------------


_SLOT_MAP_ATTR = "fused_lora_adapter_slots"


def _expand_ids_hook(mod: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
    """Forward pre-hook of the MultiLoRALinear banks made by load_peft_adapters_multi: when
    forward gets no adapter_ids, use ``mod.default_adapter_ids`` broadcast to x's leading shape
    (per-sequence ids [batch] -> per-token [batch, seq, ...]), so ids set once per model forward
    (see :func:`adapter_ids`) reach every layer whatever the sequence length."""
    if len(args) != 1 or kwargs.get("adapter_ids") is not None or mod.default_adapter_ids is None:
        return None  # explicit ids win
    x, ids = args[0], mod.default_adapter_ids
    lead = x.shape[:-1]
    if ids.shape == lead:
        return None
    if ids.dim() == 1 and len(lead) >= 1 and ids.shape[0] == lead[0]:
        kwargs = dict(kwargs, adapter_ids=ids.reshape(ids.shape[0], *([1] * (len(lead) - 1))).expand(lead))
        return args, kwargs
    raise ValueError(
        f"adapter_ids has shape {tuple(ids.shape)}; it must be one id per sequence [{lead[0]}] or "
        f"one per token {tuple(lead)}"
    )


def load_peft_adapters_multi(
    model: nn.Module,
    adapters: Mapping[str, Union[str, os.PathLike]],
    *,
    n_slots: Optional[int] = None,
    max_rank: Optional[int] = None,
    backend: str = "auto",
    autocast_adapter_dtype: bool = True,
) -> Dict[str, int]:
    """Load several PEFT LoRA adapter folders into :class:`~fused_lora.MultiLoRALinear` banks over
    one shared base model, for mixed-adapter batches (each sequence or token picks its adapter).

    Every ``nn.Linear`` that any adapter targets becomes a MultiLoRALinear sharing the base weight;
    adapter ``k`` (in ``adapters``' order) goes to slot ``k`` of each bank it has weights for,
    with its PEFT scaling (alpha / r or alpha / sqrt(r), rank/alpha patterns applied); a module
    an adapter does not target keeps that slot empty (base output, as PEFT). Banks are frozen
    (serving). Choose the adapters of a forward with :func:`adapter_ids`.

    Args:
        model: the base model (not a PeftModel, no fused layers yet).
        adapters: {adapter name: PEFT adapter folder}.
        n_slots: bank size (default: the number of adapters; larger leaves room for
            ``MultiLoRALinear.load_adapter`` later).
        max_rank: bank rank (default: the largest rank any adapter uses at that module).
        backend: kernel backend of the banks.
        autocast_adapter_dtype: fp32 banks on fp16/bf16 bases, as PEFT keeps adapters.

    Returns:
        {adapter name: slot}; also stored on ``model.fused_lora_adapter_slots``.

    Raises:
        ValueError: as :func:`load_peft_adapter` for each folder; Conv1D (GPT-2) bases, which
            MultiLoRALinear does not take; n_slots / max_rank too small.
    """
    from fused_lora.modules import MultiLoRALinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(adapters, Mapping) or not adapters:
        raise TypeError(f"adapters must be a non-empty mapping {{name: folder}}, got {adapters!r:.80}")
    for k in adapters:
        if not isinstance(k, str) or not k:
            raise TypeError(f"adapters keys must be non-empty adapter names (str), got {k!r}")
    if n_slots is not None and (not isinstance(n_slots, int) or n_slots < len(adapters)):
        raise ValueError(
            f"n_slots must be an int >= the number of adapters ({len(adapters)}), got {n_slots!r}"
        )
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"max_rank must be an int >= 1, got {max_rank!r}")

    # Parse and check every folder before touching the model.
    loaded: Dict[str, Dict[str, tuple]] = {}  # adapter -> module -> (A, B, scale)
    for an, path in adapters.items():
        where = f"PEFT adapter {an!r} ({os.fspath(path)!r})"
        cfg, sd = _read_adapter_folder(path)
        _refuse_config(cfg, where)
        mods = _parse_peft_state(sd, where)
        r0, a0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        rs = bool(cfg.get("use_rslora", False))
        loaded[an] = {}
        for name, ab in mods.items():
            try:
                m = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{where}: the model has no module {name!r}") from None
            _check_base_module(name, m)
            if _is_conv1d(m):
                raise ValueError(
                    f"{where}: module {name!r} is a transformers Conv1D; MultiLoRALinear banks take "
                    "nn.Linear bases only"
                )
            r = ab["A"].shape[0]
            if r != _pattern_value(rp, name, r0):
                raise ValueError(f"{where}: module {name!r} has rank {r} in the weights but "
                                 f"{_pattern_value(rp, name, r0)} in the config")
            if ab["A"].shape[1] != m.in_features or ab["B"].shape[0] != m.out_features:
                raise ValueError(f"{where}: module {name!r} is [{m.out_features} out, {m.in_features} in] "
                                 f"but lora_A is {tuple(ab['A'].shape)} and lora_B {tuple(ab['B'].shape)}")
            alpha = _pattern_value(ap, name, a0)
            loaded[an][name] = (ab["A"], ab["B"], alpha / (math.sqrt(r) if rs else r))
    modules: Dict[str, int] = {}  # module -> largest rank over adapters
    for per in loaded.values():
        for name, (A, _, _) in per.items():
            modules[name] = max(modules.get(name, 0), A.shape[0])
    if max_rank is not None and max(modules.values()) > max_rank:
        big = max(modules, key=modules.get)
        raise ValueError(f"max_rank={max_rank} is smaller than rank {modules[big]} at module {big!r}")

    slots = {an: i for i, an in enumerate(adapters)}
    n = n_slots if n_slots is not None else len(adapters)
    order = [name for name, _ in model.named_modules() if name in modules]
    for name in order:
        base = model.get_submodule(name)
        bank = MultiLoRALinear(
            base, n, max_rank or modules[name], trainable=False, backend=backend,
            adapter_dtype=_adapter_dtype_for(base, autocast_adapter_dtype),
        )
        for an, per in loaded.items():
            if name in per:
                A, B, scale = per[name]
                bank.load_adapter(slots[an], A, B, scale)
        bank.register_forward_pre_hook(_expand_ids_hook, with_kwargs=True)
        bank.train(base.training)
        _set_submodule(model, name, bank)
    for p in model.parameters():
        p.requires_grad_(False)
    setattr(model, _SLOT_MAP_ATTR, dict(slots))
    return dict(slots)


def _to_ids(model: nn.Module, ids: Union[Tensor, Sequence[Union[int, str, None]]], device) -> Tensor:
    if isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"adapter ids must be an integer tensor, got {ids.dtype}")
        return ids.to(device=device, dtype=torch.int64)
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"ids must be a tensor or a list of adapter names / slots, got {type(ids).__name__}")
    slots = getattr(model, _SLOT_MAP_ATTR, {})
    out = []
    for v in ids:
        if v is None:
            out.append(-1)
        elif isinstance(v, str):
            if v not in slots:
                raise ValueError(f"unknown adapter name {v!r} in ids; loaded: {sorted(slots)}")
            out.append(slots[v])
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append(v)
        else:
            raise TypeError(f"ids entries must be adapter names, slot ints or None, got {v!r}")
    return torch.tensor(out, dtype=torch.int64, device=device)


@contextlib.contextmanager
def adapter_ids(model: nn.Module, ids: Union[Tensor, Sequence[Union[int, str, None]]]) -> Iterator[Tensor]:
    """Route a model's ordinary forward (e.g. a transformers ``model(input_ids)`` or
    ``generate``) through per-sequence or per-token adapters of its MultiLoRALinear banks::

        slots = fused_lora.load_peft_adapters_multi(model, {"sql": p1, "chat": p2})
        with fused_lora.adapter_ids(model, ["chat", "sql", None]):   # None / -1: base model
            logits = model(input_ids).logits                         # input_ids [3, seq]

    ``ids``: adapter names, slot ints or None (one per sequence), or an integer tensor [batch]
    (one per sequence) or [batch, seq] (one per token). Sets ``default_adapter_ids`` on every
    MultiLoRALinear in ``model`` (restored on exit); banks from :func:`load_peft_adapters_multi`
    broadcast per-sequence ids over the token dims. Yields the id tensor.
    """
    banks = [m for m in model.modules() if hasattr(m, "default_adapter_ids") and hasattr(m, "load_adapter")]
    if not banks:
        raise ValueError("model has no MultiLoRALinear layers (use load_peft_adapters_multi first)")
    t = _to_ids(model, ids, banks[0].weight.device)
    if t.dim() not in (1, 2):
        raise ValueError(f"ids must be [batch] or [batch, seq], got shape {tuple(t.shape)}")
    n = banks[0].n_slots
    if t.numel() and (int(t.min()) < -1 or int(t.max()) >= n):
        raise ValueError(f"ids must be in [-1, n_slots={n}), got values in [{int(t.min())}, {int(t.max())}]")
    saved = [b.default_adapter_ids for b in banks]
    try:
        for b in banks:
            b.default_adapter_ids = t
        yield t
    finally:
        for b, old in zip(banks, saved):
            b.default_adapter_ids = old
