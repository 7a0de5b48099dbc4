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
    """None when the extension loaded, else why it did not."""
    return _ERROR


def build_info() -> dict:
    """What setup.py recorded about the build (torch/CUDA versions, archs, errors)."""
    p = Path(__file__).with_name("_build_info.json")
    if p.exists():
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return {}
    return {}


def _ns():
    return torch.ops.fused_lora_C


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
