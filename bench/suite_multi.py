"""Suite ``multi``: mixed-adapter batches, every request picking its own adapter (or none).

A bank of ``n_slots`` adapters (lora_A [n_slots, r_max, K], lora_B [n_slots, N, r_max],
scales [n_slots], optional per-slot ranks, columns beyond a slot's rank zero) serves

* decode: T requests of one token each (T = 1 ... 256) out of 128 slots;
* prefill: 8 requests of 512 tokens (4096 tokens) over 8 adapters;

with adapter popularity ``distinct`` (every request its own adapter), ``uniform`` (uniform over
the slots), ``zipf`` (Zipf s = 1.1), ``identical`` (all requests one adapter), ``skewed`` (75 %
one adapter, the rest uniform) and ``with_none`` (half the requests without an adapter, id -1),
at one rank (r = 16) or mixed ranks (8 / 16 / 32 / 64, r_max = 64).

Competitors: the fused op ``fused_lora.multi_lora_linear`` per registry entry, variants
included (``fused_triton``, ``fused_triton_decode`` / ``_prefill`` / ``_hybrid``, ``fused_cuda``,
``fused_cuda_mma`` ..., ``fused_torch`` on CPU, where the extension's C++ CPU kernels are
``cpp_cpu``; each skipped with the reason where it cannot run), ``base`` (the
base layer alone: the lower bound), ``loop`` (base GEMM plus one shrink/expand pair per adapter
present: what a naive server does), ``gather_bmm`` (gather each token's A and B, two batched
matmuls: Punica's baseline; skipped where the gathered copies exceed a quarter of device
memory) and ``peft`` (PEFT's mixed batch, ``forward(x, adapter_names=...)``, when peft is
importable).

Decode rows also carry the bytes a decode step must move at least (W0 + bias + the adapters
used + x + y), the achieved bandwidth over those bytes (``gbs``) and ``x_floor`` = ms over the
floor time bytes / peak bandwidth, with the peak measured in the same run by a large
device-to-device copy (env ``peak_bw_gbs``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_lora import reference

from . import harness as H

SUITE = "multi"
ENV: dict[str, Any] = {}
PATTERNS = ("distinct", "uniform", "zipf", "identical", "skewed", "with_none")
MIXED_RANKS = (8, 16, 32, 64)


def grid(cfg: H.Config) -> dict[str, Any]:
    """Sizes for the tier: K, N, slots, decode request counts, prefill (requests, tokens each),
    patterns, and which patterns also run with mixed ranks."""
    if cfg.size == "smoke":
        return dict(K=64, N=96, n_slots=8, decode=[4], prefill=(2, 8), patterns=("uniform", "with_none"),
                    mixed=("uniform",), r=8)
    if not cfg.cuda:
        return dict(K=512, N=512, n_slots=16, decode=[1, 16], prefill=(4, 64), patterns=PATTERNS,
                    mixed=("zipf",), r=16)
    if cfg.size == "quick":
        return dict(K=4096, N=4096, n_slots=128, decode=[16, 128], prefill=(8, 512),
                    patterns=("distinct", "zipf", "identical"), mixed=("zipf",), r=16)
    return dict(K=4096, N=4096, n_slots=128, decode=[1, 4, 16, 64, 128, 256], prefill=(8, 512),
                patterns=PATTERNS, mixed=("uniform", "zipf", "skewed"), r=16)


def request_ids(pattern: str, n_req: int, n_slots: int, gen: torch.Generator) -> Tensor:
    """One adapter id per request (-1 = no adapter)."""
    if pattern == "distinct":
        return torch.randperm(n_slots, generator=gen)[torch.arange(n_req) % n_slots]
    if pattern == "uniform":
        return torch.randint(0, n_slots, (n_req,), generator=gen)
    if pattern == "zipf":
        w = 1.0 / torch.arange(1, n_slots + 1, dtype=torch.float64) ** 1.1
        return torch.multinomial(w, n_req, replacement=True, generator=gen)
    if pattern == "identical":
        return torch.full((n_req,), int(torch.randint(0, n_slots, (1,), generator=gen)))
    if pattern == "skewed":
        ids = torch.randint(0, n_slots, (n_req,), generator=gen)
        hot = torch.rand(n_req, generator=gen) < 0.75
        return torch.where(hot, torch.zeros_like(ids), ids)
    if pattern == "with_none":
        ids = torch.randint(0, n_slots, (n_req,), generator=gen)
        return torch.where(torch.rand(n_req, generator=gen) < 0.5, torch.full_like(ids, -1), ids)
    raise ValueError(pattern)


def fused_impls(cfg: H.Config) -> tuple[list[tuple[str, str]], dict[str, str]]:
    import fused_lora
    from fused_lora import backends

    run: list[tuple[str, str]] = []
    skip: dict[str, str] = {}
    if not hasattr(fused_lora, "multi_lora_linear"):
        why = "fused_lora.multi_lora_linear does not exist yet in this checkout"
        return [], {H.impl_label(be, cfg.device): why for be in ("triton", "cuda", "torch")}
    # Every registry entry, variants included (triton:decode / prefill / hybrid, cuda:mma ...),
    # each timed through the public op with backend=<entry>: the variants side by side.
    entries = [e for e in backends.names("multi_lora_linear") if e != "torch"] + ["torch"]
    for be in entries:
        name = H.impl_label(be, cfg.device)
        why = H.entry_reason("multi_lora_linear", be, cfg.device)
        if be.startswith("triton") and not cfg.cuda:
            why = "Triton runs on CPU only under the interpreter, whose timings mean nothing"
        if be == "torch" and cfg.cuda:
            why = "the torch backend is the CPU path (a per-slot Python loop on GPU)"
        if why:
            skip[name] = why
        else:
            run.append((name, be))
    return run, skip


def _loop(x: Tensor, W: Tensor, b: Tensor, A: Tensor, B: Tensor, scales: Tensor, ids: Tensor,
          ranks: Optional[Tensor]) -> Tensor:
    # Grouping by adapter needs the ids on the host (one sync per call, as in a naive server).
    y = F.linear(x, W, b)
    rk = ranks.tolist() if ranks is not None else None
    for slot in torch.unique(ids[ids >= 0]).tolist():
        rows = (ids == slot).nonzero(as_tuple=True)[0]
        r = rk[slot] if rk is not None else A.shape[1]
        xs = x[rows]
        y[rows] += scales[slot] * F.linear(F.linear(xs, A[slot, :r]), B[slot, :, :r])
    return y


def _gather_bmm(x: Tensor, W: Tensor, b: Tensor, A: Tensor, B: Tensor, scales: Tensor,
                ids: Tensor) -> Tensor:
    # Columns beyond a slot's rank are zero in the bank, so padding to r_max is exact.
    idc = ids.clamp(min=0)
    s = torch.where(ids >= 0, scales[idc], torch.zeros((), dtype=scales.dtype, device=x.device))
    xa = torch.bmm(x.unsqueeze(1), A[idc].transpose(1, 2))  # [T, 1, r_max]
    yl = torch.bmm(xa, B[idc].transpose(1, 2)).squeeze(1)  # [T, N]
    return torch.addcmul(F.linear(x, W, b), yl, s.to(x.dtype).unsqueeze(1))


def _peft_layer(W: Tensor, b: Tensor, A: Tensor, B: Tensor, scales: Tensor, ranks: list[int]) -> Any:
    N, K = W.shape
    lin = torch.nn.Linear(K, N, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
    layer = None
    for slot, r in enumerate(ranks):
        alpha = float(scales[slot]) * r
        if layer is None:
            layer = H.peft_linear(lin, r, alpha, adapter_name=f"a{slot}")
        else:
            H.peft_add_adapter(layer, f"a{slot}", r, alpha)
    layer.to(device=W.device, dtype=W.dtype)
    with torch.no_grad():
        for slot, r in enumerate(ranks):
            layer.lora_A[f"a{slot}"].weight.copy_(A[slot, :r])
            layer.lora_B[f"a{slot}"].weight.copy_(B[slot, :, :r])
            layer.scaling[f"a{slot}"] = float(scales[slot])
    return layer


def _make_fn(impl: str, fused: dict[str, str], x: Tensor, W: Tensor, bias: Tensor, A: Tensor, B: Tensor,
             scales: Tensor, ids: Tensor, ranks: Optional[Tensor], req: Tensor, tpr: int,
             peft_layer: Any) -> Callable[[], Tensor]:
    """The call that computes y [T, N] for one competitor."""
    if impl == "base":
        return lambda: F.linear(x, W, bias)
    if impl == "loop":
        return lambda: _loop(x, W, bias, A, B, scales, ids, ranks)
    if impl == "gather_bmm":
        return lambda: _gather_bmm(x, W, bias, A, B, scales, ids)
    if impl == "peft":
        # PEFT's mixed batch takes one adapter name per sample: x as [requests, tokens, K].
        names = [f"a{i}" if i >= 0 else "__base__" for i in req.tolist()]
        xp = x.view(len(names), tpr, x.shape[1])
        return lambda: peft_layer(xp, adapter_names=names).view(x.shape[0], W.shape[0])
    import inspect

    import fused_lora

    op = fused_lora.multi_lora_linear
    kw: dict[str, Any] = {"ranks": ranks, "backend": fused[impl]}
    if "validate" in inspect.signature(op).parameters:
        # The serving hot path: ids were validated at admission; the value check is a host sync.
        kw["validate"] = False
    return lambda: op(x, W, bias, A, B, scales, ids, **kw)


def run(cfg: H.Config) -> list[dict[str, Any]]:
    g = grid(cfg)
    K, N, n_slots = g["K"], g["N"], g["n_slots"]
    fused, skip = fused_impls(cfg)
    peft_why = H.peft_reason()
    if peft_why:
        skip["peft"] = peft_why
    for n, why in skip.items():
        cfg.log(f"multi: skipping {n}: {why}")
    ENV["skipped"] = dict(skip)
    bw = H.measure_copy_bandwidth(cfg)
    ENV.update(bw)
    cfg.log(f"multi: peak bandwidth (device copy) {bw['peak_bw_gbs']:.1f} GB/s")
    cases: list[tuple[str, int, int, str, bool]] = []  # (phase, n_req, tokens per req, pattern, mixed)
    for pat in g["patterns"]:
        for mixed in (False, True) if pat in g["mixed"] else (False,):
            cases += [("decode", t, 1, pat, mixed) for t in g["decode"]]
            cases.append(("prefill", g["prefill"][0], g["prefill"][1], pat, mixed))
    impls = [n for n, _ in fused] + ["base", "loop", "gather_bmm"] + ([] if peft_why else ["peft"])
    rows: list[dict[str, Any]] = []
    prog = H.Progress(cfg, SUITE, len(cfg.dtypes) * len(cases) * len(impls))
    # gather_bmm copies every token's A and B: skip it where the copies would not fit easily.
    gather_limit = torch.cuda.get_device_properties(cfg.device).total_memory // 4 if cfg.cuda else 4 << 30
    for dtype in cfg.dtypes:
        gen = H.seeded(0)
        e = torch.finfo(dtype).bits // 8
        W = H.randn((N, K), cfg, dtype, 1 / math.sqrt(K), gen)
        bias = H.randn((N,), cfg, dtype, 0.1, gen)
        for mixed in (False, True):
            r_max = max(MIXED_RANKS) if mixed else g["r"]
            rank_list = ([MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(n_slots)] if mixed
                         else [r_max] * n_slots)
            ranks = torch.tensor(rank_list, device=cfg.device, dtype=torch.int32) if mixed else None
            A = H.randn((n_slots, r_max, K), cfg, dtype, 1 / math.sqrt(K), gen)
            B = H.randn((n_slots, N, r_max), cfg, dtype, 1 / math.sqrt(r_max), gen)
            cols = torch.arange(r_max, device=cfg.device)
            live = cols[None, :] < torch.tensor(rank_list, device=cfg.device)[:, None]
            A *= live[:, :, None]
            B *= live[:, None, :]
            scales = (2.0 * torch.ones(n_slots, device=cfg.device)).float()
            peft_layer = None
            for phase, n_req, tpr, pat, _ in [c for c in cases if c[4] == mixed]:
                req = request_ids(pat, n_req, n_slots, gen)
                ids = req.repeat_interleave(tpr).to(cfg.device)
                T = ids.numel()
                x = H.randn((T, K), cfg, dtype, 1.0, gen)
                with torch.no_grad():
                    ref, _ = reference.multi_lora_linear_fwd(
                        x.double(), W.double(), bias.double(), A.double(), B.double(), scales.double(),
                        ids, ranks)
                    ref_base = F.linear(x.double(), W.double(), bias.double())
                used = sorted(set(req.tolist()) - {-1})
                adapter_bytes = sum(rank_list[s] * (K + N) for s in used) * e
                n_bytes = (N * K + N + T * (K + N)) * e + adapter_bytes
                case = f"{phase} T={T} {pat}" + (" mixed-r" if mixed else f" r={r_max}")
                checked: list[tuple[dict[str, Any], Optional[Callable[[], Tensor]]]] = []
                for impl in impls:
                    note = ""
                    if impl == "gather_bmm" and T * r_max * (K + N) * e > gather_limit:
                        note = f"gathered copies {T * r_max * (K + N) * e / 2**30:.1f} GiB"
                    if impl == "peft" and peft_layer is None:
                        peft_layer = _peft_layer(W, bias, A, B, scales, rank_list)
                    fn = None if note else _make_fn(impl, dict(fused), x, W, bias, A, B, scales, ids, ranks,
                                                    req, tpr, peft_layer)
                    if fn is None:  # not run: no row (a row's pass flag means a check ran)
                        prog.step(f"{case} {impl} (skipped: {note})")
                        continue
                    row = H.make_row(SUITE, case, impl, dtype=dtype, M=T, K=K, N=N, r=r_max, phase=phase,
                                     pattern=pat, mixed_ranks=mixed, n_requests=n_req, n_adapters=len(used),
                                     n_slots=n_slots)
                    try:
                        with torch.no_grad():
                            out = fn()
                        ok, err = H.check([out], [ref_base if impl == "base" else ref], dtype)
                    except Exception as ex:  # noqa: BLE001 - a broken competitor is a failed row
                        ok, err = False, math.inf
                        row["note"] = f"{type(ex).__name__}: {ex}"[:200]
                    row.update({"pass": bool(ok), "err": err})
                    checked.append((row, fn if ok else None))

                def no_grad(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
                    def call() -> Tensor:
                        with torch.no_grad():
                            return fn()

                    return call

                fns: dict[str, H.Competitor] = {
                    row["impl"]: (no_grad(fn), None, False) for row, fn in checked if fn is not None
                }
                times = H.time_group(cfg, fns)
                for row, _ in checked:
                    impl = row["impl"]
                    t = times.get(impl)
                    if isinstance(t, Exception):
                        row.update({"pass": False, "note": f"{type(t).__name__}: {t}"[:200]})
                    elif t is not None:
                        H.add_timing(row, t)
                        row["peak_mem_mb"] = H.peak_mem_mb(cfg, fns[impl][0])
                        if phase == "decode":
                            # The base layer reads no adapter: its floor leaves them out.
                            nb = n_bytes - adapter_bytes if impl == "base" else n_bytes
                            row["bytes"] = nb
                            row["gbs"] = nb / (row["ms"] * 1e-3) / 1e9
                            row["x_floor"] = row["ms"] / (nb / (bw["peak_bw_gbs"] * 1e9) * 1e3)
                    rows.append(row)
                    prog.step(f"{H.DTYPE_NAMES[dtype]} {case} {impl}", row)
    _derive(rows)
    return rows


def _derive(rows: list[dict[str, Any]]) -> None:
    base = {(r["case"], r["dtype"]): r for r in rows if r["impl"] == "base"}
    for r in rows:
        b = base.get((r["case"], r["dtype"]))
        if b and b["ms"] and r["ms"]:
            r["x_base"] = r["ms"] / b["ms"]
            r["noisy"] = H.is_noisy(r, b)


COLUMNS = [
    ("case", lambda r: r["case"]),
    ("dtype", lambda r: r["dtype"]),
    ("impl", lambda r: r["impl"]),
    ("adapters", lambda r: r["n_adapters"]),
    ("ms", lambda r: r["ms"]),
    ("p20-p80", H.spread),
    ("x base", lambda r: r.get("x_base")),
    ("noisy", H.noisy_mark),
    ("GB/s", lambda r: r.get("gbs")),
    ("x floor", lambda r: r.get("x_floor")),
    ("check", lambda r: r["pass"]),
]
