"""PEFT adapter folders and live PEFT models: :func:`load_peft_adapter` / :func:`save_peft_adapter`
read and write the folder format of PEFT's ``save_pretrained`` (``adapter_config.json`` +
``adapter_model.safetensors`` or ``adapter_model.bin``); :func:`from_peft` converts a live
``PeftModel`` in place. ``_adapter_load_plan`` turns one adapter folder into the per-module
weights and scalings that both :func:`load_peft_adapter` and the serving loader
(:func:`~fused_lora.integrations.serving.load_peft_adapters_multi`) apply.

peft and safetensors are optional: they are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from fused_lora.integrations.inject import (
    _PEFT_PREFIX,
    _fused_layers,
    _set_submodule,
    _unwrap_peft,
    _wrap,
    lora_state_dict,
)
from fused_lora.integrations.matching import _check_base_module, _is_conv1d, _name_matches, _pattern_value

_CONFIG_NAME = "adapter_config.json"
_SAFETENSORS_NAME = "adapter_model.safetensors"
_BIN_NAME = "adapter_model.bin"

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



@dataclass
class _ModuleLoad:
    """One module's share of an adapter: where it goes and what it gets."""

    module: nn.Module  # the base nn.Linear / Conv1D in the model
    A: Tensor  # [r, in]
    B: Tensor  # [out, r]
    r: int
    alpha: float


@dataclass
class _AdapterLoad:
    """An adapter folder checked against a model, before anything in the model changes."""

    where: str  # names the adapter in error messages
    config: Dict[str, Any]
    use_rslora: bool
    dropout: float
    modules: Dict[str, _ModuleLoad] = field(default_factory=dict)  # qualified name -> load

    def scale(self, name: str) -> float:
        m = self.modules[name]
        return m.alpha / (math.sqrt(m.r) if self.use_rslora else m.r)


def _adapter_load_plan(
    model: nn.Module, path: Union[str, os.PathLike], where: str, *, linear_only: bool = False
) -> _AdapterLoad:
    """Read the adapter folder at ``path``, refuse what fused_lora cannot load, and match each
    module that has weights in the checkpoint to the model's base layer, checking ranks against
    ``r`` / ``rank_pattern`` and shapes against the base. ``linear_only`` refuses Conv1D bases
    (MultiLoRALinear banks take nn.Linear only). Touches nothing in ``model``."""
    cfg, sd = _read_adapter_folder(path)
    _refuse_config(cfg, where)
    mods = _parse_peft_state(sd, where)
    r0, a0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    out = _AdapterLoad(where=where, config=cfg, use_rslora=bool(cfg.get("use_rslora", False)),
                       dropout=float(cfg.get("lora_dropout", 0.0) or 0.0))
    for name, ab in mods.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{where}: the checkpoint has LoRA weights for {name!r} but the model has no such "
                "module (is this the adapter's base model?)"
            ) from None
        _check_base_module(name, m)
        if linear_only and _is_conv1d(m):
            raise ValueError(
                f"{where}: module {name!r} is a transformers Conv1D; MultiLoRALinear banks take "
                "nn.Linear bases only"
            )
        r = ab["A"].shape[0]
        r_cfg = _pattern_value(rank_pattern, name, r0)
        if r != r_cfg:
            raise ValueError(
                f"{where}: module {name!r} has rank {r} in the weights but {r_cfg} in the config"
            )
        alpha = _pattern_value(alpha_pattern, name, a0)
        in_f, out_f = m.weight.shape if _is_conv1d(m) else m.weight.shape[::-1]
        if ab["A"].shape[1] != in_f or ab["B"].shape[0] != out_f:
            raise ValueError(
                f"{where}: module {name!r} is [{out_f} out, {in_f} in] but lora_A is "
                f"{tuple(ab['A'].shape)} and lora_B {tuple(ab['B'].shape)}"
            )
        out.modules[name] = _ModuleLoad(m, ab["A"], ab["B"], r, alpha)
    return out

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
    plan = _adapter_load_plan(model, path, f"PEFT adapter {os.fspath(path)!r}")
    for name, ml in plan.modules.items():
        m = ml.module
        kw = dict(r=ml.r, lora_alpha=ml.alpha, lora_dropout=plan.dropout, use_rslora=plan.use_rslora,
                  backend=backend, adapter_dtype=_adapter_dtype_for(m, autocast_adapter_dtype))
        fused = _wrap(m, **kw)
        with torch.no_grad():
            fused.lora_A.weight.copy_(ml.A)
            fused.lora_B.weight.copy_(ml.B)
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


