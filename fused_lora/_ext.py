"""Loader for the C++/CUDA extension ``fused_lora._C`` (built from ``csrc/`` by setup.py).

The package works without it (Triton and torch backends); the load error is kept and reported
by ``python -m fused_lora info`` and by the dispatcher when ``backend="cuda"`` is asked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

_ERROR: Optional[str] = None
_C = None

if os.environ.get("FUSED_LORA_DISABLE_EXT", "0") == "1":
    _ERROR = "disabled by FUSED_LORA_DISABLE_EXT=1"
else:
    try:
        from fused_lora import _C  # type: ignore[attr-defined,no-redef]  # noqa: F401
    except Exception as e:  # noqa: BLE001 - keep any load failure as the reason
        _ERROR = f"{type(e).__name__}: {e}"


def ext_error() -> Optional[str]:
    """None when the extension loaded, else why it did not (with the build's own reason, e.g.
    its compile error, when setup.py recorded one)."""
    if _ERROR is None:
        return None
    reason = build_info().get("reason")
    return f"{_ERROR} (build: {reason})" if reason and reason not in _ERROR else _ERROR


def build_info() -> dict:
    """What setup.py recorded about the build (torch/CUDA versions, archs, errors)."""
    p = Path(__file__).with_name("_build_info.json")
    if p.exists():
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return {}
    return {}


def wgmma_available(device: Optional[torch.device] = None) -> bool:
    """Whether the CUDA backend's fp16/bf16 GEMMs can run the Hopper wgmma kernel on `device`
    (default: the current CUDA device): the extension holds sm_90a code (FUSED_LORA_CUDA_ARCHS
    with 90a, the default) and the GPU is compute capability 9.0. Where true, gemm=0 (auto)
    picks it; gemm=1 forces mma.sync. The extension answers itself (gemm_choice) when it can."""
    if _ERROR is not None or not torch.cuda.is_available() or not has_cuda_kernels():
        return False
    idx = torch.device(device).index if device is not None else None
    idx = torch.cuda.current_device() if idx is None else idx
    if hasattr(_ns(), "gemm_choice"):
        return gemm_choice(0, idx) == GEMM_WGMMA
    archs = str(build_info().get("archs") or "")
    return "90a" in archs and torch.cuda.get_device_capability(idx) == (9, 0)


# The ops' `gemm` argument (csrc/lora.h): which tensor-core GEMM the CUDA kernels run for
# fp16/bf16. GEMM_AUTO: wgmma (128x128) where wgmma_available(), else mma.sync.
GEMM_AUTO, GEMM_MMA, GEMM_WGMMA, GEMM_WGMMA256 = 0, 1, 2, 3
GEMM_NAMES = {GEMM_AUTO: "auto", GEMM_MMA: "mma", GEMM_WGMMA: "wgmma", GEMM_WGMMA256: "wgmma256"}


def gemm_choice(requested: int = GEMM_AUTO, device: Optional[int] = None) -> int:
    """The GEMM (GEMM_MMA, GEMM_WGMMA or GEMM_WGMMA256) that ``gemm=requested`` runs on CUDA
    device `device` (default: the current one), as the C++ launcher decides it; raises the
    launch's own RuntimeError where the variant cannot run there."""
    if device is None:
        device = torch.cuda.current_device()
    return int(_ns().gemm_choice(int(requested), int(device)))


def _ns():
    return torch.ops.fused_lora_C


# --------------------------------------------------------------------------------------------
# Backend module for dispatch ("cuda"): same signatures as fused_lora.reference. The C++ ops
# (csrc/) take the seed as an int and have CPU and CUDA kernels.
# --------------------------------------------------------------------------------------------


def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    *,
    gemm: int = GEMM_AUTO,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_lora_C::lora_linear_fwd; contract of fused_lora.reference.lora_linear_fwd. gemm:
    the tensor-core GEMM (GEMM_*; ignored by the CPU kernels)."""
    y, xa = _ns().lora_linear_fwd(
        x, weight, bias, lora_A, lora_B, float(scale), float(dropout_p), int(seed), int(gemm)
    )
    return y, xa


def lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
    *,
    gemm: int = GEMM_AUTO,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused_lora_C::lora_linear_bwd; contract of fused_lora.reference.lora_linear_bwd."""
    dx, dA, dB = _ns().lora_linear_bwd(
        dy, x, weight, lora_A, lora_B, xa, float(scale), float(dropout_p), int(seed),
        bool(needs_dx), bool(needs_dA), bool(needs_dB), int(gemm),
    )
    return dx, dA, dB


def multi_lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scales: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: Optional[torch.Tensor],
    *,
    order: Optional[torch.Tensor] = None,
    keys: Optional[torch.Tensor] = None,
    gemm: int = GEMM_AUTO,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_lora_C::multi_lora_linear_fwd; contract of reference.multi_lora_linear_fwd.
    order, keys: the batch's routing plan (int64 [M] each: the stable argsort of the ids with
    ids outside [0, n_slots) as -1, and the sorted keys), both or neither; trusted to match
    adapter_ids (only shapes are checked), they spare the op its own sort."""
    y, xa = _ns().multi_lora_linear_fwd(
        x, weight, bias, lora_A, lora_B, scales, adapter_ids, ranks, order, keys, int(gemm)
    )
    return y, xa


def multi_lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scales: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: Optional[torch.Tensor],
    xa: torch.Tensor,
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
    *,
    order: Optional[torch.Tensor] = None,
    keys: Optional[torch.Tensor] = None,
    gemm: int = GEMM_AUTO,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused_lora_C::multi_lora_linear_bwd; contract of reference.multi_lora_linear_bwd.
    order, keys, gemm: as for multi_lora_linear_fwd."""
    dx, dA, dB = _ns().multi_lora_linear_bwd(
        dy, x, weight, lora_A, lora_B, scales, adapter_ids, ranks, xa,
        bool(needs_dx), bool(needs_dA), bool(needs_dB), order, keys, int(gemm),
    )
    return dx, dA, dB


def _register_fakes() -> None:
    """Fake (meta) kernels for the C++ ops, so FakeTensor / torch.compile / opcheck can trace
    them directly: the same shape functions as the fused_lora::* ops' fakes (fused_lora.ops)."""
    from fused_lora.ops import fake_bwd, fake_lora_fwd, fake_multi_fwd

    @torch.library.register_fake("fused_lora_C::lora_linear_fwd")
    def _(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, gemm=0):
        return fake_lora_fwd(x, weight, lora_A)

    @torch.library.register_fake("fused_lora_C::lora_linear_bwd")
    def _(dy, x, weight, lora_A, lora_B, xa, scale, dropout_p, seed, needs_dx, needs_dA, needs_dB,
          gemm=0):
        return fake_bwd(x, lora_A, lora_B, needs_dx, needs_dA, needs_dB)

    @torch.library.register_fake("fused_lora_C::multi_lora_linear_fwd")
    def _(x, weight, bias, lora_A, lora_B, scales, adapter_ids, ranks, order=None, keys=None,
          gemm=0):
        return fake_multi_fwd(x, weight, lora_A)

    @torch.library.register_fake("fused_lora_C::multi_lora_linear_bwd")
    def _(dy, x, weight, lora_A, lora_B, scales, adapter_ids, ranks, xa, needs_dx, needs_dA,
          needs_dB, order=None, keys=None, gemm=0):
        return fake_bwd(x, lora_A, lora_B, needs_dx, needs_dA, needs_dB)


if _ERROR is None:
    try:
        _register_fakes()
    except Exception as e:  # noqa: BLE001 - an old .so without these ops: report, don't break import
        _ERROR = f"extension loaded but its ops are missing or stale ({type(e).__name__}: {e})"


def has_op(op: str) -> bool:
    """True when the extension registered ``op`` (e.g. 'lora_linear')."""
    if _ERROR is not None:
        return False
    return hasattr(_ns(), op + "_fwd")


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    if _ERROR is not None:
        return False
    return bool(torch.ops.fused_lora_C.has_cuda())


# --------------------------------------------------------------------------------------------
# Mixture of experts (fused_lora_C::moe_lora_linear_*; appended section: keeps merges clean)
# --------------------------------------------------------------------------------------------


def moe_lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    expert_ids: torch.Tensor,
    *,
    order: Optional[torch.Tensor] = None,
    keys: Optional[torch.Tensor] = None,
    gemm: int = GEMM_AUTO,
    slot_scales: Optional[torch.Tensor] = None,
    topk: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_lora_C::moe_lora_linear_fwd; contract of reference.moe_lora_linear_fwd. x: [T, in];
    expert_ids: int64 [M = T * topk] (a routing plan's ids: virtual experts over (S + 1) * E ids
    with adapter banks lora_A [S, E, r, in]); order, keys: the plan's routing (csrc/lora.h:
    trusted, both or neither); gemm: the tensor-core GEMM (GEMM_*; ignored by the CPU kernels);
    slot_scales: float32 [S] or None (banks only); topk: op rows per row of x (read in place)."""
    y, xa = _ns().moe_lora_linear_fwd(
        x, weight, bias, lora_A, lora_B, float(scale), float(dropout_p), int(seed), expert_ids,
        order, keys, int(gemm), slot_scales, int(topk),
    )
    return y, xa


def moe_lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    expert_ids: torch.Tensor,
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
    *,
    order: Optional[torch.Tensor] = None,
    keys: Optional[torch.Tensor] = None,
    gemm: int = GEMM_AUTO,
    slot_scales: Optional[torch.Tensor] = None,
    topk: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused_lora_C::moe_lora_linear_bwd; contract of reference.moe_lora_linear_bwd (dx [T, in]:
    each token's topk rows summed). order, keys, gemm, slot_scales, topk: as for
    moe_lora_linear_fwd."""
    dx, dA, dB = _ns().moe_lora_linear_bwd(
        dy, x, weight, lora_A, lora_B, xa, float(scale), float(dropout_p), int(seed), expert_ids,
        bool(needs_dx), bool(needs_dA), bool(needs_dB), order, keys, int(gemm), slot_scales,
        int(topk),
    )
    return dx, dA, dB


def _register_moe_fakes() -> None:
    from fused_lora.ops import fake_bwd
    from fused_lora.reference import acc_dtype

    @torch.library.register_fake("fused_lora_C::moe_lora_linear_fwd")
    def _(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, expert_ids, order=None, keys=None,
          gemm=0, slot_scales=None, topk=1):
        M = x.shape[0] * topk  # the op's rows (expert_ids [M])
        return x.new_empty(M, weight.shape[1]), x.new_empty(M, lora_A.shape[-2], dtype=acc_dtype(x.dtype))

    @torch.library.register_fake("fused_lora_C::moe_lora_linear_bwd")
    def _(dy, x, weight, lora_A, lora_B, xa, scale, dropout_p, seed, expert_ids, needs_dx, needs_dA,
          needs_dB, order=None, keys=None, gemm=0, slot_scales=None, topk=1):
        return fake_bwd(x, lora_A, lora_B, needs_dx, needs_dA, needs_dB)  # dx like x: [T, in]


# An extension built before the MoE ops loads without them: has_op("moe_lora_linear") is False
# and the cuda backend registers no MoE entry.
if _ERROR is None and hasattr(_ns(), "moe_lora_linear_fwd"):
    _register_moe_fakes()
