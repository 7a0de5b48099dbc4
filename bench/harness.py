"""Shared benchmark machinery: run configuration, timing, correctness checks, environment
capture, result rows, JSON/CSV writing, console tables, progress display and plots.

Timing (see bench/README.md, "Method"):

* CUDA: ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=...)``: CUDA
  events, warm-up, and the L2 cache flushed before every timed call. For tiny shapes where
  launch overhead would dominate, ``do_bench_cudagraph`` instead (the row says so with
  ``"cuda_graph": true``); a graph replay does not flush L2, so callers rotate among enough
  input sets that they do not fit in it.
* CPU: ``time.perf_counter`` around each call after warm-up; median, p20, p80.

Every competitor is checked against the plain-PyTorch reference (fp64) before it is timed; a
failed check gives a row with ``"pass": false`` and no time.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

ROW_KEYS: tuple[str, ...] = (
    "suite", "case", "impl", "pass", "dtype", "M", "K", "N", "r",
    "ms", "ms_p20", "ms_p80", "peak_mem_mb",
)
ENV_KEYS: tuple[str, ...] = ("gpu", "torch", "triton", "cuda", "command", "date", "device")

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# Relative Frobenius error ||out - ref|| / ||ref|| allowed against an fp64 reference, per
# operand dtype (METHOD.md: fp32 lands far under 1e-3, tf32 near 3e-4, bf16 operands between
# 1e-3 and 1e-2). These catch wrong results, not rounding: bf16's unit roundoff is 3.9e-3.
TOL: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}

SIZES = ("smoke", "quick", "full")


@dataclasses.dataclass
class Config:
    """What a benchmark run does: device, dtypes, size tier, where results go."""

    device: torch.device
    dtypes: list[torch.dtype]
    size: str = "quick"  # "smoke" (tests), "quick" or "full"
    out_dir: Path = Path("bench/results")
    command: str = ""
    plots: bool = True
    verbose: bool = True

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def log(self, msg: str) -> None:
        """Progress and skip reasons go to stderr so that stdout holds only the tables."""
        if self.verbose:
            print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- environment
def device_slug(device: torch.device) -> str:
    """File-name prefix: 'cpu', or the GPU's name in lower case ('h100-80gb-hbm3')."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def env_info(device: torch.device, command: str) -> dict[str, Any]:
    """The run's environment, recorded in every results file."""
    try:
        import triton

        triton_version: Optional[str] = triton.__version__
    except Exception:  # noqa: BLE001 - triton missing or broken: record that, do not fail
        triton_version = None
    try:
        import peft

        peft_version: Optional[str] = peft.__version__
    except Exception:  # noqa: BLE001
        peft_version = None
    from fused_lora import __version__, backends

    env: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "python": platform.python_version(),
        "fused_lora": __version__,
        "peft": peft_version,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        # Every registry entry of the timed ops: "ok" or why it cannot run here.
        "backends": {op: {n: entry_reason(op, n, device) or "ok" for n in backends.names(op)}
                     for op in ("lora_linear", "multi_lora_linear")},
    }
    if device.type != "cuda":
        env["timings_note"] = CPU_NOTE
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_mem_gb"] = round(props.total_memory / 2**30, 1)
        env["sm_count"] = props.multi_processor_count
        env["l2_mb"] = round(getattr(props, "L2_cache_size", 0) / 2**20, 1)
    return env


# Said in every CPU table and results file (issue 14): a CPU run checks that the code runs and
# compares implementations on this CPU; it says nothing about any GPU.
CPU_NOTE = ("CPU run: these timings show that the code runs (and compare implementations on this "
            "CPU); they are not GPU speed")


_PROBED: dict[tuple[str, str, str, Optional[torch.dtype]], str] = {}


def entry_reason(op: str, entry: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """Why registry entry ``entry`` cannot run ``op`` here ('' if it can): the registry's
    :func:`fused_lora.backends.unavailable_reason`, then one tiny forward + backward through the
    public op. A check or a probe that raises (a backend whose op signature is mid-change) is
    the reason: that entry is skipped and the reason recorded, instead of ending the run."""
    from fused_lora import backends

    key = (op, entry, str(device), dtype)
    if key not in _PROBED:
        try:
            why = backends.unavailable_reason(op, entry, device, dtype)
        except Exception as e:  # noqa: BLE001 - reported as the skip reason
            why = f"availability check raised {type(e).__name__}: {e}"
        if not why and device.type in ("cpu", "cuda") and op in ("lora_linear", "multi_lora_linear"):
            why = _probe(op, entry, device, dtype or torch.float32)
        _PROBED[key] = why
    return _PROBED[key]


def _probe(op: str, entry: str, device: torch.device, dtype: torch.dtype) -> str:
    import fused_lora

    g = seeded(0)
    x = torch.randn(4, 16, generator=g).to(device, dtype).requires_grad_()
    W, b = torch.randn(8, 16, generator=g).to(device, dtype), torch.randn(8, generator=g).to(device, dtype)
    try:
        if op == "lora_linear":
            A = torch.randn(4, 16, generator=g).to(device, dtype)
            B = torch.randn(8, 4, generator=g).to(device, dtype)
            y = fused_lora.lora_linear(x, W, b, A, B, 2.0, backend=entry)
        else:
            A = torch.randn(2, 4, 16, generator=g).to(device, dtype)
            B = torch.randn(2, 8, 4, generator=g).to(device, dtype)
            ids = torch.tensor([0, 1, -1, 0], device=device)
            y = fused_lora.multi_lora_linear(x, W, b, A, B, torch.full((2,), 2.0, device=device), ids,
                                             backend=entry)
        y.sum().backward()
    except Exception as e:  # noqa: BLE001 - reported as the skip reason
        return f"a probe call raised {type(e).__name__}: {e}"[:300]
    return ""


def impl_label(entry: str, device: torch.device) -> str:
    """The impl name of a registry entry in rows and tables: ``fused_triton``, ``fused_cuda_mma``
    ...; on a CPU the extension's C++ CPU kernels are ``cpp_cpu`` (they are not CUDA code)."""
    if device.type != "cuda" and entry == "cuda":
        return "cpp_cpu"
    return "fused_" + entry.replace(":", "_")


# ------------------------------------------------------------------------------- timing
@dataclasses.dataclass
class Timing:
    ms: float
    ms_p20: float
    ms_p80: float
    timer: str
    cuda_graph: bool = False


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _clear_grads(grad_to_none: Optional[Iterable[Tensor]]) -> None:
    for t in grad_to_none or ():
        t.grad = None


def time_cpu(fn: Callable[[], Any], grad_to_none: Optional[list[Tensor]] = None,
             budget_s: float = 0.3, min_reps: int = 5, max_reps: int = 200) -> Timing:
    """perf_counter around each call, after warm-up; median, p20, p80 over the calls."""
    t0 = time.perf_counter()
    n_warm = 0
    while n_warm < 2 or (time.perf_counter() - t0 < 0.05 and n_warm < 20):
        _clear_grads(grad_to_none)
        fn()
        n_warm += 1
    est = (time.perf_counter() - t0) / n_warm
    reps = int(min(max_reps, max(min_reps, budget_s / max(est, 1e-9))))
    times = []
    for _ in range(reps):
        _clear_grads(grad_to_none)
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), "perf_counter")


def time_fn(cfg: Config, fn: Callable[[], Any], grad_to_none: Optional[list[Tensor]] = None,
            cuda_graph: bool = False, rep_ms: int = 100) -> Timing:
    """Median / p20 / p80 milliseconds of ``fn()`` on cfg.device (see the module docstring).

    cuda_graph: time graph replays (do_bench_cudagraph); falls back to do_bench when capture
    fails (the row then says cuda_graph false)."""
    if not cfg.cuda:
        budget = {"smoke": 0.05, "quick": 0.3, "full": 1.0}[cfg.size]
        return time_cpu(fn, grad_to_none, budget_s=budget)
    import triton.testing

    q = [0.5, 0.2, 0.8]
    if cuda_graph:
        try:
            # rep 20 ms (triton's default here): do_bench_cudagraph captures rep / estimate
            # unrolled calls into one graph, so 100 ms would capture 10^4 calls of a 10 us op.
            med, p20, p80 = triton.testing.do_bench_cudagraph(
                fn, rep=min(rep_ms, 20), grad_to_none=grad_to_none, quantiles=q
            )
            return Timing(med, p20, p80, "do_bench_cudagraph", True)
        except Exception as e:  # noqa: BLE001 - e.g. an op that cannot be captured
            cfg.log(f"    cuda graph capture failed ({type(e).__name__}: {e}); timing eagerly")
            torch.cuda.synchronize()
    med, p20, p80 = triton.testing.do_bench(fn, rep=rep_ms, grad_to_none=grad_to_none, quantiles=q)
    return Timing(med, p20, p80, "do_bench")


Competitor = tuple[Callable[[], Any], Optional[list[Tensor]], bool]  # (fn, grad_to_none, cuda_graph)


def time_group(cfg: Config, fns: dict[str, Competitor], rep_ms: int = 100) -> dict[str, Any]:
    """Time the competitors of one case: {name: Timing, or the exception it raised}.

    GPU: one after another, each with :func:`time_fn`. CPU: interleaved, one call of each per
    round (the order rotating), so that load changes on a shared machine hit every competitor
    alike; measured on a 2-core machine shared with other jobs, timing competitors one after
    another gave one model 75 ms and the same model with adapters added 50 ms."""
    out: dict[str, Any] = {}
    if cfg.cuda:
        for k, (fn, g2n, graph) in fns.items():
            try:
                out[k] = time_fn(cfg, fn, g2n, cuda_graph=graph, rep_ms=rep_ms)
            except Exception as e:  # noqa: BLE001 - reported as a failed row by the caller
                out[k] = e
        return out
    budget = {"smoke": 0.05, "quick": 0.3, "full": 1.0}[cfg.size]
    est: dict[str, float] = {}
    for k, (fn, g2n, _) in fns.items():
        try:
            t0, n = time.perf_counter(), 0
            while n < 2 or (time.perf_counter() - t0 < 0.05 and n < 20):
                _clear_grads(g2n)
                fn()
                n += 1
            est[k] = (time.perf_counter() - t0) / n
        except Exception as e:  # noqa: BLE001
            out[k] = e
    keys = list(est)
    if not keys:
        return out
    rounds = int(min(200, max(5, budget * len(keys) / max(sum(est.values()), 1e-9))))
    times: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(rounds):
        for k in keys[i % len(keys):] + keys[: i % len(keys)]:
            fn, g2n, _ = fns[k]
            _clear_grads(g2n)
            t = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t) * 1e3)
    for k, ts in times.items():
        out[k] = Timing(statistics.median(ts), _quantile(ts, 0.2), _quantile(ts, 0.8),
                        "perf_counter interleaved")
    return out


def peak_mem_mb(cfg: Config, fn: Callable[[], Any], absolute: bool = False) -> Optional[float]:
    """Peak device memory (MiB) allocated during one call of ``fn``: above what was allocated
    before the call (activations, workspace, outputs), or the absolute peak. None on CPU."""
    if not cfg.cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return round((peak if absolute else peak - before) / 2**20, 2)


def measure_copy_bandwidth(cfg: Config) -> dict[str, float]:
    """Peak memory bandwidth from a large device-to-device copy (bytes read + bytes written),
    measured in this run: the denominator of every 'fraction of peak' figure."""
    n_bytes = (1 << 30) if cfg.cuda else (64 << 20)
    if cfg.size == "smoke":
        n_bytes = 8 << 20
    src = torch.randn(n_bytes // 4, device=cfg.device)
    dst = torch.empty_like(src)
    t = time_fn(cfg, lambda: dst.copy_(src))
    return {"copy_bytes": 2 * n_bytes, "peak_bw_gbs": 2 * n_bytes / (t.ms * 1e-3) / 1e9}


# ------------------------------------------------------------------------------- correctness
def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64 (inf for NaN/inf, or for a shape mismatch)."""
    if out.shape != ref.shape:
        return math.inf
    o, r = out.detach().double(), ref.detach().double().to(out.device)
    if not torch.isfinite(o).all():
        return math.inf
    den = r.norm().item()
    num = (o - r).norm().item()
    return num / den if den > 0 else num


def check(outs: Sequence[Optional[Tensor]], refs: Sequence[Optional[Tensor]], dtype: torch.dtype,
          factor: float = 1.0) -> tuple[bool, float]:
    """(all within factor * TOL[dtype], worst relative error) over pairs; None pairs skipped."""
    worst = 0.0
    for o, r in zip(outs, refs):
        if r is None:
            continue
        if o is None:
            return False, math.inf
        worst = max(worst, rel_err(o, r))
    return worst <= factor * TOL[dtype], worst


# ------------------------------------------------------------------------------- rows
def make_row(suite: str, case: str, impl: str, **fields: Any) -> dict[str, Any]:
    """A result row: every key of ROW_KEYS (None when not applicable), then the extras."""
    row: dict[str, Any] = {k: None for k in ROW_KEYS}
    row.update(suite=suite, case=case, impl=impl)
    for k, v in fields.items():
        if isinstance(v, torch.dtype):
            v = DTYPE_NAMES.get(v, str(v))
        row[k] = v
    return row


def add_timing(row: dict[str, Any], t: Optional[Timing]) -> dict[str, Any]:
    if t is not None:
        row.update(ms=t.ms, ms_p20=t.ms_p20, ms_p80=t.ms_p80, timer=t.timer, cuda_graph=t.cuda_graph)
    return row


class Progress:
    """One stderr line per finished measurement: '[  3/40] 0:00:12 <what> <result>'."""

    def __init__(self, cfg: Config, suite: str, total: int) -> None:
        self.cfg, self.suite, self.total, self.i = cfg, suite, total, 0
        self.t0 = time.perf_counter()

    def step(self, what: str, row: Optional[dict[str, Any]] = None) -> None:
        self.i += 1
        el = int(time.perf_counter() - self.t0)
        res = ""
        if row is not None:
            if not row.get("pass"):
                res = f"FAILED check (err {row.get('err')})"
            elif row.get("ms") is not None:
                res = f"{row['ms']:.4g} ms"
        self.cfg.log(f"[{self.i:4d}/{self.total}] {el // 60}:{el % 60:02d} {self.suite} {what} {res}")


# ------------------------------------------------------------------------------- output
def result_paths(cfg: Config, suite: str, stamp: str) -> tuple[Path, Path]:
    base = cfg.out_dir / f"{device_slug(cfg.device)}-{suite}-{stamp}"
    return base.with_suffix(".json"), base.with_suffix(".csv")


def write_results(cfg: Config, suite: str, env: dict[str, Any], rows: list[dict[str, Any]],
                  stamp: str) -> list[Path]:
    """Write ``<device>-<suite>-<stamp>.json`` ({"env", "rows"}) and the same rows as CSV."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    jpath, cpath = result_paths(cfg, suite, stamp)
    with open(jpath, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1, default=str)
    keys: list[str] = list(ROW_KEYS)
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in keys})
    return [jpath, cpath]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "ok" if v else "FAIL"
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def print_table(title: str, rows: list[dict[str, Any]],
                columns: Sequence[tuple[str, Callable[[dict[str, Any]], Any]]]) -> None:
    """A plain aligned table on stdout; columns are (header, row -> value). A column empty in
    every row (None or "": peak MiB and graph on a CPU) is left out."""
    columns = [(h, get) for h, get in columns if any(get(r) not in (None, "") for r in rows)] or list(columns)
    cells = [[h for h, _ in columns]] + [[_fmt(get(r)) for _, get in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    print(f"\n## {title}")
    for j, line in enumerate(cells):
        print("  ".join(c.rjust(w) if j and i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def spread(r: dict[str, Any]) -> Optional[str]:
    """'p20-p80' of a row, or None."""
    if r.get("ms_p20") is None:
        return None
    return f"{r['ms_p20']:.3g}-{r['ms_p80']:.3g}"


def is_noisy(row: dict[str, Any], ref: Optional[dict[str, Any]]) -> Optional[bool]:
    """True when the p20-p80 spread of ``row`` or of ``ref`` (what it is compared with) is wider
    than the difference of their medians: the ratio reported between them is inside the noise.
    None when either has no timing."""
    if ref is None or ref is row:
        return None
    if any(x.get(k) is None for x in (row, ref) for k in ("ms", "ms_p20", "ms_p80")):
        return None
    width = max(row["ms_p80"] - row["ms_p20"], ref["ms_p80"] - ref["ms_p20"])
    return width > abs(row["ms"] - ref["ms"])


def noisy_mark(r: dict[str, Any]) -> Optional[str]:
    """The table's "noisy" column: "yes" where :func:`is_noisy` said so."""
    return "yes" if r.get("noisy") else None


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pyplot():  # -> matplotlib.pyplot module, headless
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def seeded(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(shape: Sequence[int], cfg: Config, dtype: torch.dtype, std: float = 1.0,
          gen: Optional[torch.Generator] = None) -> Tensor:
    """Random normal, never zeros: zeros hide unwritten outputs and can run faster than real
    data. With ``gen`` (a CPU generator) it is drawn on the CPU, reproducible across devices;
    without, on the device (fast for GPU-sized tensors), from torch's global seed."""
    if gen is not None:
        return (torch.randn(*shape, generator=gen) * std).to(device=cfg.device, dtype=dtype)
    return (torch.randn(*shape, device=cfg.device) * std).to(dtype)


# ------------------------------------------------------------------------------- PEFT (optional)
def peft_reason() -> str:
    """'' when peft is importable, else why not (peft is optional everywhere)."""
    try:
        import peft  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"peft is not importable ({type(e).__name__}: {e})"
    return ""


def _peft_kwargs(fn: Callable[..., Any], r: int, alpha: float) -> dict[str, Any]:
    # PEFT >= 0.17 takes a LoraConfig (`config=`); older releases take lora_dropout etc. directly.
    import inspect

    from peft import LoraConfig

    if "config" in inspect.signature(fn).parameters:
        return {"config": LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0)}
    return {"lora_dropout": 0.0}


def peft_linear(base: torch.nn.Linear, r: int, alpha: float,
                adapter_name: str = "default") -> torch.nn.Module:
    """PEFT's own ``lora.Linear`` around ``base`` (adapters moved to base's device and dtype)."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    kw = _peft_kwargs(PeftLinear.__init__, r, alpha)
    layer = PeftLinear(base, adapter_name, r=r, lora_alpha=alpha, **kw)
    return layer.to(device=base.weight.device, dtype=base.weight.dtype)


def peft_add_adapter(layer: torch.nn.Module, adapter_name: str, r: int, alpha: float) -> None:
    """Add one more adapter to a PEFT LoRA layer (for mixed-batch ``adapter_names``)."""
    kw = _peft_kwargs(layer.update_layer, r, alpha)
    layer.update_layer(adapter_name, r, lora_alpha=alpha, **kw)
