"""PEFT adapter folders: :func:`load_peft_adapter` / :func:`save_peft_adapter` read and write the
folder format of PEFT's ``save_pretrained`` (``adapter_config.json`` +
``adapter_model.safetensors`` or ``adapter_model.bin``). ``_adapter_load_plan`` turns one adapter
folder into the per-module weights and scalings that both :func:`load_peft_adapter` and the
serving loader (:func:`~fused_lora.integrations.serving.load_peft_adapters_multi`) apply. A live
``PeftModel`` converts with :func:`~fused_lora.integrations.live_peft.from_peft`.

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

from fused_lora.integrations import features, moe_io
from fused_lora.integrations.inject import (
    _PEFT_PREFIX,
    _fused_layers,
    _transaction,
    _unwrap_peft,
    _wrap,
    lora_state_dict,
)
from fused_lora.integrations.matching import (
    _check_base_module,
    _is_conv1d,
    _missing_targets,
    _name_matches,
    _pattern_value,
)
from fused_lora.modules import FusedLoRALinear
from fused_lora.moe import MoELoRAExperts, _FusedExperts, moe_layers

_CONFIG_NAME = "adapter_config.json"
_SAFETENSORS_NAME = "adapter_model.safetensors"
_BIN_NAME = "adapter_model.bin"

def _read_adapter_folder(path: Union[str, os.PathLike]) -> tuple:
    """(config dict, {key: tensor}) from a PEFT save_pretrained folder. A damaged file raises
    ValueError naming the file and what is wrong (not the raw parser error)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path must be a folder written by PEFT's save_pretrained, got {path!r}")
    cfg_file = os.path.join(path, _CONFIG_NAME)
    if not os.path.isfile(cfg_file):
        raise ValueError(f"no {_CONFIG_NAME} in {path!r}: not a PEFT adapter folder")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{cfg_file}: not valid JSON ({e}); the adapter config is damaged") from e
    if not isinstance(cfg, dict):
        raise ValueError(
            f"{cfg_file}: must hold a JSON object (PEFT's LoraConfig), got a JSON {type(cfg).__name__}"
        )
    st, bn = os.path.join(path, _SAFETENSORS_NAME), os.path.join(path, _BIN_NAME)
    if os.path.isfile(st):
        from safetensors.torch import load_file

        weights, kind = st, "safetensors"
        load = lambda: load_file(st)  # noqa: E731
    elif os.path.isfile(bn):
        weights, kind = bn, "PyTorch (torch.save)"
        load = lambda: torch.load(bn, map_location="cpu", weights_only=True)  # noqa: E731
    else:
        raise ValueError(f"no {_SAFETENSORS_NAME} or {_BIN_NAME} in {path!r}")
    try:
        sd = load()
    except Exception as e:  # SafetensorError, PytorchStreamReader's RuntimeError, UnpicklingError, ...
        raise ValueError(
            f"{weights}: not a readable {kind} file, it may be truncated or corrupt "
            f"({type(e).__name__}: {str(e)[:200]})"
        ) from e
    if not isinstance(sd, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()
    ):
        raise ValueError(f"{weights}: must hold a {{name: tensor}} state dict, got {type(sd).__name__} "
                         "with non-tensor entries")
    return cfg, sd


def _parse_peft_state(sd: Mapping[str, Tensor], where: str, *, allow_empty: bool = False
                      ) -> Dict[str, Dict[str, Tensor]]:
    """{module name: {"A": [r, in], "B": [out, r]}} from PEFT's keys; refuses keys of features
    that plain LoRA does not have (the feature table's key patterns). allow_empty: the adapter
    may have no module weights (its target_parameters weights were split off already)."""
    mods: Dict[str, Dict[str, Tensor]] = {}
    # Name the feature first: its checkpoints also hold other keys (e.g. saved embedding layers).
    features.refuse_keys(sd, where)
    for key, t in sd.items():
        k = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", k)
        if m is None:
            raise ValueError(
                f"{where}: unexpected key {key!r} (not a LoRA lora_A/lora_B weight); fused_lora "
                "loads plain LoRA adapters"
            )
        if t.dim() != 2:
            raise ValueError(
                f"{where}: {key!r} has shape {tuple(t.shape)}; conv LoRA (non-2-D lora weights) "
                "is not supported"
            )
        if not t.is_floating_point():
            raise ValueError(f"{where}: {key!r} has dtype {t.dtype}; LoRA weights are floating point")
        mods.setdefault(m.group(1), {})[m.group(2)] = t
    for name, ab in mods.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: module {name!r} has lora_{'AB'.replace(''.join(ab), '')} missing")
        if ab["A"].shape[0] != ab["B"].shape[1]:
            raise ValueError(
                f"{where}: module {name!r}: lora_A {tuple(ab['A'].shape)} and lora_B "
                f"{tuple(ab['B'].shape)} ranks differ"
            )
    if not mods and not allow_empty:
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

    module: nn.Module  # the base nn.Linear / Conv1D in the model, or its FusedLoRALinear
    A: Tensor  # [r, in]
    B: Tensor  # [out, r]
    r: int
    alpha: float


@dataclass
class _ParamLoad:
    """One targeted projection of a fused MoE experts module (PEFT's target_parameters)."""

    A: Tensor  # [E, r, in] (a view of PEFT's [E*r, in])
    B: Tensor  # [E, out, r] (a view of PEFT's [out, E*r])
    r: int
    alpha: float


@dataclass
class _ExpertsLoad:
    """One fused experts module's share of an adapter: its targeted projections."""

    module: nn.Module  # the transformers experts module, or its MoELoRAExperts
    projs: Dict[str, _ParamLoad] = field(default_factory=dict)  # projection -> load, nesting order


@dataclass
class _AdapterLoad:
    """An adapter folder checked against a model, before anything in the model changes."""

    where: str  # names the adapter in error messages
    config: Dict[str, Any]
    use_rslora: bool
    dropout: float
    modules: Dict[str, _ModuleLoad] = field(default_factory=dict)  # qualified name -> load
    experts: Dict[str, _ExpertsLoad] = field(default_factory=dict)  # MoE experts module -> load

    def expert_scale(self, name: str, proj: str) -> float:
        p = self.experts[name].projs[proj]
        return p.alpha / (math.sqrt(p.r) if self.use_rslora else p.r)

    @property
    def frozen_lora_B(self) -> bool:
        # MiCA trains lora_A only (PEFT freezes lora_B); its forward is plain LoRA.
        init = self.config.get("init_lora_weights")
        return isinstance(init, str) and init.lower() == "mica"

    def scale(self, name: str) -> float:
        m = self.modules[name]
        return m.alpha / (math.sqrt(m.r) if self.use_rslora else m.r)


def _adapter_load_plan(
    model: nn.Module, path: Union[str, os.PathLike], where: str, *, into_fused: bool = False,
    linear_only: bool = False,
) -> _AdapterLoad:
    """Read the adapter folder at ``path``, refuse what fused_lora cannot load (the feature
    table, config values), and match each module that has weights in the checkpoint to the
    model's base layer, checking ranks against ``r`` / ``rank_pattern`` and shapes against the
    base. ``into_fused``: a module that already is a FusedLoRALinear (inject_lora) takes the
    weights if its rank matches, and every such layer must get weights. ``linear_only``
    refuses Conv1D bases (MultiLoRALinear banks take nn.Linear only). Touches nothing in
    ``model``: a refusal leaves it as it was."""
    cfg, sd = _read_adapter_folder(path)
    features.refuse_config(cfg, where)
    features.check_config_values(cfg, where)
    features.refuse_keys(sd, where)
    experts = _experts_load_plan(model, cfg, sd, where, into_fused=into_fused)
    if experts is not None:
        ptargets, found, sd = experts
    mods = _parse_peft_state(sd, where, allow_empty=experts is not None)
    targets = cfg.get("target_modules")
    if targets is not None:
        missing = _missing_targets(model, targets if isinstance(targets, str) else list(targets))
        if missing:
            raise ValueError(
                f"{where}: config key 'target_modules' lists {missing} not found in the base model "
                f"({type(model).__name__}); is this the adapter's base model?"
            )
    r0, a0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    out = _AdapterLoad(where=where, config=cfg, use_rslora=bool(cfg.get("use_rslora", False)),
                       dropout=float(cfg.get("lora_dropout", 0.0) or 0.0))
    if experts is not None:
        _fill_experts_plan(out, model, ptargets, found, rank_pattern, alpha_pattern, r0, a0)
    for name, ab in mods.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{where}: the checkpoint has LoRA weights for {name!r} but the model has no such "
                "module (is this the adapter's base model?)"
            ) from None
        r = ab["A"].shape[0]
        if into_fused and isinstance(m, FusedLoRALinear):
            if m.merged:
                raise ValueError(f"{where}: module {name!r} is merged; unmerge_lora(model) before loading")
            if m.r != r:
                raise ValueError(
                    f"{where}: module {name!r} already has a fused LoRA adapter of rank {m.r} (from "
                    f"inject_lora) but the checkpoint's is rank {r}; inject with the adapter's rank, "
                    "or load into the base model"
                )
        else:
            _check_base_module(name, m)
        if linear_only and _is_conv1d(m):
            raise ValueError(
                f"{where}: module {name!r} is a transformers Conv1D; MultiLoRALinear banks take "
                "nn.Linear bases only"
            )
        r_cfg = _pattern_value(rank_pattern, name, r0)
        if r != r_cfg:
            raise ValueError(
                f"{where}: module {name!r} has rank {r} in the weights but {r_cfg} in the config"
            )
        alpha = _pattern_value(alpha_pattern, name, a0)
        if isinstance(m, FusedLoRALinear):
            in_f, out_f = m.in_features, m.out_features
        else:
            in_f, out_f = m.weight.shape if _is_conv1d(m) else m.weight.shape[::-1]
        if ab["A"].shape[1] != in_f or ab["B"].shape[0] != out_f:
            raise ValueError(
                f"{where}: module {name!r} is [{out_f} out, {in_f} in] but lora_A is "
                f"{tuple(ab['A'].shape)} and lora_B {tuple(ab['B'].shape)}"
            )
        out.modules[name] = _ModuleLoad(m, ab["A"], ab["B"], r, alpha)
    if into_fused:
        uncovered = [n for n, _ in _fused_layers(model) if n not in out.modules]
        uncovered += [f"{n}.{t}" for n, m in moe_layers(model) for t in m.targets
                      if n not in out.experts or t not in out.experts[n].projs]
        if uncovered:
            raise ValueError(
                f"{where}: module {uncovered[0]!r} has a fused LoRA adapter (inject_lora) but the "
                f"checkpoint has no weights for it ({len(uncovered)} such modules); inject only the "
                "adapter's target modules, or load into the base model"
            )
    return out


def _experts_load_plan(model: nn.Module, cfg: Mapping[str, Any], sd: Mapping[str, Tensor], where: str,
                       *, into_fused: bool):
    """(targets {module: [projections]}, PEFT weights {module: {proj: {"A", "B"}}}, the other
    keys) for an adapter with target_parameters, or None without them."""
    tp = cfg.get("target_parameters")
    if not tp:
        return None
    ptargets = moe_io.param_targets(model, tp, where)
    for name in ptargets:
        m = model.get_submodule(name)
        if isinstance(m, _FusedExperts) and not (into_fused and isinstance(m, MoELoRAExperts)):
            raise ValueError(f"{where}: module {name!r} already has fused MoE LoRA adapters (a "
                             f"{type(m).__name__}); target the plain base model")
    found, rest = moe_io.split_param_keys(sd, ptargets, _PEFT_PREFIX, where)
    return ptargets, found, rest


def _fill_experts_plan(out: _AdapterLoad, model: nn.Module, ptargets, found, rank_pattern, alpha_pattern,
                       r0, a0) -> None:
    where = out.where
    for name, leaves in ptargets.items():
        m = model.get_submodule(name)
        fused = isinstance(m, MoELoRAExperts)
        load = _ExpertsLoad(m)
        for leaf in leaves:
            pname = f"{name}.{leaf}"
            w = found[name][leaf]
            dims = moe_io.proj_dims(m, leaf)
            r = moe_io.check_param_weights(pname, dims, w["A"], w["B"], where)
            r_cfg = _pattern_value(rank_pattern, pname, r0)
            if r != r_cfg:
                raise ValueError(f"{where}: target parameter {pname!r} has rank {r} in the weights but "
                                 f"{r_cfg} in the config")
            if fused and (leaf not in m.targets or m.ranks[leaf] != r):
                have = f"rank {m.ranks[leaf]}" if leaf in m.targets else "no adapter"
                raise ValueError(
                    f"{where}: {pname!r} has {have} in the model's MoELoRAExperts (from inject_lora) but "
                    f"the checkpoint's is rank {r}; inject with the adapter's ranks, or load into the "
                    "base model"
                )
            alpha = _pattern_value(alpha_pattern, pname, a0)
            A, B = moe_io.from_peft_layout(w["A"], w["B"], dims[0])
            load.projs[leaf] = _ParamLoad(A, B, r, alpha)
        out.experts[name] = load


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

    ``target_parameters`` adapters (LoRA on the fused ``gate_up_proj`` / ``down_proj`` of
    transformers' MoE experts, e.g. Qwen3-MoE, Mixtral) replace each experts module by a
    :class:`~fused_lora.moe.MoELoRAExperts` (PEFT's [E*r, in] / [out, E*r] weights reshaped per
    expert; rank_pattern / alpha_pattern by the parameter's full name), and load into the
    MoELoRAExperts of a model injected with ``inject_lora(..., target_parameters=...)``.

    A model that :func:`inject_lora` already gave FusedLoRALinear layers takes the weights into
    those layers (each must be in the checkpoint, with the same rank; its alpha, rsLoRA and
    dropout become the adapter's; its backend and adapter dtype stay). Either everything loads
    or, on any error, the model is left exactly as it was.

    Args:
        model: the base model the adapter was trained on (not a PeftModel), plain or injected.
        path: the adapter folder (local; nothing is downloaded).
        backend: kernel backend of the injected layers.
        is_trainable: leave the LoRA weights trainable (requires_grad=True; MiCA adapters keep
            lora_B frozen, as PEFT). The default False freezes every parameter, as
            ``PeftModel.from_pretrained``'s default; the model's train/eval mode is left as it was.
        autocast_adapter_dtype: fp32 adapters on fp16/bf16 bases, as PEFT's default.

    Raises:
        ValueError: a feature fused_lora does not compute (see
            :mod:`fused_lora.integrations.features`: DoRA, KaSA, LoHa/LoKr/other peft types,
            lora_bias, base-modifying inits such as PiSSA / OLoRA, embedding/conv/MHA LoRA,
            modules_to_save, ...), a damaged file, a bad config value, a target or checkpoint
            module the model lacks or that cannot be wrapped, or shapes / ranks that disagree.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if hasattr(model, "peft_config"):
        raise ValueError("model is a PeftModel: pass the base model, or use from_peft() to convert it")
    plan = _adapter_load_plan(model, path, f"PEFT adapter {os.fspath(path)!r}", into_fused=True)
    with _transaction(model) as tx:
        for name, ml in plan.modules.items():
            m = ml.module
            if isinstance(m, FusedLoRALinear):  # injected: load into it
                fused = m
                for attr, v in (("lora_alpha", ml.alpha), ("use_rslora", plan.use_rslora),
                                ("lora_dropout", plan.dropout)):
                    tx.set_attr(m, attr, v)
                for t in (m.lora_A.weight, m.lora_B.weight):
                    tx.save_tensor(t)
            else:
                kw = dict(r=ml.r, lora_alpha=ml.alpha, lora_dropout=plan.dropout,
                          use_rslora=plan.use_rslora, backend=backend,
                          adapter_dtype=_adapter_dtype_for(m, autocast_adapter_dtype))
                fused = _wrap(m, **kw)
                fused.train(m.training)
            with torch.no_grad():
                fused.lora_A.weight.copy_(ml.A)
                fused.lora_B.weight.copy_(ml.B)
            if fused is not m:
                tx.replace(name, fused)
        for name, el in plan.experts.items():
            _apply_experts_load(tx, name, el, plan, backend, autocast_adapter_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if is_trainable:
        for _, m in _fused_layers(model):
            m.lora_A.weight.requires_grad_(True)
            m.lora_B.weight.requires_grad_(not plan.frozen_lora_B)
        for _, m in moe_layers(model):
            for t in m.targets:
                getattr(m, f"lora_A_{t}").requires_grad_(True)
                getattr(m, f"lora_B_{t}").requires_grad_(not plan.frozen_lora_B)
    return model


def _apply_experts_load(tx, name: str, el: _ExpertsLoad, plan: _AdapterLoad, backend: str,
                        autocast_adapter_dtype: bool) -> None:
    """Load one experts module's target_parameters weights: into its MoELoRAExperts (from
    inject_lora), or into a new MoELoRAExperts over the base module (recorded in ``tx``)."""
    m = el.module
    if isinstance(m, MoELoRAExperts):
        layer = m
        tx.set_attr(m, "alphas", {**m.alphas, **{t: p.alpha for t, p in el.projs.items()}})
        tx.set_attr(m, "use_rslora", plan.use_rslora)
        tx.set_attr(m, "dropout", plan.dropout)
        for t in el.projs:
            tx.save_tensor(getattr(m, f"lora_A_{t}"))
            tx.save_tensor(getattr(m, f"lora_B_{t}"))
    else:
        w = m.gate_up_proj
        dt = torch.float32 if autocast_adapter_dtype and w.dtype in (torch.float16, torch.bfloat16) else None
        layer = MoELoRAExperts(m, r={t: p.r for t, p in el.projs.items()},
                               lora_alpha={t: p.alpha for t, p in el.projs.items()}, targets=tuple(el.projs),
                               dropout=plan.dropout, use_rslora=plan.use_rslora, backend=backend,
                               adapter_dtype=dt)
        layer.train(m.training)
    with torch.no_grad():
        for t, p in el.projs.items():
            getattr(layer, f"lora_A_{t}").copy_(p.A)
            getattr(layer, f"lora_B_{t}").copy_(p.B)
    if layer is not m:
        tx.replace(name, layer)


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


def _param_suffix_targets(model: nn.Module, names: List[str]) -> List[str]:
    """PEFT target_parameters naming ``names`` (full parameter names): the shortest common
    suffixes ("mlp.experts.gate_up_proj" style) that select exactly these parameters, else the
    full names."""
    wanted = set(names)
    # The base model's parameter names (a MoELoRAExperts keeps its base's names).
    all_names = [n for n, _ in model.named_parameters()]
    for depth in (1, 2):
        suffixes = sorted({".".join(n.split(".")[-(depth + 1):]) for n in names})
        picked = {n for n in all_names if any(n == t or n.endswith("." + t) for t in suffixes)}
        if picked == wanted:
            return suffixes
    return sorted(names)


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
    MoELoRAExperts layers are written as PEFT ``target_parameters`` adapters (their keys and
    layout, see :mod:`fused_lora.integrations.moe_io`); a non-zero dropout on them is saved as
    0 with a warning, since PEFT refuses lora_dropout with target_parameters.
    ``task_type`` (e.g. "CAUSAL_LM") is written to the config, so that PEFT rebuilds the matching
    ``PeftModelFor...`` class; the checkpoint keys are the same either way.

    Raises:
        ValueError: no FusedLoRALinear in ``model``; modules that mix use_rslora settings or
            dropout rates (PEFT's config has one of each); merged layers (unmerge first).
    """
    model = _unwrap_peft(model)
    layers = dict(_fused_layers(model))
    experts = dict(moe_layers(model))
    if not layers and not experts:
        raise ValueError("model has no FusedLoRALinear or MoELoRAExperts layers to save (call inject_lora "
                         "first)")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"modules {merged[:3]} are merged: call unmerge_lora(model) before saving")
    # One record per adapted unit: a Linear module, or one projection of an experts module
    # (named by its parameter, as PEFT's rank_pattern / alpha_pattern match target_parameters).
    units = {n: (m.r, m.lora_alpha, m.use_rslora, m.lora_dropout) for n, m in layers.items()}
    for n, m in experts.items():
        for t in m.targets:
            units[f"{n}.{t}"] = (m.ranks[t], m.alphas[t], m.use_rslora, m.dropout)
    rs = {u[2] for u in units.values()}
    if len(rs) != 1:
        raise ValueError("modules mix use_rslora=True and False; PEFT's config has one use_rslora")
    drops = {u[3] for u in units.values()}
    if experts:
        if any(drops):
            # PEFT refuses lora_dropout != 0 with target_parameters: write 0 (training-only; the
            # weights are the same) so that PeftModel.from_pretrained loads the folder.
            warnings.warn(f"save_peft_adapter: lora_dropout {sorted(drops)} saved as 0.0: PEFT refuses "
                          "lora_dropout with target_parameters (MoE experts)", stacklevel=2)
        drops = {0.0}
    if len(drops) != 1:
        raise ValueError(f"modules use different lora_dropout {sorted(drops)}; PEFT's config has one")
    ranks = Counter(u[0] for u in units.values())
    alphas = Counter(u[1] for u in units.values())
    r0 = ranks.most_common(1)[0][0]
    a0 = alphas.most_common(1)[0][0]
    rank_pattern = {n: u[0] for n, u in units.items() if u[0] != r0}
    alpha_pattern = {n: u[1] for n, u in units.items() if u[1] != a0}
    cfg = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": a0,
        "lora_dropout": drops.pop(),
        "use_rslora": rs.pop(),
        "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "target_modules": _suffix_targets(model, list(layers)) if layers else [],
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "lora_bias": False,
    }
    if experts:
        cfg["target_parameters"] = _param_suffix_targets(
            model, [f"{n}.{t}" for n, m in experts.items() for t in m.targets])
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
