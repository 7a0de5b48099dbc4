"""The ``torch`` backend: :mod:`fused_lora.reference` (plain PyTorch, fp32 accumulation).

Runs on any device and dtype (fp64 included, for gradcheck); it is the CPU path of "auto"
unless a measured CPU table says the C++ CPU kernels are faster."""

from __future__ import annotations

from fused_lora import reference as R
from fused_lora.backends import ALL_DTYPES, register_kernel


def _multi_fwd(x, weight, bias, lora_A, lora_B, scales, ranks, plan):
    return R.multi_lora_linear_fwd(x, weight, bias, lora_A, lora_B, scales, plan.ids, ranks)


def _multi_bwd(dy, x, weight, lora_A, lora_B, scales, ranks, plan, xa, needs_dx, needs_dA, needs_dB):
    return R.multi_lora_linear_bwd(dy, x, weight, lora_A, lora_B, scales, plan.ids, ranks, xa,
                                   needs_dx, needs_dA, needs_dB)


register_kernel("lora_linear", "torch", fwd=R.lora_linear_fwd, bwd=R.lora_linear_bwd, dtypes=ALL_DTYPES,
                doc="PyTorch reference")
register_kernel("multi_lora_linear", "torch", fwd=_multi_fwd, bwd=_multi_bwd, dtypes=ALL_DTYPES,
                doc="PyTorch reference (a loop over the slots present)")


def _moe_fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, plan, slot_scales=None, topk=1):
    return R.moe_lora_linear_fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, plan.ids,
                                 slot_scales, topk)


def _moe_bwd(dy, x, weight, lora_A, lora_B, xa, scale, dropout_p, seed, plan, needs_dx, needs_dA, needs_dB,
             slot_scales=None, topk=1):
    return R.moe_lora_linear_bwd(dy, x, weight, lora_A, lora_B, xa, scale, dropout_p, seed, plan.ids,
                                 needs_dx, needs_dA, needs_dB, slot_scales, topk)


register_kernel("moe_lora_linear", "torch", fwd=_moe_fwd, bwd=_moe_bwd, dtypes=ALL_DTYPES,
                doc="PyTorch reference (a loop over the experts present)")
