"""Compile every Triton kernel of the package for real GPU targets, without a GPU.

    python -m fused_lora.kernels.compile_check [--arch 80,90] [--all-configs] [--dtypes bf16,fp32]

The interpreter (TRITON_INTERPRET=1, how CPU CI runs the kernels) is more permissive than the
GPU compiler: it accepted a backward kernel whose runtime `if` arms gave one variable two
shapes, which the compiler rejects (found by this check, fixed in _lora_bwd_kernel). This
builds each kernel to a cubin with Triton's bundled ptxas for sm_80 / sm_90 and reports
registers, stack bytes (spills) and shared memory per config from cuobjdump, so CI catches
compile errors and a reviewer sees register pressure before any GPU time is spent.

Must run with TRITON_INTERPRET unset (kernels decorated under the interpreter are not
compilable objects); tests/test_compile_check.py runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("compile_check: unset TRITON_INTERPRET (it makes kernels uncompilable)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fused_lora.kernels import lora_linear as L  # noqa: E402
from fused_lora.kernels import multi_lora as ML  # noqa: E402

_FLOAT_SCALARS = {"scale", "drop_scale"}


@dataclass
class Case:
    """One kernel: pointer dtypes (by arg name; '*x' = activations, '*a' = adapters), the
    constexpr variants to build, and its configs (autotune list or a fixed one)."""

    name: str
    kernel: Any
    ptrs: dict[str, str]
    variants: list[dict[str, Any]]
    configs: list[Any] = field(default_factory=list)


def _jit(k: Any) -> JITFunction:
    while not isinstance(k, JITFunction):
        k = k.fn
    return k


def _configs(k: Any) -> list[Any]:
    return list(getattr(k, "configs", None) or [triton.Config({}, num_warps=4, num_stages=3)])


def _cases(lp: Callable[[bool], str], prec: str) -> list[Case]:
    x, a = "*x", "*a"
    single = dict(x_ptr=x, w_ptr=x, bias_ptr=x, y_ptr=x, dy_ptr=x, dx_ptr=x, xa_ptr="*fp32",
                  ds_ptr="*fp32", a_ptr=a, b_ptr=a, da_ptr=a, db_ptr=a)
    ids = dict(ids_ptr="*i64", ranks_ptr="*i64", scales_ptr="*fp32", perm_ptr="*i32",
               tile_row0_ptr="*i32", tile_row1_ptr="*i32", tile_slot_ptr="*i64",
               seg_start_ptr="*i32", seg_len_ptr="*i32", seg_slot_ptr="*i64", out_ptr="*fp32")
    multi = {**single, **ids}
    return [
        Case("lora shrink", L._lora_shrink_kernel, single,
             [dict(HAS_DROPOUT=d, A_FP32=f, LORA_PRECISION=lp(f), BLOCK_R=r)
              for d, r in ((True, 16), (False, 64)) for f in (False, True)]),
        Case("lora fwd", L._lora_fwd_kernel, single,
             [dict(HAS_BIAS=True, INPUT_PRECISION=prec, LORA_PRECISION=lp(f), FUSE_SHRINK=s,
                   A_FP32=f, BLOCK_R=16) for s in (False, True) for f in (False, True)]),
        Case("lora bwd ds", L._lora_bwd_ds_kernel, {**single, "db_ptr": "*fp32"},
             [dict(COMPUTE_DS=True, COMPUTE_DB=True, B_FP32=f, LORA_PRECISION=lp(f), BLOCK_R=16)
              for f in (False, True)]),
        Case("lora bwd", L._lora_bwd_kernel, single,
             [dict(NEED_DX=True, NEED_DA=True, NEED_DB=db, HAS_DROPOUT=True, INPUT_PRECISION=prec,
                   LORA_PRECISION=lp(True), BLOCK_R=16) for db in (False, True)]),
        Case("multi bgmv shrink", ML._mlora_bgmv_shrink_kernel, {**multi, "a_ptr": a},
             [dict(HAS_RANKS=True, APPLY_SCALE=True, BLOCK_R=ML._BGMV_BLOCK_R,
                   BLOCK_K=ML._BGMV_BLOCK_K)]),
        Case("multi sgmv shrink", ML._mlora_sgmv_shrink_kernel, multi,
             [dict(HAS_RANKS=True, APPLY_SCALE=True, A_FP32=f, LORA_PRECISION=lp(f), BLOCK_R=16,
                   BLOCK_M=ML._SEG_BLOCK_M) for f in (False, True)]),
        Case("multi fwd gather", ML._mlora_fwd_gather, multi,
             [dict(HAS_BIAS=True, HAS_RANKS=True, APPLY_SCALE=True, SEGMENTED=False,
                   INPUT_PRECISION=prec, LORA_PRECISION=lp(True), BLOCK_R=16)]),
        Case("multi fwd segmented", ML._mlora_fwd_segmented, multi,
             [dict(HAS_BIAS=True, HAS_RANKS=True, APPLY_SCALE=True, SEGMENTED=True,
                   INPUT_PRECISION=prec, LORA_PRECISION=lp(True), BLOCK_R=16,
                   BLOCK_M=ML._SEG_BLOCK_M)]),
        Case("multi bwd weight", ML._mlora_bwd_weight_kernel, multi,
             [dict(NEED_DA=True, NEED_DB=True, HAS_RANKS=True, LORA_PRECISION=lp(True),
                   BLOCK_R=16, BLOCK_M=ML._SEG_BLOCK_M)]),
    ]


def _signature(fn: JITFunction, ptrs: dict[str, str], consts: dict[str, Any], xdt: str,
               adt: str) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            t = ptrs.get(name, "*x")
            sig[name] = {"*x": f"*{xdt}", "*a": f"*{adt}"}.get(t, t)
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the cubin's kernel, read with Triton's bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


def run(archs: list[int], dtypes: list[str], all_configs: bool, out=sys.stdout) -> int:
    """Compile everything; print one line per (kernel, arch, dtypes, variant) with the worst
    registers / stack / shared memory over its configs. Returns the number of failures."""
    failures = 0
    for arch in archs:
        for xdt in dtypes:
            prec = "ieee" if xdt == "fp32" else "tf32"
            for adt in sorted({xdt, "fp32"}):
                def lp(a_fp32: bool, xdt: str = xdt) -> str:
                    return "tf32x3" if (a_fp32 or xdt == "fp32") else "tf32"

                for case in _cases(lp, prec):
                    fn = _jit(case.kernel)
                    cfgs = _configs(case.kernel)
                    cfgs = cfgs if all_configs else cfgs[:1]
                    for variant in case.variants:
                        fp32_adapters = variant.get("A_FP32", variant.get("B_FP32"))
                        if fp32_adapters is not None and fp32_adapters != (adt == "fp32"):
                            continue  # the launchers set A_FP32 / B_FP32 from the adapters' dtype
                        worst = [0, 0, 0]
                        for cfg in cfgs:
                            consts = {**variant, **cfg.kwargs}
                            src = ASTSource(fn=fn, signature=_signature(fn, case.ptrs, consts, xdt, adt),
                                            constexprs=consts)
                            try:
                                k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                                   options={"num_warps": cfg.num_warps,
                                                            "num_stages": cfg.num_stages})
                                regs, stack = _resources(k.asm["cubin"])
                            except Exception as e:  # noqa: BLE001 - report every failure
                                failures += 1
                                print(f"FAIL sm_{arch} x={xdt} adapters={adt} {case.name} {variant} "
                                      f"{cfg}: {type(e).__name__}: {str(e)[-800:]}", file=out)
                                continue
                            worst = [max(worst[0], regs), max(worst[1], stack),
                                     max(worst[2], k.metadata.shared)]
                        flags = ",".join(f"{k}={v}" for k, v in variant.items()
                                         if k in ("FUSE_SHRINK", "A_FP32", "HAS_DROPOUT", "NEED_DB",
                                                  "B_FP32"))
                        print(f"sm_{arch} x={xdt:4s} adapters={adt:4s} {case.name:20s} {flags:32s} "
                              f"configs={len(cfgs):2d} regs<={worst[0]:3d} stack<={worst[1]:4d} "
                              f"smem<={worst[2]}", file=out)
    print(f"compile_check: {failures} failure(s)", file=out)
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fused_lora.kernels.compile_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90", help="comma list of SM versions (default 80,90)")
    p.add_argument("--dtypes", default="bf16,fp16,fp32", help="activation dtypes")
    p.add_argument("--all-configs", action="store_true", help="every autotune config (slow)")
    a = p.parse_args(argv)
    archs = [int(s) for s in a.arch.split(",") if s]
    return 1 if run(archs, [d for d in a.dtypes.split(",") if d], a.all_configs) else 0


if __name__ == "__main__":
    sys.exit(main())
