"""Use fused LoRA on real models: injection into any ``nn.Module`` tree (Hugging Face transformers
models included), PEFT adapter load/save/convert, and adapter-bank loading for mixed-adapter
serving.

* :mod:`~fused_lora.integrations.matching`: which modules match ``target_modules`` (PEFT's
  rules) and which bases can be wrapped.
* :mod:`~fused_lora.integrations.inject`: :func:`inject_lora`, :func:`lora_state_dict`,
  :func:`merge_lora`, :func:`unmerge_lora`.
* :mod:`~fused_lora.integrations.peft_io`: :func:`load_peft_adapter` / :func:`save_peft_adapter`
  (PEFT's ``save_pretrained`` folder format); :mod:`~fused_lora.integrations.live_peft`:
  :func:`from_peft` (a live ``PeftModel``).
* :mod:`~fused_lora.integrations.features`: the one table of supported / refused PEFT features
  and the config value checks, used by every loader and by :func:`from_peft`.
* :mod:`~fused_lora.integrations.serving`: :func:`load_peft_adapters_multi` (several adapters in
  ``MultiLoRALinear`` banks) and :func:`adapter_ids` (per-row adapter routing).

peft, transformers and safetensors are optional: they are imported inside the functions that
need them.
"""

from fused_lora.integrations.inject import inject_lora, lora_state_dict, merge_lora, unmerge_lora
from fused_lora.integrations.live_peft import from_peft
from fused_lora.integrations.matching import TargetModules  # noqa: F401
from fused_lora.integrations.peft_io import load_peft_adapter, save_peft_adapter
from fused_lora.integrations.serving import (  # noqa: F401  (private names: moved, still importable)
    _SLOT_MAP_ATTR,
    _expand_ids_hook,
    _to_ids,
    adapter_ids,
    load_peft_adapters_multi,
)

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
