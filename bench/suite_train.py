"""Suite ``train``: LoRA fine-tuning steps of a small Llama-shaped decoder.

The model (built here, random weights, no downloads): token embedding, ``n_layer`` blocks of
RMSNorm -> grouped-query causal attention (q/k/v/o projections, SDPA; no RoPE, which costs the
same for every competitor) -> RMSNorm -> SwiGLU MLP (gate/up/down), final RMSNorm and an LM
head, all frozen. LoRA (r = 16, alpha = 32, no dropout) on all seven linear layers of every
block:

* ``fused_triton`` / ``fused_cuda`` / ``fused_torch``: :class:`fused_lora.FusedLoRALinear`
  per backend available here (Triton never on CPU; on a CPU backend "cuda" runs the
  extension's C++ CPU kernels and is named ``cpp_cpu``);
* ``peft``: PEFT's ``inject_adapter_in_model`` with the same target modules (when importable);
* ``unfused_eager``: the PEFT-style chain in a plain module.

Every competitor starts from the same base weights and the same adapter values (lora_B drawn
nonzero, so the adapters affect the loss from the first step) and trains on the same batch
with AdamW; the losses of the first steps must match ``unfused_eager``'s within tolerance
(``pass``) before the step is timed. Rows: ms per step, ``tokens_per_s`` and ``peak_mem_mb``
(peak allocated during one step, absolute: weights included).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_lora import FusedLoRALinear

from . import harness as H

SUITE = "train"
ENV: dict[str, Any] = {}  # merged into the results' env: what was skipped and why
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
N_CHECK_STEPS = 3
# Loss agreement with unfused_eager after each of the first steps (relative). The same math
# in a different order differs by rounding only: bf16 unit roundoff is 3.9e-3.
LOSS_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclasses.dataclass
class LlamaConfig:
    vocab: int = 32000
    d: int = 2048
    n_layer: int = 4
    n_head: int = 16
    n_kv_head: int = 8
    ffn: int = 5632


class RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = c.n_head, c.n_kv_head, c.d // c.n_head
        self.q_proj = nn.Linear(c.d, c.d, bias=False)
        self.k_proj = nn.Linear(c.d, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(c.d, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(c.d, c.d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q = self.q_proj(x).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        rep = self.nh // self.nkv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(a.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.d, c.ffn, bias=False)
        self.up_proj = nn.Linear(c.d, c.ffn, bias=False)
        self.down_proj = nn.Linear(c.ffn, c.d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm, self.self_attn = RMSNorm(c.d), Attention(c)
        self.post_attention_layernorm, self.mlp = RMSNorm(c.d), MLP(c)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class Llama(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab, c.d)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.d)
        self.lm_head = nn.Linear(c.d, c.vocab, bias=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        logits = self.lm_head(self.norm(h)).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


class EagerLoRALinear(nn.Module):
    """The PEFT-style unfused chain: base(x) + s * B(A(x))."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base.out_features, **kw)
        self.scaling = alpha / r

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear, str]]:
    """(parent, attribute, linear, qualified name) for every LoRA target."""
    out = []
    for pname, parent in model.named_modules():
        for attr in TARGETS:
            child = getattr(parent, attr, None)
            if isinstance(child, nn.Linear):
                out.append((parent, attr, child, f"{pname}.{attr}"))
    return out


def lora_init(model: nn.Module, r: int, gen: torch.Generator) -> dict[str, tuple[Tensor, Tensor]]:
    """One (A, B) per target, shared by every competitor: A kaiming-like, B nonzero."""
    init = {}
    for _, _, lin, name in _targets(model):
        a = torch.randn(r, lin.in_features, generator=gen) / math.sqrt(lin.in_features)
        b = torch.randn(lin.out_features, r, generator=gen) * 0.01
        init[name] = (a, b)
    return init


def build(base: Llama, impl: str, r: int, alpha: float, init: dict[str, tuple[Tensor, Tensor]]) -> nn.Module:
    """A copy of ``base`` with LoRA per ``impl``, adapter values from ``init``."""
    m = copy.deepcopy(base)
    dev, dt = base.lm_head.weight.device, base.lm_head.weight.dtype
    if impl == "peft":
        from peft import LoraConfig, inject_adapter_in_model

        lcfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(TARGETS))
        inject_adapter_in_model(lcfg, m)
        m.to(device=dev, dtype=dt)
        with torch.no_grad():
            for name, mod in m.named_modules():
                if name in init and hasattr(mod, "lora_A"):
                    mod.lora_A["default"].weight.copy_(init[name][0])
                    mod.lora_B["default"].weight.copy_(init[name][1])
    else:
        for parent, attr, lin, name in _targets(m):
            if impl == "unfused_eager":
                new: nn.Module = EagerLoRALinear(lin, r, alpha)
            else:
                new = FusedLoRALinear.from_linear(lin, r=r, lora_alpha=alpha, backend=backend_of(impl))
            with torch.no_grad():
                new.lora_A.weight.copy_(init[name][0])
                new.lora_B.weight.copy_(init[name][1])
            setattr(parent, attr, new)
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n)
    return m


def grid(cfg: H.Config) -> tuple[LlamaConfig, int, int]:
    """(model config, batch, seq)."""
    if cfg.size == "smoke":
        return LlamaConfig(vocab=128, d=64, n_layer=1, n_head=4, n_kv_head=2, ffn=128), 1, 16
    if not cfg.cuda:
        return LlamaConfig(vocab=1000, d=256, n_layer=2, n_head=4, n_kv_head=2, ffn=688), 2, 64
    if cfg.size == "quick":
        return LlamaConfig(n_layer=2), 2, 512
    return LlamaConfig(), 4, 1024


def backend_of(impl: str) -> str:
    """The backend of a fused impl name (``cpp_cpu`` is backend "cuda" on a CPU)."""
    return "cuda" if impl == "cpp_cpu" else impl.split("_", 1)[1]


def impl_names(cfg: H.Config) -> tuple[list[str], dict[str, str]]:
    run: list[str] = []
    skip: dict[str, str] = {}
    for be in ("triton", "cuda", "torch"):
        name = H.impl_label(be, cfg.device)
        why = H.entry_reason("lora_linear", be, cfg.device)
        if be == "triton" and not cfg.cuda:
            why = "Triton runs on CPU only under the interpreter, whose timings mean nothing"
        if be == "torch" and cfg.cuda:
            why = "the torch backend is the CPU path"
        if why:
            skip[name] = why
        else:
            run.append(name)
    why = H.peft_reason()
    if why:
        skip["peft"] = why
    else:
        run.append("peft")
    run.append("unfused_eager")
    return run, skip


def _timed(row: dict[str, Any], t: Any, cfg: H.Config, step: Callable[[], Tensor]) -> None:
    if isinstance(t, Exception):
        row.update({"pass": False, "note": f"{type(t).__name__}: {t}"[:200]})
        return
    H.add_timing(row, t)
    row["tokens_per_s"] = row["M"] / (row["ms"] * 1e-3)
    row["peak_mem_mb"] = H.peak_mem_mb(cfg, step, absolute=True)


def run(cfg: H.Config) -> list[dict[str, Any]]:
    mcfg, batch, seq = grid(cfg)
    r, alpha = 16, 32.0
    impls, skip = impl_names(cfg)
    for n, why in skip.items():
        cfg.log(f"train: skipping {n}: {why}")
    ENV["skipped"] = dict(skip)
    # unfused_eager first: it is the loss reference for the others.
    impls = ["unfused_eager"] + [i for i in impls if i != "unfused_eager"]
    rows: list[dict[str, Any]] = []
    prog = H.Progress(cfg, SUITE, len(cfg.dtypes) * len(impls))
    for dtype in cfg.dtypes:
        torch.manual_seed(0)
        base = Llama(mcfg).to(device=cfg.device, dtype=dtype)
        init = lora_init(base, r, H.seeded(1))
        gen = H.seeded(2)
        ids = torch.randint(0, mcfg.vocab, (batch, seq + 1), generator=gen).to(cfg.device)
        inp, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        ref_losses: Optional[list[float]] = None
        pending: dict[str, tuple[dict[str, Any], Callable[[], Tensor]]] = {}
        for impl in impls:
            row = H.make_row(SUITE, f"{mcfg.n_layer}L d={mcfg.d} b={batch} s={seq}", impl, dtype=dtype,
                             M=batch * seq, K=mcfg.d, N=mcfg.d, r=r, batch=batch, seq=seq,
                             n_layer=mcfg.n_layer)
            try:
                model = build(base, impl, r, alpha, init)
                params = [p for p in model.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(params, lr=1e-3)

                def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt,
                         inp: Tensor = inp, labels: Tensor = labels) -> Tensor:
                    opt.zero_grad(set_to_none=True)
                    loss = model(inp, labels)
                    loss.backward()
                    opt.step()
                    return loss

                losses = [float(step().detach()) for _ in range(N_CHECK_STEPS)]
                if ref_losses is None:
                    ref_losses = losses
                err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
                ok = all(math.isfinite(v) for v in losses) and err <= LOSS_TOL[dtype]
                row.update(losses=losses, err=err, n_lora_params=sum(p.numel() for p in params))
            except Exception as e:  # noqa: BLE001 - a broken competitor is a failed row
                ok, model = False, None
                row["note"] = f"{type(e).__name__}: {e}"[:200]
            row["pass"] = bool(ok)
            rows.append(row)
            if ok and cfg.cuda:
                # One model at a time on the GPU, so that the absolute peak memory is its own.
                _timed(row, H.time_group(cfg, {impl: (step, None, False)}, rep_ms=2000)[impl], cfg, step)
                prog.step(f"{H.DTYPE_NAMES[dtype]} {row['case']} {impl}", row)
                del step
            elif ok:
                pending[impl] = (row, step)
            else:
                prog.step(f"{H.DTYPE_NAMES[dtype]} {row['case']} {impl}", row)
            del model
            if cfg.cuda:
                torch.cuda.empty_cache()
        # CPU: all models at once, steps interleaved (see harness.time_group).
        times = H.time_group(cfg, {k: (st, None, False) for k, (_, st) in pending.items()})
        for k, (row, st) in pending.items():
            _timed(row, times[k], cfg, st)
            prog.step(f"{H.DTYPE_NAMES[dtype]} {row['case']} {k}", row)
        pending.clear()
    eager = {r_["dtype"]: r_ for r_ in rows if r_["impl"] == "unfused_eager"}
    for r_ in rows:
        e = eager.get(r_["dtype"])
        if e and e["ms"] and r_["ms"]:
            r_["speedup_vs_eager"] = e["ms"] / r_["ms"]
            r_["noisy"] = H.is_noisy(r_, e)
    return rows


COLUMNS = [
    ("case", lambda r: r["case"]),
    ("dtype", lambda r: r["dtype"]),
    ("impl", lambda r: r["impl"]),
    ("ms/step", lambda r: r["ms"]),
    ("p20-p80", H.spread),
    ("tokens/s", lambda r: r.get("tokens_per_s")),
    ("vs eager", lambda r: r.get("speedup_vs_eager")),
    ("noisy", H.noisy_mark),
    ("peak MiB", lambda r: r["peak_mem_mb"]),
    ("loss err", lambda r: r.get("err")),
    ("check", lambda r: r["pass"]),
]
