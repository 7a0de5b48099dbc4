"""Injection of fused LoRA layers into any ``nn.Module`` tree (Hugging Face transformers models
included): :func:`inject_lora` replaces matching ``nn.Linear`` layers (and transformers' GPT-2
style ``Conv1D``, whose weight is stored [in, out]) with :class:`~fused_lora.FusedLoRALinear`,
which shares the frozen base parameters; :func:`lora_state_dict`, :func:`merge_lora`,
:func:`unmerge_lora`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch
from torch import Tensor, nn

from fused_lora.integrations.matching import (
    TargetModules,
    _candidates,
    _check_base_module,
    _check_rank_alpha,
    _check_targets,
    _is_conv1d,
    _missing_targets,
    _pattern_value,
)
from fused_lora.modules import FusedLoRALinear

# PEFT's checkpoint keys are the PeftModel's parameter names: base_model (LoraModel) . model.
_PEFT_PREFIX = "base_model.model."


def _wrap(m: nn.Module, **kw: Any) -> FusedLoRALinear:
    return FusedLoRALinear.from_conv1d(m, **kw) if _is_conv1d(m) else FusedLoRALinear.from_linear(m, **kw)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class _Transaction:
    """Undo record of a change to several modules of ``model``: the submodules replaced, every
    parameter's requires_grad, tensors and attributes changed in place. A load checks all it
    can first; this makes the rest (a layer constructor refusing, an unmerge, an out-of-memory
    halfway through a model) leave the model exactly as it was too."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        self._undo: List[Any] = []  # closures, run in reverse order

    def replace(self, name: str, new: nn.Module) -> None:
        old = self.model.get_submodule(name)
        _set_submodule(self.model, name, new)
        self._undo.append(lambda: _set_submodule(self.model, name, old))

    def save_tensor(self, t: Tensor) -> None:
        """Call before changing ``t`` in place."""
        saved = t.detach().clone()
        self._undo.append(lambda: t.data.copy_(saved))

    def set_attr(self, obj: object, attr: str, value: Any) -> None:
        old = getattr(obj, attr)
        setattr(obj, attr, value)
        self._undo.append(lambda: setattr(obj, attr, old))

    def rollback(self) -> None:
        with torch.no_grad():
            for undo in reversed(self._undo):
                undo()
        for p, rg in self._flags:
            p.requires_grad_(rg)


@contextlib.contextmanager
def _transaction(model: nn.Module) -> Iterator[_Transaction]:
    tx = _Transaction(model)
    try:
        yield tx
    except BaseException:
        tx.rollback()
        raise




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
    target_parameters: Optional[List[str]] = None,
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
        target_parameters: fused 3-D expert parameters of MoE layers (PEFT's
            ``target_parameters``, e.g. ``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``):
            their experts modules become :class:`fused_lora.moe.MoELoRAExperts` (rank_pattern /
            alpha_pattern keys match the parameter's full name, as in PEFT). With
            ``target_modules=None`` only these are adapted. Dropout applies to the experts too
            (PEFT refuses it there).

    Returns:
        The qualified names of the replaced modules, in ``named_modules`` order.

    Raises:
        ValueError: nothing matched, or a matched module cannot be wrapped (embedding, conv,
            quantized, nn.Linear subclass, already injected), or a bad r / alpha.
        TypeError: a badly typed argument.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if target_parameters is not None:
        return _inject_with_parameters(
            model, target_modules, target_parameters, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            use_rslora=use_rslora, backend=backend, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
            exclude_modules=exclude_modules, adapter_dtype=adapter_dtype, freeze_base=freeze_base)
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

    missing = _missing_targets(model, targets)
    if missing:
        raise ValueError(
            f"target_modules {missing} not found in the base model ({type(model).__name__}): no "
            "module is named so or ends with '.' + name (PEFT's rule); please check the target modules"
        )
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

    with _transaction(model) as tx:
        for name, (m, r_i, a_i) in modules.items():
            kw = dict(r=r_i, lora_alpha=a_i, lora_dropout=lora_dropout, use_rslora=use_rslora,
                      backend=backend, adapter_dtype=adapter_dtype)
            fused = _wrap(m, **kw)
            fused.train(m.training)
            tx.replace(name, fused)

    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for _, m in _fused_layers(model):
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    return names


def _inject_with_parameters(model: nn.Module, target_modules, target_parameters, *, r, lora_alpha,
                            lora_dropout, use_rslora, backend, rank_pattern, alpha_pattern, exclude_modules,
                            adapter_dtype, freeze_base) -> List[str]:
    """inject_lora with target_parameters: MoE experts (MoELoRAExperts) and, if target_modules
    is given, Linear layers too; all of it or nothing (one transaction)."""
    from fused_lora.moe import inject_moe_lora, moe_layers

    _check_rank_alpha(r, lora_alpha, "")
    if not (0.0 <= float(lora_dropout) < 1.0):
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    with _transaction(model):
        names = inject_moe_lora(model, target_parameters, r=r, lora_alpha=lora_alpha, dropout=lora_dropout,
                                use_rslora=use_rslora, backend=backend, rank_pattern=rank_pattern,
                                alpha_pattern=alpha_pattern, adapter_dtype=adapter_dtype)
        if target_modules is not None:
            names = inject_lora(model, target_modules, r, lora_alpha, lora_dropout, use_rslora, backend,
                                rank_pattern, alpha_pattern, exclude_modules=exclude_modules,
                                adapter_dtype=adapter_dtype, freeze_base=freeze_base) + names
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for _, m in _fused_layers(model):
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    for _, m in moe_layers(model):
        for p in m.lora_parameters():
            p.requires_grad_(True)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(set(names), key=lambda n: order.get(n, -1))


def lora_state_dict(model: nn.Module, peft_format: bool = False) -> Dict[str, Tensor]:
    """The LoRA parameters of every FusedLoRALinear in ``model``: ``{"<module>.lora_A.weight":
    [r, in], "<module>.lora_B.weight": [out, r]}`` (detached tensors, not copies), and of every
    MoELoRAExperts: ``{"<module>.lora_A_<proj>": [E, r, in], "<module>.lora_B_<proj>":
    [E, out, r]}``. With ``peft_format=True`` keys get PEFT's ``"base_model.model."`` prefix, as
    in ``adapter_model.safetensors``, and experts' weights PEFT's target_parameters keys and
    layout (copies; see :mod:`fused_lora.integrations.moe_io`). A PeftModel is unwrapped first."""
    from fused_lora.integrations import moe_io
    from fused_lora.moe import moe_layers

    model = _unwrap_peft(model)
    prefix = _PEFT_PREFIX if peft_format else ""
    out: Dict[str, Tensor] = {}
    for name, m in _fused_layers(model):
        out[f"{prefix}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{prefix}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    for name, m in moe_layers(model):  # MoE experts (target_parameters)
        leaves = [t for t in m.proj_order if t in m.targets]
        for t, pre in moe_io.peft_key_prefixes(name, leaves).items():
            A, B = getattr(m, f"lora_A_{t}").detach(), getattr(m, f"lora_B_{t}").detach()
            if peft_format:  # PEFT's ParamWrapper layout (copies): lora_A [E*r, in], lora_B [out, E*r]
                A, B = moe_io.to_peft_layout(A, B)
                out[f"{prefix}{pre}.lora_A.weight"], out[f"{prefix}{pre}.lora_B.weight"] = A, B
            else:
                out[f"{name}.lora_A_{t}"], out[f"{name}.lora_B_{t}"] = A, B
    return out


def merge_lora(model: nn.Module, exact_unmerge: bool = True) -> List[str]:
    """Fold every adapter into its base weight (see :meth:`FusedLoRALinear.merge`); returns the
    merged module names. Forward is then plain GEMMs.

    Every layer is checked before any is merged, so a refusal leaves the model as it was: the
    model must be in eval mode (a merged layer has no LoRA gradients), and no merged weight may
    be shared with another module (e.g. an lm_head tied to the embedding: merging would rewrite
    both)."""
    from fused_lora.modules import shared_weight_names

    root = _unwrap_peft(model)
    layers = list(_fused_layers(root))
    for name, m in layers:
        if m.training and not m.merged:
            raise RuntimeError(f"merge_lora: module {name!r} is in train mode; call model.eval() first "
                               "(merged layers give no LoRA gradients)")
        tied = [] if m.merged else shared_weight_names(root, m)
        if tied:
            raise ValueError(f"merge_lora: the weight of {name!r} is shared with {tied}; merging would "
                             "rewrite those too (untie them first)")
    for _, m in layers:
        m.merge(exact_unmerge=exact_unmerge)
    return [name for name, _ in layers]


def unmerge_lora(model: nn.Module) -> List[str]:
    """Undo :func:`merge_lora` on every FusedLoRALinear; returns the module names."""
    names = []
    for name, m in _fused_layers(_unwrap_peft(model)):
        m.unmerge()
        names.append(name)
    return names


