"""Suite ``adapters``: the LoRA paper's appendix B (inference latency added by adapter layers).

A GPT-2 medium shaped model (24 layers, d = 1024, 16 heads, GELU MLP of 4d, learned position
embeddings, tied LM head; built here from a config with random weights: no downloads, no
transformers) runs one forward pass over a [batch, seq] block of token ids, with:

* ``none``: no adapter (the denominator of every slowdown);
* ``adapter_h`` (Houlsby et al. 2019): two adapters per block, after attention and after the
  MLP, each ``h + up(gelu(down(h)))`` with bottleneck r;
* ``adapter_l`` (Lin et al. 2020): one adapter per block after the MLP, with a LayerNorm:
  ``h + up(gelu(down(LN(h))))``;
* ``lora_fused``: LoRA of rank r on W_q and W_v (the paper's choice), unmerged, through
  :class:`fused_lora.FusedLoRALinear` (backend "auto");
* ``lora_merged``: the same after ``merge()``: the base model's cost by construction.

Rows report ms and ``slowdown_pct`` = (ms / ms of ``none`` at the same batch and seq - 1) * 100,
as the paper's figure does. Timings are eager (``do_bench``), as in the paper, where adapter
layers cost most through their extra sequential launches; on a GPU, runs of at most 512 tokens
are also timed as CUDA graph replays (``ms_graph``, ``slowdown_graph_pct``), which removes the
launch overhead that adapters add.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_lora import FusedLoRALinear, backends

from . import harness as H

SUITE = "adapters"
IMPLS = ("none", "adapter_h", "adapter_l", "lora_fused", "lora_merged")


@dataclasses.dataclass
class GPT2Config:
    n_layer: int = 24
    d: int = 1024
    n_head: int = 16
    vocab: int = 50257
    n_ctx: int = 1024


class Adapter(nn.Module):
    """Bottleneck adapter with its own residual; Lin's variant has a LayerNorm first."""

    def __init__(self, d: int, r: int, layernorm: bool) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d) if layernorm else nn.Identity()
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(F.gelu(self.down(self.ln(h))))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        d = cfg.d
        self.n_head = cfg.n_head
        self.ln_1 = nn.LayerNorm(d)
        # q, k, v as three layers (GPT-2 stores one fused c_attn): LoRA adapts q and v only.
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_proj = nn.Linear(4 * d, d)
        self.adapter_attn: nn.Module = nn.Identity()
        self.adapter_mlp: nn.Module = nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        x = self.ln_1(h)

        def heads(z: Tensor) -> Tensor:
            return z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = self.proj(a.transpose(1, 2).reshape(b, t, d))
        h = h + self.adapter_attn(a)
        m = self.fc_proj(F.gelu(self.fc(self.ln_2(h)), approximate="tanh"))
        return h + self.adapter_mlp(m)


class GPT2(nn.Module):
    """GPT-2 shaped decoder: token + position embeddings, blocks, final LayerNorm, tied LM head."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.d)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d)
        for p in self.parameters():
            nn.init.normal_(p, std=0.02 if p.dim() > 1 else 0.01)
        for m in self.modules():  # LayerNorms start at weight ~1
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.wte(ids) + self.wpe(pos)
        for blk in self.blocks:
            h = blk(h)
        return F.linear(self.ln_f(h), self.wte.weight)


def variant(base: GPT2, impl: str, r: int, backend: str = "auto") -> GPT2:
    """A copy of ``base`` with the adapters of ``impl`` at bottleneck / rank r (seeded init;
    adapter up-projections and lora_B are nonzero so the check sees them)."""
    torch.manual_seed(1234 + r)
    m = copy.deepcopy(base)
    dev, dt = base.wte.weight.device, base.wte.weight.dtype
    d = base.wte.weight.shape[1]
    for blk in m.blocks:
        if impl == "adapter_h":
            blk.adapter_attn = Adapter(d, r, layernorm=False)
            blk.adapter_mlp = Adapter(d, r, layernorm=False)
        elif impl == "adapter_l":
            blk.adapter_mlp = Adapter(d, r, layernorm=True)
        elif impl in ("lora_fused", "lora_merged"):
            for name in ("q", "v"):
                lin = FusedLoRALinear.from_linear(getattr(blk, name), r=r, lora_alpha=2 * r, backend=backend)
                nn.init.normal_(lin.lora_B.weight, std=0.02)
                setattr(blk, name, lin)
    for mod in m.modules():
        if isinstance(mod, Adapter):
            nn.init.normal_(mod.up.weight, std=0.02)
    m.to(device=dev, dtype=dt).eval()
    if impl == "lora_merged":
        for mod in m.modules():
            if isinstance(mod, FusedLoRALinear):
                mod.merge()
    return m


def reference_copy(m: GPT2) -> GPT2:
    """fp64 copy for the correctness check (LoRA layers on the torch backend, unmerged math
    preserved: a merged layer's fp64 copy holds the merged weight, checked at its dtype's tol)."""
    ref = copy.deepcopy(m).double()
    for mod in ref.modules():
        if isinstance(mod, FusedLoRALinear):
            mod.backend = "torch"
    return ref


def grid(cfg: H.Config) -> tuple[GPT2Config, list[int], list[tuple[int, int]]]:
    """(model config, bottleneck ranks, [(batch, seq)]) for the size tier."""
    if cfg.size == "smoke":
        return GPT2Config(n_layer=1, d=128, n_head=4, vocab=256, n_ctx=64), [16], [(1, 16)]
    if not cfg.cuda:
        # CPU: 2 layers of the real width; small vocabulary so the LM head does not dominate.
        return GPT2Config(n_layer=2, vocab=1024, n_ctx=128), [16, 64], [(1, 32), (2, 32)]
    if cfg.size == "quick":
        return GPT2Config(), [16, 256], [(1, 128), (16, 512)]
    bs = [(b, s) for s in (128, 256, 512) for b in (1, 2, 4, 8, 16, 32)]
    return GPT2Config(), [16, 64, 256], bs


def run(cfg: H.Config) -> list[dict[str, Any]]:
    mcfg, ranks, bs = grid(cfg)
    # The layers keep backend "auto"; each row records the entry it resolved to (per dtype and
    # token count, as the layer's call does).
    backend = "auto"
    cfg.log(f"adapters: model {mcfg}, LoRA backend {backend!r}")
    rows: list[dict[str, Any]] = []
    configs = [("none", 0)] + [(i, r) for r in ranks for i in IMPLS[1:]]
    prog = H.Progress(cfg, SUITE, len(cfg.dtypes) * len(configs) * len(bs))
    for dtype in cfg.dtypes:
        torch.manual_seed(0)
        base = GPT2(mcfg).to(device=cfg.device, dtype=dtype).eval()
        for p in base.parameters():
            p.requires_grad_(False)
        # Every variant lives at once (13 GPT-2 medium copies in bf16: about 9 GiB) so that all
        # competitors of a (batch, seq) are timed together.
        models: dict[tuple[str, int], nn.Module] = {}
        checks: dict[tuple[str, int], tuple[bool, float]] = {}
        b0, s0 = bs[0]
        ids0 = torch.randint(0, mcfg.vocab, (b0, s0), device=cfg.device)
        for impl, r in configs:
            model = variant(base, impl, r, backend) if impl != "none" else base
            for p in model.parameters():
                p.requires_grad_(False)
            # Checked once per variant, on the smallest input, against an fp64 copy: a 24-layer
            # stack accumulates rounding, so the tolerance is 3x the single-op one.
            with torch.no_grad():
                ok, err = H.check([model(ids0)], [reference_copy(model)(ids0)], dtype, factor=3.0)
            models[(impl, r)], checks[(impl, r)] = model, (bool(ok), err)
            if cfg.cuda:
                torch.cuda.empty_cache()
        for batch, seq in bs:
            ids = torch.randint(0, mcfg.vocab, (batch, seq), device=cfg.device)
            fns: dict[str, H.Competitor] = {}
            for key, model in models.items():
                if checks[key][0]:
                    def fwd(model: nn.Module = model, ids: Tensor = ids) -> Any:
                        with torch.no_grad():
                            return model(ids)

                    fns[f"{key[0]} r={key[1]}"] = (fwd, None, False)
            times = H.time_group(cfg, fns)
            graphs: dict[str, Any] = {}
            if cfg.cuda and batch * seq <= 512:
                graphs = H.time_group(cfg, {k: (f, g, True) for k, (f, g, _) in fns.items()})
            for (impl, r), (ok, err) in checks.items():
                name = f"{impl} r={r}"
                row = H.make_row(SUITE, f"b={batch} s={seq}", impl, dtype=dtype, M=batch * seq, K=mcfg.d,
                                 N=mcfg.d, r=r, batch=batch, seq=seq, n_layer=mcfg.n_layer, err=err,
                                 backend=(_resolved(cfg, dtype, batch * seq) if impl.startswith("lora")
                                          else None))
                row["pass"] = ok
                t = times.get(name)
                if isinstance(t, Exception):
                    row.update({"pass": False, "note": f"{type(t).__name__}: {t}"[:200]})
                elif t is not None:
                    H.add_timing(row, t)
                    row["peak_mem_mb"] = H.peak_mem_mb(cfg, fns[name][0])
                    g = graphs.get(name)
                    if isinstance(g, H.Timing) and g.cuda_graph:
                        row["ms_graph"] = g.ms
                rows.append(row)
                prog.step(f"{H.DTYPE_NAMES[dtype]} b={batch} s={seq} {impl} r={r}", row)
        del models, base
        if cfg.cuda:
            torch.cuda.empty_cache()
    _derive(rows)
    return rows


def _resolved(cfg: H.Config, dtype: torch.dtype, rows: int) -> str:
    """The entry backend="auto" runs a LoRA layer's forward on here (no_grad: mode fwd)."""
    try:
        return backends.select("lora_linear", "auto", cfg.device, dtype, "fwd", rows)
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        return f"auto ({type(e).__name__}: {e})"[:200]


def _derive(rows: list[dict[str, Any]]) -> None:
    none = {(r["dtype"], r["batch"], r["seq"]): r for r in rows if r["impl"] == "none"}
    for r in rows:
        n = none.get((r["dtype"], r["batch"], r["seq"]))
        if n is None or r["ms"] is None or not n["ms"]:
            continue
        r["slowdown_pct"] = (r["ms"] / n["ms"] - 1.0) * 100.0
        r["noisy"] = H.is_noisy(r, n)
        if r.get("ms_graph") and n.get("ms_graph"):
            r["slowdown_graph_pct"] = (r["ms_graph"] / n["ms_graph"] - 1.0) * 100.0


COLUMNS = [
    ("case", lambda r: r["case"]),
    ("dtype", lambda r: r["dtype"]),
    ("impl", lambda r: r["impl"]),
    ("r", lambda r: r["r"] or None),
    ("ms", lambda r: r["ms"]),
    ("p20-p80", H.spread),
    ("slowdown %", lambda r: r.get("slowdown_pct")),
    ("noisy", H.noisy_mark),
    ("graph ms", lambda r: r.get("ms_graph")),
    ("graph slowdown %", lambda r: r.get("slowdown_graph_pct")),
    ("check", lambda r: r["pass"]),
]


def plot(rows: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """The paper's figure: % slowdown vs batch size, one panel per sequence length, one line
    per adapter type and r."""
    ok = [r for r in rows if r.get("slowdown_pct") is not None and r["impl"] != "none"]
    if not ok:
        return None
    dtype = ok[0]["dtype"]
    ok = [r for r in ok if r["dtype"] == dtype]
    seqs = sorted({r["seq"] for r in ok})
    plt = H.pyplot()
    fig, axes = plt.subplots(1, len(seqs), figsize=(5 * len(seqs), 4), squeeze=False)
    for ax, seq in zip(axes[0], seqs):
        for impl, r in sorted({(x["impl"], x["r"]) for x in ok}):
            pts = sorted((x["batch"], x["slowdown_pct"]) for x in ok
                         if x["seq"] == seq and x["impl"] == impl and x["r"] == r)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{impl} r={r}")
        ax.set_xscale("log", base=2)
        ax.axhline(0.0, color="gray", lw=0.5)
        ax.set_xlabel("batch size")
        ax.set_ylabel("% slowdown vs no adapter")
        ax.set_title(f"seq {seq} ({dtype})")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

