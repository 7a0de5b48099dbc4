"""The ``triton`` backend: the Triton kernels of ``kernels/`` (installed as fused_lora.kernels).

Entries (variants are named here, never read from the environment at launch):

=====================================  =======================================================
lora_linear  triton                    shrink pre-kernel + GEMM with the expand in its accumulator
lora_linear  triton:inloop             the shrink inside the GEMM's K loop (no dropout, r <= 32,
                                       16-bit adapters)
lora_linear  triton:tma                the forward's x / W0 and the dx GEMM's dy / W0 tiles loaded
                                       by TMA (sm_90+; Triton >= 3.4)
lora_linear  triton:tma_persistent     the same, the forward persistent: one program per SM walks
                                       the tiles
multi        triton                    path chosen from shapes (decode for M <= 64, else
                                       prefill/hybrid)
multi        triton:decode / :prefill  that path at any M
             / :hybrid
=====================================  =======================================================

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set
before triton is first imported), except bf16 there (see backends.unavailable_reason)."""

from __future__ import annotations

import functools

import torch

from fused_lora.backends import register_kernel
from fused_lora.kernels import lora_linear as L
from fused_lora.kernels import multi_lora as ML


def _reason(device: torch.device) -> str:
    if device.type == "cpu" and not L.INTERPRET:
        return ("Triton kernels need CUDA tensors; to run them on CPU tensors set TRITON_INTERPRET=1 "
                "in the environment before triton is first imported")
    return ""


register_kernel("lora_linear", "triton", fwd=L.lora_linear_fwd, bwd=L.lora_linear_bwd, reason=_reason,
                doc="shrink pre-kernel + fused GEMM; fused backward")
register_kernel("lora_linear", "triton:inloop", fwd=functools.partial(L.lora_linear_fwd, shrink="fused"),
                bwd=L.lora_linear_bwd, reason=_reason, doc="shrink in the GEMM's K loop")


def _tma_reason(device: torch.device) -> str:
    if _reason(device):
        return _reason(device)
    if L.TensorDescriptor is None:
        return f"Triton {L.triton.__version__} has no host tensor descriptors (needs Triton >= 3.4)"
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return "TMA needs an sm_90+ GPU (Hopper or newer)"
    return ""


register_kernel("lora_linear", "triton:tma", fwd=functools.partial(L.lora_linear_fwd, tma=True),
                bwd=functools.partial(L.lora_linear_bwd, tma=True), reason=_tma_reason,
                doc="forward and dx GEMM tiles by TMA (operands TMA cannot take: the pointer GEMMs)")
register_kernel("lora_linear", "triton:tma_persistent",
                fwd=functools.partial(L.lora_linear_fwd, tma=True, persistent=True),
                bwd=functools.partial(L.lora_linear_bwd, tma=True), reason=_tma_reason,
                doc="persistent forward GEMM (one program per SM) with TMA tiles; TMA dx GEMM")

for _path in (None, "decode", "prefill", "hybrid"):
    register_kernel(
        "multi_lora_linear", "triton" if _path is None else f"triton:{_path}",
        fwd=functools.partial(ML.multi_lora_linear_fwd, path=_path),
        bwd=functools.partial(ML.multi_lora_linear_bwd, path=_path),
        reason=_reason, doc=f"mixed adapters, {_path or 'shape-chosen'} path",
    )

from fused_lora.kernels import moe_lora as MOE  # noqa: E402  (appended section: keeps merges clean)

register_kernel("moe_lora_linear", "triton", fwd=MOE.moe_lora_linear_fwd, bwd=MOE.moe_lora_linear_bwd,
                reason=_reason, doc="grouped GEMM over experts, expand in the accumulator; fused backward")
