"""The one table of PEFT features fused_lora loads or refuses, used by every entry point
(:func:`~fused_lora.load_peft_adapter`, :func:`~fused_lora.load_peft_adapters_multi`,
:func:`~fused_lora.from_peft`), and the checks of config values.

Three views of the same features: ``LoraConfig`` keys / values (:data:`CONFIG_FEATURES`, for
folders and live configs alike), checkpoint key patterns (:data:`KEY_FEATURES`: a folder whose
config was edited still names its feature) and live PEFT layers (:data:`VARIANT_FEATURES`,
:data:`LAYER_FEATURES`). Every ``LoraConfig`` field of the installed peft is in
:data:`CONFIG_FEATURES` or :data:`SUPPORTED_CONFIG_KEYS` (a test checks it), so a new PEFT
feature is noticed rather than loaded as plain LoRA.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

# LoraConfig keys whose value does not change what plain LoRA computes, with the reason.
SUPPORTED_CONFIG_KEYS: Dict[str, str] = {
    "task_type": "chooses PEFT's wrapper class; the checkpoint keys are the same",
    "auto_mapping": "bookkeeping", "peft_version": "bookkeeping", "revision": "bookkeeping",
    "base_model_name_or_path": "bookkeeping", "inference_mode": "trainability only",
    "r": "checked (int >= 1, equal to the weights' rank)",
    "lora_alpha": "checked (finite number)", "lora_dropout": "checked (number in [0, 1))",
    "use_rslora": "checked (bool): scaling alpha / sqrt(r)",
    "rank_pattern": "checked per module", "alpha_pattern": "checked per module",
    "target_modules": "checked: every name must exist in the model",
    "exclude_modules": "the checkpoint names the modules that got weights",
    "layers_to_transform": "the checkpoint names the modules that got weights",
    "layers_pattern": "the checkpoint names the modules that got weights",
    "fan_in_fan_out": "follows the base module (Conv1D: [in, out] weight), as PEFT corrects it",
    "runtime_config": "runtime options (e.g. ephemeral GPU offload), not saved semantics",
    "megatron_core": "module path, used only with megatron_config",
    "qalora_group_size": "used only with use_qalora",
    # Init-only settings: the saved weights are what was trained; the init that needs them is
    # judged through init_lora_weights.
    "loftq_config": "used only with init_lora_weights='loftq'",
    "eva_config": "EVA init: data-driven lora_A, base weight untouched",
    "corda_config": "used only with init_lora_weights='corda'",
    "lora_ga_config": "used only with init_lora_weights='lora_ga'",
    "target_parameters": "checked: the gate_up_proj / down_proj of fused MoE experts (MoELoRAExperts); "
    "any other parameter is refused by name",
    "ensure_weight_tying": "ties adapters of tied embedding / modules_to_save layers (refused anyway)",
}

# Inits that rewrite the base weight (W0 -> W0 - s B0 A0, or a quantization residual) when PEFT
# builds the layers; PeftModel.from_pretrained redoes it on the base, so a plainly saved folder
# is not a LoRA on the unmodified base model.
BASE_MODIFYING_INITS: Dict[str, str] = {
    "pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "loftq": "LoftQ", "lora_ga": "LoRA-GA",
}


def _truthy(v: Any) -> bool:
    return v not in (None, False, [], {}, (), "")


def _base_modifying_init(v: Any) -> Optional[str]:
    if not isinstance(v, str):
        return None
    low = v.lower()
    for prefix, name in BASE_MODIFYING_INITS.items():
        if low == prefix or low.startswith(prefix + "_"):  # pissa_niter_[n]
            return name
    return None


def _init_refusal(v: Any) -> Optional[str]:
    name = _base_modifying_init(v)
    if name is None:
        return None
    return (
        f"init_lora_weights={v!r} ({name}) changes the base model's weights when PEFT builds the "
        "adapter, and PeftModel.from_pretrained redoes that on the base; these weights are not a "
        "LoRA on the unmodified base. Save the trained adapter with save_pretrained(..., "
        "path_initial_model_for_weight_conversion=<folder of the initial adapter>), which writes a "
        "plain LoRA on the original base, or convert the live PeftModel with from_peft()"
    )


def _peft_type_refusal(v: Any) -> Optional[str]:
    t = str(getattr(v, "value", v) if v is not None else "LORA").upper()  # a PeftType enum when live
    if t == "LORA":
        return None
    return (f"peft_type={t!r} is not supported (fused_lora loads plain LoRA only; LoHa, LoKr, IA3, "
            "AdaLoRA, ... are different adapters)")


def _flag(feature: str) -> Callable[[Any], Optional[str]]:
    return lambda v: f"{feature} is not supported by fused_lora" if _truthy(v) else None


# LoraConfig key -> check of its value: None when loadable, else the refusal naming the feature.
# live=False only: refusals that hold for folders but not for a live PeftModel (whose base PEFT
# has already modified).
CONFIG_FEATURES: Dict[str, Callable[[Any], Optional[str]]] = {
    "peft_type": _peft_type_refusal,
    "init_lora_weights": _init_refusal,
    "bias": lambda v: None if v in (None, "none") else
    f"bias={v!r} (trained base biases) is not supported; only bias='none'",
    "use_dora": _flag("DoRA (use_dora=True)"),
    "use_qalora": _flag("QA-LoRA (use_qalora=True)"),
    "lora_bias": _flag("lora_bias=True (a bias on lora_B)"),
    "kasa_config": _flag("KaSA (kasa_config: a trained singular-value diagonal lora_diag between lora_A "
                         "and lora_B, over a truncated base weight)"),
    "alora_invocation_tokens": _flag("activated LoRA (alora_invocation_tokens)"),
    "velora_config": _flag("VeLoRA (velora_config)"),
    "monteclora_config": _flag("MonteCLoRA (monteclora_config)"),
    "use_bdlora": _flag("BD-LoRA (use_bdlora)"),
    "target_modules_bd_a": _flag("BD-LoRA (target_modules_bd_a)"),
    "target_modules_bd_b": _flag("BD-LoRA (target_modules_bd_b)"),
    "arrow_config": _flag("Arrow routing (arrow_config)"),
    "trainable_token_indices": _flag("trainable_token_indices (trainable token embeddings)"),
    "modules_to_save": _flag("modules_to_save (fully trained extra modules)"),
    "layer_replication": _flag("layer_replication (PEFT-built repeated layers)"),
    "megatron_config": _flag("Megatron tensor-parallel LoRA (megatron_config)"),
}
_FOLDER_ONLY = {"init_lora_weights"}

# Checkpoint key patterns (searched in each key) -> feature; checked before plain LoRA parsing,
# since such checkpoints also hold ordinary lora_A / lora_B keys.
KEY_FEATURES: Tuple[Tuple[str, str], ...] = (
    (r"lora_magnitude_vector", "DoRA (a lora_magnitude_vector)"),
    (r"lora_embedding_[AB]", "embedding LoRA"),
    (r"\.lora_diag$", "KaSA (a lora_diag singular-value diagonal)"),
    (r"\.lora_B(\.[^.]+)?\.bias$", "lora_bias (a bias on lora_B)"),
    # PEFT's MHA layer nests out_proj's LoRA under its base_layer.
    (r"\.base_layer\.out_proj\.lora_[AB]\.", "MultiheadAttention LoRA"),
    (r"modules_to_save", "modules_to_save (fully trained extra modules)"),
    (r"trainable_tokens_", "trainable_token_indices (trainable token embeddings)"),
)

# Live PEFT LoRA variants (type(layer.lora_variant[adapter]).__name__) -> feature; None: the
# forward is plain LoRA and fused_lora computes it (MiCA: frozen lora_B, base untouched).
VARIANT_FEATURES: Dict[str, Optional[str]] = {
    "MiCALinearVariant": None,
    "DoraLinearVariant": "DoRA (use_dora=True)",
    "KasaLinearVariant": "KaSA (kasa_config)",
    "QALoraLinearVariant": "QA-LoRA (use_qalora=True)",
    "ALoraLinearVariant": "activated LoRA (alora_invocation_tokens)",
    "VeloraLinearVariant": "VeLoRA (velora_config)",
    "BdLoraLinearVariant": "BD-LoRA (use_bdlora)",
    "MontecloraLinearVariant": "MonteCLoRA (monteclora_config)",
    "ArrowLinearVariant": "Arrow routing (arrow_config)",
}

# Live PEFT LoRA layer classes other than Linear -> feature.
LAYER_FEATURES: Dict[str, str] = {
    "Embedding": "embedding LoRA", "Conv1d": "convolution LoRA", "Conv2d": "convolution LoRA",
    "Conv3d": "convolution LoRA", "MultiheadAttention": "MultiheadAttention LoRA",
}


def refuse_config(cfg: Mapping[str, Any], where: str, *, live: bool = False) -> None:
    """Raise ValueError naming the first feature of ``cfg`` (a LoraConfig as a dict) that
    fused_lora cannot compute. ``live``: the config of a live PeftModel, whose base PEFT has
    already modified (base-modifying inits are then right as they are)."""
    for key, check in CONFIG_FEATURES.items():
        if live and key in _FOLDER_ONLY:
            continue
        msg = check(cfg.get(key))
        if msg is not None:
            raise ValueError(f"{where}: {msg}")


def refuse_keys(keys: Iterable[str], where: str) -> None:
    """Raise ValueError naming the first feature of :data:`KEY_FEATURES` (table order, so the
    feature wins over the side keys its checkpoints also hold) that any key shows."""
    keys = list(keys)
    for pattern, feature in KEY_FEATURES:
        for key in keys:
            if re.search(pattern, key):
                if feature == "MultiheadAttention LoRA":
                    owner = re.sub(r"^base_model\.model\.", "", key.split(".base_layer.", 1)[0])
                    feature = f"MultiheadAttention LoRA (module {owner!r})"
                raise ValueError(f"{where}: key {key!r}: {feature} is not supported by fused_lora")


def variant_refusal(variant: object) -> Optional[str]:
    name = type(variant).__name__
    if name in VARIANT_FEATURES:
        f = VARIANT_FEATURES[name]
        return None if f is None else f"{f} is not supported by fused_lora"
    return f"LoRA variant {name} is not supported by fused_lora"


# ------------------------------------------------------------------------------- config values


def _bad(where: str, key: str, what: str, v: Any) -> ValueError:
    return ValueError(f"{where}: config key {key!r} must be {what}, got {v!r}")


def _is_rank(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_alpha(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_config_values(cfg: Mapping[str, Any], where: str) -> None:
    """Types and ranges of the values a load reads, each refusal naming the key and value
    (a config edited by hand or written by another tool fails here, not in arithmetic)."""
    r = cfg.get("r", 8)
    if not _is_rank(r):
        raise _bad(where, "r", "an int >= 1", r)
    a = cfg.get("lora_alpha", 8)
    if not _is_alpha(a):
        raise _bad(where, "lora_alpha", "a finite number", a)
    d = cfg.get("lora_dropout", 0.0)
    if d is not None and not (isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d < 1):
        raise _bad(where, "lora_dropout", "a number in [0, 1)", d)
    rs = cfg.get("use_rslora", False)
    if not isinstance(rs, bool):
        raise _bad(where, "use_rslora", "true or false", rs)
    for key, ok, what in (("rank_pattern", _is_rank, "an int >= 1"),
                          ("alpha_pattern", _is_alpha, "a finite number")):
        pat = cfg.get(key)
        if pat is None:
            continue
        if not isinstance(pat, Mapping):
            raise _bad(where, key, "a mapping {module-name regex: value}", pat)
        for k, v in pat.items():
            try:
                re.compile(k)
            except (re.error, TypeError) as e:
                raise ValueError(f"{where}: config key {key!r} entry {k!r} is not a valid regex ({e})") from e
            if not ok(v):
                raise ValueError(f"{where}: config key {key!r} entry {k!r} (module pattern) must be "
                                 f"{what}, got {v!r}")
    t = cfg.get("target_modules")
    if t is not None and not (isinstance(t, str) or (
            isinstance(t, (list, tuple)) and all(isinstance(x, str) and x for x in t))):
        raise _bad(where, "target_modules", "a list of module names or a regex string", t)
