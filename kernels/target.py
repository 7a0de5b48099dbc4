"""The GPU a launch prunes its autotune configs for.

On a CUDA tensor that is the tensor's GPU. The kernel audit (kernels/audit.py) captures its
launches on CPU tensors, and pins a target with :func:`pinned` so that every prune function
drops exactly the configs a launch on that GPU would drop (an sm_80 launch keeps other configs
than an sm_90a one: audit, in-loop shrink at 128x256x64 spills 152 B on sm_80, none on sm_90a).
Off a GPU and unpinned, :func:`gpu_of` is None and nothing is pruned: the interpreter's tests see
every config list whole.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class GPU:
    major: int  # compute capability major: 8 (A100), 9 (H100 / H200)
    smem_optin: int  # opt-in shared memory per block, bytes
    sms: int  # streaming multiprocessors


# What the audit pins per arch: an H100 SXM / H200 (132 SMs, 227 KB per block) and an A100
# (108 SMs, 163 KB); the shared-memory figures are kernels.audit.SHARED_LIMIT's.
AUDIT_GPUS = {90: GPU(9, 232448, 132), 80: GPU(8, 166912, 108)}

_PINNED: Optional[GPU] = None


@functools.cache
def _cuda_gpu(index: int) -> GPU:
    p = torch.cuda.get_device_properties(index)
    return GPU(p.major, getattr(p, "shared_memory_per_block_optin", 0) or 0, p.multi_processor_count)


def gpu_of(t: object) -> Optional[GPU]:
    """The pinned target, else the GPU of CUDA tensor ``t``, else None."""
    if _PINNED is not None:
        return _PINNED
    if isinstance(t, Tensor) and t.is_cuda:
        return _cuda_gpu(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return None


@contextlib.contextmanager
def pinned(gpu: Optional[GPU]) -> Iterator[None]:
    """Prune every launch inside as on ``gpu`` (the audit's capture)."""
    global _PINNED
    old, _PINNED = _PINNED, gpu
    try:
        yield
    finally:
        _PINNED = old
