"""Triton kernels, installed as ``fused_lora.kernels``.

Each launcher has the same signature as its reference in :mod:`fused_lora.reference`:

* lora_linear.py: ``lora_linear_fwd`` (_lora_shrink_kernel, _lora_fwd_kernel) and
  ``lora_linear_bwd`` (_lora_bwd_ds_kernel, _lora_bwd_kernel).
"""

from fused_lora.kernels.lora_linear import lora_linear_bwd, lora_linear_fwd

__all__ = ["lora_linear_fwd", "lora_linear_bwd"]
