"""Suite ``dispatch``: the backends of each op timed per mode and row count: the measurements
that ``backend="auto"`` follows (:mod:`fused_lora.dispatch`).

For ``lora_linear`` and ``multi_lora_linear`` (64 adapters, ids uniform over the bank and -1,
r = 16) over a sweep of rows (tokens per call: decode to large prefill/training batches), in
``fwd`` (inference: no grad) and ``fwd+bwd`` (training: x, A and B require grad) mode, each
available backend is checked against the fp64 reference, then timed side by side.

* GPU: Triton vs CUDA at K = N = 4096 (do_bench medians, L2 flushed by do_bench).
* CPU: the extension's C++ CPU kernels (entry "cuda", named ``cpp_cpu`` in the table) vs the
  reference ("torch") at K = N = 1024 in fp32 (what the CPU path computes in), rows 1 to 256
  (a CPU serves decode-sized batches), timings interleaved (harness.time_group).

The suite writes the timings into ``fused_lora/dispatch_table.json`` (replacing earlier
entries of the same device, op, mode, dtype and rows) with the name of the results file they
came from; commit both. GPU entries name the GPU (``"gpu"``), CPU ones say ``"device": "cpu"``.
The table is written only when the results file lands in bench/results (the default --out),
where it is committed, never from a --smoke run, and on a CPU only from the full run (not
--quick).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

import fused_lora
from fused_lora import dispatch, reference

from . import harness as H

SUITE = "dispatch"
ENV: dict[str, Any] = {}
SKIPPED: dict[str, str] = {}  # "op entry dtype" -> why, recorded in the results' env
OPS = ("lora_linear", "multi_lora_linear")
MODES = ("fwd", "fwd+bwd")
N_SLOTS = 64


def grid(cfg: H.Config) -> dict[str, Any]:
    if not cfg.cuda:
        if cfg.size == "smoke":
            return dict(K=64, N=48, r=8, rows=[5])
        # 1024 wide (GPT-2 medium): a fwd+bwd at 256 rows is ~1.6 GFLOP, tens of ms on one core.
        rows = [1, 16, 64, 256] if cfg.size == "full" else [1, 16, 128]
        return dict(K=1024, N=1024, r=16, rows=rows)
    rows = [1, 16, 64, 256, 1024, 4096, 8192]
    if cfg.size == "quick":
        rows = [1, 16, 128, 1024, 8192]
    return dict(K=4096, N=4096, r=16, rows=rows)


def backends(cfg: H.Config, op: str, dtype: Optional[torch.dtype] = None) -> tuple[list[str], dict[str, str]]:
    """([registry entries to time], {entry: why skipped})."""
    run, skip = [], {}
    for be in ("triton", "cuda") if cfg.cuda else ("cuda", "torch"):
        why = H.entry_reason(op, be, cfg.device, dtype)
        if why:
            skip[be] = why
        else:
            run.append(be)
    return run, skip


def _case(op: str, cfg: H.Config, dtype: torch.dtype, M: int, g: dict[str, Any],
          gen: torch.Generator) -> dict[str, Any]:
    K, N, r = g["K"], g["N"], g["r"]
    x = H.randn((M, K), cfg, dtype, gen=gen)
    W = H.randn((N, K), cfg, dtype, std=K**-0.5, gen=gen)
    b = H.randn((N,), cfg, dtype, gen=gen)
    dy = H.randn((M, N), cfg, dtype, gen=gen)
    if op == "lora_linear":
        A = H.randn((r, K), cfg, dtype, std=K**-0.5, gen=gen)
        B = H.randn((N, r), cfg, dtype, std=0.1, gen=gen)
        return dict(x=x, W=W, b=b, A=A, B=B, dy=dy, scale=2.0)
    A = H.randn((N_SLOTS, r, K), cfg, dtype, std=K**-0.5, gen=gen)
    B = H.randn((N_SLOTS, N, r), cfg, dtype, std=0.1, gen=gen)
    scales = torch.full((N_SLOTS,), 2.0, device=cfg.device)
    ids = torch.randint(-1, N_SLOTS, (M,), generator=gen).to(cfg.device)
    return dict(x=x, W=W, b=b, A=A, B=B, dy=dy, scales=scales, ids=ids)


def _call(op: str, c: dict[str, Any], be: str, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
    if op == "lora_linear":
        return fused_lora.lora_linear(x, c["W"], c["b"], A, B, c["scale"], backend=be)
    return fused_lora.multi_lora_linear(x, c["W"], c["b"], A, B, c["scales"], c["ids"],
                                        backend=be, validate=False)


def _reference(op: str, c: dict[str, Any], mode: str) -> list[Optional[Tensor]]:
    """fp64 outputs (and grads of x, A, B in fwd+bwd mode) from the op-level reference."""
    d = {k: (v.double() if isinstance(v, Tensor) and v.is_floating_point() and k != "scales" else v)
         for k, v in c.items()}
    grads = mode == "fwd+bwd"
    if op == "lora_linear":
        y, xa = reference.lora_linear_fwd(d["x"], d["W"], d["b"], d["A"], d["B"], c["scale"], 0.0, 0)
        if not grads:
            return [y]
        return [y, *reference.lora_linear_bwd(d["dy"], d["x"], d["W"], d["A"], d["B"], xa, c["scale"],
                                              0.0, 0, True, True, True)]
    args = (d["A"], d["B"], c["scales"], c["ids"], None)
    y, xa = reference.multi_lora_linear_fwd(d["x"], d["W"], d["b"], *args)
    if not grads:
        return [y]
    return [y, *reference.multi_lora_linear_bwd(d["dy"], d["x"], d["W"], *args, xa, True, True, True)]


def _fn(op: str, c: dict[str, Any], be: str, mode: str) -> tuple[Callable[[], Any], list[Tensor],
                                                                  Callable[[], list[Tensor]]]:
    """(timed fn, grads to clear, fn giving the outputs to check)."""
    if mode == "fwd":
        def fwd() -> Tensor:
            with torch.no_grad():
                return _call(op, c, be, c["x"], c["A"], c["B"])
        return fwd, [], lambda: [fwd()]
    x, A, B = (c[k].clone().requires_grad_(True) for k in ("x", "A", "B"))

    def step() -> Tensor:
        y = _call(op, c, be, x, A, B)
        y.backward(c["dy"])
        return y

    def outs() -> list[Tensor]:
        for t in (x, A, B):
            t.grad = None
        y = step()
        return [y.detach(), x.grad, A.grad, B.grad]

    return step, [x, A, B], outs


def run(cfg: H.Config) -> list[dict[str, Any]]:
    g = grid(cfg)
    rows_out: list[dict[str, Any]] = []
    SKIPPED.clear()
    ENV["skipped_backends"] = SKIPPED
    total = len(OPS) * len(MODES) * len(g["rows"]) * len(cfg.dtypes)
    prog = H.Progress(cfg, SUITE, total)
    for dtype in cfg.dtypes:
        for op in OPS:
            run_be, skip = backends(cfg, op, dtype)
            for be, why in skip.items():
                cfg.log(f"{SUITE}: {op} backend {be} skipped: {why}")
                SKIPPED[f"{op} {be} {H.DTYPE_NAMES[dtype]}"] = why
            for mode in MODES:
                for M in g["rows"]:
                    gen = H.seeded(M)
                    c = _case(op, cfg, dtype, M, g, gen)
                    ref = _reference(op, c, mode)
                    fns: dict[str, H.Competitor] = {}
                    checks: dict[str, tuple[bool, float]] = {}
                    for be in run_be:
                        fn, g2n, outs = _fn(op, c, be, mode)
                        try:
                            checks[be] = H.check(outs(), ref, dtype)
                        except Exception as e:  # noqa: BLE001 - reported as a failed row
                            checks[be] = (False, float("inf"))
                            cfg.log(f"{SUITE}: {op} {mode} M={M} {be} raised {type(e).__name__}: {e}")
                            continue
                        if checks[be][0]:
                            fns[be] = (fn, g2n, False)
                    times = H.time_group(cfg, fns)
                    group: list[dict[str, Any]] = []
                    for be in run_be:
                        ok, err = checks.get(be, (False, float("inf")))
                        t = times.get(be)
                        row = H.make_row(SUITE, f"{op} {mode} M={M}", H.impl_label(be, cfg.device),
                                         backend=be, op=op, mode=mode,
                                         dtype=dtype, M=M, K=g["K"], N=g["N"], r=g["r"],
                                         err=err, **{"pass": ok and not isinstance(t, Exception)})
                        if isinstance(t, H.Timing):
                            H.add_timing(row, t)
                        elif isinstance(t, Exception):
                            row["note"] = f"{type(t).__name__}: {t}"[:200]
                        group.append(row)
                    _flag_noisy(group)
                    rows_out += group
                    prog.step(f"{op} {mode} M={M}")
    return rows_out


def _flag_noisy(group: list[dict[str, Any]]) -> None:
    """noisy per row: its p20-p80 spread, or that of the fastest other backend, is wider than
    the difference of their medians (the choice between them is inside the noise)."""
    for r in group:
        others = [o for o in group if o is not r and o.get("ms") is not None]
        r["noisy"] = H.is_noisy(r, min(others, key=lambda o: o["ms"])) if others else None


def _table_device(env: dict[str, Any]) -> dict[str, Any]:
    return {"gpu": env["gpu"]} if env.get("gpu") else {"device": "cpu"}


def table_entries(rows: list[dict[str, Any]], env: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """dispatch_table.json entries from a run's rows: one per (op, mode, dtype, rows) with the
    median ms of every registry entry that passed its check (GPU entries name the GPU as
    ``"gpu"``, CPU ones ``"device": "cpu"``), ``noisy`` when the fastest two are within the
    p20-p80 spread of either."""
    by_key: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if not r.get("pass") or r.get("ms") is None:
            continue
        dt = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(r["dtype"], r["dtype"])
        key = (r["op"], r["mode"], dt, r["M"])
        e = by_key.setdefault(key, {
            **_table_device(env), "op": r["op"], "mode": r["mode"], "dtype": dt, "rows": r["M"],
            "K": r["K"], "N": r["N"], "r": r["r"], "ms": {},
            "torch": env.get("torch"), "triton": env.get("triton"), "source": source,
        })
        e["ms"][r.get("backend") or r["impl"]] = r["ms"]
        e["noisy"] = bool(e.get("noisy") or r.get("noisy"))
    return [e for e in by_key.values() if e["ms"]]


def merge_table(path: Path, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``entries`` into the table at ``path``, replacing those of the same device (GPU
    name or "cpu"), op, mode, dtype and rows; returns the new table."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    key = lambda e: (dispatch._entry_device(e), e.get("op"), e.get("mode"), e.get("dtype"), e.get("rows"))  # noqa: E731
    new = {key(e) for e in entries}
    kept = [e for e in table.get("entries", []) if key(e) not in new]
    table["entries"] = sorted(kept + entries, key=lambda e: tuple(str(v) for v in key(e)))
    table["about"] = ABOUT
    table["updated"] = datetime.date.today().isoformat()
    path.write_text(json.dumps(table, indent=1) + "\n")
    return table


ABOUT = ("Timings that backend='auto' follows (fused_lora/dispatch.py): per GPU (\"gpu\") Triton vs "
         "CUDA, on CPU (\"device\": \"cpu\") the C++ CPU kernels (entry \"cuda\") vs the reference "
         "(\"torch\"). Written by `python -m fused_lora.bench dispatch`, never by hand; each entry "
         "names its results file in bench/results.")


def after_write(cfg: H.Config, rows: list[dict[str, Any]], env: dict[str, Any], files: list[Path]) -> None:
    """Called by the CLI once the results are written: fold them into the table, when the
    results file is in bench/results (where it is committed: the table names it) and the run
    is not --smoke (nor --quick on a CPU)."""
    results = Path(__file__).resolve().parent / "results"
    if cfg.size == "smoke":
        return
    if not cfg.cuda and cfg.size != "full":
        # The README's `--quick` on a CPU checks that the code runs; rewriting the shipped CPU
        # entries (and adding a results file to commit) on every such run would be churn.
        cfg.log(f"{SUITE}: table not written: a CPU table comes from the full run "
                "(python -m fused_lora.bench dispatch)")
        return
    if files[0].resolve().parent != results:
        cfg.log(f"{SUITE}: table not written: results went to {files[0].parent}, not bench/results "
                "(the table's entries must name a committed results file)")
        return
    entries = table_entries(rows, env, files[0].name)
    if entries:
        merge_table(dispatch.MEASURED_TABLE_PATH, entries)
        dispatch.measured_table.cache_clear()
        cfg.log(f"{SUITE}: {len(entries)} entries written to fused_lora/dispatch_table.json "
                f"(source {files[0].name})")


COLUMNS = [
    ("case", lambda r: r["case"]),
    ("impl", lambda r: r["impl"]),
    ("dtype", lambda r: r["dtype"]),
    ("ms", lambda r: r["ms"]),
    ("p20-p80", H.spread),
    ("noisy", H.noisy_mark),
    ("err", lambda r: r.get("err")),
    ("check", lambda r: "ok" if r["pass"] else "FAIL"),
]
