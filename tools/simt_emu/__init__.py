"""JIT build of the SIMT emulator extension ``fused_lora_sim`` (tools/simt_emu/src/).

Development tooling, not part of the fused_lora package (setup.py does not install it and
nothing in fused_lora/ imports it): the tests import it as ``simt_emu`` with tools/ on sys.path
(tests/conftest.py). It needs a source checkout: it compiles the repository's csrc/.

The CUDA kernels and launchers of csrc/ (gemm.cu, lora_linear_cuda.cu, multi_lora_cuda.cu,
moe_lora_cuda.cu) are compiled as plain host C++ with ``-DFUSED_LORA_SIM``: src/simt_emu.h runs
every CUDA thread of a block as a fiber, with barriers, warp collectives, cp.async, ldmatrix and
mma.sync emulated from the PTX ISA, so CPU CI executes every CUDA kernel (tests/test_cuda_sim.py).
Only the CUDA toolkit's *headers* are needed (cuda_fp16.h, cuda_bf16.h, vector_types.h), no nvcc
and no GPU.

    ops = build_sim()                      # torch.ops.fused_lora_sim
    y, xa = ops.lora_linear_fwd(x, w, b, A, B, scale, p, seed)   # CPU tensors

The build is cached under ``$FUSED_LORA_SIM_CACHE`` (default ``~/.cache/fused_lora``) in a
directory named by a hash of the sources, flags and torch version, and done once per process.
``FUSED_LORA_SIM_ASAN=1`` builds it with AddressSanitizer (load it only in a process started
with gcc's libasan preloaded: see tests/test_cuda_sim.py).
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
from pathlib import Path
from typing import Optional

import torch

__all__ = [
    "SimUnavailable",
    "asan_runtime",
    "build_sim",
    "csrc_dir",
    "src_dir",
    "find_cuda_include",
    "sim_unavailable_reason",
]

_OPS = {}  # (asan,) -> torch.ops namespace
_ERRORS = {}


class SimUnavailable(RuntimeError):
    """The emulator cannot be built here (no toolkit headers, no source checkout)."""


def _has_headers(inc: Path) -> bool:
    return all((inc / h).exists() for h in ("cuda_fp16.h", "cuda_bf16.h", "vector_types.h"))


def find_cuda_include() -> Optional[str]:
    """The CUDA toolkit's include directory, found like setup.py finds the toolkit: CUDA_HOME /
    CUDA_PATH, else /usr/local/cuda, else the newest /usr/local/cuda-*; never from the nvcc on
    PATH (it may be a wrapper script). Last, the headers of the pip CUDA runtime wheels that a
    CUDA build of torch depends on (site-packages/nvidia/*/include)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and _has_headers(Path(home, "include")):
            return str(Path(home, "include").resolve())
    for home in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if _has_headers(Path(home, "include")):
            return str(Path(home, "include").resolve())
    try:
        import nvidia  # namespace package of the pip CUDA wheels

        roots = list(nvidia.__path__)
    except ImportError:
        roots = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "*", "include")), reverse=True):
            if _has_headers(Path(inc)):
                return str(Path(inc).resolve())
    return None


def src_dir() -> Path:
    """The emulator's own sources (sim_ops.cpp, simt_emu.cpp, simt_emu.h)."""
    return Path(__file__).resolve().parent / "src"


def csrc_dir() -> Path:
    """csrc/ of the source checkout this tool lives in (tools/simt_emu/ -> ../../csrc)."""
    d = Path(__file__).resolve().parent.parent.parent / "csrc"
    if not (d / "gemm.cu").exists() or not (src_dir() / "sim_ops.cpp").exists():
        raise SimUnavailable(
            f"the SIMT emulator needs a source checkout of fused_lora: {d} has no gemm.cu or "
            f"{src_dir()} no sim_ops.cpp"
        )
    return d


def _cache_root() -> Path:
    if os.environ.get("FUSED_LORA_SIM_CACHE"):
        return Path(os.environ["FUSED_LORA_SIM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fused_lora"


def _cpu_has_fma() -> bool:
    import platform

    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return False  # FMA is baseline there: no flag needed
    if machine not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "fma" in line.split()
    except OSError:
        pass
    return False


def _prune_cache(keep: Path, max_age_days: float = 7.0) -> None:
    """Drop builds of other source versions not used for max_age_days (each is ~10 MB)."""
    import shutil
    import time

    for d in keep.parent.glob("sim-*"):
        try:
            if d != keep and time.time() - d.stat().st_mtime > max_age_days * 86400:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def asan_runtime() -> Optional[list[str]]:
    """The libraries to LD_PRELOAD in a process that loads the ASan build (gcc's libasan and
    libstdc++, whose __cxa_throw the ASan interceptor must find), or None if not found."""
    import shutil
    import subprocess

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return None
    libs = []
    for lib in ("libasan.so", "libstdc++.so"):
        try:
            p = subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True,
                               check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
        if not os.path.isabs(p) or not os.path.exists(p):
            return None
        libs.append(os.path.realpath(p))
    return libs


def _flags(asan: bool) -> list[str]:
    # -fno-strict-aliasing: CUDA code type-puns (uint4 / __half2 views of arrays) freely.
    # -ffp-contract=fast: a*b+c may fuse, as nvcc's default --fmad=true does.
    flags = ["-O2", "-DFUSED_LORA_SIM", "-fno-strict-aliasing", "-ffp-contract=fast",
             "-Wno-unknown-pragmas"]
    if _cpu_has_fma():
        flags.append("-mfma")  # fmaf inline instead of a libm call: ~2.5x faster kernels
    if asan:  # -O1: compiles ~2x faster than -O2 and still runs the kernels fast enough
        flags = ["-O1" if f == "-O2" else f for f in flags]
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g1"]
    if os.environ.get("FUSED_LORA_SIM_UCONTEXT", "0") == "1":
        flags.append("-DFUSED_LORA_SIM_UCONTEXT")
    flags += os.environ.get("FUSED_LORA_SIM_CFLAGS", "").split()
    return flags


def sim_unavailable_reason() -> Optional[str]:
    """None when build_sim() can be attempted here, else why not."""
    try:
        csrc_dir()
    except SimUnavailable as e:
        return str(e)
    if find_cuda_include() is None:
        return ("no CUDA toolkit headers found (cuda_fp16.h, cuda_bf16.h, vector_types.h): set "
                "CUDA_HOME, or install the toolkit under /usr/local/cuda")
    return None


def build_sim(verbose: bool = False, asan: Optional[bool] = None):
    """Build (or reuse the cached build of) the emulator extension, load it and return
    ``torch.ops.fused_lora_sim``. Raises SimUnavailable with the reason when it cannot be built
    here; a compile error propagates (the kernels do not build as host C++)."""
    if asan is None:
        asan = os.environ.get("FUSED_LORA_SIM_ASAN", "0") == "1"
    key = bool(asan)
    if key in _OPS:
        return _OPS[key]
    if key in _ERRORS:
        raise _ERRORS[key]
    reason = sim_unavailable_reason()
    if reason is not None:
        _ERRORS[key] = SimUnavailable(reason)
        raise _ERRORS[key]
    from torch.utils import cpp_extension

    csrc, src = csrc_dir(), src_dir()
    inc = find_cuda_include()
    sources = [src / "sim_ops.cpp", src / "simt_emu.cpp"]
    flags = _flags(asan)
    # Everything the translation units include from csrc/ and src/, plus flags and versions.
    h = hashlib.sha256()
    deps = sorted(set(csrc.glob("*.cu")) | set(csrc.glob("*.cuh")) | set(csrc.glob("*.h"))
                  | set(src.glob("*")))
    for p in deps:
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(f"{torch.__version__} {sys.version} {inc}".encode())
    name = "fused_lora_sim_asan" if asan else "fused_lora_sim"
    build_dir = _cache_root() / f"sim-{'asan-' if asan else ''}{h.hexdigest()[:16]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    os.utime(build_dir)
    _prune_cache(build_dir)
    ldflags = ["-fsanitize=address"] if asan else []
    cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=flags,
        extra_ldflags=ldflags,
        extra_include_paths=[inc, str(csrc), str(src)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    _OPS[key] = torch.ops.fused_lora_sim
    return _OPS[key]
