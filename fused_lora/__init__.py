"""fused_lora: fused GPU kernels for LoRA (Triton and C++/CUDA), with a PyTorch reference.

    y = x W0^T + b + s * (dropout(x) A^T) B^T

Public API: :func:`lora_linear`, :class:`FusedLoRALinear` (one adapter, fused forward and
backward). Backends: see :mod:`fused_lora.dispatch`; ``python -m fused_lora info`` tells which
are available here.
"""

from fused_lora import ops  # noqa: F401  (registers the torch custom ops)
from fused_lora.functional import lora_linear
from fused_lora.modules import FusedLoRALinear

__version__ = "0.1.0"

__all__ = ["FusedLoRALinear", "lora_linear", "__version__"]
