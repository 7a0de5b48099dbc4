"""``python -m fused_lora info``: versions, devices, and each backend's availability (with the
reason when one is missing)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys


def _cuda_gemm(_ext) -> str:
    """Which tensor-core GEMM backend='cuda' runs for fp16/bf16 here with gemm=0 (auto), as the
    extension itself decides it (fused_lora_C::gemm_choice)."""
    import torch

    if not _ext.has_cuda_kernels():
        return "none (no CUDA kernels in the extension)"
    has_90a = "90a" in str(_ext.build_info().get("archs") or "")
    if not torch.cuda.is_available():
        return ("decided per device at launch; this build has the sm_90a wgmma kernels" if has_90a
                else "mma.sync (built without sm_90a)") + " (no GPU here)"
    try:
        got = _ext.GEMM_NAMES.get(_ext.gemm_choice(_ext.GEMM_AUTO), "?")
    except Exception as e:  # noqa: BLE001 - an old .so without gemm_choice: say so
        return f"unknown ({type(e).__name__}: {e})"
    cc = ".".join(map(str, torch.cuda.get_device_capability()))
    return (f"{got} for gemm=0 (auto) on compute capability {cc}"
            + ("" if has_90a else ", built without sm_90a")
            + "; the ops' gemm argument picks 1 = mma, 2 = wgmma, 3 = wgmma256")


def info() -> dict:
    import torch

    from fused_lora import __version__, _ext, backends, dispatch

    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001
        triton_version = f"unavailable ({type(e).__name__}: {e})"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "fused_lora": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "gpu": gpu,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "extension": _ext.ext_error() or "loaded",
        "extension_cuda_kernels": _ext.has_cuda_kernels(),
        "extension_build": _ext.build_info(),
        "cuda_gemm": _cuda_gemm(_ext),
        "backends": {op: backends.report(op) for op in ("lora_linear", "multi_lora_linear")},
        "dispatch_table": (
            f"{len(dispatch.measured_table())} measured entries in {dispatch.MEASURED_TABLE_PATH.name}"
            + ("" if dispatch.measured_table() else
               " (empty until `python -m fused_lora.bench dispatch` runs on a GPU: backend='auto' "
               "uses the AUTO_TABLE order)")
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_lora", description=__doc__)
    parser.add_argument("command", nargs="?", default="info", choices=["info"])
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for k, v in data.items():
        if k == "backends":
            print("backends:")
            for op, entries in v.items():
                print(f"  {op}:")
                for b, devs in entries.items():
                    for d, why in devs.items():
                        print(f"    {b:16s} {d:5s} {why}")
        elif k == "extension_build":
            if v:
                print(f"extension_build: {json.dumps(v)}")
        else:
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
