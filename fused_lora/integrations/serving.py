"""Mixed-adapter serving: :func:`load_peft_adapters_multi` loads several PEFT adapter folders into
:class:`~fused_lora.MultiLoRALinear` banks over one base model; :func:`adapter_ids` routes
per-row adapter ids through a model's ordinary forward.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fused_lora.integrations.inject import _transaction
from fused_lora.integrations.peft_io import _adapter_load_plan, _AdapterLoad
from fused_lora.moe import MoEMultiLoRAExperts
from fused_lora.routing import BatchRouting

_SLOT_MAP_ATTR = "fused_lora_adapter_slots"


def _expand_ids_hook(mod: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
    """Forward pre-hook of the MultiLoRALinear banks made by load_peft_adapters_multi: when
    forward gets no adapter_ids, use ``mod.default_adapter_ids`` broadcast to x's leading shape
    (per-sequence ids [batch] -> per-token [batch, seq, ...]), so ids set once per model forward
    (see :func:`adapter_ids`) reach every layer whatever the sequence length."""
    if len(args) != 1 or kwargs.get("adapter_ids") is not None or mod.default_adapter_ids is None:
        return None  # explicit ids win
    if isinstance(mod.default_adapter_ids, BatchRouting):
        return None  # MultiLoRALinear.forward takes the shared plan for x's shape
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
    adapter_dtype: Optional[torch.dtype] = None,
) -> Dict[str, int]:
    """Load several PEFT LoRA adapter folders into :class:`~fused_lora.MultiLoRALinear` banks over
    one shared base model, for mixed-adapter batches (each sequence or token picks its adapter).

    Every ``nn.Linear`` that any adapter targets becomes a MultiLoRALinear sharing the base weight,
    and every fused MoE experts module that an adapter targets through ``target_parameters`` a
    :class:`~fused_lora.moe.MoEMultiLoRAExperts` (an adapter x expert pair is one virtual
    expert; tokens with id -1 get the base experts' output; one routing plan per MoE layer and
    batch, shared by gate_up and down);
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
        adapter_dtype: dtype of the banks. Default (None): each base layer's weight dtype, as
            vLLM casts adapters to the model dtype. A decode step is bandwidth-bound and reads
            every bank slot it routes to: fp32 banks on a bf16 model double those bytes (one rank-16
            slot over a 4096x4096 layer is 256 KiB in bf16, 512 KiB in fp32) for accuracy that
            the bf16 base output rounds away. Pass torch.float32 for PEFT's fp32 adapters
            (``load_peft_adapter`` keeps that default, for training).

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
    if adapter_dtype is not None and not (
        isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point
    ):
        raise TypeError(f"adapter_dtype must be None or a floating torch.dtype, got {adapter_dtype!r}")

    # Parse and check every folder before touching the model.
    loaded: Dict[str, _AdapterLoad] = {
        an: _adapter_load_plan(model, path, f"PEFT adapter {an!r} ({os.fspath(path)!r})", linear_only=True)
        for an, path in adapters.items()
    }
    modules: Dict[str, int] = {}  # module -> largest rank over adapters
    for plan in loaded.values():
        for name, ml in plan.modules.items():
            modules[name] = max(modules.get(name, 0), ml.r)
    if max_rank is not None and modules and max(modules.values()) > max_rank:
        big = max(modules, key=modules.get)
        raise ValueError(f"max_rank={max_rank} is smaller than rank {modules[big]} at module {big!r}")

    # MoE experts (target_parameters): {module: {projection: largest rank over adapters}}.
    experts: Dict[str, Dict[str, int]] = {}
    for plan in loaded.values():
        for name, el in plan.experts.items():
            ranks = experts.setdefault(name, {})
            for t, pl in el.projs.items():
                ranks[t] = max(ranks.get(t, 0), pl.r)
    if max_rank is not None:
        for name, ranks in experts.items():
            for t, r in ranks.items():
                if r > max_rank:
                    raise ValueError(f"max_rank={max_rank} is smaller than rank {r} at {name}.{t}")
    if not modules and not experts:
        raise ValueError("the adapters have no LoRA weights")

    slots = {an: i for i, an in enumerate(adapters)}
    n = n_slots if n_slots is not None else len(adapters)
    order = [name for name, _ in model.named_modules() if name in modules or name in experts]
    with _transaction(model) as tx:
        for name in order:
            base = model.get_submodule(name)
            if name in experts:
                ranks = experts[name]
                bank = MoEMultiLoRAExperts(
                    base, n, {t: max_rank or ranks.get(t, 1) for t in ("gate_up_proj", "down_proj")},
                    backend=backend, adapter_dtype=adapter_dtype)
                for an, plan in loaded.items():
                    if name in plan.experts:
                        el = plan.experts[name]
                        bank.load_adapter(slots[an], {t: (pl.A, pl.B, plan.expert_scale(name, t))
                                                      for t, pl in el.projs.items()})
            else:
                bank = MultiLoRALinear(
                    base, n, max_rank or modules[name], trainable=False, backend=backend,
                    adapter_dtype=adapter_dtype,  # None: the base weight's dtype
                )
                for an, plan in loaded.items():
                    if name in plan.modules:
                        ml = plan.modules[name]
                        bank.load_adapter(slots[an], ml.A, ml.B, plan.scale(name))
                bank.register_forward_pre_hook(_expand_ids_hook, with_kwargs=True)
            bank.train(base.training)
            tx.replace(name, bank)
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


def _bank_device(bank: nn.Module) -> torch.device:
    w = getattr(bank, "weight", None)
    return w.device if isinstance(w, Tensor) else bank.gate_up_proj.device  # MoE experts bank


@contextlib.contextmanager
def adapter_ids(model: nn.Module, ids: Union[Tensor, Sequence[Union[int, str, None]]]) -> Iterator[Tensor]:
    """Route a model's ordinary forward (e.g. a transformers ``model(input_ids)`` or
    ``generate``) through per-sequence or per-token adapters of its MultiLoRALinear banks::

        slots = fused_lora.load_peft_adapters_multi(model, {"sql": p1, "chat": p2})
        with fused_lora.adapter_ids(model, ["chat", "sql", None]):   # None / -1: base model
            logits = model(input_ids).logits                         # input_ids [3, seq]

    ``ids``: adapter names, slot ints or None (one per sequence), or an integer tensor [batch]
    (one per sequence) or [batch, seq] (one per token). Sets ``default_adapter_ids`` on every
    MultiLoRALinear and MoEMultiLoRAExperts in ``model`` (restored on exit); banks from
    :func:`load_peft_adapters_multi` broadcast per-sequence ids over the token dims. Yields the
    id tensor.
    """
    banks = [m for m in model.modules() if hasattr(m, "default_adapter_ids") and hasattr(m, "load_adapter")]
    if not banks:
        raise ValueError("model has no MultiLoRALinear layers (use load_peft_adapters_multi first)")
    t = _to_ids(model, ids, _bank_device(banks[0]))
    if t.dim() not in (1, 2):
        raise ValueError(f"ids must be [batch] or [batch, seq], got shape {tuple(t.shape)}")
    n = banks[0].n_slots
    if t.numel() and (int(t.min()) < -1 or int(t.max()) >= n):
        raise ValueError(f"ids must be in [-1, n_slots={n}), got values in [{int(t.min())}, {int(t.max())}]")
    # One BatchRouting per bank size (normally one for the model): the first layer of a forward
    # builds the routing plan for its input's shape and every other layer, and the backward,
    # reuse it -- one sort per forward instead of one per layer.
    routes: Dict[int, BatchRouting] = {}
    saved = [b.default_adapter_ids for b in banks]
    try:
        for b in banks:
            if b.n_slots not in routes:
                routes[b.n_slots] = BatchRouting(t, b.n_slots, validate=False)  # checked above
            b.default_adapter_ids = routes[b.n_slots]
        yield t
    finally:
        for b, old in zip(banks, saved):
            b.default_adapter_ids = old
