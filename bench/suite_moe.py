"""Suite ``moe``: LoRA on a mixture-of-experts layer (issue 12).

Training: one MoE layer (transformers' fused experts: gate_up [E, 2I, H], the gate, down
[E, H, I], top-k routing weights), fwd and fwd+bwd, at the shapes of

* Qwen3-30B-A3B: E = 128 experts, top-8, H = 2048, I = 768;
* Mixtral-8x7B: E = 8 experts, top-2, H = 4096, I = 14336;

with r = 16 on both projections and 4096 tokens (on a CPU: the same structure at small
shapes). Competitors:

==================  =========================================================================
fused_<backend>     ``fused_lora.moe.MoELoRAExperts`` (grouped kernels; the delta weight is
                    never formed; a token's top-k rows are read in place)
peft                PEFT ``target_parameters`` (``ParamWrapper`` around transformers' experts
                    module): W + s B A folded per forward (a baddbmm over every expert), then
                    transformers' eager per-expert loop
hf_loop             transformers' own eager per-expert loop on merged weights (no LoRA)
merged_grouped_mm   transformers' ``grouped_mm`` experts implementation on merged weights:
                    the merged-weight bound (one grouped GEMM per projection)
merged_fused        fused_lora's grouped kernels on merged weights without LoRA: the bound of
                    fused_lora's own kernels (x merged = the cost of LoRA in them)
==================  =========================================================================

Weights are frozen; fwd+bwd computes dx (and dA / dB where there is LoRA). Every competitor's
output and dx are checked against a per-expert fp64 loop on the merged weights.

Decode: mixed-adapter MoE serving (``MoEMultiLoRAExperts``: a bank of 16 adapters, r = 16,
every token its own adapter or none) at T = 1 ... 64 tokens on the Qwen3-30B-A3B layer, with
the bytes a step must move at least (the weights of the experts the batch routes to, the
adapters x experts it uses, x and y), the achieved bandwidth over them and its % of the peak
(a device-to-device copy measured in the same run, env ``peak_bw_gbs``). ``base_fused`` is the
same op with every adapter id -1 (the floor); ``hf_loop`` transformers' eager loop without
adapters. PEFT has no mixed-adapter batches for target_parameters (its ParamWrapper refuses
``adapter_names``), so it is not in the decode rows.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import harness as H

SUITE = "moe"
ENV: dict[str, Any] = {}

# name -> (E, top_k, H, I) of the real models.
MODELS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}


def grid(cfg: H.Config) -> dict[str, Any]:
    """Shapes for the tier. On a CPU (and for the tests' smoke size) the models keep their
    structure (many small experts vs few big ones) at small widths."""
    if cfg.size == "smoke":
        return dict(train=[("qwen3-30b-a3b", (8, 2, 32, 16)), ("mixtral-8x7b", (4, 2, 32, 48))], tokens=[16],
                    r=4, modes=("fwd_bwd",), decode_shape=("qwen3-30b-a3b", (8, 2, 32, 16)), decode=[1, 4],
                    n_slots=4)
    if not cfg.cuda:
        return dict(train=[("qwen3-30b-a3b", (16, 4, 128, 48)), ("mixtral-8x7b", (4, 2, 128, 448))],
                    tokens=[128], r=8, modes=("fwd", "fwd_bwd"),
                    decode_shape=("qwen3-30b-a3b", (16, 4, 128, 48)), decode=[1, 8, 64], n_slots=8)
    real = [(n, MODELS[n]) for n in MODELS]
    if cfg.size == "quick":
        return dict(train=real, tokens=[4096], r=16, modes=("fwd_bwd",),
                    decode_shape=real[0], decode=[1, 16, 64], n_slots=16)
    return dict(train=real, tokens=[1024, 4096], r=16, modes=("fwd", "fwd_bwd"),
                decode_shape=real[0], decode=[1, 2, 4, 8, 16, 32, 64], n_slots=16)


# ------------------------------------------------------------------------------- modules


class _Experts(torch.nn.Module):
    """Stand-in for transformers' fused experts (same parameters and eager loop) when
    transformers is not importable."""

    def __init__(self, E: int, H_: int, I_: int) -> None:
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = torch.nn.Parameter(torch.empty(E, 2 * I_, H_))
        self.down_proj = torch.nn.Parameter(torch.empty(E, H_, I_))
        self.act_fn = torch.nn.SiLU()

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return _loop(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                     self.act_fn)


def _loop(h: Tensor, idx: Tensor, wts: Tensor, Wgu: Tensor, Wd: Tensor, act: Callable) -> Tensor:
    """The per-expert loop (transformers' eager experts forward)."""
    out = torch.zeros_like(h)
    for e in torch.unique(idx).tolist():
        if not (0 <= e < Wgu.shape[0]):
            continue
        tok, pos = torch.where(idx == e)
        gate, up = F.linear(h[tok], Wgu[e]).chunk(2, dim=-1)
        y = F.linear(act(gate) * up, Wd[e]) * wts[tok, pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def make_experts(model: str, E: int, k: int, H_: int, I_: int, device: torch.device, dtype: torch.dtype,
                 gen: Optional[torch.Generator], impl: str = "eager") -> torch.nn.Module:
    """transformers' experts module of ``model`` (Qwen3MoeExperts / MixtralExperts) at these
    sizes, random weights (std 1 / sqrt(in); drawn from ``gen`` on a CPU, on the device from
    torch's seed on a GPU: GPU-sized weights), frozen; the local stand-in without
    transformers."""
    try:
        if model.startswith("qwen3"):
            from transformers import Qwen3MoeConfig
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls

            c = Qwen3MoeConfig(hidden_size=H_, moe_intermediate_size=I_, num_experts=E, num_experts_per_tok=k)
        else:
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls

            c = MixtralConfig(hidden_size=H_, intermediate_size=I_, num_local_experts=E,
                              num_experts_per_tok=k)
        c._experts_implementation = impl
        with torch.device("meta"):
            m = cls(c)
    except Exception:  # noqa: BLE001 - transformers missing or changed: the stand-in
        if impl != "eager":
            raise
        with torch.device("meta"):
            m = _Experts(E, H_, I_)
    m = m.to_empty(device=device).to(dtype)
    c = H.Config(device, [dtype])
    g = gen if device.type == "cpu" else None
    with torch.no_grad():
        m.gate_up_proj.copy_(H.randn(m.gate_up_proj.shape, c, dtype, 1 / math.sqrt(H_), g))
        m.down_proj.copy_(H.randn(m.down_proj.shape, c, dtype, 1 / math.sqrt(I_), g))
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _routing(T: int, E: int, k: int, device: torch.device, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """top-k expert ids [T, k] (distinct per token, random) and softmax routing weights."""
    logits = torch.randn(T, E, generator=gen)
    w, idx = torch.topk(logits, k, dim=-1)
    return idx.to(device), torch.softmax(w, dim=-1).to(device)


def _set_lora(layer: torch.nn.Module, r: int, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in ("gate_up_proj", "down_proj"):
            A, B = getattr(layer, f"lora_A_{p}"), getattr(layer, f"lora_B_{p}")
            A.copy_(torch.randn(A.shape, generator=gen) / math.sqrt(A.shape[-1]))
            B.copy_(torch.randn(B.shape, generator=gen) / math.sqrt(r) * 0.5)


def _merged(base: torch.nn.Module, fused: torch.nn.Module) -> dict[str, Tensor]:
    """W + s B A per projection, in fp64 (for the reference) -- the merged weights."""
    out = {}
    for p in ("gate_up_proj", "down_proj"):
        W = getattr(base, p).double()
        A, B = getattr(fused, f"lora_A_{p}").double(), getattr(fused, f"lora_B_{p}").double()
        out[p] = W + fused.scale_of(p) * torch.bmm(B, A)
    return out


def _peft_experts(base: torch.nn.Module, fused: torch.nn.Module, r: int, alpha: float) -> torch.nn.Module:
    """PEFT's ParamWrapper (target_parameters) around a copy of ``base``, with fused's weights."""
    from peft import LoraConfig, inject_adapter_in_model

    from fused_lora.integrations import moe_io

    holder = torch.nn.Module()
    holder.experts = copy.deepcopy(base)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=[],
                     target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    holder = inject_adapter_in_model(cfg, holder)
    outer = holder.experts
    wrappers = {outer.parameter_name: outer, outer.base_layer.parameter_name: outer.base_layer}
    with torch.no_grad():
        for p, w in wrappers.items():
            A, B = moe_io.to_peft_layout(getattr(fused, f"lora_A_{p}"), getattr(fused, f"lora_B_{p}"))
            w.lora_A["default"].weight.copy_(A)
            w.lora_B["default"].weight.copy_(B)
    return holder.experts.to(device=base.gate_up_proj.device)


def _fused_entries(cfg: H.Config) -> tuple[list[tuple[str, str]], dict[str, str]]:
    from fused_lora import backends

    run, skip = [], {}
    for be in ("triton", "torch"):
        name = H.impl_label(be, cfg.device)
        try:
            why = backends.unavailable_reason("moe_lora_linear", be, cfg.device)
        except Exception as e:  # noqa: BLE001
            why = f"availability check raised {type(e).__name__}: {e}"
        if be == "triton" and not cfg.cuda:
            why = "Triton runs on CPU only under the interpreter, whose timings mean nothing"
        if be == "torch" and cfg.cuda:
            why = "the torch backend is the CPU path (a per-expert Python loop on GPU)"
        if why:
            skip[name] = why
        else:
            run.append((name, be))
    return run, skip


# ------------------------------------------------------------------------------- training rows


def _train_case(cfg: H.Config, dtype: torch.dtype, model: str, shape: tuple, T: int, r: int, modes,
                fused: list, skip: dict, gen: torch.Generator, prog: H.Progress) -> list[dict[str, Any]]:
    from fused_lora.moe import MoELoRAExperts

    E, k, H_, I_ = shape
    alpha = 2.0 * r
    base = make_experts(model, E, k, H_, I_, cfg.device, dtype, gen)
    be0 = fused[0][1] if fused else "torch"
    first = MoELoRAExperts(copy.deepcopy(base), r=r, lora_alpha=alpha, backend=be0)
    _set_lora(first, r, gen)
    merged64 = _merged(base, first)
    hf_merged = copy.deepcopy(base)
    with torch.no_grad():
        for p in ("gate_up_proj", "down_proj"):
            getattr(hf_merged, p).copy_(merged64[p])
    makers: dict[str, Callable[[], torch.nn.Module]] = {}
    for i, (name, be) in enumerate(fused):
        def make(be=be, i=i):
            if i == 0:
                return first
            m = MoELoRAExperts(copy.deepcopy(base), r=r, lora_alpha=alpha, backend=be)
            m.load_state_dict(first.state_dict())
            return m
        makers[name] = make
    if "peft" not in skip:
        makers["peft"] = lambda: _peft_experts(base, first, r, alpha)
    makers["hf_loop"] = lambda: hf_merged
    makers["merged_grouped_mm"] = lambda: _with_impl(hf_merged, model, shape, dtype, "grouped_mm")
    makers["merged_fused"] = lambda: MoELoRAExperts(copy.deepcopy(hf_merged), r=1, lora_alpha=1.0, targets=(),
                                                    backend=be0)
    mods: dict[str, Any] = {}
    for impl, make in makers.items():
        try:
            mods[impl] = make()
        except Exception as ex:  # noqa: BLE001 - reported below
            mods[impl] = ex
    h = H.randn((T, H_), cfg, dtype, 1.0, gen)
    idx, wts = _routing(T, E, k, cfg.device, gen)
    wts = wts.to(dtype)
    g = H.randn((T, H_), cfg, dtype, 1.0, gen)
    # Reference: the per-expert loop in fp64 on the merged weights; dx through autograd.
    h64 = h.double().requires_grad_(True)
    ref = _loop(h64, idx, wts.double(), merged64["gate_up_proj"], merged64["down_proj"], F.silu)
    (ref_dx,) = torch.autograd.grad(ref, h64, g.double())
    ref = ref.detach()
    del merged64, h64
    rows: list[dict[str, Any]] = []
    case = f"{model} E={E} k={k} H={H_} I={I_} T={T}"
    for mode in modes:
        checked, fns = [], {}
        for impl, mod in mods.items():
            with_lora = impl.startswith("fused_") or impl == "peft"
            row = H.make_row(SUITE, case, impl, dtype=dtype, M=T, K=H_, N=I_, r=r if with_lora else None,
                             mode=mode, model=model, E=E, top_k=k, phase="train")
            try:
                if isinstance(mod, Exception):
                    raise mod
                hx = h.detach().clone().requires_grad_(mode == "fwd_bwd")
                if mode == "fwd":
                    def fn(mod=mod, hx=hx):
                        with torch.no_grad():
                            return mod(hx, idx, wts)

                    ok, err = H.check([fn()], [ref], dtype)
                    g2n = None
                else:
                    def fn(mod=mod, hx=hx):
                        out = mod(hx, idx, wts)
                        out.backward(g)
                        return out

                    out = fn()
                    ok, err = H.check([out, hx.grad], [ref, ref_dx], dtype)
                    g2n = [hx] + [p for p in mod.parameters() if p.requires_grad]
                row.update({"pass": bool(ok), "err": err})
                if ok:
                    fns[impl] = (fn, g2n, False)
            except Exception as ex:  # noqa: BLE001 - a competitor that cannot run is a failed row
                why = f"{type(ex).__name__}: {ex}"[:200]
                if impl == "merged_grouped_mm":  # optional: transformers' grouped_mm does not run here
                    skip[impl] = why
                    prog.step(f"{case} {mode} {impl} (skipped: {why})")
                    continue
                row.update({"pass": False, "err": math.inf, "note": why})
            checked.append(row)
        times = H.time_group(cfg, fns)
        for row in checked:
            t = times.get(row["impl"])
            if isinstance(t, Exception):
                row.update({"pass": False, "note": f"{type(t).__name__}: {t}"[:200]})
            elif t is not None:
                H.add_timing(row, t)
                row["peak_mem_mb"] = H.peak_mem_mb(cfg, fns[row["impl"]][0])
            rows.append(row)
            prog.step(f"{H.DTYPE_NAMES[dtype]} {case} {mode} {row['impl']}", row)
    return rows


def _with_impl(m: torch.nn.Module, model: str, shape: tuple, dtype: torch.dtype,
               impl: str) -> torch.nn.Module:
    E, k, H_, I_ = shape
    other = make_experts(model, E, k, H_, I_, m.gate_up_proj.device, dtype, None, impl=impl)
    other.load_state_dict(m.state_dict())
    return other


# ------------------------------------------------------------------------------- decode rows


def _decode_rows(cfg: H.Config, dtype: torch.dtype, g: dict, fused: list, gen: torch.Generator,
                 prog: H.Progress, peak_bw: float) -> list[dict[str, Any]]:
    from fused_lora.moe import MoEMultiLoRAExperts

    model, (E, k, H_, I_) = g["decode_shape"]
    r, S = g["r"], g["n_slots"]
    e = torch.finfo(dtype).bits // 8
    base = make_experts(model, E, k, H_, I_, cfg.device, dtype, gen)
    banks = {}
    for name, be in fused:
        banks[name] = MoEMultiLoRAExperts(copy.deepcopy(base), S, r, backend=be)
    first = next(iter(banks.values()), None)
    if first is None:
        return []
    with torch.no_grad():
        for p in ("gate_up_proj", "down_proj"):
            A, B = getattr(first, f"lora_A_{p}"), getattr(first, f"lora_B_{p}")
            A.copy_(torch.randn(A.shape, generator=gen) / math.sqrt(A.shape[-1]))
            B.copy_(torch.randn(B.shape, generator=gen) / math.sqrt(r) * 0.5)
            getattr(first, f"scales_{p}").fill_(2.0)
    for b in banks.values():
        b.load_state_dict(first.state_dict())
    rows: list[dict[str, Any]] = []
    for T in g["decode"]:
        h = H.randn((T, H_), cfg, dtype, 1.0, gen)
        idx, wts = _routing(T, E, k, cfg.device, gen)
        wts = wts.to(dtype)
        ad = torch.randint(-1, S, (T,), generator=gen).to(cfg.device)  # about 1 in S + 1 without adapter
        none = torch.full_like(ad, -1)
        # Reference: each token through its adapter's merged weights (fp64).
        ref = torch.zeros(T, H_, dtype=torch.float64, device=cfg.device)
        for a in torch.unique(ad).tolist():
            rows_a = (ad == a).nonzero(as_tuple=True)[0]
            Ws = {}
            for p in ("gate_up_proj", "down_proj"):
                W = getattr(base, p).double()
                if a >= 0:
                    A = getattr(first, f"lora_A_{p}")[a].double()
                    B = getattr(first, f"lora_B_{p}")[a].double()
                    W = W + float(getattr(first, f"scales_{p}")[a]) * torch.bmm(B, A)
                Ws[p] = W
            ref[rows_a] = _loop(h[rows_a].double(), idx[rows_a], wts[rows_a].double(), Ws["gate_up_proj"],
                                Ws["down_proj"], F.silu)
        ref_base = _loop(h.double(), idx, wts.double(), base.gate_up_proj.double(), base.down_proj.double(),
                         F.silu)
        n_exp = int(torch.unique(idx).numel())
        pairs = int((torch.unique((ad[:, None] + 1) * E + idx) >= E).sum())  # (adapter, expert) pairs used
        w_bytes = n_exp * (2 * I_ * H_ + H_ * I_) * e
        a_bytes = pairs * r * ((H_ + 2 * I_) + (I_ + H_)) * e
        io_bytes = 2 * T * H_ * e
        case = f"decode T={T} {model} E={E} k={k} S={S}"
        comps: dict[str, tuple[Callable[[], Tensor], Tensor, int]] = {}
        for name, b in banks.items():
            comps[name] = (_call(b, h, idx, wts, ad), ref, w_bytes + a_bytes + io_bytes)
        comps["base_fused"] = (_call(first, h, idx, wts, none), ref_base, w_bytes + io_bytes)
        comps["hf_loop"] = (_call(base, h, idx, wts, None), ref_base, w_bytes + io_bytes)
        checked, fns = [], {}
        for impl, (fn, want, nb) in comps.items():
            row = H.make_row(SUITE, case, impl, dtype=dtype, M=T, K=H_, N=I_, r=r, mode="fwd", model=model,
                             E=E, top_k=k, phase="decode", n_slots=S, n_experts_used=n_exp,
                             n_pairs_used=pairs, bytes=nb)

            def call(fn=fn):
                with torch.no_grad():
                    return fn()

            try:
                ok, err = H.check([call()], [want], dtype)
            except Exception as ex:  # noqa: BLE001
                ok, err = False, math.inf
                row["note"] = f"{type(ex).__name__}: {ex}"[:200]
            row.update({"pass": bool(ok), "err": err})
            checked.append(row)
            if ok:
                fns[impl] = (call, None, cfg.cuda)  # CUDA graphs on a GPU: decode is launch-bound
        times = H.time_group(cfg, fns)
        for row in checked:
            t = times.get(row["impl"])
            if isinstance(t, Exception):
                row.update({"pass": False, "note": f"{type(t).__name__}: {t}"[:200]})
            elif t is not None:
                H.add_timing(row, t)
                row["gbs"] = row["bytes"] / (row["ms"] * 1e-3) / 1e9
                row["pct_peak"] = 100.0 * row["gbs"] / peak_bw
            rows.append(row)
            prog.step(f"{H.DTYPE_NAMES[dtype]} {case} {row['impl']}", row)
    return rows


def _call(mod: torch.nn.Module, h: Tensor, idx: Tensor, wts: Tensor,
          ad: Optional[Tensor]) -> Callable[[], Tensor]:
    if ad is None:
        return lambda: mod(h, idx, wts)
    return lambda: mod(h, idx, wts, adapter_ids=ad)


# ------------------------------------------------------------------------------- run


def run(cfg: H.Config) -> list[dict[str, Any]]:
    g = grid(cfg)
    fused, skip = _fused_entries(cfg)
    why = H.peft_reason()
    if why:
        skip["peft"] = why
    for n, w in skip.items():
        cfg.log(f"moe: skipping {n}: {w}")
    bw = H.measure_copy_bandwidth(cfg)
    ENV.clear()
    ENV.update(bw)
    ENV["skipped"] = skip
    ENV["shapes"] = {n: dict(zip(("E", "top_k", "H", "I"), s)) for n, s in MODELS.items()}
    cfg.log(f"moe: peak bandwidth (device copy) {bw['peak_bw_gbs']:.1f} GB/s")
    n_train = len(g["train"]) * len(g["tokens"]) * len(g["modes"]) * (len(fused) + 4)
    n_dec = len(g["decode"]) * (len(fused) + 2)
    prog = H.Progress(cfg, SUITE, len(cfg.dtypes) * (n_train + n_dec))
    rows: list[dict[str, Any]] = []
    for dtype in cfg.dtypes:
        gen = H.seeded(0)
        for model, shape in g["train"]:
            for T in g["tokens"]:
                rows += _train_case(cfg, dtype, model, shape, T, g["r"], g["modes"], fused, skip, gen, prog)
        rows += _decode_rows(cfg, dtype, g, fused, gen, prog, bw["peak_bw_gbs"])
    _derive(rows)
    return rows


def _derive(rows: list[dict[str, Any]]) -> None:
    """x merged: ms over the merged-weight bound (merged_grouped_mm, else merged_fused) of the
    same case and mode; x peft: peft's ms over this ms (above 1: faster than PEFT)."""
    by = {(r["case"], r["mode"], r["dtype"], r["impl"]): r for r in rows}
    for r in rows:
        key = (r["case"], r["mode"], r["dtype"])
        bound = by.get(key + ("merged_grouped_mm",)) or by.get(key + ("merged_fused",)) or by.get(
            key + ("base_fused",))
        if bound and bound.get("ms") and r.get("ms"):
            r["x_merged"] = r["ms"] / bound["ms"]
            r["noisy"] = H.is_noisy(r, bound)
        peft = by.get(key + ("peft",))
        if peft and peft.get("ms") and r.get("ms") and r is not peft:
            r["x_peft"] = peft["ms"] / r["ms"]


COLUMNS = [
    ("case", lambda r: r["case"]),
    ("mode", lambda r: r["mode"]),
    ("dtype", lambda r: r["dtype"]),
    ("impl", lambda r: r["impl"]),
    ("ms", lambda r: r["ms"]),
    ("p20-p80", H.spread),
    ("x merged", lambda r: r.get("x_merged")),
    ("vs peft", lambda r: r.get("x_peft")),
    ("noisy", H.noisy_mark),
    ("peak MiB", lambda r: r.get("peak_mem_mb")),
    ("GB/s", lambda r: r.get("gbs")),
    ("% peak", lambda r: r.get("pct_peak")),
    ("check", lambda r: r["pass"]),
]

NOTES = ("x merged: ms / the merged-weight bound (merged_grouped_mm, or merged_fused where transformers' "
         "grouped_mm does not run; base_fused for decode); vs peft: peft's ms / this ms; % peak: decode "
         "bytes (experts routed to, adapters x experts used, x, y) / ms over the measured copy bandwidth")
