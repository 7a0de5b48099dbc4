"""LoRA on mixture-of-experts layers (issue 12): fused_lora.moe_lora_linear, its custom ops, the
Triton grouped kernels (kernels/moe_lora.py) and MoELoRAExperts, against a per-row fp64 loop.

Tolerance: the 2x rule of tests/_utils.py -- the kernel's max error against fp64 is at most 2x
the error of the same per-row loop run in the inputs' dtype (+ a small atol). Outputs of
torch.empty inside the package are NaN-poisoned (conftest), so unwritten rows fail.
On CPU the Triton kernels run under TRITON_INTERPRET=1 (fp32, fp16; small shapes).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _utils import INTERPRET, TRITON_DEVICE, TRITON_DTYPES, assert_close_2x

import fused_lora
from fused_lora import ops
from fused_lora import reference as ref
from fused_lora.moe import MoELoRAExperts, moe_routing_plan

# Interpreter tiles are 16 rows x 32 columns: M=37 cuts segments at odd places, K=40 / N=36
# leave partial column tiles, r=8 a partial 16-wide rank chunk. E=5 experts.
M0, K0, N0, R0, E0 = 37, 40, 36, 8, 5
BACKENDS = [("torch", "cpu"), ("triton", TRITON_DEVICE)]


def _cuda_backend():
    """("cuda", device) where the C++/CUDA extension has the MoE ops: its CUDA kernels on a GPU
    build with a device, else its C++ CPU kernels on CPU tensors."""
    from fused_lora import _ext

    if _ext.ext_error() is not None or not _ext.has_op("moe_lora_linear"):
        return []
    return [("cuda", "cuda" if torch.cuda.is_available() and _ext.has_cuda_kernels() else "cpu")]


# The adapter-bank and top-k tests run every backend (the C++ twin takes banks and top-k rows).
BANK_BACKENDS = BACKENDS + _cuda_backend()
_REAL_EMPTY = torch.empty
# Dynamo builds its table of torch functions once per process, on first use; build it now (at
# collection, before conftest swaps torch.empty for its poisoning wrapper), or the real
# torch.empty is missing from it and reads as an untraceable builtin in test_compile_fullgraph.
torch._dynamo.trace_rules._allowed_callable_ids()


def _ids(pattern: str, M: int, E: int) -> torch.Tensor:
    """'mixed': expert 2 gets no row, expert 0 one row, the rest random; 'all': every row on
    expert E - 1 (one segment spanning several tiles)."""
    g = torch.Generator().manual_seed(7)
    if pattern == "all":
        return torch.full((M,), E - 1, dtype=torch.int64)
    ids = torch.tensor([1, 3, 4])[torch.randint(0, 3, (M,), generator=g)]
    ids[M // 2] = 0
    return ids


def _args(dtype, device, M=M0, K=K0, N=N0, R=R0, E=E0, bias=True, adapter_dtype=None):
    ad = adapter_dtype or dtype
    x = torch.randn(M, K).to(dtype).to(device)
    w = (torch.randn(E, N, K) / K**0.5).to(dtype).to(device)
    b = torch.randn(E, N).to(dtype).to(device) if bias else None
    A = (torch.randn(E, R, K) / K**0.5).to(ad).to(device)
    B = torch.randn(E, N, R).to(ad).to(device)
    return x, w, b, A, B


def _loop(x, w, b, A, B, s, ids, p, seed, dtype):
    """Per-row loop in ``dtype`` (fp64: ground truth), differentiable: y[m] = x[m] W[e]^T + b[e]
    + s (drop(x)[m] A[e]^T) B[e]^T."""
    xd = x.to(dtype)
    if p > 0:
        keep = ref.dropout_keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device)
        xd = torch.where(keep, xd / (1 - p), torch.zeros((), dtype=dtype))
    rows = []
    for m in range(x.shape[0]):
        e = int(ids[m])
        y = x[m].to(dtype) @ w[e].to(dtype).t() + s * ((xd[m] @ A[e].to(dtype).t()) @ B[e].to(dtype).t())
        if b is not None:
            y = y + b[e].to(dtype)
        rows.append(y)
    return torch.stack(rows)


def _grads(x, w, b, A, B, s, ids, p, seed, dtype, g):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, A, B)]
    y = _loop(leaves[0], w, b, leaves[1], leaves[2], s, ids, p, seed, dtype)
    y.backward(g.to(dtype))
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.interpreter
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("pattern,p", [("mixed", 0.0), ("all", 0.0), ("mixed", 0.25)])
def test_moe_fwd_bwd_vs_fp64_loop(backend, device, dtype, pattern, p):
    x, w, b, A, B = _args(dtype, device)
    ids = _ids(pattern, M0, E0).to(device)
    s, seed = 0.7, 12345
    plan = moe_routing_plan(ids, E0)
    y, xa = ops.moe_lora_linear_fwd(x, w, b, A, B, s, p, torch.tensor(seed) if p else None, plan.data,
                                    backend)
    g = torch.randn(M0, N0).to(dtype).to(device)
    dx, dA, dB = ops.moe_lora_linear_bwd(g, x, w, A, B, xa, s, p, torch.tensor(seed) if p else None,
                                         plan.data, True, True, True, backend)
    ids_c = ids.cpu()
    y64, (dx64, dA64, dB64) = _grads(x.cpu(), w.cpu(), b.cpu(), A.cpu(), B.cpu(), s, ids_c, p, seed,
                                     torch.float64, g.cpu())
    ypt, (dxpt, dApt, dBpt) = _grads(x.cpu(), w.cpu(), b.cpu(), A.cpu(), B.cpu(), s, ids_c, p, seed,
                                     dtype, g.cpu())
    assert y.dtype == dtype and xa.dtype == torch.float32
    for out, r64, pt, name in [(y, y64, ypt, "y"), (dx, dx64, dxpt, "dx"), (dA, dA64, dApt, "dA"),
                               (dB, dB64, dBpt, "dB")]:
        assert_close_2x(out.cpu(), r64, pt, name)
    present = set(ids_c.tolist())
    for e in range(E0):  # experts without rows: exact zeros, not merely small
        if e not in present:
            assert not dA[e].any() and not dB[e].any(), e


@pytest.mark.interpreter
def test_triton_dropout_drops_what_torch_drops():
    x, w, b, A, B = _args(torch.float32, TRITON_DEVICE)
    ids = _ids("mixed", M0, E0).to(TRITON_DEVICE)
    A.requires_grad_(True)
    out = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(3)  # the same seed drawn for both
        y = fused_lora.moe_lora_linear(x, w, A, B, 0.5, ids, bias=b, dropout_p=0.5, backend=backend)
        y.sum().backward()
        out[backend] = (y.detach().cpu(), A.grad.cpu())
        A.grad = None
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=1e-4, atol=1e-4)
    torch.manual_seed(3)
    y_eval = fused_lora.moe_lora_linear(x, w, A, B, 0.5, ids, bias=b, dropout_p=0.5, training=False,
                                        backend="triton")
    assert (y_eval.detach().cpu() - out["torch"][0]).abs().max() > 1e-3  # dropout did something


@pytest.mark.interpreter
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_transposed_weight_view(backend, device):
    """weight as a transposed view of an [E, in, out] tensor (older transformers' layout): read
    through strides, same result as the contiguous [E, out, in] weight."""
    x, w, b, A, B = _args(torch.float32, device, bias=False)
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)  # [E, out, in] view of [E, in, out] memory
    assert not wt.is_contiguous() and torch.equal(wt, w)
    ids = _ids("mixed", M0, E0).to(device)
    x.requires_grad_(True)
    y1 = fused_lora.moe_lora_linear(x, wt, A, B, 0.5, ids, backend=backend)
    (g1,) = torch.autograd.grad(y1.sum(), x)
    y2 = fused_lora.moe_lora_linear(x, w, A, B, 0.5, ids, backend=backend)
    (g2,) = torch.autograd.grad(y2.sum(), x)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(g1, g2)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_functional_leading_dims_plan_reuse_and_no_expert_rows(backend, device):
    x, w, b, A, B = _args(torch.float32, device, M=24)
    ids = _ids("mixed", 24, E0).to(device)
    ids[5] = -1  # a row routed to no expert: output row 0
    plan = moe_routing_plan(ids.view(4, 6), E0)
    y = fused_lora.moe_lora_linear(x.view(4, 6, K0), w, A, B, 0.5, plan, bias=b, backend=backend)
    y2 = fused_lora.moe_lora_linear(x.view(4, 6, K0), w, A, B, 0.5, ids.view(4, 6), bias=b, backend=backend)
    assert y.shape == (4, 6, N0)
    torch.testing.assert_close(y, y2)
    assert not y.reshape(24, N0)[5].any()
    keep = ids >= 0
    y64 = _loop(x[keep].cpu(), w.cpu(), b.cpu(), A.cpu(), B.cpu(), 0.5, ids[keep].cpu(), 0.0, 0,
                torch.float64)
    torch.testing.assert_close(y.reshape(24, N0)[keep].cpu().double(), y64, rtol=1e-4, atol=1e-4)


def test_bad_inputs():
    x, w, b, A, B = _args(torch.float32, "cpu")
    ids = _ids("mixed", M0, E0)
    f = fused_lora.moe_lora_linear
    with pytest.raises(ValueError, match="weight"):
        f(x, w[0], A, B, 0.5, ids)
    with pytest.raises(ValueError, match="x's last dim"):
        f(x[:, :-1], w, A, B, 0.5, ids)
    with pytest.raises(ValueError, match="lora_A"):
        f(x, w, A[:-1], B, 0.5, ids)
    with pytest.raises(ValueError, match="lora_B"):
        f(x, w, A, B[:, :, :-1], 0.5, ids)
    with pytest.raises(ValueError, match="bias"):
        f(x, w, A, B, 0.5, ids, bias=b[:-1])
    with pytest.raises(TypeError, match="weight dtype"):
        f(x, w.double(), A, B, 0.5, ids)
    with pytest.raises(TypeError, match="lora_B dtype"):
        f(x, w, A, B.double(), 0.5, ids)
    with pytest.raises(TypeError, match="expert_ids must be an integer"):
        f(x, w, A, B, 0.5, ids.float())
    with pytest.raises(TypeError, match="expert_ids must be a torch.Tensor"):
        f(x, w, A, B, 0.5, ids.tolist())
    with pytest.raises(ValueError, match="expert_ids must have x's leading shape"):
        f(x, w, A, B, 0.5, ids[:-1])
    with pytest.raises(ValueError, match=r"expert_ids must be in \[-1, E=5\)"):
        f(x, w, A, B, 0.5, torch.where(ids == 3, 5, ids))
    with pytest.raises(ValueError, match="E=4"):
        f(x, w, A, B, 0.5, moe_routing_plan(ids.clamp(max=3), 4))
    with pytest.raises(ValueError, match="dropout_p"):
        f(x, w, A, B, 0.5, ids, dropout_p=1.0)
    with pytest.raises(TypeError, match="training"):
        f(x, w, A, B, 0.5, ids, training="yes")
    with pytest.raises(ValueError, match="backend"):
        f(x, w, A, B, 0.5, ids, backend="nope")
    with pytest.raises(ValueError, match="rank r must be >= 1"):
        f(x, w, A[:, :0], B[:, :, :0], 0.5, ids)
    with pytest.raises(ValueError, match="plan"):  # the op checks the plan tensor's size
        ops.moe_lora_linear_fwd(x, w, b, A, B, 0.5, 0.0, None, moe_routing_plan(ids[:-1], E0).data, "torch")


@pytest.mark.interpreter
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck_moe_ops(backend, device):
    x, w, b, A, B = _args(torch.float32, device, M=20, K=24, N=20, R=4, E=3)
    ids = torch.tensor([0, 2] * 10).to(device)
    plan = moe_routing_plan(ids, 3).data
    for t in (x, A, B):
        t.requires_grad_(True)
    torch.library.opcheck(ops.moe_lora_linear_fwd, (x, w, b, A, B, 0.5, 0.0, None, plan, backend))
    x, A, B = x.detach(), A.detach(), B.detach()  # the backward op itself has no autograd
    y, xa = ops.moe_lora_linear_fwd(x, w, b, A, B, 0.5, 0.0, None, plan, backend)
    dy = torch.randn_like(y)
    torch.library.opcheck(ops.moe_lora_linear_bwd,
                          (dy, x, w, A, B, xa, 0.5, 0.0, None, plan, True, True, True, backend))


@pytest.mark.interpreter
@pytest.mark.parametrize("backend,device,compiler", [("torch", "cpu", "aot_eager"),
                                                     ("triton", TRITON_DEVICE, "aot_eager")])
def test_compile_fullgraph(backend, device, compiler, monkeypatch):
    torch._dynamo.reset()
    # conftest's NaN-poisoning torch.empty wrapper is not traceable by dynamo (it reads frames):
    # the plan's buffer is fully written anyway, so trace the real torch.empty (_REAL_EMPTY).
    monkeypatch.setattr(torch, "empty", _REAL_EMPTY)
    fused_lora.backends.names("moe_lora_linear")  # import every backend module outside the trace
    x, w, b, A, B = _args(torch.float32, device, M=20)
    ids = _ids("mixed", 20, E0).to(device)
    A.requires_grad_(True)
    B.requires_grad_(True)

    def fwd(inp, i):
        return fused_lora.moe_lora_linear(inp, w, A, B, 0.5, i, bias=b, backend=backend)

    compiled = torch.compile(fwd, fullgraph=True, backend=compiler)
    out_c = compiled(x, ids)
    out_c.square().mean().backward()
    gA, gB = A.grad.clone(), B.grad.clone()
    A.grad = B.grad = None
    out_e = fwd(x, ids)
    out_e.square().mean().backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(gA, A.grad)
    torch.testing.assert_close(gB, B.grad)
    ids2 = torch.roll(ids, 3)  # other routing, same shapes: nothing baked into the graph
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, ids2), fwd(x, ids2))


def test_double_backward_and_base_grads_on_reference_path():
    x, w, b, A, B = _args(torch.float64, "cpu", M=12, K=8, N=6, R=2, E=3)
    ids = torch.tensor([0, 2, 2, 0, 0, 2, 0, 0, 2, 2, 0, 0])
    for t in (x, w, b, A, B):
        t.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda *a: fused_lora.moe_lora_linear(a[0], a[1], a[3], a[4], 0.5, ids, bias=a[2], backend="torch"),
        (x, w, b, A, B))
    torch.autograd.gradgradcheck(
        lambda x_, A_: fused_lora.moe_lora_linear(x_, w, A_, B, 0.5, ids, bias=b, backend="torch"), (x, A))


# ----------------------------------------------------------------------------- module


def _tiny_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(cfg).eval()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moe_experts_equal_original_with_zero_lora_B_and_train(backend):
    from fused_lora.moe import MoELoRAExperts, inject_moe_lora

    model = _tiny_qwen3_moe()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ref_logits = model(ids).logits
    names = inject_moe_lora(model, r=4, lora_alpha=8, backend=backend)
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    experts = model.get_submodule(names[0])
    assert isinstance(experts, MoELoRAExperts)
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    # LoRA trains: gradients reach both projections' adapters of the experts that got rows.
    logits = model(ids).logits
    logits.square().mean().backward()
    assert experts.lora_B_gate_up_proj.grad.abs().sum() > 0
    assert experts.lora_B_down_proj.grad.abs().sum() > 0
    assert experts.gate_up_proj.grad is None


def test_moe_experts_with_lora_match_a_per_expert_loop():
    """Non-zero LoRA: the module equals transformers' own expert loop run on W + s B A."""
    from fused_lora.moe import MoELoRAExperts

    model = _tiny_qwen3_moe()
    base = model.model.layers[0].mlp.experts
    orig_gu, orig_d = base.gate_up_proj.detach().clone(), base.down_proj.detach().clone()
    m = MoELoRAExperts(base, r=4, lora_alpha=8, backend="torch")
    with torch.no_grad():
        m.lora_B_gate_up_proj.normal_()
        m.lora_B_down_proj.normal_()
    h = torch.randn(9, 32)
    idx = torch.randint(0, 4, (9, 2))
    w = torch.rand(9, 2)
    y = m(h, idx, w)
    with torch.no_grad():  # the delta weight, materialised here only as the test's reference
        base.gate_up_proj.copy_(orig_gu + m.scaling * m.lora_B_gate_up_proj @ m.lora_A_gate_up_proj)
        base.down_proj.copy_(orig_d + m.scaling * m.lora_B_down_proj @ m.lora_A_down_proj)
    torch.testing.assert_close(y, type(base).forward(base, h, idx, w), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- adapter banks, top-k rows


class CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten ops by name (sort, ...) under the mode."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


S0, TOPK = 3, 2


def _bank_args(dtype, device, T=19, K=K0, N=N0, R=R0, E=E0):
    """x [T, K] with top-k expert ids [T, TOPK] (expert 2 gets no row), adapter banks [S, E, ...]
    (slot 1 unused and NaN-poisoned), per-token adapter ids in [-1, S) (slot 1 never used),
    per-adapter scales."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(T, K, generator=g).to(dtype).to(device)
    w = (torch.randn(E, N, K, generator=g) / K**0.5).to(dtype).to(device)
    b = torch.randn(E, N, generator=g).to(dtype).to(device)
    A = (torch.randn(S0, E, R, K, generator=g) / K**0.5).to(dtype)
    B = torch.randn(S0, E, N, R, generator=g).to(dtype)
    A[1], B[1] = float("nan"), float("nan")
    ids = torch.tensor([0, 1, 3, 4])[torch.randint(0, 4, (T, TOPK), generator=g)]
    ids[3, 1] = -1  # a dropped (token, choice): no expert
    adapters = torch.tensor([-1, 0, 2])[torch.randint(0, 3, (T,), generator=g)]
    scales = torch.tensor([0.5, 7.0, 1.25])
    return x, w, b, A.to(device), B.to(device), ids.to(device), adapters.to(device), scales.to(device)


def _bank_loop(x, w, b, A, B, ids, adapters, scales, s, dtype):
    """Per-row loop in ``dtype``, differentiable: row (t, j) = x[t] W[e]^T + b[e] + s * scales[a] *
    (x[t] A[a, e]^T) B[a, e]^T, e = ids[t, j], a = adapters[t] (-1: no LoRA); e = -1: 0."""
    rows = []
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e, a = int(ids[t, j]), int(adapters[t])
            if e < 0:
                rows.append(torch.zeros(w.shape[1], dtype=dtype))
                continue
            y = x[t].to(dtype) @ w[e].to(dtype).t() + b[e].to(dtype)
            if a >= 0:
                xa = x[t].to(dtype) @ A[a, e].to(dtype).t()
                y = y + s * scales[a].to(dtype) * (xa @ B[a, e].to(dtype).t())
            rows.append(y)
    return torch.stack(rows).view(ids.shape[0], ids.shape[1], -1)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend,device", BANK_BACKENDS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_banks_and_topk_rows_vs_fp64_loop(backend, device, dtype):
    """Mixed adapters over one MoE (an adapter x expert pair is one virtual expert) with top-k
    rows read in place: forward, dx (summed over a token's k rows), dA / dB per adapter and
    expert, against the per-row loop; unused slots (NaN-poisoned) and experts without rows get
    exact-zero gradients."""
    x, w, b, A, B, ids, adapters, scales = _bank_args(dtype, device)
    s = 0.8
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    y = fused_lora.moe_lora_linear(x, w, A, B, scales * s, ids, bias=b, adapter_ids=adapters, backend=backend)
    assert y.shape == (19, TOPK, N0) and y.dtype == dtype
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype).to(device)
    y.backward(g)
    cpu = [t.detach().cpu() for t in (x, w, b, A, B, ids, adapters, scales)]
    ref = {}
    for dt in (torch.float64, dtype):
        leaves = [cpu[0].to(dt).requires_grad_(True), cpu[3].to(dt).requires_grad_(True),
                  cpu[4].to(dt).requires_grad_(True)]
        yl = _bank_loop(leaves[0], cpu[1], cpu[2], leaves[1], leaves[2], cpu[5], cpu[6], cpu[7], s, dt)
        yl.backward(g.cpu().to(dt))
        ref[dt] = (yl.detach(), *[t.grad.nan_to_num(0.0) for t in leaves])
    for i, (out, name) in enumerate([(y, "y"), (x.grad, "dx"), (A.grad, "dA"), (B.grad, "dB")]):
        out = out.detach().cpu()
        if name in ("dA", "dB"):
            assert not out[1].any(), f"{name}: the unused slot got a gradient"
            assert not out[:, 2].any(), f"{name}: expert 2 (no rows) got a gradient"
        assert_close_2x(out, ref[torch.float64][i], ref[dtype][i], name)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend,device", BANK_BACKENDS)
def test_bank_rows_without_adapter_are_the_base_bit_exact(backend, device):
    """Rows with adapter -1 are what the same backend gives when every adapter id is -1 (bit
    for bit on the reference and on a GPU; see the interpreter note), and a batch without
    adapters reads no bank (NaN banks and scales change nothing)."""
    x, w, b, A, B, ids, adapters, scales = _bank_args(torch.float32, device)
    f = fused_lora.moe_lora_linear
    y = f(x, w, A, B, scales, ids, bias=b, adapter_ids=adapters, backend=backend)
    none = torch.full_like(adapters, -1)
    y0 = f(x, w, A, B, scales, ids, bias=b, adapter_ids=none, backend=backend)
    rows = adapters == -1
    assert rows.any() and (~rows).any()
    if INTERPRET and backend == "triton":
        # The interpreter's tl.dot is numpy's sgemm, whose rounding depends on a row's position
        # in the tile; a GPU MMA computes every row alike, so the bit-exact check runs there.
        torch.testing.assert_close(y[rows], y0[rows], rtol=5e-7, atol=5e-7)
    else:
        assert torch.equal(y[rows], y0[rows])
    y0n = f(x, w, A * float("nan"), B, scales * float("nan"), ids, bias=b, adapter_ids=none, backend=backend)
    assert torch.equal(y0n, y0)
    # ... and equals the one-adapter op with a zero adapter (the base MoE).
    zA, zB = torch.zeros_like(A[0]), torch.zeros_like(B[0])
    torch.testing.assert_close(y0, f(x, w, zA, zB, 1.0, ids, bias=b, backend=backend), rtol=1e-6, atol=1e-6)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend,device", BANK_BACKENDS)
def test_topk_rows_read_in_place_equal_copied_rows(backend, device):
    """x [T, in] with expert ids [T, k] gives what the copied rows x[t] (k times) give, dx summed
    per token, and the top-k rows are never materialised: the op's saved x is x itself."""
    x, w, b, A, B = _args(torch.float32, device, M=11)
    ids = torch.randint(0, E0, (11, 3), generator=torch.Generator().manual_seed(2)).to(device)
    x.requires_grad_(True)
    y = fused_lora.moe_lora_linear(x, w, A, B, 0.5, ids, bias=b, backend=backend)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    xr = x.detach().repeat_interleave(3, 0).requires_grad_(True)
    yr = fused_lora.moe_lora_linear(xr, w, A, B, 0.5, ids.reshape(-1), bias=b, backend=backend)
    (gr,) = torch.autograd.grad(yr.square().sum(), xr)
    torch.testing.assert_close(y.reshape(33, N0), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gr.view(11, 3, K0).sum(1), rtol=1e-5, atol=1e-5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_lora.moe_lora_linear(x, w, A, B, 0.5, ids, bias=b, backend=backend)
    assert not [t for t in saved if t.shape[0] == 33 and t.shape[-1] == K0], "top-k copies of x were saved"


def test_bank_bad_inputs():
    x, w, b, A, B, ids, adapters, scales = _bank_args(torch.float32, "cpu")
    f = fused_lora.moe_lora_linear
    with pytest.raises(ValueError, match="pass adapter_ids"):
        f(x, w, A, B, scales, ids)
    with pytest.raises(ValueError, match="adapter_ids needs adapter banks"):
        f(x, w, A[0], B[0], 0.5, ids, adapter_ids=adapters)
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, n_slots=3\)"):
        f(x, w, A, B, scales, ids, adapter_ids=torch.where(adapters == 2, 3, adapters))
    with pytest.raises(ValueError, match="adapter_ids must have x's leading shape"):
        f(x, w, A, B, scales, ids, adapter_ids=adapters[:-1])
    with pytest.raises(ValueError, match=r"one per adapter \[S=3\]"):
        f(x, w, A, B, scales[:2], ids, adapter_ids=adapters)
    with pytest.raises(ValueError, match=r"lora_B must be \[S=3, E=5"):
        f(x, w, A, B[:, :, :-1], scales, ids, adapter_ids=adapters)
    with pytest.raises(ValueError, match="or \\(19,\\) \\+ \\(k,\\)"):
        f(x, w, A, B, scales, ids[:-1], adapter_ids=adapters)
    plan = moe_routing_plan(ids, E0)  # built without the adapters
    with pytest.raises(ValueError, match=r"built over 5 ids but the layer has E=5 experts and a bank of S=3"):
        f(x, w, A, B, scales, plan)
    plan = moe_routing_plan(ids, E0, adapter_ids=adapters, n_slots=S0)
    y = f(x, w, A, B, scales, plan)  # the plan carries the adapters
    torch.testing.assert_close(y, f(x, w, A, B, scales, ids, adapter_ids=adapters))
    with pytest.raises(ValueError, match="slot_scales"):
        ops.moe_lora_linear_fwd(x, w, None, A[0], B[0], 1.0, 0.0, None, moe_routing_plan(ids, E0).data,
                                "torch", scales, TOPK)


def test_bank_plan_is_built_once_per_layer_and_reused_in_backward():
    """One routing plan per MoE layer call (the virtual experts of the batch): gate_up and down
    read it, and their backward sorts nothing."""
    model = _tiny_qwen3_moe()
    from fused_lora.moe import MoEMultiLoRAExperts

    base = model.model.layers[0].mlp.experts
    bank = MoEMultiLoRAExperts(base, 3, 4, backend="torch", trainable=True)
    with torch.no_grad():
        for p in ("gate_up_proj", "down_proj"):
            getattr(bank, f"lora_A_{p}").normal_()
            getattr(bank, f"lora_B_{p}").normal_()
            getattr(bank, f"scales_{p}").fill_(0.5)
    h = torch.randn(9, 32, requires_grad=True)
    idx = torch.randint(0, 4, (9, 2))
    wts = torch.rand(9, 2)
    adapters = torch.tensor([0, 1, -1, 2, 0, 0, -1, 1, 2])
    with CountOps() as fwd:
        y = bank(h, idx, wts, adapter_ids=adapters)
    with CountOps() as bwd:
        y.square().sum().backward()
    assert fwd.counts.get("sort", 0) == 1, fwd.counts
    assert bwd.counts.get("sort", 0) == 0, bwd.counts
    # Each token equals its adapter alone (a one-adapter module over the same base).
    for a in (-1, 0, 1, 2):
        rows = adapters == a
        one = MoELoRAExperts(copy.deepcopy(base), r=4, lora_alpha=2.0, backend="torch")  # scale 0.5
        if a >= 0:
            with torch.no_grad():
                for p in ("gate_up_proj", "down_proj"):
                    getattr(one, f"lora_A_{p}").copy_(getattr(bank, f"lora_A_{p}")[a])
                    getattr(one, f"lora_B_{p}").copy_(getattr(bank, f"lora_B_{p}")[a])
        else:
            with torch.no_grad():
                for p in ("gate_up_proj", "down_proj"):
                    getattr(one, f"lora_B_{p}").zero_()
        torch.testing.assert_close(y[rows], one(h[rows], idx[rows], wts[rows]), rtol=1e-5, atol=1e-5)


def test_opcheck_bank_and_topk_ops():
    """The op schemas with adapter banks, per-adapter scales and top-k rows (fake impls, autograd
    registration) pass torch.library.opcheck."""
    x, w, b, A, B, ids, adapters, scales = _bank_args(torch.float32, "cpu", T=8, K=16, N=12, R=4)
    plan = moe_routing_plan(ids, E0, adapter_ids=adapters, n_slots=S0).data
    A, B = A.nan_to_num(0.0), B.nan_to_num(0.0)
    for t in (x, A, B):
        t.requires_grad_(True)
    torch.library.opcheck(ops.moe_lora_linear_fwd,
                          (x, w, b, A, B, 0.5, 0.0, None, plan, "torch", scales, TOPK))
    x, A, B = x.detach(), A.detach(), B.detach()
    y, xa = ops.moe_lora_linear_fwd(x, w, b, A, B, 0.5, 0.0, None, plan, "torch", scales, TOPK)
    torch.library.opcheck(ops.moe_lora_linear_bwd, (torch.randn_like(y), x, w, A, B, xa, 0.5, 0.0, None, plan,
                                                    True, True, True, "torch", scales, TOPK))


def test_modules_compile_fullgraph(monkeypatch):
    """MoELoRAExperts and MoEMultiLoRAExperts (plan built inside the layer) under
    torch.compile(fullgraph=True): same outputs and gradients as eager."""
    from fused_lora.moe import MoEMultiLoRAExperts

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "empty", _REAL_EMPTY)
    fused_lora.backends.names("moe_lora_linear")
    base = _tiny_qwen3_moe().model.layers[0].mlp.experts
    single = MoELoRAExperts(copy.deepcopy(base), r=4, lora_alpha=8, backend="torch")
    multi = MoEMultiLoRAExperts(copy.deepcopy(base), 3, 4, backend="torch", trainable=True)
    with torch.no_grad():
        single.lora_B_down_proj.normal_()
        for p in ("gate_up_proj", "down_proj"):
            getattr(multi, f"lora_A_{p}").normal_()
            getattr(multi, f"lora_B_{p}").normal_()
            getattr(multi, f"scales_{p}").fill_(0.5)
    h = torch.randn(9, 32)
    idx = torch.randint(0, 4, (9, 2))
    wts = torch.rand(9, 2)
    for mod, extra in ((single, ()), (multi, (torch.tensor([0, 1, -1, 2, 0, 0, -1, 1, 2]),))):
        compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
        yc = compiled(h, idx, wts, *extra)
        yc.square().sum().backward()
        gc = [p.grad.clone() for p in mod.parameters() if p.requires_grad]
        mod.zero_grad()
        ye = mod(h, idx, wts, *extra)
        ye.square().sum().backward()
        torch.testing.assert_close(yc, ye)
        for a, b in zip(gc, [p.grad for p in mod.parameters() if p.requires_grad]):
            torch.testing.assert_close(a, b)
