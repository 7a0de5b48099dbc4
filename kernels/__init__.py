"""Triton kernels, installed as ``fused_lora.kernels``.

Each launcher has the same signature as its reference in :mod:`fused_lora.reference`:

* lora_linear.py: ``lora_linear_fwd`` (_lora_shrink_kernel, _lora_fwd_kernel) and
  ``lora_linear_bwd`` (_lora_bwd_ds_kernel, _lora_bwd_kernel).
* multi_lora.py: ``multi_lora_linear_fwd`` / ``multi_lora_linear_bwd`` (mixed-adapter batches:
  _mlora_bgmv_shrink_kernel, _mlora_sgmv_shrink_kernel, _mlora_fwd_kernel,
  _mlora_bwd_weight_kernel).
"""

from fused_lora.kernels.lora_linear import lora_linear_bwd, lora_linear_fwd
from fused_lora.kernels.multi_lora import multi_lora_linear_bwd, multi_lora_linear_fwd

__all__ = ["lora_linear_fwd", "lora_linear_bwd", "multi_lora_linear_fwd", "multi_lora_linear_bwd"]
