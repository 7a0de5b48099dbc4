"""Suite ``linear``: one LoRA layer, forward / backward / forward+backward.

Competitors (same process, same inputs, each checked against the fp64 reference first):

* the registry entries of ``lora_linear`` (:func:`fused_lora.backends.names`), each through the
  public op, ``fused_lora.lora_linear(..., backend=entry)``, when
  :func:`fused_lora.backends.unavailable_reason` says it runs here: ``fused_triton``,
  ``fused_triton_inloop`` (entry "triton:inloop": the forward's shrink inside the GEMM's K
  loop), ``fused_cuda`` and its GEMM variants ``fused_cuda_mma`` / ``fused_cuda_wgmma`` /
  ``fused_cuda_wgmma256`` (the one that "cuda" itself picks on this GPU is not timed twice),
  ``fused_torch`` (the reference, timed on CPU only). On a CPU, entry "cuda" runs the
  extension's C++ CPU kernels and is named ``cpp_cpu``; Triton is never timed there (the
  interpreter's timings mean nothing).
* ``unfused_eager``: PEFT's chain ``F.linear(x, W, b) + s * F.linear(F.linear(drop(x), A), B)``
  (dropout is off: p = 0, as PEFT's nn.Identity).
* ``unfused_compile``: the same chain under ``torch.compile``.
* ``peft``: PEFT's own ``lora.Linear`` (when peft is importable).
* ``base``: ``F.linear(x, W, b)`` with the frozen weight: the merged-weight cost, the lower
  bound (its backward is dx only).

Modes: ``fwd`` (inference, under no_grad), ``bwd`` (backward of a retained graph: dx, dA,
dB) and ``fwd_bwd`` (a training step of the layer).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_lora import backends, lora_linear, reference

from . import harness as H

SUITE = "linear"
ENV: dict[str, Any] = {}  # merged into the results' env: what was skipped and why
MODES = ("fwd", "bwd", "fwd_bwd")

# (name, K = in_features, N = out_features)
GPU_SHAPES: list[tuple[str, int, int]] = [
    ("llama3-8b.q/o", 4096, 4096),
    ("llama3-8b.k/v", 4096, 1024),
    ("llama3-8b.up", 4096, 14336),
    ("llama3-8b.down", 14336, 4096),
    ("llama2-7b.up", 4096, 11008),
    ("llama2-7b.down", 11008, 4096),
    ("gpt2-medium.attn", 1024, 1024),
    ("gpt2-medium.mlp", 1024, 4096),
]
GPU_M = [1, 16, 128, 512, 2048, 4096, 8192, 16384]


def grid(cfg: H.Config) -> list[tuple[str, int, int, int, int]]:
    """(shape name, K, N, M, r) cases for the size tier.

    full GPU: every shape x every M at r = 16, plus the rank sweep r in {8, 64, 256} at
    4096x4096 for a decode (M=16) and a training (M=4096) token count. quick GPU (about 5
    minutes): 4096x4096 r=16 at M=8192 and the decode row M=16."""
    if cfg.cuda:
        if cfg.size == "full":
            cases = [(n, k, nn, m, 16) for (n, k, nn) in GPU_SHAPES for m in GPU_M]
            cases += [("llama3-8b.q/o", 4096, 4096, m, r) for r in (8, 64, 256) for m in (16, 4096)]
            return cases
        return [("llama3-8b.q/o", 4096, 4096, m, 16) for m in (16, 8192)]
    if cfg.size == "smoke":
        return [("tiny", 64, 96, 16, 8)]
    # CPU: small shapes only (the GPU grid would take hours on two cores).
    return [("gpt2-medium.attn", 1024, 1024, m, 16) for m in (16, 256)] + [
        ("small", 512, 1536, 256, 64)
    ]


@dataclasses.dataclass
class Impl:
    name: str
    fn: Callable[[Tensor], Tensor]
    params: list[Tensor]  # the trainable tensors whose .grad backward writes (A, B)
    note: str = ""


def _eager_chain(x: Tensor, W: Tensor, b: Optional[Tensor], A: Tensor, B: Tensor, s: float) -> Tensor:
    # PEFT's lora.Linear.forward with lora_dropout = 0 (nn.Identity) and adapters in x's dtype.
    return F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s


_COMPILED: dict[str, Callable[..., Tensor]] = {}


def _compiled_chain() -> Callable[..., Tensor]:
    # One compiled function for the whole run: dynamo marks sizes dynamic after the first
    # recompile, so later shapes reuse the graph instead of hitting the recompile limit
    # (after which it would silently run eager).
    if "chain" not in _COMPILED:
        cfg = torch._dynamo.config
        if hasattr(cfg, "recompile_limit"):
            cfg.recompile_limit = max(cfg.recompile_limit, 64)
        else:
            cfg.cache_size_limit = max(cfg.cache_size_limit, 64)
        # The bwd mode replays one graph's backward (retain_graph=True), which AOTAutograd's
        # donated buffers forbid; turning them off costs only the reuse of dead saved tensors.
        if hasattr(torch._functorch.config, "donated_buffer"):
            torch._functorch.config.donated_buffer = False
        _COMPILED["chain"] = torch.compile(_eager_chain)
    return _COMPILED["chain"]


# What each variant entry is, for the row's note.
_NOTES = {
    "triton:inloop": "shrink inside the GEMM K loop",
    "triton:tma": "GEMM tiles by TMA",
    "triton:tma_persistent": "persistent GEMM, TMA tiles",
    "cuda:mma": "mma.sync GEMM",
    "cuda:wgmma": "wgmma GEMM, 128x128 tiles",
    "cuda:wgmma256": "wgmma GEMM, 128x256 tiles",
}


def impl_names(cfg: H.Config) -> tuple[list[tuple[str, Optional[str]]], dict[str, str]]:
    """([(impl, registry entry or None)], {impl: why skipped}) for this device."""
    run: list[tuple[str, Optional[str]]] = []
    skip: dict[str, str] = {}
    entries = backends.names("lora_linear")
    # "cuda" (gemm auto) runs wgmma 128x128 where cuda:wgmma runs, else mma.sync: time that
    # variant once, as fused_cuda.
    same = "cuda:wgmma" if not H.entry_reason("lora_linear", "cuda:wgmma", cfg.device) else "cuda:mma"
    for entry in [e for e in entries if e != "torch"] + ["torch"]:
        name = H.impl_label(entry, cfg.device)
        why = H.entry_reason("lora_linear", entry, cfg.device)
        if entry.startswith("triton") and not cfg.cuda:
            why = "Triton runs on CPU only under the interpreter, whose timings mean nothing"
        elif entry == "torch" and cfg.cuda:
            why = "the torch backend is the CPU path; on GPU it is unfused_eager in fp32"
        elif entry == same and cfg.cuda and not why:
            why = "the GEMM that backend 'cuda' picks on this GPU: timed as fused_cuda"
        if why:
            skip[name] = why
        else:
            run.append((name, entry))
    run.append(("unfused_eager", None))
    if not cfg.cuda and cfg.size != "full":
        skip["unfused_compile"] = (
            "torch.compile on CPU: compiling takes longer than the quick run (run without --quick)"
        )
    else:
        run.append(("unfused_compile", None))
    why = H.peft_reason()
    if why:
        skip["peft"] = why
    else:
        run.append(("peft", None))
    run.append(("base", None))
    return run, skip


def build(name: str, backend: Optional[str], W: Tensor, b: Tensor, A: Tensor, B: Tensor,
          s: float) -> Impl:
    """An implementation bound to its own leaf adapter tensors (copies of A, B)."""
    if name == "base":
        return Impl(name, lambda x: F.linear(x, W, b), [])
    if name == "peft":
        N, K = W.shape
        lin = torch.nn.Linear(K, N, bias=True, device=W.device, dtype=W.dtype)
        r = A.shape[0]
        layer = H.peft_linear(lin, r, s * r)
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(b)
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
        lin.weight.requires_grad_(False)
        lin.bias.requires_grad_(False)
        assert math.isclose(layer.scaling["default"], s)
        return Impl(name, layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight])
    A_, B_ = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    if name == "unfused_eager":
        return Impl(name, lambda x: _eager_chain(x, W, b, A_, B_, s), [A_, B_])
    if name == "unfused_compile":
        chain = _compiled_chain()
        return Impl(name, lambda x: chain(x, W, b, A_, B_, s), [A_, B_])
    assert backend is not None
    note = _NOTES.get(backend, "")
    if backend == "cuda" and W.device.type == "cpu":
        note = "C++ CPU kernels of the extension"
    return Impl(name, lambda x: lora_linear(x, W, b, A_, B_, s, backend=backend), [A_, B_], note=note)


def _reference(x: Tensor, W: Tensor, b: Tensor, A: Tensor, B: Tensor, s: float,
               dy: Tensor) -> dict[str, dict[str, Tensor]]:
    """fp64 forward and gradients, LoRA and base-only."""
    xd = x.double().requires_grad_()
    Ad, Bd = A.double().requires_grad_(), B.double().requires_grad_()
    y = reference.lora_linear(xd, W.double(), b.double(), Ad, Bd, s)
    y.backward(dy.double())
    xb = x.double().requires_grad_()
    yb = F.linear(xb, W.double(), b.double())
    yb.backward(dy.double())
    return {
        "lora": {"y": y.detach(), "dx": xd.grad, "dA": Ad.grad, "dB": Bd.grad},
        "base": {"y": yb.detach(), "dx": xb.grad},
    }


def _check_impl(impl: Impl, x: Tensor, dy: Tensor, ref: dict[str, Tensor],
                dtype: torch.dtype) -> tuple[bool, float]:
    """Forward under no_grad, then forward + backward; every output vs the fp64 reference."""
    with torch.no_grad():
        y0 = impl.fn(x)
    xg = x.detach().requires_grad_()
    y = impl.fn(xg)
    y.backward(dy)
    outs = [y0, y, xg.grad] + [p.grad for p in impl.params]
    refs = [ref["y"], ref["y"], ref["dx"]] + ([ref["dA"], ref["dB"]] if impl.params else [])
    for p in impl.params:
        p.grad = None
    return H.check(outs, refs, dtype)


def _graph_fwd_fn(cfg: H.Config, name: str, backend: Optional[str], W: Tensor, b: Tensor,
                  A: Tensor, B: Tensor, s: float, x: Tensor) -> Callable[[], Any]:
    """A no_grad forward that cycles through enough copies of (W, b, A, B, x) to exceed twice
    the L2 cache: graph replays do not flush L2, and one 4096x4096 bf16 W0 (32 MiB) fits in an
    H100's 50 MiB L2."""
    l2 = getattr(torch.cuda.get_device_properties(cfg.device), "L2_cache_size", 50 << 20)
    per_set = sum(t.numel() * t.element_size() for t in (W, b, A, B, x))
    n_sets = max(1, min(16, math.ceil(2 * l2 / per_set)))
    sets = [(build(name, backend, *(t.clone() for t in (W, b, A, B)), s), x.clone())
            for _ in range(n_sets)]
    it = itertools.cycle(sets)

    def fn() -> Any:
        impl, xi = next(it)
        with torch.no_grad():
            return impl.fn(xi)

    return fn


def run(cfg: H.Config) -> list[dict[str, Any]]:
    impls, skipped = impl_names(cfg)
    for n, why in skipped.items():
        cfg.log(f"linear: skipping {n}: {why}")
    ENV["skipped"] = dict(skipped)
    cases = grid(cfg)
    prog = H.Progress(cfg, SUITE, len(cfg.dtypes) * len(cases) * len(impls))
    rows: list[dict[str, Any]] = []
    for dtype in cfg.dtypes:
        for shape, K, N, M, r in cases:
            torch.manual_seed(0)
            s = 2.0  # lora_alpha = 2 r, the common setting
            W = H.randn((N, K), cfg, dtype, 1 / math.sqrt(K))
            b = H.randn((N,), cfg, dtype, 0.1)
            A = H.randn((r, K), cfg, dtype, 1 / math.sqrt(K))
            B = H.randn((N, r), cfg, dtype, 1 / math.sqrt(r))  # nonzero, unlike PEFT's init
            x = H.randn((M, K), cfg, dtype)
            # Upstream gradients of std 0.1. With std 1, fp16 dA (a sum over M tokens) would have
            # std sqrt(4 N / r) * sqrt(M) ~ 60 * 128 = 7.7e3 at N = 14336, r = 16, M = 16384
            # (an estimate from the input scales), with tails near fp16's 65504.
            dy = H.randn((M, N), cfg, dtype, 0.1)
            ref = _reference(x, W, b, A, B, s, dy)
            case = f"{shape} M={M} r={r}"
            built: dict[str, tuple[Optional[Impl], bool, float]] = {}
            for name, backend in impls:
                try:
                    impl = build(name, backend, W, b, A, B, s)
                    ok, err = _check_impl(impl, x, dy, ref["base" if name == "base" else "lora"], dtype)
                except Exception as e:  # noqa: BLE001 - a broken competitor is a failed row
                    impl, ok, err = None, False, math.inf
                    cfg.log(f"    {name} raised {type(e).__name__}: {e}")
                built[name] = (impl, bool(ok), err)
            by_mode: dict[str, dict[str, dict[str, Any]]] = {}
            for mode in MODES:
                fns: dict[str, H.Competitor] = {}
                mems: dict[str, Callable[[], Any]] = {}
                for name, backend in impls:
                    impl, ok, _ = built[name]
                    if ok and impl is not None:
                        weights = (W, b, A, B, s)
                        fn, g2n, graph, once = _mode_fn(cfg, impl, mode, x, dy, name, backend, weights)
                        fns[name], mems[name] = (fn, g2n, graph), once
                times = H.time_group(cfg, fns)
                by_mode[mode] = {}
                for name, backend in impls:
                    impl, ok, err = built[name]
                    row = H.make_row(SUITE, case, name, mode=mode, err=err, dtype=dtype, M=M, K=K, N=N, r=r,
                                     shape=shape, backend=backend)
                    row["pass"] = ok
                    if impl is not None and impl.note:
                        row["note"] = impl.note
                    t = times.get(name)
                    if isinstance(t, Exception):  # failed while timing: no speed
                        row.update({"pass": False, "note": f"{type(t).__name__}: {t}"[:200]})
                        cfg.log(f"    {name} {mode} raised {type(t).__name__}: {t}")
                    elif t is not None:
                        H.add_timing(row, t)
                        if t.cuda_graph:
                            row["note"] = "cuda graph replay, inputs rotated"
                        row["peak_mem_mb"] = H.peak_mem_mb(cfg, mems[name])
                    for p in fns.get(name, (None, [], False))[1] or []:
                        p.grad = None
                    by_mode[mode][name] = row
                del fns, mems
            for name, _ in impls:
                rows += [by_mode[mode][name] for mode in MODES]
                prog.step(f"{H.DTYPE_NAMES[dtype]} {case} {name}", rows[-1])
            del built
            del W, b, A, B, x, dy, ref
            if cfg.cuda:
                torch.cuda.empty_cache()
    _derive(rows)
    return rows


def _mode_fn(cfg: H.Config, impl: Impl, mode: str, x: Tensor, dy: Tensor, name: str,
             backend: Optional[str], weights: tuple) -> tuple[Callable[[], Any], list[Tensor], bool,
                                                              Callable[[], Any]]:
    """(timed call, tensors whose .grad to reset, CUDA-graph flag, one call for peak memory)."""
    xg = x.detach().requires_grad_()
    g2n = [xg] + impl.params
    if mode == "fwd":
        def once() -> Any:
            with torch.no_grad():
                return impl.fn(x)

        # Tiny token counts are launch-bound: time CUDA graph replays (with L2-defeating
        # input rotation) so the row measures the kernels, not Python and launch latency.
        if cfg.cuda and x.shape[0] <= 64:
            return _graph_fwd_fn(cfg, name, backend, *weights, x), [], True, once
        return once, [], False, once
    if mode == "bwd":
        y = impl.fn(xg)

        def bwd() -> Any:
            y.backward(dy, retain_graph=True)

        return bwd, g2n, False, bwd

    def fwd_bwd() -> Any:
        impl.fn(xg).backward(dy)

    return fwd_bwd, g2n, False, fwd_bwd


def _derive(rows: list[dict[str, Any]]) -> None:
    """x_base = ms / base ms (1.0 = merged cost), speedup = unfused_eager ms / ms and, for the
    CUDA backend's rows, x_triton = ms / fused_triton ms (issue 4's target: <= 1.25), per case;
    noisy = the spread of the row or of unfused_eager is wider than their difference."""
    by: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["case"], r["mode"], r["dtype"]), {})[r["impl"]] = r
    for group in by.values():
        base, eager, tri = group.get("base"), group.get("unfused_eager"), group.get("fused_triton")
        for r in group.values():
            if r["ms"] is None:
                continue
            if base and base["ms"]:
                r["x_base"] = r["ms"] / base["ms"]
            if eager and eager["ms"]:
                r["speedup_vs_eager"] = eager["ms"] / r["ms"]
                r["noisy"] = H.is_noisy(r, eager)
            if tri and tri["ms"] and r["impl"].startswith("fused_cuda"):
                r["x_triton"] = r["ms"] / tri["ms"]


COLUMNS = [
    ("case", lambda r: r["case"]),
    ("dtype", lambda r: r["dtype"]),
    ("mode", lambda r: r["mode"]),
    ("impl", lambda r: r["impl"]),
    ("ms", lambda r: r["ms"]),
    ("p20-p80", H.spread),
    ("x base", lambda r: r.get("x_base")),
    ("vs eager", lambda r: r.get("speedup_vs_eager")),
    ("noisy", H.noisy_mark),
    ("x triton", lambda r: r.get("x_triton")),
    ("peak MiB", lambda r: r["peak_mem_mb"]),
    ("graph", lambda r: "yes" if r.get("cuda_graph") else ""),
    ("check", lambda r: r["pass"]),
]


def plot(rows: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """Speedup over unfused_eager vs tokens M, one panel per mode, for the shape/r/dtype with
    the most token counts."""
    ok = [r for r in rows if r.get("speedup_vs_eager") is not None]
    if not ok:
        return None
    key = max({(r["shape"], r["r"], r["dtype"]) for r in ok},
              key=lambda k: len({r["M"] for r in ok if (r["shape"], r["r"], r["dtype"]) == k}))
    sel = [r for r in ok if (r["shape"], r["r"], r["dtype"]) == key]
    plt = H.pyplot()
    fig, axes = plt.subplots(1, len(MODES), figsize=(5 * len(MODES), 4), squeeze=False)
    for ax, mode in zip(axes[0], MODES):
        for impl in sorted({r["impl"] for r in sel}):
            pts = sorted((r["M"], r["speedup_vs_eager"]) for r in sel
                         if r["impl"] == impl and r["mode"] == mode)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.set_xlabel("tokens M")
        ax.set_ylabel("speedup vs unfused_eager")
        ax.set_title(f"{mode}: {key[0]} r={key[1]} {key[2]}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
