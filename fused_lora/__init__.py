"""fused_lora: fused GPU kernels for LoRA (Triton and C++/CUDA), with a PyTorch reference.

    y = x W0^T + b + s * (dropout(x) A^T) B^T

Public API: :func:`lora_linear`, :class:`FusedLoRALinear` (one adapter, fused forward and
backward); :func:`multi_lora_linear`, :class:`MultiLoRALinear` (mixed-adapter batches);
:mod:`fused_lora.integrations` (inject into models, PEFT adapters).
Backends: see :mod:`fused_lora.dispatch`; ``python -m fused_lora info`` tells which are
available here.
"""

import os as _os

# A source checkout used without `pip install` (e.g. after `python setup.py build_ext
# --inplace`): kernels/ and bench/ sit beside this package and are installed as
# fused_lora.kernels / fused_lora.bench, so let this package's path reach them too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")) and _root not in __path__:
    __path__.append(_root)

from fused_lora import ops  # noqa: E402,F401  (registers the torch custom ops)
from fused_lora.functional import lora_linear, multi_lora_linear  # noqa: E402
from fused_lora.integrations import (  # noqa: E402
    adapter_ids,
    from_peft,
    inject_lora,
    load_peft_adapter,
    load_peft_adapters_multi,
    lora_state_dict,
    merge_lora,
    save_peft_adapter,
    unmerge_lora,
)
from fused_lora.modules import FusedLoRALinear, MultiLoRALinear  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    # one adapter: fused forward/backward (issue 2)
    "FusedLoRALinear", "lora_linear",
    # mixed-adapter batches (issue 3)
    "MultiLoRALinear", "multi_lora_linear",
    # LoRA on MoE experts (issue 12)
    "moe_lora_linear",
    # model-level integration: injection, PEFT adapters, serving banks (issue 6)
    "inject_lora", "lora_state_dict", "merge_lora", "unmerge_lora", "load_peft_adapter",
    "save_peft_adapter", "from_peft", "load_peft_adapters_multi", "adapter_ids",
    "__version__",
]
from fused_lora.moe import moe_lora_linear  # noqa: E402,F401  (issue 12: LoRA on MoE experts)
