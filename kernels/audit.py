"""Kernel audit: the sm_90a / sm_80 machine code of every Triton kernel as a launch builds it.

    python -m fused_lora.kernels.audit [--arch 90a,80] [--cases NAME,...] [--json out.json] [--gate]

How it compiles what runs. Each named case (_CASES: training 8192 x 4096^2 at r = 16 / 64 with
bf16 / fp32 adapters, dropout on and off, the forward's shrink / TMA variants; fp16; decode M =
1 and 16 over 64 adapters; prefill of 4096 tokens over 8 adapters; one Qwen3-30B-A3B MoE
gate_up, 4096 tokens x top-8 of 128 experts) calls the real launchers (kernels.lora_linear /
kernels.multi_lora / kernels.moe_lora) on CPU tensors of the named shapes, once per arch with
that arch's GPU pinned (kernels.target.pinned: every prune function then keeps what a launch on
an H100 / H200 or an A100 would keep), while Triton's launch is intercepted: Autotuner.run is
replaced by a loop over every config the autotuner could pick (its own prune_configs, so a
kernel's prune_configs_by / early_config_prune applies), and JITFunction.run by a recorder of
the real arguments and constexprs. Each recorded launch is then bound with Triton's own runtime
code for the target backend (create_function_from_signature + JITFunction._pack_args: ints
divisible by 16 get the divisibility hint, ints equal to 1 become constants, 16-byte-aligned
pointers get the alignment hint, exactly as at run time) and compiled with triton.compile for
GPUTarget("cuda", 90) (ptxas --gpu-name=sm_90a) and GPUTarget("cuda", 80), in a pool of
os.cpu_count() processes, with a fresh Triton cache directory per run (nothing carried over).

What it reports, per kernel x config x arch (the readable table, and every field in --json):
registers, stack / spill bytes (ptxas) and LDL/STL in the SASS, shared memory and whether the
config can launch (shared <= the opt-in limit per block, registers x threads <= 64K); the
tensor-core instructions of the main loop (HGMMA shape / HMMA / FFMA-only) and their count
per iteration; the main loop's instruction count per K step; the ptxas C75xx notes (C7515 /
C7512 = serialised wgmma); global load widths in the loop (LDG / LDGSTS by bit width,
UTMALDG) and the cp.async groups still in flight at the loop's wait (DEPBAR.LE SB0, N).
Main loop = the innermost SASS loop (a backward branch) with the most tensor-core work on
operands of the activation dtype (FFMA count when a kernel has no MMA).

Beside them it compiles _plain_gemm_kernel (kernels/plain_gemm.py, the Triton tutorial's
GEMM) at the same tile, stages, warps, dtype, B layout and shape, and reports
ratio = kernel main-loop instructions per K step / plain GEMM's. The dx GEMM's tile is
(BLOCK_M, BLOCK_K) with K step BLOCK_N, so it is compared with the plain GEMM at
(BLOCK_M, BLOCK_N=BLOCK_K, BLOCK_K=BLOCK_N).

It also reads the C++/CUDA extension's sm_90a cubins (fused_lora/_C*.so, when built):
registers / stack / shared per kernel, and whether every kernel whose name says wgmma holds
HGMMA instructions.

--gate exits 1 and lists every failure of: compile (a kernel does not compile), wgmma-serialised
(any ptxas C7511 / C7512 / C7515 on sm_90a), spill (stack or spill bytes in a hot kernel),
unlaunchable (a listed config over the shared-memory or register limit: such configs must be
pruned before autotuning), ratio (a forward or dx main loop of the single-adapter GEMMs more
than 1.15x the plain GEMM's instructions per K step at the same tile), ext-no-hgmma.

Must run with TRITON_INTERPRET unset: under the interpreter @triton.jit kernels are not
compilable objects (tests/conftest.py sets it, so tests/test_audit.py runs this in a
subprocess). The interpreter is also more permissive than the compiler (it accepted a
backward kernel whose runtime `if` arms gave one variable two shapes), which is why CI compiles.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import copy
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
import triton

_API_ERROR = None
try:  # the runtime pieces the audit drives; run() fails clearly on a Triton that lacks them
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not hasattr(JITFunction, "_pack_args"):
        raise ImportError("JITFunction._pack_args")
except ImportError as _e:  # pragma: no cover - depends on the installed Triton
    _API_ERROR = (f"audit: Triton {triton.__version__} lacks a runtime API the audit uses ({_e}); "
                  "written against Triton 3.8 (triton/runtime/jit.py: create_function_from_signature, "
                  "JITFunction._pack_args; triton/runtime/autotuner.py: Autotuner.prune_configs)")

from fused_lora.kernels import lora_linear as L  # noqa: E402
from fused_lora.kernels import moe_lora as MOE  # noqa: E402
from fused_lora.kernels import multi_lora as ML  # noqa: E402
from fused_lora.kernels import plain_gemm as PG  # noqa: E402
from fused_lora.kernels import target  # noqa: E402
from fused_lora.routing import RoutingPlan  # noqa: E402

# Max dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), what Triton's
# launcher checks metadata.shared against: sm_90 (H100 / H200) 227 KB = 232448 bytes of the
# SM's 228 KB (1 KB is reserved per block); sm_80 (A100) 163 KB = 166912 bytes of 164 KB.
SHARED_LIMIT = {90: 232448, 80: 166912}
REGS_PER_SM = 65536  # 64K 32-bit registers per SM (and the most one block may hold), sm_80 / sm_90
RATIO_LIMIT = 1.15

# Kernels on the training / serving hot path (the spill gate). The plain GEMM is a yardstick.
HOT = {
    "_lora_shrink_kernel", "_lora_fwd_kernel", "_lora_bwd_ds_kernel", "_lora_bwd_kernel",
    "_mlora_bgmv_shrink_kernel", "_mlora_sgmv_shrink_kernel", "_mlora_fwd_gather",
    "_mlora_fwd_segmented", "_mlora_bwd_weight_kernel", "_lora_fwd_tma_kernel",
    "_lora_fwd_tma_persistent_kernel", "_lora_bwd_dx_tma_kernel",
    "_moe_shrink_kernel", "_moe_gemm_kernel", "_moe_bwd_weight_kernel",
}
# The ratio gate: the single-adapter forward GEMM and dx GEMM. (The multi-adapter GEMMs get
# the ratio column too, for information.)
RATIO_GATED = {"_lora_fwd_kernel", "_lora_bwd_kernel", "_lora_fwd_tma_kernel",
               "_lora_fwd_tma_persistent_kernel", "_lora_bwd_dx_tma_kernel"}
# ... except the in-loop-shrink forward (registry entry triton:inloop): its K loop holds the
# shrink's r-wide MMA and A-tile loads on purpose (1 + BR / BN of the MMA work), so its gates
# are the others (compiles, no spill, no serialised wgmma); its ratio is reported.
RATIO_EXEMPT_VARIANTS = ("fwd fused",)

_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


# --------------------------------------------------------------------------------------------
# The named cases: every launcher call of the audit is in _calls (edit there when a launcher's
# signature changes).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "train" | "multi" | "moe" | "plain"
    M: int
    N: int
    K: int
    R: int
    x_dtype: str = "bf16"
    a_dtype: str = "bf16"
    slots: int = 0  # multi: adapters in the bank; moe: experts
    topk: int = 1  # moe: experts per token (M tokens give M * topk rows)
    path: Optional[str] = None
    split_k: Optional[int] = None
    ci: bool = False  # in the CI subset (tests/test_audit.py)
    gated: bool = True  # False: only the compile gate (coverage, not a performance target)
    selftest: bool = False  # checks the audit itself; not in "all"


_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# split_k: what _split_k picks on a 132-SM H200 for N = K = 4096 (min(cdiv(4 * 132, M), 8)); on
# CPU tensors the launcher would pick 1, which is not what runs.
_CASES = [
    Case("train-bf16-r16", "train", 8192, 4096, 4096, 16, ci=True),
    Case("train-bf16-r64", "train", 8192, 4096, 4096, 64),
    Case("train-fp32a-r16", "train", 8192, 4096, 4096, 16, a_dtype="fp32", ci=True),
    Case("train-fp32a-r64", "train", 8192, 4096, 4096, 64, a_dtype="fp32"),
    Case("train-fp16-r16", "train", 8192, 4096, 4096, 16, x_dtype="fp16", a_dtype="fp16"),
    # fp32 activations are not a performance target (no fp32 tensor-core GEMM is: tf32 / ieee
    # dots of 4-byte tiles); compiled for coverage: the compile gate only.
    Case("train-fp32-r16", "train", 8192, 4096, 4096, 16, x_dtype="fp32", a_dtype="fp32", gated=False),
    Case("decode-m1", "multi", 1, 4096, 4096, 16, slots=64, path="decode", split_k=8),
    Case("decode-m16", "multi", 16, 4096, 4096, 16, slots=64, path="decode", split_k=8, ci=True),
    Case("prefill-4096x8", "multi", 4096, 4096, 4096, 16, slots=8, path="prefill", ci=True),
    # One Qwen3-30B-A3B MoE layer's gate_up projection: 4096 tokens, top-8 of E = 128 experts,
    # H = 2048 -> 2 x I = 1536, r = 16.
    Case("moe-qwen3", "moe", 4096, 1536, 2048, 16, slots=128, topk=8, ci=True),
    # Known answers: the plain GEMM against itself (ratio 1.0, HGMMA, no spill), and a config
    # whose 4 stages of 256x128 + 128x256 bf16 tiles (512 KB) cannot launch.
    Case("selftest", "plain", 8192, 4096, 4096, 0, selftest=True),
]
CASES = {c.name: c for c in _CASES}


def _calls(c: Case) -> list[tuple[str, Callable[[], Any]]]:
    """(variant label, thunk) per launcher call of case ``c``: tensors on the CPU (torch.empty,
    64-byte-aligned like a real allocation), values never read."""
    xd, ad = _DT[c.x_dtype], _DT[c.a_dtype]
    e = torch.empty
    x, dy, w = e(c.M, c.K, dtype=xd), e(c.M, c.N, dtype=xd), e(c.N, c.K, dtype=xd)
    xa = e(c.M, c.R, dtype=torch.float32)
    if c.kind == "train":
        A, B = e(c.R, c.K, dtype=ad), e(c.N, c.R, dtype=ad)
        fwd = L.lora_linear_fwd
        bwd = L.lora_linear_bwd
        return [
            ("fwd pre p=0.1", lambda: fwd(x, w, None, A, B, 2.0, 0.1, 0, shrink="pre")),
            ("fwd pre p=0", lambda: fwd(x, w, None, A, B, 2.0, 0.0, 0, shrink="pre")),
            ("fwd fused p=0", lambda: fwd(x, w, None, A, B, 2.0, 0.0, 0, shrink="fused")),
            ("fwd tma p=0", lambda: fwd(x, w, None, A, B, 2.0, 0.0, 0, tma=True)),
            ("fwd tma-persistent p=0", lambda: fwd(x, w, None, A, B, 2.0, 0.0, 0, tma=True, persistent=True)),
            ("bwd p=0.1", lambda: bwd(dy, x, w, A, B, xa, 2.0, 0.1, 0, True, True, True)),
            ("bwd p=0", lambda: bwd(dy, x, w, A, B, xa, 2.0, 0.0, 0, True, True, True)),
            ("bwd tma p=0.1", lambda: bwd(dy, x, w, A, B, xa, 2.0, 0.1, 0, True, True, True, tma=True)),
            ("bwd tma p=0", lambda: bwd(dy, x, w, A, B, xa, 2.0, 0.0, 0, True, True, True, tma=True)),
        ]
    if c.kind == "plain":
        wt = w.t()  # [K, N], the forward's W0^T
        return [
            ("128x256x64", lambda: PG.plain_gemm(x, wt, block_m=128, block_n=256, block_k=64,
                                                 num_stages=3, num_warps=8)),
            ("256x256x128", lambda: PG.plain_gemm(x, wt, block_m=256, block_n=256, block_k=128,
                                                  num_stages=4, num_warps=8)),
        ]
    if c.kind == "moe":
        from fused_lora import routing
        from fused_lora.moe import moe_routing_plan

        W = e(c.slots, c.N, c.K, dtype=xd)  # [E, out, in], never touched (no page is faulted in)
        A, B = e(c.slots, c.R, c.K, dtype=ad), e(c.slots, c.N, c.R, dtype=ad)
        ids = (torch.arange(c.M * c.topk, dtype=torch.int64) * 7 % c.slots).reshape(c.M, c.topk)
        view = routing.unpack(moe_routing_plan(ids, c.slots).data, c.M * c.topk, c.slots)
        rows_xa = e(c.M * c.topk, c.R, dtype=torch.float32)
        dy_r = e(c.M * c.topk, c.N, dtype=xd)
        mf, mb = MOE.moe_lora_linear_fwd, MOE.moe_lora_linear_bwd
        return [
            ("fwd p=0", lambda: mf(x, W, None, A, B, 2.0, 0.0, 0, view, topk=c.topk)),
            ("fwd p=0.1", lambda: mf(x, W, None, A, B, 2.0, 0.1, 0, view, topk=c.topk)),
            ("bwd p=0", lambda: mb(dy_r, x, W, A, B, rows_xa, 2.0, 0.0, 0, view, True, True, True,
                                   topk=c.topk)),
        ]
    A, B = e(c.slots, c.R, c.K, dtype=ad), e(c.slots, c.N, c.R, dtype=ad)
    scales = e(c.slots, dtype=torch.float32)
    ranks = torch.full((c.slots,), c.R, dtype=torch.int64)
    # The batch's routing plan, built once as a model forward would (fused_lora.routing).
    plan = RoutingPlan.build(torch.arange(c.M, dtype=torch.int64) % c.slots, c.slots).view()
    kw = dict(path=c.path, split_k=c.split_k)
    return [
        ("fwd", lambda: ML.multi_lora_linear_fwd(x, w, None, A, B, scales, ranks, plan, **kw)),
        ("bwd", lambda: ML.multi_lora_linear_bwd(dy, x, w, A, B, scales, ranks, plan, xa,
                                                 True, True, True, **kw)),
    ]


# --------------------------------------------------------------------------------------------
# Capture: run the launchers with Triton's launch intercepted
# --------------------------------------------------------------------------------------------


@dataclass
class Launch:
    case: str
    variant: str
    kernel: str  # the launched object's name (an autotuner's module attribute, or the jit fn's)
    fn: Any  # JITFunction
    args: tuple
    kwargs: dict
    config: str
    config_index: int  # position in the autotuner's (pruned) list; 0 for fixed launches
    n_configs: int


class _Capture:
    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.case = self.variant = ""
        self._tuner: Any = None
        self._cfg: tuple[int, int, str] = (0, 1, "")

    @staticmethod
    def _name(obj: Any) -> str:
        for mod in (L, ML, MOE, PG):
            for k, v in vars(mod).items():
                if v is obj:
                    return k
        f = obj
        while not isinstance(f, JITFunction):
            f = f.fn
        return f.__name__

    @contextlib.contextmanager
    def patched(self):
        cap = self
        orig_jit, orig_tune = JITFunction.run, Autotuner.run

        def jit_run(fn, *args, grid, warmup, **kwargs):
            idx, n, label = cap._cfg
            if not label:
                label = _cfg_label({k: v for k, v in kwargs.items() if k.startswith("BLOCK_")},
                                   kwargs.get("num_stages"), kwargs.get("num_warps"))
            # TMA descriptors are mutated by the next config's pre-hook: keep this launch's own
            args = tuple(copy.copy(a) if type(a).__name__ == "TensorDescriptor" else a for a in args)
            cap.launches.append(Launch(cap.case, cap.variant, cap._name(cap._tuner or fn), fn, args,
                                       dict(kwargs), label, idx, n))
            return None

        def tune_run(tuner, *args, **kwargs):
            # Autotuner.run, minus the benchmark: every config it could pick is launched.
            tuner.nargs = dict(zip(tuner.arg_names, args))
            cfgs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs[:1]
            outer = cap._tuner
            cap._tuner = tuner
            try:
                for i, cfg in enumerate(cfgs):
                    cap._cfg = (i, len(cfgs), _cfg_label(cfg.kwargs, cfg.num_stages, cfg.num_warps))
                    if cfg.pre_hook:  # as Autotuner.run (e.g. the TMA descriptors' block shapes)
                        cfg.pre_hook({**tuner.nargs, **kwargs, **cfg.all_kwargs()})
                    tuner.fn.run(*args, **kwargs, **cfg.all_kwargs())
            finally:
                cap._tuner, cap._cfg, tuner.nargs = outer, (0, 1, ""), None

        JITFunction.run, Autotuner.run = jit_run, tune_run
        try:
            yield self
        finally:
            JITFunction.run, Autotuner.run = orig_jit, orig_tune

    def run(self, case: str, variant: str, thunk: Callable[[], Any]) -> None:
        self.case, self.variant = case, variant
        thunk()


def _cfg_label(kw: dict, stages: Any, warps: Any) -> str:
    b = {k.replace("BLOCK_", ""): v for k, v in kw.items() if k.startswith("BLOCK_")}
    if {"M", "N", "K"} <= b.keys():
        tile = f"{b['M']}x{b['N']}x{b['K']}"
    else:
        tile = " ".join(f"{k}{v}" for k, v in b.items())
    return f"{tile} s{stages} w{warps}"


# --------------------------------------------------------------------------------------------
# Bind exactly as the runtime does, for a given target
# --------------------------------------------------------------------------------------------

_BINDERS: dict = {}


def _target(arch: int) -> Any:
    return GPUTarget("cuda", arch, 32)


def _bind(fn: Any, args: tuple, kwargs: dict, arch: int) -> dict:
    """(signature, constexprs, attrs, options) of a launch, from JITFunction.run's own steps."""
    key = (id(fn), arch)
    if key not in _BINDERS:
        backend = make_backend(_target(arch))
        _BINDERS[key] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
    backend, binder = _BINDERS[key]
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return dict(fn_key=f"{fn.module}:{fn.fn.__qualname__}", signature=signature, constexprs=constexprs,
                attrs=attrs, options=options.__dict__, arch=arch)


def _job_key(j: dict) -> str:
    return repr((j["fn_key"], sorted(j["signature"].items()), sorted(j["constexprs"].items()),
                 sorted(j["attrs"].items()), sorted(j["options"].items()), j["arch"]))


# --------------------------------------------------------------------------------------------
# Compile (in worker processes) and read the machine code
# --------------------------------------------------------------------------------------------

_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_NOTE = re.compile(r"\((C\d{4})\)\s*(.*)")
# ptxas "wgmma.mma_async instructions are serialized due to ...": C7511 / C7512 (insufficient
# registers), C7515 (non-wgmma instructions defining accumulator registers), and any other
# C75xx note that says so.
SERIALISED = {"C7511", "C7512", "C7515"}


def is_serialised(note: str) -> bool:
    code = note.split()[0] if note else ""
    return code in SERIALISED or (code.startswith("C75") and "wgmma" in note and "serializ" in note)


def parse_ptxas(log: str) -> dict:
    """Registers, stack / spill bytes and C-numbered notes (e.g. C7515) from a ptxas -v log."""
    out: dict[str, Any] = {"ptxas_regs": None, "stack": None, "spill_stores": None, "spill_loads": None,
                           "notes": []}
    m = _PTXAS_FRAME.search(log)
    if m:
        out["stack"], out["spill_stores"], out["spill_loads"] = map(int, m.groups())
    m = _PTXAS_REGS.search(log)
    if m:
        out["ptxas_regs"] = int(m.group(1))
    seen = set()
    for m in _PTXAS_NOTE.finditer(log):
        note = f"{m.group(1)} {m.group(2).strip()}"
        if note not in seen:
            seen.add(note)
            out["notes"].append(note)
    return out


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"\bBRA(?:\.[A-Z.]+)?\b.*?(0x[0-9a-f]+)\s*$")
_HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA = {"16816": 16 * 8 * 16, "1688": 16 * 8 * 8, "1684": 16 * 8 * 4, "884": 8 * 8 * 4}


def _op(text: str) -> str:
    t = text.split()
    if t and t[0].startswith("@"):
        t = t[1:]
    return t[0] if t else ""


def _mma_work(op: str) -> int:
    m = _HGMMA.match(op)
    if m:
        return int(m.group(1)) * int(m.group(2)) * int(m.group(3))
    if op.startswith("HMMA."):
        return _HMMA.get(op.split(".")[1], 16 * 8 * 8)
    return 0


def _load_kind(op: str) -> Optional[str]:
    if op.startswith("UTMALDG"):
        return "UTMALDG"
    if op.startswith("LDGSTS") or op.startswith("LDG."):
        base = "LDGSTS" if op.startswith("LDGSTS") else "LDG"
        parts = op.split(".")
        width = 32
        for p, w in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
            if p in parts:
                width = w
                break
        return f"{base}{width}"
    return None


def _hist(ops: list[str], pick: Callable[[str], Optional[str]]) -> dict[str, int]:
    h: dict[str, int] = {}
    for op in ops:
        k = pick(op)
        if k:
            h[k] = h.get(k, 0) + 1
    return dict(sorted(h.items()))


def _mma_name(op: str) -> Optional[str]:
    if op.startswith("HGMMA") or op.startswith("HMMA"):
        return ".".join(op.split(".")[:4])
    return None


def parse_sass(sass: str, act: str = "") -> dict:
    """Main-loop facts of one kernel's SASS (cuobjdump -sass). ``act``: the activation dtype's
    SASS spelling (BF16 / F16), preferred when choosing the main loop."""
    ins = [(int(a, 16), txt) for a, txt in _SASS_LINE.findall(sass)]
    ops = [_op(t) for _, t in ins]
    whole = {
        "mma": _hist(ops, _mma_name), "ffma": sum(o.startswith("FFMA") for o in ops),
        "ldl": sum(o.startswith("LDL") for o in ops), "stl": sum(o.startswith("STL") for o in ops),
        "loads": _hist(ops, _load_kind),
    }
    best = None
    loops = []
    cands = []
    for i, (addr, txt) in enumerate(ins):
        m = _BRA.search(txt) if "BRA" in ops[i] else None
        if not m:
            continue
        tgt = int(m.group(1), 16)
        if tgt >= addr:
            continue
        body = [j for j, (a, _) in enumerate(ins) if tgt <= a <= addr]
        bops = [ops[j] for j in body]
        work_act = sum(_mma_work(o) for o in bops if act and act in o.split("."))
        work = sum(_mma_work(o) for o in bops)
        ffma = sum(o.startswith("FFMA") for o in bops)
        loops.append({"range": [hex(tgt), hex(addr)], "instrs": len(body), "mma": _hist(bops, _mma_name),
                      "ffma": ffma, "loads": _hist(bops, _load_kind)})
        cands.append(((work_act, work, ffma, -len(body)), bops, tgt, addr))
    # A back-branch that spans the main loop and more (with TMA, one from the epilogue back
    # into the loop body) is not the main loop: of overlapping loops with tensor-core work on
    # the activation dtype, only the smallest are candidates.
    inner = [c for c in cands if not (c[0][0] and any(
        d is not c and d[0][0] and len(d[1]) < len(c[1]) and d[2] <= c[3] and c[2] <= d[3]
        for d in cands))]
    for c in inner:
        if best is None or c[0] > best[0]:
            best = c
    def facts(c) -> dict:
        bops, lo, hi = c[1], c[2], c[3]
        in_loop = [(ops[j], t) for j, (a, t) in enumerate(ins) if lo <= a <= hi]
        depbar = [int(t.rsplit(",", 1)[-1], 16) for o, t in in_loop if o == "DEPBAR.LE" and "SB0" in t]
        wg = [int(t.rsplit(",", 1)[-1], 16) for o, t in in_loop if o == "WARPGROUP.DEPBAR.LE"]
        return {
            "instrs": len(bops), "mma": _hist(bops, _mma_name),
            "ffma": sum(o.startswith("FFMA") for o in bops),
            "mma_work": c[0][1],
            "loads": _hist(bops, _load_kind), "ldl": sum(o.startswith("LDL") for o in bops),
            "stl": sum(o.startswith("STL") for o in bops),
            "ldgdepbar": sum(o == "LDGDEPBAR" for o in bops),
            "async_waits": len(depbar),
            "async_in_flight": max(depbar) if depbar else None,
            "wgmma_in_flight": max(wg) if wg else None,
            "range": [hex(lo), hex(hi)],
        }

    loop = facts(best) if best is not None and (best[0][1] or best[0][2]) else None
    # every innermost loop with tensor-core work, for matching against a yardstick (run())
    alts = [facts(c) for c in inner if c[0][1] and c is not best]
    return {"kernel": whole, "loop": loop, "loops": loops, "alt_loops": alts}


def _tool(name: str, *args: str) -> str:
    return subprocess.run([os.path.join(_TOOLS, name), *args], capture_output=True, text=True,
                          check=True).stdout


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """cuobjdump -res-usage: {function: {REG, STACK, SHARED, LOCAL}}."""
    out: dict[str, dict[str, int]] = {}
    cur = None
    for line in text.splitlines():
        m = re.search(r"Function (\S+?):?\s*$", line)
        if m:
            cur = m.group(1)
            continue
        if cur and "REG:" in line:
            out[cur] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            cur = None
    return out


def _worker_init() -> None:
    """Pool workers die with the audit (a killed audit must not leave compiles running)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux / no glibc: workers end with the pool instead
        pass


def _compile_job(job: dict) -> dict:
    """Worker: compile one bound launch, read ptxas log + cuobjdump. Never raises."""
    t0 = time.time()
    res: dict[str, Any] = {"error": None}
    try:
        from triton.runtime.jit import _triton_jit_function_registry as reg

        fn = reg[job["fn_key"]]
        knobs.nvidia.dump_ptxas_log = True
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(fn, job["signature"], job["constexprs"], job["attrs"]),
                               target=_target(job["arch"]), options=job["options"])
        res.update(parse_ptxas(buf.getvalue()))
        res["ptxas_log"] = buf.getvalue()[-4000:]
        res["shared"] = int(k.metadata.shared)
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "k.cubin")
            with open(p, "wb") as f:
                f.write(k.asm["cubin"])
            usage = parse_res_usage(_tool("cuobjdump", "-res-usage", p))
            sass = _tool("cuobjdump", "-sass", p)
        if job.get("sass_out"):
            with open(job["sass_out"], "w") as f:
                f.write(sass)
        u = next(iter(usage.values()), {})
        res["regs"] = u.get("REG", res.get("ptxas_regs"))
        res["static_shared"] = u.get("SHARED", 0)
        if res.get("stack") is None:
            res["stack"] = u.get("STACK")
        first_ptr = next((v for v in job["signature"].values() if str(v).startswith("*")), "")
        act = {"*bf16": "BF16", "*fp16": "F16"}.get(first_ptr, "")
        res.update(parse_sass(sass, act))
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the audit
        msg = str(e)
        res["error"] = f"{type(e).__name__}: {msg[-1500:]}"
    res["compile_s"] = round(time.time() - t0, 2)
    return res


# --------------------------------------------------------------------------------------------
# Plain-GEMM yardstick
# --------------------------------------------------------------------------------------------


def _plain_for(lc: Launch) -> Optional[dict]:
    """The plain GEMM launch that matches a GEMM launch's tile / layout / dtype / shape."""
    names = lc.fn.arg_names
    a = dict(zip(names, lc.args))
    a.update(lc.kwargs)
    if lc.kernel in ("_lora_fwd_kernel", "_mlora_fwd_gather", "_mlora_fwd_segmented") or (
            lc.kernel == "_plain_gemm_kernel" and lc.case != "plain"):  # the self-test: against itself
        bm, bn, bk = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
        M, N, K = a["M"], a["N"], a["K"]
        if lc.kernel == "_plain_gemm_kernel":
            b_strides = (a["stride_bk"], a["stride_bn"])
        else:
            b_strides = (a["stride_wk"], a["stride_wn"])  # the W^T tile [BK, BN]
    elif lc.kernel in ("_lora_fwd_tma_kernel", "_plain_gemm_tma_kernel", "_lora_fwd_tma_persistent_kernel",
                       "_plain_gemm_tma_persistent_kernel") and lc.case != "plain":
        # against Triton's TMA tutorial structure at the same tile (b = W0 [N, K] by descriptor),
        # persistent on as many programs for the persistent kernel
        act = a.get("x_desc", a.get("a_desc")).base
        return dict(M=a["M"], N=a["N"], K=a["K"], dtype=act.dtype, b_strides=(0, 0), tma=True,
                    num_sms=a.get("NUM_SMS", 0),
                    bm=a["BLOCK_M"], bn=a["BLOCK_N"], bk=a["BLOCK_K"], group_m=a.get("GROUP_M", 8),
                    stages=a.get("num_stages", 3), warps=a.get("num_warps", 4),
                    prec=a.get("INPUT_PRECISION", "ieee"))
    elif lc.kernel == "_lora_bwd_dx_tma_kernel":
        # dx [M, K] = dy [M, N] W0 [N, K]: the TMA yardstick with b = W0 as stored ([K_red, N_out]
        # tiles [BN, BK], no transpose), at the dx tile (BM, BK) and K step BN
        return dict(M=a["M"], N=a["K"], K=a["N"], dtype=a["dy_desc"].base.dtype, b_strides=(1, 1),
                    tma=True, num_sms=0, b_kn=True, bm=a["BLOCK_M"], bn=a["BLOCK_K"], bk=a["BLOCK_N"],
                    group_m=a.get("GROUP_M", 8), stages=a.get("num_stages", 3),
                    warps=a.get("num_warps", 4), prec=a.get("INPUT_PRECISION", "ieee"))
    elif lc.kernel == "_lora_bwd_kernel" and a.get("NEED_DX"):
        # dx tile [BM, BK], K step BLOCK_N over N; the W0 tile [BN, BK] is the plain GEMM's b.
        bm, bn, bk = a["BLOCK_M"], a["BLOCK_K"], a["BLOCK_N"]
        M, N, K = a["M"], a["K"], a["N"]
        b_strides = (a["stride_wn"], a["stride_wk"])
    else:
        return None
    act = next(a[k] for k in ("x_ptr", "dy_ptr", "a_ptr") if k in a)
    return dict(M=M, N=N, K=K, dtype=act.dtype, b_strides=tuple(int(s) for s in b_strides),
                bm=bm, bn=bn, bk=bk, group_m=a.get("GROUP_M", 8), stages=a.get("num_stages", 3),
                warps=a.get("num_warps", 4),
                prec=a.get("INPUT_PRECISION", "ieee"))


def _plain_call(p: dict) -> Callable[[], Any]:
    a = torch.empty(p["M"], p["K"], dtype=p["dtype"])
    if p.get("tma"):
        kn = p.get("b_kn", False)
        b_nk = torch.empty(*((p["K"], p["N"]) if kn else (p["N"], p["K"])), dtype=p["dtype"])
        return lambda: PG.plain_gemm_tma(a, b_nk, b_kn=kn, block_m=p["bm"], block_n=p["bn"], block_k=p["bk"],
                                         group_m=p["group_m"], num_stages=p["stages"],
                                         num_warps=p["warps"], input_precision=p["prec"],
                                         num_sms=p["num_sms"])
    sk, sn = p["b_strides"]
    b = torch.empty_strided((p["K"], p["N"]), (sk, sn), dtype=p["dtype"])
    return lambda: PG.plain_gemm(a, b, block_m=p["bm"], block_n=p["bn"], block_k=p["bk"],
                                 group_m=p["group_m"], num_stages=p["stages"], num_warps=p["warps"],
                                 input_precision=p["prec"])


def _plain_key(p: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in p.items()))


# --------------------------------------------------------------------------------------------
# The extension's sm_90a cubins
# --------------------------------------------------------------------------------------------


def audit_extension() -> dict:
    import fused_lora

    d = os.path.dirname(fused_lora.__file__)
    libs = sorted(f for f in os.listdir(d) if f.startswith("_C") and f.endswith(".so"))
    if not libs:
        return {"built": False, "kernels": []}
    lib = os.path.join(d, libs[0])
    try:
        usage = parse_res_usage(_tool("cuobjdump", "-arch", "sm_90a", "-res-usage", lib))
        sass = _tool("cuobjdump", "-arch", "sm_90a", "-sass", lib)
    except (subprocess.CalledProcessError, OSError) as e:
        return {"built": True, "lib": lib, "error": str(e), "kernels": []}
    per_fn: dict[str, list[str]] = {}
    cur = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = m.group(1)
            per_fn[cur] = []
        elif cur:
            per_fn[cur].append(line)
    kernels = []
    for name, u in usage.items():
        ops = [_op(t) for _, t in _SASS_LINE.findall("\n".join(per_fn.get(name, [])))]
        kernels.append(dict(name=name, regs=u.get("REG"), stack=u.get("STACK"), shared=u.get("SHARED"),
                            hgmma=sum(o.startswith("HGMMA") for o in ops),
                            hmma=sum(o.startswith("HMMA") for o in ops),
                            wgmma_meant="wgmma" in name.lower()))
    return {"built": True, "lib": lib, "kernels": kernels}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    arch: str
    case: str
    variant: str
    kernel: str
    config: str
    config_index: int
    n_configs: int
    hot: bool
    job: str = ""
    plain_job: Optional[str] = None
    metrics: dict = field(default_factory=dict)
    plain: Optional[dict] = None
    launches: Optional[bool] = None
    instrs_per_step: Optional[float] = None
    plain_instrs_per_step: Optional[float] = None
    ratio: Optional[float] = None


def _steps(loop: Optional[dict], tile: Optional[tuple] = None, warps: int = 4) -> int:
    """K steps one loop iteration does (> 1 only if ptxas unrolled it): the smaller of the
    cp.async waits it holds (DEPBAR.LE SB0: one per K step on sm_90; sm_80 waits several times
    per step) and the K steps its tensor-core work covers (which overcounts when the loop also
    holds another dot, e.g. the in-loop shrink). 1 when neither is known."""
    if not loop:
        return 1
    cands = []
    if loop.get("async_waits"):
        cands.append(loop["async_waits"])
    by_mma = _steps_by_mma(loop, tile, warps)
    if by_mma:
        cands.append(int(by_mma + 0.01))
    return max(1, min(cands)) if cands else 1


def _steps_by_mma(loop: Optional[dict], tile: Optional[tuple], warps: int) -> Optional[float]:
    """Cross-check for the JSON: the loop's tensor-core work over one K step's (BM x BN x BK per
    CTA; SASS shows one warpgroup's share of an HGMMA, one warp's of an HMMA)."""
    if not loop or not tile or not loop["mma_work"]:
        return None
    per = warps / 4 if any(k.startswith("HGMMA") for k in loop["mma"]) else warps
    return round(loop["mma_work"] * per / (tile[0] * tile[1] * tile[2]), 2)


def _launch_ok(m: dict, arch: int, warps: int) -> Optional[bool]:
    if m.get("error") or m.get("shared") is None:
        return None
    regs = m.get("regs") or 0
    return m["shared"] <= SHARED_LIMIT[arch] and regs * 32 * warps <= REGS_PER_SM


def _capture(case_names: list[str], plain: str, kernels: Optional[list[str]],
             variants: Optional[list[str]], configs: Optional[list[str]]) -> tuple[list[Launch], int, dict]:
    """Every launch of the named cases (filtered), then one plain-GEMM yardstick launch per
    distinct GEMM launch: (launches, how many are real, plain key -> its launch's index)."""
    cap = _Capture()
    with cap.patched():
        for name in case_names:
            for variant, thunk in _calls(CASES[name]):
                cap.run(name, variant, thunk)
        cap.launches = [lc for lc in cap.launches
                        if (not kernels or lc.kernel in kernels)
                        and (not variants or any(v in lc.variant for v in variants))
                        and (not configs or any(lc.config.startswith(c) for c in configs))]
        plains: dict[tuple, dict] = {}
        for lc in list(cap.launches):
            if plain != "all" and lc.kernel not in RATIO_GATED | {"_plain_gemm_kernel"}:
                continue
            p = _plain_for(lc)
            if p is not None:
                plains.setdefault(_plain_key(p), p)
        n_real = len(cap.launches)
        plain_of: dict[tuple, int] = {}
        for k, p in plains.items():
            # b = W^T (column-major, the forward's W0 tile) or W (row-major, the dx GEMM's)
            b = "TMA" if p.get("tma") else ("W^T" if p["b_strides"][0] == 1 else "W")
            cap.case, cap.variant = "plain", f"M{p['M']} {str(p['dtype'])[6:]} b={b}"
            plain_of[k] = len(cap.launches)
            _plain_call(p)()
    return cap.launches, n_real, plain_of


def run(archs: list[str], case_names: list[str], jobs: Optional[int] = None, ext: bool = True,
        plain: str = "all", log=sys.stderr, kernels: Optional[list[str]] = None,
        variants: Optional[list[str]] = None, configs: Optional[list[str]] = None,
        sass_dir: Optional[str] = None) -> dict:
    """Capture, bind, compile and read every launch of the named cases for each arch; returns
    the report (rows, extension, gates). plain="gated": yardsticks only for the ratio-gated
    kernels (what CI needs), "all": for the multi-adapter GEMMs too. kernels / variants /
    configs keep only the launches whose kernel name is listed, whose variant label contains
    one of the strings, whose config label starts with one of them (a quicker look at one
    kernel while editing it; CI runs everything). sass_dir: write each compile's SASS there,
    named by its first row (arch, case, variant, kernel, config)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("audit: unset TRITON_INTERPRET (under the interpreter kernels cannot be compiled)")
    if _API_ERROR:
        raise SystemExit(_API_ERROR)
    if not hasattr(Autotuner, "prune_configs"):
        raise SystemExit(f"audit: Triton {triton.__version__}: Autotuner has no prune_configs")
    t_start = time.time()
    all_jobs: dict[str, dict] = {}
    rows: list[Row] = []
    for arch_s in archs:
        arch = int(arch_s.rstrip("a"))
        # Captured per arch, with the target pinned: each prune function keeps what a launch on
        # that GPU would keep (shared memory, SM count, arch-specific spill rules).
        with target.pinned(target.AUDIT_GPUS[arch]):
            launches, n_real, plain_of = _capture(case_names, plain, kernels, variants, configs)
        print(f"audit: sm_{arch}: {n_real} kernel launches (+{len(launches) - n_real} plain GEMM) captured "
              f"in {time.time() - t_start:.1f}s", file=log)
        job_of_launch = []
        for lc in launches:
            j = _bind(lc.fn, lc.args, lc.kwargs, arch)
            k = _job_key(j)
            all_jobs.setdefault(k, j)
            job_of_launch.append(k)
        for i, lc in enumerate(launches):
            label = lc.config
            if "sNone" in label or "wNone" in label:  # a fixed launch on the backend's defaults
                o = all_jobs[job_of_launch[i]]["options"]
                label = label.replace("sNone", f"s{o['num_stages']}").replace("wNone", f"w{o['num_warps']}")
            r = Row(f"sm_{arch}{'a' if arch >= 90 else ''}", lc.case, lc.variant, lc.kernel, label,
                    lc.config_index, lc.n_configs, lc.kernel in HOT, job=job_of_launch[i])
            if i < n_real:
                p = _plain_for(lc)
                if p is not None and _plain_key(p) in plain_of:
                    r.plain_job = job_of_launch[plain_of[_plain_key(p)]]
            rows.append(r)

    # The captured launches hold CPU tensors of the named shapes (never touched, but counted
    # against the fork's overcommit check): only the bound jobs are needed from here on.
    launches = None  # noqa: F841
    if sass_dir:
        os.makedirs(sass_dir, exist_ok=True)
        for r in rows:
            name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{r.arch}-{r.case}-{r.variant}-{r.kernel}-{r.config}")
            all_jobs[r.job].setdefault("sass_out", os.path.join(sass_dir, name + ".sass"))
    # Compile every distinct job once, biggest tiles first, in a fresh Triton cache.
    order = sorted(all_jobs, key=lambda k: -_job_cost(all_jobs[k]))
    n_workers = jobs or os.cpu_count() or 1
    results: dict[str, dict] = {}
    cache = tempfile.mkdtemp(prefix="fused_lora_audit_cache_")
    old_cache = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = cache
    t_c = time.time()
    try:
        ctx = mp.get_context("fork")
        with cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_worker_init) as pool:
            futs = {pool.submit(_compile_job, all_jobs[k]): k for k in order}
            for n, f in enumerate(cf.as_completed(futs), 1):
                results[futs[f]] = f.result()
                if n % 20 == 0 or n == len(futs):
                    print(f"audit: compiled {n}/{len(futs)} ({time.time() - t_c:.0f}s)", file=log)
    finally:
        if old_cache is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old_cache
        shutil.rmtree(cache, ignore_errors=True)

    for r in rows:
        j = all_jobs[r.job]
        r.metrics = results[r.job]
        warps = j["options"]["num_warps"]
        r.launches = _launch_ok(r.metrics, j["arch"], warps)
        tile = _tile(j, r.kernel)
        lp = r.metrics.get("loop")
        if r.plain_job and lp:
            # A kernel with several GEMM-like loops (the backward: dx, and the dA / dB programs of
            # the same launch) is measured on the one with the yardstick's tensor-core shape and
            # count when the most-work pick is not it (at r = 64 the dA loop's bf16x3 dots
            # outweigh the dx loop's).
            plp0 = results[r.plain_job].get("loop") or {}
            if plp0.get("mma") and lp["mma"] != plp0["mma"]:
                same = [a for a in r.metrics.get("alt_loops", []) if a["mma"] == plp0["mma"]]
                if same:
                    lp = r.metrics["loop"] = dict(same[0], picked_by="yardstick MMA shape")
        if lp:
            r.instrs_per_step = lp["instrs"] / _steps(lp, tile, warps)
            lp["k_steps_by_mma"] = _steps_by_mma(lp, tile, warps)
        if r.plain_job:
            pm = results[r.plain_job]
            pj = all_jobs[r.plain_job]
            plp = pm.get("loop")
            r.plain = {"config": _cfg_label(
                {k: pj["constexprs"][(pj_i,)] for pj_i, k in _plain_idx(pj) if (pj_i,) in pj["constexprs"]},
                pj["options"]["num_stages"], pj["options"]["num_warps"]), "error": pm.get("error")}
            if plp:
                r.plain_instrs_per_step = plp["instrs"] / _steps(plp, _tile(pj, "_plain_gemm_kernel"),
                                                                 pj["options"]["num_warps"])
            if r.instrs_per_step and r.plain_instrs_per_step:
                r.ratio = round(r.instrs_per_step / r.plain_instrs_per_step, 3)

    report = {
        "triton": triton.__version__, "torch": torch.__version__, "archs": archs, "cases": case_names,
        "shared_limit": SHARED_LIMIT, "ratio_limit": RATIO_LIMIT,
        "rows": [_row_json(r) for r in rows],
        "extension": audit_extension() if ext else {"skipped": True},
        "compiles": len(all_jobs), "workers": n_workers, "wall_s": round(time.time() - t_start, 1),
    }
    report["gates"] = gates(report)
    return report


def _plain_idx(pj: dict) -> list[tuple[int, str]]:
    from triton.runtime.jit import _triton_jit_function_registry as reg

    names = reg[pj["fn_key"]].arg_names  # the yardstick's own kernel (pointer, TMA, persistent)
    return [(names.index(k), k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")]


def _tile(j: dict, kernel: str) -> Optional[tuple]:
    from triton.runtime.jit import _triton_jit_function_registry as reg

    names = reg[j["fn_key"]].arg_names
    c = {names[p[0]]: v for p, v in j["constexprs"].items() if len(p) == 1}
    if not {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= c.keys():
        return None
    if kernel in ("_lora_bwd_kernel", "_lora_bwd_dx_tma_kernel"):  # dx GEMM: [BM, BK] tile, K step BN
        return c["BLOCK_M"], c["BLOCK_K"], c["BLOCK_N"]
    return c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]


def _job_cost(j: dict) -> int:
    vals = [v for v in j["constexprs"].values() if isinstance(v, int) and not isinstance(v, bool)]
    return j["options"].get("num_warps", 4) * max(vals or [1])


def _row_json(r: Row) -> dict:
    d = asdict(r)
    d.pop("job")
    d.pop("plain_job")
    return d


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------


def gates(report: dict) -> list[dict]:
    """Every failed gate, one entry per (gate, arch, kernel, config, case, variant)."""
    fails = []

    def fail(gate: str, r: dict, detail: str) -> None:
        fails.append(dict(gate=gate, arch=r["arch"], kernel=r["kernel"], config=r["config"],
                          case=r["case"], variant=r["variant"], detail=detail))

    for r in report["rows"]:
        m = r["metrics"]
        if m.get("error"):
            fail("compile", r, m["error"].splitlines()[0][:200])
            continue
        if r["case"] == "plain":  # the yardstick's own facts gate nothing (beyond compiling)
            continue
        if r["case"] in CASES and not CASES[r["case"]].gated:  # coverage: compiling is its gate
            continue
        if "_tma_" in r["kernel"] and not r["arch"].startswith("sm_9"):
            continue  # TMA kernels run on sm_90+ only (the registry refuses older GPUs)
        ser = [n for n in m.get("notes", []) if is_serialised(n)]
        if ser and r["arch"].startswith("sm_9"):
            fail("wgmma-serialised", r, ser[0][:160])
        loop = m.get("loop") or {}
        spill = (m.get("stack") or 0) + (m.get("spill_stores") or 0) + (m.get("spill_loads") or 0)
        if r["hot"] and (spill or m["kernel"]["ldl"] or m["kernel"]["stl"]):
            fail("spill", r, f"stack {m.get('stack')} B, spill stores {m.get('spill_stores')} B, "
                             f"loads {m.get('spill_loads')} B, LDL/STL {m['kernel']['ldl']}/"
                             f"{m['kernel']['stl']} (in loop {loop.get('ldl', 0)}/{loop.get('stl', 0)})")
        if r["launches"] is False:
            lim = SHARED_LIMIT[int(r["arch"][3:5])]
            fail("unlaunchable", r, f"shared {m['shared']} B > {lim} B or regs {m.get('regs')} x threads "
                                    f"> {REGS_PER_SM}")
        if (r["kernel"] in RATIO_GATED and r["ratio"] is not None and r["ratio"] > report["ratio_limit"]
                and not r["variant"].startswith(RATIO_EXEMPT_VARIANTS)):
            fail("ratio", r, f"{r['instrs_per_step']:.0f} vs plain {r['plain_instrs_per_step']:.0f} "
                             f"instructions per K step = {r['ratio']:.2f}x > {report['ratio_limit']}x")
    ext = report.get("extension", {})
    for k in ext.get("kernels", []):
        if k["wgmma_meant"] and not k["hgmma"]:
            fails.append(dict(gate="ext-no-hgmma", arch="sm_90a", kernel=k["name"], config="", case="ext",
                              variant="", detail="a wgmma kernel without HGMMA in its sm_90a SASS"))
    # Deduplicate: the same compiled kernel is often reached from several cases / variants.
    seen, out = set(), []
    for f in fails:
        k = (f["gate"], f["arch"], f["kernel"], f["config"], f["detail"], f["case"], f["variant"])
        if k not in seen:
            seen.add(k)
            out.append(f)
    return out


# --------------------------------------------------------------------------------------------
# The readable table
# --------------------------------------------------------------------------------------------


def _fmt_hist(h: dict) -> str:
    return " ".join(f"{k}x{v}" for k, v in h.items()) or "-"


def table(report: dict) -> str:
    hdr = (f"{'arch':7s} {'case':15s} {'variant':14s} {'kernel':26s} {'config':18s} {'regs':>4s} "
           f"{'stack':>5s} {'smem':>7s} {'ok':>2s}  {'main loop MMA / iter':34s} {'ins/step':>8s} "
           f"{'plain':>5s} {'ratio':>5s} {'inflt':>5s}  loads/iter  notes")
    lines = [hdr, "-" * len(hdr)]
    seen = set()
    for r in report["rows"]:
        m = r["metrics"]
        key = (r["arch"], r["case"], r["kernel"], r["config"], json.dumps(m.get("loop"), sort_keys=True),
               m.get("regs"), m.get("stack"), str(m.get("notes")))
        if key in seen:  # identical compile reached again by another variant of the case
            continue
        seen.add(key)
        if m.get("error"):
            lines.append(f"{r['arch']:7s} {r['case']:15s} {r['variant']:14s} {r['kernel']:26s} "
                         f"{r['config']:18s} COMPILE ERROR: {m['error'].splitlines()[0][:120]}")
            continue
        lp = m.get("loop") or {}
        mma = _fmt_hist(lp.get("mma", {})) if lp.get("mma") else (f"FFMAx{lp['ffma']}" if lp else "-")
        notes = ",".join(sorted({n.split()[0] for n in m.get("notes", [])}))
        ok = {True: "y", False: "NO", None: "?"}[r["launches"]]
        ips = f"{r['instrs_per_step']:.0f}" if r["instrs_per_step"] else "-"
        pl = f"{r['plain_instrs_per_step']:.0f}" if r["plain_instrs_per_step"] else "-"
        ra = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        infl = lp.get("async_in_flight")
        lines.append(
            f"{r['arch']:7s} {r['case']:15s} {r['variant']:14s} {r['kernel']:26s} {r['config']:18s} "
            f"{m.get('regs') or 0:4d} {m.get('stack') or 0:5d} {m['shared']:7d} {ok:>2s}  {mma[:34]:34s} "
            f"{ips:>8s} {pl:>5s} {ra:>5s} {('-' if infl is None else infl):>5}  "
            f"{_fmt_hist(lp.get('loads', {}))}  {notes}")
    ext = report.get("extension", {})
    if ext.get("kernels"):
        lines += ["", f"extension {ext['lib']} (sm_90a):"]
        for k in ext["kernels"]:
            lines.append(f"  {k['name'][:90]:90s} regs {k['regs']:3d} stack {k['stack']:4d} "
                         f"shared {k['shared']:6d} HGMMA {k['hgmma']:4d} HMMA {k['hmma']:4d}")
    elif ext.get("built") is False:
        lines += ["", "extension: not built here (fused_lora/_C*.so absent): skipped"]
    g = report.get("gates", [])
    lines += ["", f"gates: {len(g)} failure(s)"]
    for f in g:
        lines.append(f"  FAIL {f['gate']:16s} {f['arch']:7s} {f['kernel']:26s} {f['config']:18s} "
                     f"[{f['case']} {f['variant']}] {f['detail']}")
    lines.append(f"audit: {report['compiles']} compiles on {report['workers']} workers, {report['wall_s']}s")
    return "\n".join(lines)


def markdown(report: dict, configs: tuple = ("128x256x64 s3 w8", "128x64x256 s3 w8", "16x32x256 s3 w4",
                                              "N256 K64 s3 w8", "64x64x64 s3 w4", "R16 K512 s3 w8")) -> str:
    """A README-sized markdown table: each kernel x variant at its headline config (the first of
    ``configs`` it was compiled at), with its plain-GEMM yardstick where it has one."""
    out = ["| arch | case | variant | kernel | config | regs | stack | smem KB | main loop MMA | ins/step "
           "| plain | ratio | loads / iter | notes |", "|" + "---|" * 14]
    done = set()
    for r in report["rows"]:
        m = r["metrics"]
        if r["case"] in ("plain", "selftest") or m.get("error") or r["config"] not in configs:
            continue
        key = (r["arch"], r["case"], r["variant"], r["kernel"])
        if key in done:
            continue
        done.add(key)
        lp = m.get("loop") or {}
        mma = _fmt_hist(lp.get("mma", {})) if lp.get("mma") else (f"FFMAx{lp['ffma']}" if lp else "-")
        notes = ",".join(sorted({n.split()[0] for n in m.get("notes", [])})) or "-"
        f = (lambda v, d=0: "-" if v is None else f"{v:.{d}f}")
        out.append(f"| {r['arch']} | {r['case']} | {r['variant']} | `{r['kernel']}` | {r['config']} | "
                   f"{m.get('regs')} | {m.get('stack') or 0} | {m['shared'] // 1024} | {mma} | "
                   f"{f(r['instrs_per_step'])} | {f(r['plain_instrs_per_step'])} | {f(r['ratio'], 2)} | "
                   f"{_fmt_hist(lp.get('loads', {}))} | {notes} |")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fused_lora.kernels.audit",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90a,80", help="comma list of targets (default 90a,80)")
    p.add_argument("--cases", default="all", help=f"comma list, 'all' or 'ci' (of {', '.join(CASES)})")
    p.add_argument("--json", help="write the full report as JSON here")
    p.add_argument("--gate", action="store_true", help="exit 1 when any gate fails")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default os.cpu_count())")
    p.add_argument("--no-ext", action="store_true", help="skip the extension's cubins")
    p.add_argument("--plain", choices=("all", "gated"), default="all",
                   help="plain-GEMM yardsticks for every GEMM (all) or only the ratio-gated ones")
    p.add_argument("--kernels", help="comma list: only these kernels (e.g. _lora_bwd_kernel)")
    p.add_argument("--variants", help="comma list: only variant labels containing one of these")
    p.add_argument("--configs", help="comma list: only config labels starting with one of these")
    p.add_argument("--sass", metavar="DIR", help="write every compiled kernel's SASS into DIR")
    p.add_argument("--markdown", action="store_true",
                   help="print a README-sized markdown table (headline configs) after the full one")
    a = p.parse_args(argv)
    names: list[str] = []
    for tok in (s.strip() for s in a.cases.split(",")):
        if tok == "all":
            names += [c.name for c in _CASES if not c.selftest]
        elif tok == "ci":
            names += [c.name for c in _CASES if c.ci]
        elif tok in CASES:
            names.append(tok)
        elif tok:
            p.error(f"unknown case {tok!r}; known: all, ci, {', '.join(CASES)}")
    names = list(dict.fromkeys(names))
    archs = [s.strip() for s in a.arch.split(",") if s.strip()]
    for s in archs:
        if int(s.rstrip("a")) not in SHARED_LIMIT:
            p.error(f"unsupported arch {s} (known: 90a, 80)")
    def _list(v: Optional[str]) -> Optional[list[str]]:
        return [t.strip() for t in v.split(",") if t.strip()] if v else None

    report = run(archs, names, jobs=a.jobs, ext=not a.no_ext, plain=a.plain, kernels=_list(a.kernels),
                 variants=_list(a.variants), configs=_list(a.configs), sass_dir=a.sass)
    print(table(report))
    if a.markdown:
        print()
        print(markdown(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 1 if (a.gate and report["gates"]) else 0


if __name__ == "__main__":
    sys.exit(main())
