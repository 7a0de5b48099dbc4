"""The ``backend="auto"`` policy: which registry entry to try first for a call.

:func:`fused_lora.backends.select` asks :func:`measured_choice` (the fastest entry a recorded
run measured for this device, op, mode, dtype and nearest row count) and then walks
:func:`auto_order`; the first available entry wins.

Measurements live in ``dispatch_table.json`` beside this file, written only by ``python -m
fused_lora.bench dispatch`` (each entry names the device, versions, dtype, op, mode, rows, the
median ms per entry and its results file; never edited by hand). GPU entries name the GPU model;
CPU entries have ``"device": "cpu"`` and apply to any CPU: they compare the C++ CPU kernels with
the reference, a property of the code more than of the processor.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

# Where nothing was measured: CUDA tries Triton first (the kernels with the longer test record),
# then the extension; CPU takes the reference.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("torch",),
}

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
def device_key(device: torch.device) -> str:
    """The table key of a device: the GPU model name, or "cpu"."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_name(index)


def _entry_device(e: dict[str, Any]) -> Optional[str]:
    return e.get("device") or e.get("gpu")


def measured_choice(op: str, device: torch.device, mode: str, rows: int, dtype: torch.dtype,
                    table: Optional[Sequence[dict[str, Any]]] = None) -> Optional[str]:
    """The fastest available entry measured for this device, op, mode ("fwd" or "fwd+bwd") and
    dtype at the nearest row count (in log2), or None when nothing was measured for them."""
    from fused_lora.backends import unavailable_reason

    entries = measured_table() if table is None else table
    if not entries:
        return None
    dev = device_key(device)
    dt = str(dtype).replace("torch.", "")
    cands = [e for e in entries
             if _entry_device(e) == dev and e.get("op") == op and e.get("mode") == mode
             and e.get("dtype") == dt and isinstance(e.get("rows"), int) and e["rows"] > 0]
    if not cands:
        return None
    lr = math.log2(max(rows, 1))
    best = min(cands, key=lambda e: (abs(math.log2(e["rows"]) - lr), e["rows"]))
    timed = sorted((ms, b) for b, ms in best.get("ms", {}).items() if isinstance(ms, (int, float)))
    for _, b in timed:
        if not unavailable_reason(op, b, device, dtype):
            return b
    return None


def auto_order(op: str, device: torch.device) -> tuple[str, ...]:
    """Entries "auto" tries, in order, where no measurement decides."""
    return AUTO_ORDER.get(device.type, ("torch",))
