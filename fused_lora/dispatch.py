"""Backend selection: which implementation runs an op for a given device.

Three backends implement every op with the same Python signature:

* ``"torch"``  -- :mod:`fused_lora.reference` (plain PyTorch, fp32 accumulation); any device.
* ``"triton"`` -- :mod:`fused_lora.kernels` (Triton); CUDA tensors, or CPU tensors when the
  Triton interpreter is on (``TRITON_INTERPRET=1`` set before triton is first imported).
* ``"cuda"``   -- the C++/CUDA extension ``fused_lora._C`` (``csrc/``); CUDA tensors, and CPU
  tensors through its C++ CPU kernels.

``"auto"`` resolves per device: the torch reference on CPU, and on CUDA the backend that a
recorded measurement (``dispatch_table.json``, written by ``python -m fused_lora.bench
dispatch`` on a GPU) found fastest for that GPU, op, mode, dtype and nearest row count, falling
back to the :data:`AUTO_TABLE` order where nothing was measured.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Sequence

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS

# Order of preference per op on CUDA when no measurement covers the call (another GPU model,
# an op or dtype never measured): first available wins. Triton first, the backend whose
# kernels have the longer test record; a measurement in MEASURED_TABLE overrides it.
AUTO_TABLE: dict[str, tuple[str, ...]] = {
    "lora_linear": ("triton", "cuda", "torch"),
    "multi_lora_linear": ("triton", "cuda", "torch"),
}

# Measured Triton-vs-CUDA timings, written by `python -m fused_lora.bench dispatch` on a GPU
# (each entry names the GPU, versions, dtype, op, mode, rows and the median ms per backend,
# and the results file it came from). "auto" on CUDA picks the faster available backend of
# the entry for this GPU, op, mode and dtype whose row count is nearest in log2. Never edited
# by hand: a number here is a number a run showed.
MEASURED_TABLE_PATH = Path(__file__).with_name("dispatch_table.json")


@functools.cache
def measured_table() -> tuple[dict[str, Any], ...]:
    """The entries of dispatch_table.json (empty when the file is absent or unreadable)."""
    try:
        data = json.loads(MEASURED_TABLE_PATH.read_text())
    except (OSError, ValueError):
        return ()
    return tuple(e for e in data.get("entries", []) if isinstance(e, dict))


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def measured_choice(op: str, device: torch.device, mode: str, rows: int, dtype: torch.dtype,
                    table: Optional[Sequence[dict[str, Any]]] = None) -> Optional[str]:
    """The fastest available backend measured for this GPU, op, mode ("fwd" or "fwd+bwd") and
    dtype at the nearest row count, or None when nothing was measured for them."""
    entries = measured_table() if table is None else table
    if not entries or device.type != "cuda":
        return None
    gpu = _device_name(device.index if device.index is not None else torch.cuda.current_device())
    dt = str(dtype).replace("torch.", "")
    cands = [e for e in entries
             if e.get("gpu") == gpu and e.get("op") == op and e.get("mode") == mode
             and e.get("dtype") == dt and isinstance(e.get("rows"), int) and e["rows"] > 0]
    if not cands:
        return None
    lr = math.log2(max(rows, 1))
    best = min(cands, key=lambda e: (abs(math.log2(e["rows"]) - lr), e["rows"]))
    timed = sorted((ms, b) for b, ms in best.get("ms", {}).items()
                   if b in BACKENDS and isinstance(ms, (int, float)))
    for _, b in timed:
        if not unavailable_reason(b, device, op):
            return b
    return None


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
def resolve(backend: str, device: torch.device, op: str = "lora_linear", mode: str = "fwd",
            rows: int = 0, dtype: torch.dtype = torch.bfloat16) -> str:
    """Resolve ``backend`` ("auto" included) to a concrete backend for ``op`` on ``device``.

    ``mode`` ("fwd" or "fwd+bwd"), ``rows`` (tokens in the call; 0 = unknown) and ``dtype``
    select the measurement "auto" follows on CUDA (:func:`measured_choice`); without one the
    :data:`AUTO_TABLE` order applies. Raises ValueError naming the backend when it is unknown
    or cannot run here. Under torch.compile the result is a constant of the traced graph (it
    depends only on its arguments and what is installed), so resolution costs nothing per call
    there."""
    if not isinstance(backend, str) or backend not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {backend!r}")
    if backend != "auto":
        reason = unavailable_reason(backend, device, op)
        if reason:
            raise ValueError(f"backend={backend!r} is unavailable for {op} on {device}: {reason}")
        return backend
    if device.type == "cpu":
        return "torch"
    if rows > 0:
        chosen = measured_choice(op, device, mode, rows, dtype)
        if chosen is not None:
            return chosen
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
