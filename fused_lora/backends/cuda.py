"""The ``cuda`` backend: the C++/CUDA extension ``fused_lora._C`` (``csrc/``).

On CUDA tensors its CUDA kernels; on CPU tensors its C++ CPU kernels (the measured CPU table
may make "auto" pick them). The GEMM variant is an op argument: entries ``cuda`` (gemm=0: wgmma
where the build and GPU allow, else mma.sync), ``cuda:mma``, ``cuda:wgmma``, ``cuda:wgmma256``."""

from __future__ import annotations

import functools

import torch

from fused_lora import _ext
from fused_lora.backends import register_kernel

if _ext.ext_error() is not None:
    raise ImportError(f"C++/CUDA extension not built or failed to load: {_ext.ext_error()}")

# gemm argument of the C++ ops: 0 auto, 1 mma.sync, 2 wgmma 128x128, 3 wgmma 128x256.
GEMM_VARIANTS = {"cuda": 0, "cuda:mma": 1, "cuda:wgmma": 2, "cuda:wgmma256": 3}


def _reason(variant: int, device: torch.device) -> str:
    if device.type == "cuda" and not _ext.has_cuda_kernels():
        return "the C++ extension was built without CUDA kernels (CPU-only build)"
    if variant and device.type != "cuda":
        return "a GEMM variant applies to CUDA tensors only (the C++ CPU kernels have one GEMM)"
    if variant >= 2 and not _ext.wgmma_available(device):
        return "wgmma needs an sm_90a build of the extension on a compute capability 9.0 GPU"
    return ""


def _multi_fwd(x, weight, bias, lora_A, lora_B, scales, ranks, plan, *, gemm):
    return _ext.multi_lora_linear_fwd(x, weight, bias, lora_A, lora_B, scales, plan.ids, ranks,
                                      order=plan.order, keys=plan.keys, gemm=gemm)


def _multi_bwd(dy, x, weight, lora_A, lora_B, scales, ranks, plan, xa, needs_dx, needs_dA, needs_dB, *,
               gemm):
    return _ext.multi_lora_linear_bwd(dy, x, weight, lora_A, lora_B, scales, plan.ids, ranks, xa,
                                      needs_dx, needs_dA, needs_dB, order=plan.order, keys=plan.keys,
                                      gemm=gemm)


for _name, _g in GEMM_VARIANTS.items():
    _why = functools.partial(_reason, _g)
    register_kernel("lora_linear", _name, fwd=functools.partial(_ext.lora_linear_fwd, gemm=_g),
                    bwd=functools.partial(_ext.lora_linear_bwd, gemm=_g), reason=_why,
                    doc=f"C++/CUDA extension, gemm={_g}")
    register_kernel("multi_lora_linear", _name, fwd=functools.partial(_multi_fwd, gemm=_g),
                    bwd=functools.partial(_multi_bwd, gemm=_g), reason=_why,
                    doc=f"C++/CUDA extension, gemm={_g}")


def _moe_fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, plan, *, gemm, slot_scales=None,
             topk=1):
    # Adapter banks and top-k rows go to the C++ op as they are: the kernels read x[m // topk]
    # in place and sum dx per token themselves; row m's dropout mask is keyed by m.
    return _ext.moe_lora_linear_fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, plan.ids,
                                    order=plan.order, keys=plan.keys, gemm=gemm,
                                    slot_scales=slot_scales, topk=topk)


def _moe_bwd(dy, x, weight, lora_A, lora_B, xa, scale, dropout_p, seed, plan, needs_dx, needs_dA, needs_dB,
             *, gemm, slot_scales=None, topk=1):
    return _ext.moe_lora_linear_bwd(dy, x, weight, lora_A, lora_B, xa, scale, dropout_p, seed, plan.ids,
                                    needs_dx, needs_dA, needs_dB, order=plan.order, keys=plan.keys,
                                    gemm=gemm, slot_scales=slot_scales, topk=topk)


if _ext.has_op("moe_lora_linear"):  # appended section (keeps merges clean); absent in an old build
    for _name, _g in GEMM_VARIANTS.items():
        register_kernel("moe_lora_linear", _name, fwd=functools.partial(_moe_fwd, gemm=_g),
                        bwd=functools.partial(_moe_bwd, gemm=_g), reason=functools.partial(_reason, _g),
                        doc=f"C++/CUDA extension: grouped GEMM over experts, gemm={_g}")
