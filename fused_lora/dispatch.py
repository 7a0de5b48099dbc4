"""Backend selection: which implementation runs an op for a given device.

Three backends implement every op with the same Python signature:

* ``"torch"``  -- :mod:`fused_lora.reference` (plain PyTorch, fp32 accumulation); any device.
* ``"triton"`` -- :mod:`fused_lora.kernels` (Triton); CUDA tensors, or CPU tensors when the
  Triton interpreter is on (``TRITON_INTERPRET=1`` set before triton is first imported).
* ``"cuda"``   -- the C++/CUDA extension ``fused_lora._C`` (``csrc/``); CUDA tensors, and CPU
  tensors through its C++ CPU kernels.

``"auto"`` resolves per device: the torch reference on CPU, and on CUDA the backend that the
measurement table :data:`AUTO_TABLE` says is fastest among those available.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Optional

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS

# Measured choice of backend per op on CUDA, first available wins. Until a GPU run of
# `python -m fused_lora.bench` records CUDA-vs-Triton timings here, the order is the Triton
# kernels first (the backend with a recorded correctness run under the interpreter), then the
# C++/CUDA extension, then the reference. Keys are op names in fused_lora.ops.
AUTO_TABLE: dict[str, tuple[str, ...]] = {
    "lora_linear": ("triton", "cuda", "torch"),
    "multi_lora_linear": ("triton", "cuda", "torch"),
}


def triton_interpret() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _import(backend: str) -> tuple[Optional[ModuleType], str]:
    """Import a backend's module once; return (module or None, reason it is unavailable)."""
    try:
        if backend == "torch":
            return importlib.import_module("fused_lora.reference"), ""
        if backend == "triton":
            return importlib.import_module("fused_lora.kernels"), ""
        if backend == "cuda":
            from fused_lora import _ext

            if _ext.ext_error() is not None:
                return None, f"C++/CUDA extension not built or failed to load: {_ext.ext_error()}"
            return importlib.import_module("fused_lora._ext"), ""
    except Exception as e:  # noqa: BLE001 - any import failure makes the backend unavailable
        return None, f"{type(e).__name__}: {e}"
    raise ValueError(f"backend must be one of {_CHOICES}, got {backend!r}")


def unavailable_reason(backend: str, device: torch.device, op: str = "lora_linear") -> str:
    """Why ``backend`` cannot run ``op`` on ``device`` ('' when it can)."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {_CHOICES}"
    if device.type not in ("cpu", "cuda"):
        return f"fused_lora supports CPU and CUDA tensors, got device {device}"
    mod, reason = _import(backend)
    if mod is None:
        return reason
    if backend == "triton" and device.type == "cpu" and not triton_interpret():
        return (
            "Triton kernels need CUDA tensors; to run them on CPU tensors set TRITON_INTERPRET=1 "
            "in the environment before triton is first imported"
        )
    if backend == "cuda":
        from fused_lora import _ext

        if device.type == "cuda" and not _ext.has_cuda_kernels():
            return "the C++ extension was built without CUDA kernels (CPU-only build)"
        if not _ext.has_op(op):
            return f"the C++ extension has no kernel for op {op!r}"
    return ""


@torch.compiler.assume_constant_result
def resolve(backend: str, device: torch.device, op: str = "lora_linear") -> str:
    """Resolve ``backend`` ("auto" included) to a concrete backend for ``op`` on ``device``.

    Raises ValueError naming the backend when it is unknown or cannot run here. Under
    torch.compile the result is a constant of the traced graph (it depends only on the backend
    name, the device and what is installed), so resolution costs nothing per call there."""
    if not isinstance(backend, str) or backend not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {backend!r}")
    if backend != "auto":
        reason = unavailable_reason(backend, device, op)
        if reason:
            raise ValueError(f"backend={backend!r} is unavailable for {op} on {device}: {reason}")
        return backend
    if device.type == "cpu":
        return "torch"
    for candidate in AUTO_TABLE.get(op, BACKENDS):
        if not unavailable_reason(candidate, device, op):
            return candidate
    return "torch"


def module(backend: str) -> ModuleType:
    """The module implementing a resolved backend's kernels."""
    mod, reason = _import(backend)
    if mod is None:
        raise ValueError(f"backend={backend!r} is unavailable: {reason}")
    return mod


def report() -> dict[str, dict[str, str]]:
    """Availability of each backend on each device type: {backend: {device: reason or 'ok'}}."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    out: dict[str, dict[str, str]] = {}
    for b in BACKENDS:
        out[b] = {}
        for d in devices:
            out[b][d.type] = unavailable_reason(b, d) or "ok"
        if not torch.cuda.is_available():
            out[b]["cuda"] = "no CUDA device visible"
    return out
