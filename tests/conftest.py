"""Test set-up shared by every test file.

* Without a CUDA device the Triton kernels run on CPU tensors through the Triton interpreter:
  TRITON_INTERPRET=1 must be in the environment before triton is first imported, so it is set
  here, before anything imports fused_lora (importing torch does not import triton).
* Every torch.empty / empty_like / new_empty called from inside the fused_lora package returns
  NaN-filled memory during tests, so a kernel that leaves part of an output unwritten fails
  the comparison instead of passing on lucky zeros.
"""

from __future__ import annotations

import os
import sys

import torch

# tools/ (development tooling outside the package, e.g. the SIMT emulator simt_emu) importable.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _from_package() -> bool:
    f = sys._getframe(2)
    return f.f_globals.get("__name__", "").startswith("fused_lora")


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and t.numel() and t.device.type != "meta":
        from torch._subclasses.fake_tensor import is_fake

        if not is_fake(t):
            t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def p_empty(*a, **k):
        t = empty(*a, **k)
        return _poison(t) if _from_package() else t

    def p_empty_like(*a, **k):
        t = empty_like(*a, **k)
        return _poison(t) if _from_package() else t

    def p_new_empty(self, *a, **k):
        t = new_empty(self, *a, **k)
        return _poison(t) if _from_package() else t

    monkeypatch.setattr(torch, "empty", p_empty)
    monkeypatch.setattr(torch, "empty_like", p_empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", p_new_empty)
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
