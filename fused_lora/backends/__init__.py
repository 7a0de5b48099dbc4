"""One registry of kernel implementations, and the one place a call's implementation is chosen.

Every op family (``lora_linear``, ``multi_lora_linear``, ``moe_lora_linear``) has one schema in
:mod:`fused_lora.ops`. Each backend module registers its implementations of it here
(bitsandbytes' ``register_kernel`` pattern), one entry per kernel variant:

=====================  ========================================================================
module                 entries
=====================  ========================================================================
backends/reference.py  ``torch``: :mod:`fused_lora.reference` (any device; the CPU path)
backends/triton.py     ``triton`` and its variants (``triton:inloop``, ``triton:decode`` ...)
backends/cuda.py       ``cuda`` (the C++/CUDA extension; its C++ CPU kernels on CPU tensors) and
                       its GEMM variants (``cuda:mma``, ``cuda:wgmma``, ``cuda:wgmma256``)
=====================  ========================================================================

A caller passes ``backend=`` as ``"auto"``, a backend (``"triton"``) or an entry
(``"triton:decode"``). :func:`select` checks it once per call (name, availability on the device,
dtype) and returns the entry name that the op then receives: the op looks the entry up with
:func:`kernel` and calls it. Nothing is read from the environment on that path.
``"auto"`` follows :mod:`fused_lora.dispatch`: measured timings for this device, else a fixed
order. :func:`select` depends only on its arguments and what is installed, so under
torch.compile it is a constant of the graph.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

__all__ = ["Kernel", "register_kernel", "kernel", "names", "select", "unavailable_reason", "check_name",
           "BACKENDS", "OPS"]

OPS = ("lora_linear", "multi_lora_linear", "moe_lora_linear")
BACKENDS = ("torch", "triton", "cuda")
# fp64 runs on the torch reference only (gradcheck); the kernels take fp16 / bf16 / fp32.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ALL_DTYPES = KERNEL_DTYPES + (torch.float64,)


@dataclass(frozen=True)
class Kernel:
    """One implementation of an op family: forward and backward callables with the signatures
    of :mod:`fused_lora.reference` (multi-adapter ones take a routing view instead of ids)."""

    op: str
    name: str
    fwd: Callable
    bwd: Callable
    dtypes: tuple = KERNEL_DTYPES
    # Why this entry cannot run on a device ("" when it can), beyond the dtype check.
    reason: Callable[[torch.device], str] = field(default=lambda device: "")
    doc: str = ""

    @property
    def backend(self) -> str:
        return self.name.split(":", 1)[0]


_REGISTRY: dict[tuple[str, str], Kernel] = {}
# Backend -> module of this package that registers it. The torch backend's module is not named
# torch.py: a submodule named torch would shadow `torch` in this package's namespace.
_MODULES = {"torch": "reference", "triton": "triton", "cuda": "cuda"}
_LOAD_ERRORS: dict[str, str] = {}
_LOADED: set[str] = set()


def register_kernel(op: str, name: str, *, fwd: Callable, bwd: Callable, dtypes: tuple = KERNEL_DTYPES,
                    reason: Optional[Callable[[torch.device], str]] = None, doc: str = "") -> Kernel:
    """Register ``name`` ("backend" or "backend:variant") as an implementation of ``op``."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if name.split(":", 1)[0] not in BACKENDS:
        raise ValueError(f"kernel name must start with a backend of {BACKENDS}, got {name!r}")
    k = Kernel(op, name, fwd, bwd, dtypes, reason or (lambda device: ""), doc)
    _REGISTRY[(op, name)] = k
    return k


def _load(backend: str) -> str:
    """Import a backend module once (it registers its kernels); '' or why it failed."""
    if backend not in _LOADED:
        _LOADED.add(backend)
        try:
            importlib.import_module(f"fused_lora.backends.{_MODULES[backend]}")
        except Exception as e:  # noqa: BLE001 - any import failure makes the backend unavailable
            _LOAD_ERRORS[backend] = f"{type(e).__name__}: {e}"
    return _LOAD_ERRORS.get(backend, "")


def _load_all() -> None:
    for b in BACKENDS:
        _load(b)


def names(op: str) -> list[str]:
    """Every registered entry of ``op`` (loading every backend module)."""
    _load_all()
    return sorted(n for (o, n) in _REGISTRY if o == op)


def kernel(op: str, name: str) -> Kernel:
    """The registered entry ``name`` of ``op`` (a name :func:`select` returned)."""
    k = _REGISTRY.get((op, name))
    if k is None:
        err = _load(name.split(":", 1)[0])
        k = _REGISTRY.get((op, name))
        if k is None:
            raise ValueError(f"no kernel {name!r} for {op}" + (f": {err}" if err else
                             f"; registered: {names(op)}"))
    return k


def check_name(op: str, backend: object) -> str:
    """``backend`` if it is "auto" or a registered entry of ``op`` (available here or not), else a
    ValueError listing the choices. For constructors, which check the name before any call."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend.split(":", 1)[0] in BACKENDS:
        _load(backend.split(":", 1)[0])
    if backend != "auto" and (op, backend) not in _REGISTRY and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {['auto'] + names(op)}, got {backend!r}")
    return backend


def unavailable_reason(op: str, name: str, device: torch.device,
                       dtype: Optional[torch.dtype] = None) -> str:
    """Why entry ``name`` cannot run ``op`` on ``device`` for ``dtype`` activations ('' if it can)."""
    backend = name.split(":", 1)[0]
    if backend not in BACKENDS:
        return f"unknown backend {name!r}; choose 'auto' or one of {names(op)}"
    err = _load(backend)
    if err:
        return f"the {backend} backend failed to import: {err}"
    k = _REGISTRY.get((op, name))
    if k is None:
        return f"no kernel {name!r} for {op}; registered: {names(op)}"
    if device.type not in ("cpu", "cuda", "meta"):
        return f"fused_lora supports CPU and CUDA tensors, got device {device}"
    if dtype is not None and dtype not in k.dtypes:
        takes = ", ".join(str(d).replace("torch.", "") for d in k.dtypes)
        return f"{name} takes {takes} activations, got {dtype}"
    if device.type == "meta":  # only the fake (meta) impls run: every entry can trace
        return ""
    why = k.reason(device)
    if why or dtype is None:
        return why
    return _dtype_reason(k, device, dtype)


def _dtype_reason(k: Kernel, device: torch.device, dtype: torch.dtype) -> str:
    if k.backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        # Known interpreter limit: it computes bf16 through numpy float arrays and returns
        # silently wrong numbers (errors of O(1) seen in tests), so refuse rather than answer.
        return ("bf16 arithmetic is wrong under the Triton interpreter (a known interpreter limit); "
                "use fp16 / fp32 on CPU, or a GPU for bf16")
    return ""


# A constant of the traced graph under torch.compile: it depends only on its (constant)
# arguments and on what is installed; Dynamo runs it once at trace time instead of tracing its
# table reads. rows must be a plain int (0 for a symbolic size, see functional._rows).
@torch.compiler.assume_constant_result
def select(op: str, backend: str, device: torch.device, dtype: torch.dtype, mode: str = "fwd",
           rows: int = 0) -> str:
    """The entry that runs ``op`` for this call: ``backend`` checked, or "auto" resolved.

    mode ("fwd" or "fwd+bwd"), rows (tokens in the call; 0 = unknown, as under torch.compile
    with dynamic shapes) and dtype choose the measurement "auto" follows. Raises ValueError
    naming the backend when it is unknown or cannot run here (with the reason)."""
    check_name(op, backend)
    if backend != "auto":
        k = _REGISTRY.get((op, backend))
        if k is not None and dtype not in k.dtypes:
            raise TypeError(f"x dtype {dtype} is only supported by backend='torch'; {backend} takes "
                            f"{', '.join(str(d).replace('torch.', '') for d in k.dtypes)}")
        reason = unavailable_reason(op, backend, device, dtype)
        if reason:
            raise ValueError(f"backend={backend!r} is unavailable for {op} on {device}: {reason}")
        return backend
    from fused_lora import dispatch

    if device.type == "meta" or dtype not in KERNEL_DTYPES:
        return "torch"
    measured = dispatch.measured_choice(op, device, mode, rows, dtype) if rows > 0 else None
    for name in ([measured] if measured else []) + list(dispatch.auto_order(op, device)):
        if not unavailable_reason(op, name, device, dtype):
            return name
    return "torch"


def report(op: str = "lora_linear") -> dict[str, dict[str, str]]:
    """Availability of each entry of ``op`` on each device type: {entry: {device: reason or 'ok'}}."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    out: dict[str, dict[str, str]] = {}
    for name in names(op) or list(BACKENDS):
        out[name] = {d.type: unavailable_reason(op, name, d) or "ok" for d in devices}
        if not torch.cuda.is_available():
            out[name]["cuda"] = "no CUDA device visible"
    for b, err in _LOAD_ERRORS.items():
        out.setdefault(b, {"cpu": err, "cuda": err})
    return out
