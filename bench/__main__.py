"""``python -m fused_lora.bench [suite ...] [--device cuda|cpu] [--dtype bf16|fp16|fp32] [--quick]
[--out DIR]`` (also installed as the ``fused-lora-bench`` console script).

Runs the benchmark suites on the device that is present (a GPU if torch sees one, else the
CPU), prints a table per suite and writes ``<gpu-or-cpu>-<suite>-<date>.json`` / ``.csv``
(and PNG plots when matplotlib is installed) under bench/results or --out. See
bench/README.md for what each suite measures and how.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from . import harness as H

SUITES: dict[str, str] = {
    "linear": "one LoRA layer fwd/bwd: fused Triton/CUDA vs unfused eager/compile vs PEFT vs base",
    "adapters": "LoRA paper appendix B: GPT-2 medium with Adapter^H / Adapter^L vs LoRA, % slowdown",
    "multi": "mixed-adapter batches (decode, prefill): fused vs loop vs gather+bmm vs PEFT",
    "train": "small Llama-shaped decoder, LoRA on all linears: training tokens/s, peak memory",
    "dispatch": "backends per op/mode/rows: the table backend='auto' follows (GPU: Triton vs CUDA; "
                "CPU: C++ CPU kernels vs reference)",
    "moe": "one MoE layer with LoRA fwd/bwd (Qwen3-30B-A3B, Mixtral-8x7B) vs PEFT target_parameters, "
           "transformers' loop, merged weights; mixed-adapter MoE decode bandwidth",
}
_MODULES = {"linear": "suite_linear", "adapters": "suite_adapters", "multi": "suite_multi",
            "train": "suite_train", "dispatch": "suite_dispatch", "moe": "suite_moe"}
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


def _dtypes(text: str) -> list[torch.dtype]:
    out = []
    for part in text.split(","):
        if part not in H.DTYPES:
            raise argparse.ArgumentTypeError(
                f"unknown dtype {part!r}: choose from {', '.join(H.DTYPES)} (comma-separated for several)"
            )
        out.append(H.DTYPES[part])
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fused_lora.bench",
        description="fused_lora benchmarks. Suites: "
        + "; ".join(f"{k}: {v}" for k, v in SUITES.items()),
        epilog="Without a GPU a quick CPU suite runs at small shapes (a few minutes).",
    )
    p.add_argument("suites", nargs="*", metavar="suite",
                   help=f"which suites to run (default: all): {', '.join(SUITES)}")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--dtype", type=_dtypes, default=None,
                   help="bf16, fp16 or fp32, or a comma list such as bf16,fp16 "
                   "(default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--quick", action="store_true", help="a small subset (sized for about 5 minutes on a GPU)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="results directory (default: bench/results)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default on CPU: 1, see bench/README.md)")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    # Smallest sizes, for tests/test_bench.py only.
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, H.Config]:
    parser = build_parser()
    args = parser.parse_args(argv)
    bad = [s for s in args.suites if s not in SUITES and s != "all"]
    if bad:
        parser.error(f"unknown suite {bad[0]!r}: choose from {', '.join(SUITES)} (or all)")
    suites = list(SUITES) if not args.suites or "all" in args.suites else list(dict.fromkeys(args.suites))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.dtype is not None:
        dtypes = args.dtype
    elif device.type == "cpu":
        dtypes = [torch.float32]  # the CPU's native GEMM dtype
    else:
        dtypes = [torch.bfloat16]
    args.suites = suites
    cfg = H.Config(
        device=device, dtypes=dtypes, size=size,
        out_dir=args.out if args.out is not None else DEFAULT_RESULTS,
        command=" ".join(["python -m fused_lora.bench"] + [shlex.quote(a) for a in (argv if argv is not None
                                                                                   else sys.argv[1:])]),
        plots=not args.no_plots, verbose=not args.quiet,
    )
    return args, cfg


def run_suite(name: str, cfg: H.Config, stamp: str) -> dict[str, Any]:
    """Run one suite; print its table; write JSON/CSV (and PNG). Returns {"rows", "files"}."""
    mod = importlib.import_module(f"fused_lora.bench.{_MODULES[name]}")
    scfg = cfg
    env = H.env_info(cfg.device, cfg.command)
    env["suite"] = name
    env["size"] = cfg.size
    t0 = time.perf_counter()
    rows = mod.run(scfg)
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    extra = getattr(mod, "ENV", None)
    if extra:
        env.update(extra)
    files = H.write_results(scfg, name, env, rows, stamp)
    if hasattr(mod, "after_write"):
        mod.after_write(scfg, rows, env, files)
    if cfg.plots and rows and hasattr(mod, "plot"):
        if H.have_matplotlib():
            png = files[0].with_suffix(".png")
            if mod.plot(rows, png):
                files.append(png)
        else:
            cfg.log(f"{name}: matplotlib not installed, no plot (pip install matplotlib)")
    where = H.device_slug(cfg.device) if cfg.cuda else "CPU: shows the code runs, not GPU speed"
    H.print_table(f"{name} ({where}, {cfg.size}; {env['wall_s']} s)", rows, mod.COLUMNS)
    notes = getattr(mod, "NOTES", None)
    if notes:
        print(notes)
    if any(r.get("noisy") for r in rows):
        print("noisy = yes: the p20-p80 spread (of the row or of what it is compared with) is wider "
              "than the difference of the medians, so that ratio is inside the noise")
    if not cfg.cuda:
        print(H.CPU_NOTE + "; cpp_cpu = the C++ extension's CPU kernels")
    failed = [r for r in rows if not r["pass"]]
    if failed:
        print(f"{name}: {len(failed)} rows FAILED their correctness check (no time reported for them)")
    for f in files:
        print(f"wrote {f}")
    return {"rows": rows, "files": files}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m fused_lora.bench`` and ``fused-lora-bench``; returns 1 when any
    competitor failed its correctness check, else 0."""
    args, cfg = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads is not None or not cfg.cuda:
        # One CPU thread by default: a parallel region waits for its slowest thread, and on a
        # shared machine a descheduled thread stalls every op. Measured on a 2-core machine
        # under load 2.6 (1-layer d=128 GPT-2 forward): median 96 ms with 2 threads, 0.42 ms
        # with 1.
        torch.set_num_threads(args.threads or 1)
    try:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        where = torch.cuda.get_device_name(cfg.device) if cfg.cuda else "CPU (no GPU: small shapes)"
        cfg.log(f"fused_lora.bench: suites {', '.join(args.suites)} on {where}, size {cfg.size}, "
                f"dtypes {', '.join(H.DTYPE_NAMES[d] for d in cfg.dtypes)}, "
                f"{torch.get_num_threads()} CPU thread(s)")
        t0 = time.perf_counter()
        n_failed = 0
        for name in args.suites:
            res = run_suite(name, cfg, stamp)
            n_failed += sum(1 for r in res["rows"] if not r["pass"])
        print(f"\ntotal wall time {time.perf_counter() - t0:.1f} s")
    finally:
        torch.set_num_threads(threads)
    return 1 if n_failed else 0

if __name__ == "__main__":
    sys.exit(main())
