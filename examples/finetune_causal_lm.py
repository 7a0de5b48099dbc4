"""Fine-tune a small causal LM with fused_lora.inject_lora, next to PEFT with the same init.

The model is a tiny Llama (GQA attention, SwiGLU MLP) built from a transformers config with random
weights (nothing is downloaded); LoRA goes on q/k/v/o and gate/up/down. The data set is
synthetic: arithmetic sequences ``t_{i+1} = (t_i + step) mod vocab`` with a per-sequence step,
so the loss falls steadily. Both runs start from the same base weights and the same LoRA init
(PEFT's, copied into the fused layers), see the same batches and use the same AdamW; the script
prints both loss curves, checks that they agree within ``--tol`` (relative) and times each run.

    python examples/finetune_causal_lm.py                      # CPU defaults, well under a minute
    python examples/finetune_causal_lm.py --device cuda --hidden 1024 --layers 4 --seq 512 \
        --batch 8 --steps 50 --dtype bfloat16 --tol 2e-2

Needs ``pip install peft transformers``. Dropout is 0 by default: with dropout the two runs draw
different masks (fused_lora's dropout is statistically, not bitwise, equal to nn.Dropout).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Callable, List

import torch

import fused_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: List[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="base model dtype (adapters stay fp32, as PEFT keeps them)")
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--backend", default="auto", help="fused_lora backend: auto, triton, cuda, torch")
    p.add_argument("--tol", type=float, default=1e-3, help="max relative loss difference allowed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dir", default=None, help="write the fused adapter here in PEFT's format")
    return p.parse_args(argv)


def make_batches(args: argparse.Namespace) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed + 1)
    out = []
    for _ in range(args.steps):
        start = torch.randint(0, args.vocab, (args.batch, 1), generator=g)
        step = torch.randint(1, 4, (args.batch, 1), generator=g)
        out.append((start + step * torch.arange(args.seq)) % args.vocab)
    return out


def train_both(models: dict, batches: List[torch.Tensor], args: argparse.Namespace,
               sync: Callable[[], None]) -> dict:
    """AdamW on each model's trainable (LoRA) parameters, the models taking turns step by step
    (so that machine noise -- other processes, clocks -- hits both timings alike); returns
    {name: (losses, seconds)}."""
    opts, losses, secs = {}, {}, {}
    for name, model in models.items():
        model.train()
        opts[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        losses[name], secs[name] = [], 0.0
    for ids in batches:
        ids = ids.to(args.device)
        for name, model in models.items():
            sync()
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            sync()
            secs[name] += time.perf_counter() - t0
            losses[name].append(float(loss.detach()))
    return {name: (losses[name], secs[name]) for name in models}


def main(argv: List[str] = None) -> int:
    args = parse_args(argv)
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("this example needs: pip install peft transformers", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=max(64, args.seq),
    )
    base = LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype)

    # PEFT: its own init (A kaiming-uniform, B zero) and fp32 adapters on a low-precision base.
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, use_rslora=args.rslora,
        target_modules=TARGETS,
    ))
    # fused_lora: the same modules, then PEFT's initial adapter weights copied in.
    fused = copy.deepcopy(base)
    names = fused_lora.inject_lora(
        fused, TARGETS, r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
        use_rslora=args.rslora, backend=args.backend,
        adapter_dtype=torch.float32 if dtype != torch.float32 else None,
    )
    init = {k.replace("base_model.model.", "").replace(".default", ""): v
            for k, v in peft_model.state_dict().items() if ".lora_" in k}
    missing, unexpected = fused.load_state_dict(init, strict=False)
    assert not unexpected and not [k for k in missing if ".lora_" in k], (missing, unexpected)
    n_train = sum(p.numel() for p in fused.parameters() if p.requires_grad)
    print(f"{len(names)} layers with LoRA r={args.r}, {n_train} trainable parameters, "
          f"device={args.device}, dtype={args.dtype}")

    batches = make_batches(args)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    # A warm-up step on throwaway copies, so that neither timing includes one-off start-up costs
    # (kernel compilation / autotuning, allocator growth).
    train_both({"peft": copy.deepcopy(peft_model), "fused": copy.deepcopy(fused)}, batches[:1], args, sync)
    res = train_both({"peft": peft_model, "fused": fused}, batches, args, sync)
    (peft_losses, peft_s), (fused_losses, fused_s) = res["peft"], res["fused"]

    print(f"{'step':>4} {'peft loss':>10} {'fused loss':>10} {'rel diff':>9}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(peft_losses, fused_losses)):
        rel = abs(a - b) / max(abs(a), 1e-12)
        worst = max(worst, rel)
        print(f"{i:>4} {a:>10.5f} {b:>10.5f} {rel:>9.2e}")
    print(f"PEFT:       {peft_s:7.3f} s ({1e3 * peft_s / args.steps:.2f} ms/step)")
    print(f"fused_lora: {fused_s:7.3f} s ({1e3 * fused_s / args.steps:.2f} ms/step), "
          f"speed-up x{peft_s / fused_s:.2f}")
    if args.save_dir:
        fused_lora.save_peft_adapter(fused, args.save_dir)
        print(f"adapter written in PEFT's format to {args.save_dir}")
    ok = worst <= args.tol
    print(f"loss curves {'agree' if ok else 'DISAGREE'}: max relative difference {worst:.2e} "
          f"(tolerance {args.tol:.0e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
