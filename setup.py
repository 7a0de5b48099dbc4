"""Build for fused_lora: the Python package, its Triton kernels (``kernels/`` installed as
``fused_lora.kernels``), its benchmarks (``bench/`` as ``fused_lora.bench``) and the C++/CUDA
extension ``fused_lora._C`` from ``csrc/``.

Never needs a GPU. The extension gets its CUDA kernels when torch is a CUDA build and a CUDA
toolkit is found, else it is built CPU-only. Knobs (environment variables):

====================================  ========================================================
FUSED_LORA_SKIP_EXT=1                 no C++ extension at all (pure Python + Triton install)
FUSED_LORA_SKIP_CUDA_BUILD=1          build the extension CPU-only even with a CUDA toolkit
FUSED_LORA_EXT_OPTIONAL=1             a failed extension build installs the package without it
                                      (the error goes to _build_info.json and `python -m
                                      fused_lora info`); default: the build fails
FUSED_LORA_CUDA_ARCHS="80;90a"        SASS targets (default: the visible GPUs' archs; with no
                                      GPU visible, no CUDA kernels: CI asks for "80;90a").
                                      PTX of the newest without its "a" is added. 90a builds
                                      the Hopper wgmma GEMM and
                                      lets the host launch it on compute capability 9.0
                                      (the ops' gemm argument picks mma/wgmma per call)
CUDA_HOME / CUDA_PATH                 the toolkit; default: CUDA's standard install prefix
                                      /usr/local/cuda (not derived from the nvcc on PATH,
                                      which may be a wrapper script)
MAX_JOBS                              parallel compile jobs; default min(cores, free RAM / 3 GiB)
NVCC_THREADS                          nvcc --threads (default 2)
FUSED_LORA_DEBUG=1                    -O0 -g, and -G -lineinfo for device code
====================================  ========================================================
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root: CUDA_HOME / CUDA_PATH if set, else the standard prefix.

    torch.utils.cpp_extension guesses the toolkit from `which nvcc`; where nvcc on PATH is a
    wrapper script (as on our CI machines) that guess is its parent dir, which holds no
    headers or libraries. So resolve it here and export CUDA_HOME before torch reads it."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and Path(home, "bin", "nvcc").exists():
            return home
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if Path(home, "bin", "nvcc").exists() and Path(home, "include", "cuda_runtime.h").exists():
            return str(Path(home).resolve())
    nvcc = shutil.which("nvcc")
    if nvcc:  # last resort: follow symlinks (not wrapper scripts) to a real toolkit
        home = Path(nvcc).resolve().parent.parent
        if Path(home, "include", "cuda_runtime.h").exists():
            return str(home)
    return None


def _max_jobs() -> str:
    if os.environ.get("MAX_JOBS"):
        return os.environ["MAX_JOBS"]
    cpus = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        by_mem = max(1, avail_kb // (3 * 1024 * 1024))  # nvcc peaks near 3 GiB per job
    except (OSError, StopIteration, ValueError):
        by_mem = 1
    return str(max(1, min(cpus, by_mem)))


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    items = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    for a in items:
        a = a.replace(".", "")
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    if items:
        # PTX for later GPUs: of the newest target without its arch-specific "a" suffix
        # (compute_90a PTX would run on 9.0 only).
        newest = items[-1].replace(".", "").rstrip("a")
        flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    if any(a.replace(".", "").endswith("90a") for a in items):
        flags += ["-DFUSED_LORA_SM90A"]  # the host may launch the wgmma kernels (fl_has_wgmma)
    return flags


def _visible_gpu_archs() -> str:
    """SASS targets for the GPUs this machine can see ("90a" for Hopper, whose wgmma kernels
    need the arch-specific target; "80" style otherwise), or "" when none is visible."""
    try:
        import torch

        if not torch.cuda.is_available():
            return ""
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    except Exception:  # noqa: BLE001 - no driver: build CPU-only unless archs are asked for
        return ""
    return ";".join(f"{a}{b}" + ("a" if (a, b) == (9, 0) else "") for a, b in caps)


def _extensions():
    """(ext_modules, cmdclass, build_info)."""
    info: dict = {"extension": False}
    if _env_flag("FUSED_LORA_SKIP_EXT"):
        info["reason"] = "FUSED_LORA_SKIP_EXT=1"
        return [], {}, info
    cpp_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    cu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu"))
    if not cpp_sources:
        info["reason"] = "no C++ sources in csrc/"
        return [], {}, info

    cuda_home = None
    want_cuda = not _env_flag("FUSED_LORA_SKIP_CUDA_BUILD")
    archs = os.environ.get("FUSED_LORA_CUDA_ARCHS") or _visible_gpu_archs()
    if want_cuda and not archs:
        # No GPU here and no archs asked for: CUDA kernels that can never run on this machine
        # would cost ~5-10 minutes of nvcc on 2 cores. CI asks for the full set explicitly.
        want_cuda = False
        info["cuda_reason_detail"] = "no CUDA device visible and FUSED_LORA_CUDA_ARCHS unset"
    if want_cuda:
        cuda_home = _find_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    use_cuda = bool(want_cuda and cuda_home and torch.version.cuda and cu_sources)
    debug = _env_flag("FUSED_LORA_DEBUG")
    os.environ.setdefault("MAX_JOBS", _max_jobs())
    # No -std flag: torch.utils.cpp_extension adds the standard its own headers need when none
    # is given (torch 2.14's ATen.h #errors below C++20), and no -DPy_LIMITED_API: with
    # py_limited_api=True torch defines it itself (a second definition only warns).
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    info.update(
        extension=True,
        cuda=use_cuda,
        cuda_home=cuda_home,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        archs=archs if use_cuda else None,
        max_jobs=os.environ["MAX_JOBS"],
    )
    if not use_cuda:
        info["cuda_reason"] = (
            info.get("cuda_reason_detail") or "FUSED_LORA_SKIP_CUDA_BUILD=1" if not want_cuda
            else "torch is not a CUDA build" if not torch.version.cuda
            else "no CUDA toolkit found (set CUDA_HOME)" if not cuda_home
            else "no .cu sources"
        )
        ext = CppExtension(
            "fused_lora._C", cpp_sources, extra_compile_args={"cxx": cxx}, py_limited_api=True
        )
    else:
        nvcc = ["-O0", "-G", "-lineinfo"] if debug else ["-O3", "-lineinfo"]
        nvcc += [
            "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "--threads", os.environ.get("NVCC_THREADS", "2"),
        ] + _gencode_flags(archs)  # explicit -gencode: torch then ignores TORCH_CUDA_ARCH_LIST
        ext = CUDAExtension(
            "fused_lora._C",
            cpp_sources + cu_sources,
            extra_compile_args={
                "cxx": cxx + ["-DFUSED_LORA_WITH_CUDA"],
                "nvcc": nvcc + ["-DFUSED_LORA_WITH_CUDA"],
            },
            py_limited_api=True,
        )

    class _Build(BuildExtension):
        def run(self):
            t0 = time.monotonic()
            try:
                super().run()
            except Exception as e:  # noqa: BLE001
                if not _env_flag("FUSED_LORA_EXT_OPTIONAL"):
                    raise
                # Install without the extension; `python -m fused_lora info` shows why.
                info.update(extension=False, reason=f"build failed: {type(e).__name__}: {e}")
                print(f"fused_lora: extension build failed, continuing without it: {e}",
                      file=sys.stderr)
            info["build_seconds"] = round(time.monotonic() - t0, 1)
            # Record what was built next to the package (read by `python -m fused_lora info`);
            # the source tree's copy is the one an editable install imports.
            for target in {ROOT / "fused_lora", Path(self.build_lib) / "fused_lora"}:
                if target.exists():
                    (target / "_build_info.json").write_text(json.dumps(info, indent=2))

    return [ext], {"build_ext": _Build.with_options(use_ninja=True)}, info


ext_modules, cmdclass, _info = _extensions()
print(f"fused_lora build: {json.dumps(_info)}", file=sys.stderr)

setup(
    packages=["fused_lora", "fused_lora.backends", "fused_lora.integrations", "fused_lora.kernels",
              "fused_lora.bench"],
    package_dir={
        "fused_lora": "fused_lora",
        "fused_lora.kernels": "kernels",
        "fused_lora.bench": "bench",
    },
    package_data={"fused_lora": ["py.typed", "_build_info.json", "dispatch_table.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
