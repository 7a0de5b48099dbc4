"""FusedLoRALinear: construction, PEFT layout, merge/unmerge, dropout, train/eval; MultiLoRALinear:
loading / unloading adapters into its bank, training two of them, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _utils import TRITON_DEVICE

import fused_lora
from fused_lora import FusedLoRALinear
from fused_lora import reference as ref


def test_fresh_layer_equals_base_and_peft_layout():
    layer = FusedLoRALinear(24, 16, r=4, lora_alpha=8)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    assert layer.lora_A.weight.shape == (4, 24) and layer.lora_B.weight.shape == (16, 4)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.lora_A.weight) > 0
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer.scaling == 2.0


def test_rslora_scaling():
    assert FusedLoRALinear(8, 8, r=16, lora_alpha=8, use_rslora=True).scaling == 8 / math.sqrt(16)


def test_from_linear_shares_frozen_params():
    lin = torch.nn.Linear(12, 10)
    layer = FusedLoRALinear.from_linear(lin, r=2, lora_alpha=4)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    assert not lin.weight.requires_grad
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 12)
    want = lin(x) + 2.0 * (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="linear"):
        FusedLoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1))


def test_training_only_updates_adapters():
    layer = FusedLoRALinear(12, 10, r=2)
    w0, b0 = layer.weight.clone(), layer.bias.clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(4, 12)).square().sum().backward()
        opt.step()
    assert torch.equal(layer.weight, w0) and torch.equal(layer.bias, b0)
    assert torch.count_nonzero(layer.lora_B.weight) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_merge_exact_unmerge(dtype):
    layer = FusedLoRALinear(64, 48, r=8, lora_alpha=16, dtype=dtype)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    w0 = layer.weight.detach().clone()
    x = torch.randn(7, 64, dtype=dtype)
    layer.eval()
    y_unmerged = layer(x)
    layer.merge()
    assert layer.merged
    # Merged weight = round(W0 + s B A computed in fp32): one rounding.
    want = (w0.float() + layer.delta_weight()).to(dtype)
    assert torch.equal(layer.weight, want)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(layer(x).float(), y_unmerged.float(), rtol=5e-2, atol=5e-2)
    for _ in range(5):
        layer.unmerge()
        assert torch.equal(layer.weight, w0)  # bit-exact restore
        layer.merge()
    layer.unmerge()
    assert torch.equal(layer.weight, w0) and not layer.merged


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_merge_without_copy_is_within_one_rounding_and_does_not_drift(dtype):
    layer = FusedLoRALinear(64, 48, r=8, lora_alpha=16, dtype=dtype)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    w0 = layer.weight.detach().clone()
    layer.eval().merge(exact_unmerge=False)
    wm = layer.weight.detach().clone()
    layer.unmerge()
    w1 = layer.weight.detach().clone()
    # Within one rounding of the merged weight W' = round(W0 + dW): the only information lost
    # is W''s rounding, so |W'' - W0| <= ulp at max(|W0|, |W'|).
    mag = torch.maximum(w0.float().abs(), wm.float().abs())
    ulp = torch.finfo(dtype).eps * mag.clamp_min(torch.finfo(dtype).tiny)
    assert ((w1.float() - w0.float()).abs() <= ulp * 1.0001).all()
    for _ in range(10):
        layer.merge(exact_unmerge=False)
        layer.unmerge()
        assert torch.equal(layer.weight, w1)  # a fixed point: cycles never accumulate error


def test_train_unmerges_and_merged_forward_is_base_gemm():
    layer = FusedLoRALinear(16, 8, r=2)
    torch.nn.init.normal_(layer.lora_B.weight)
    w0 = layer.weight.detach().clone()
    layer.eval().merge()
    assert layer.merged
    layer.train()
    assert not layer.merged and torch.equal(layer.weight, w0)


def test_dropout_train_eval_and_seed_determinism():
    layer = FusedLoRALinear(32, 16, r=4, lora_dropout=0.5)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(8, 32)
    torch.manual_seed(5)
    y1 = layer(x)
    torch.manual_seed(5)
    y2 = layer(x)
    y3 = layer(x)
    assert torch.equal(y1, y2)  # same torch seed -> same mask
    assert not torch.equal(y2, y3)  # next draw -> another mask
    layer.eval()
    ye = layer(x)
    want = F.linear(x, layer.weight, layer.bias) + layer.scaling * (
        x @ layer.lora_A.weight.t() @ layer.lora_B.weight.t()
    )
    torch.testing.assert_close(ye, want, rtol=1e-5, atol=1e-5)


def test_dropout_mask_statistics():
    M, K = 1000, 1000
    for p in (0.05, 0.1, 0.5):
        keep = ref.dropout_keep_mask(1234, M, K, p).float()
        assert abs(keep.mean().item() - (1 - p)) < 0.003
        # No correlation between neighbours along rows or columns (|r| < 0.01 for 1e6 samples).
        k = keep - keep.mean()
        for a, b in ((k[:, 1:], k[:, :-1]), (k[1:], k[:-1])):
            corr = (a * b).mean() / k.var()
            assert abs(corr.item()) < 0.01
    m1 = ref.dropout_keep_mask(1, 200, 200, 0.5)
    m2 = ref.dropout_keep_mask(2, 200, 200, 0.5)
    assert 0.45 < (m1 != m2).float().mean().item() < 0.55  # independent across seeds


def test_dropout_hash_high_index_bits():
    # Indices past 2^32 (M*K > 4e9 elements) mix the high word in: no aliasing with index-2^32.
    idx = torch.tensor([5, 5 + (1 << 32), 5 + (2 << 32)], dtype=torch.int64)
    h = ref.dropout_hash(77, idx)
    assert len(set(h.tolist())) == 3


def test_activation_checkpointing_replays_dropout_mask():
    layer = FusedLoRALinear(16, 12, r=4, lora_dropout=0.3)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 16, requires_grad=True)
    torch.manual_seed(3)
    layer(x).sum().backward()
    g_plain = layer.lora_A.weight.grad.clone()
    layer.zero_grad()
    torch.manual_seed(3)
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).sum().backward()
    torch.testing.assert_close(layer.lora_A.weight.grad, g_plain)


@pytest.mark.interpreter
def test_module_triton_backend_matches_torch_backend():
    lin = torch.nn.Linear(40, 24, device=TRITON_DEVICE)
    a = FusedLoRALinear.from_linear(lin, r=4, backend="triton")
    b = FusedLoRALinear.from_linear(lin, r=4, backend="torch")
    torch.nn.init.normal_(a.lora_B.weight)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 9, 40, device=TRITON_DEVICE)
    torch.testing.assert_close(a(x), b(x.cpu()).to(x.device), rtol=1e-5, atol=1e-5)


def test_fp32_adapters_under_autocast():
    # Under autocast x/weight run in bf16 like F.linear; fp32 adapters are read as they are.
    layer = FusedLoRALinear(32, 16, r=4, adapter_dtype=torch.float32)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    want = fused_lora.reference.lora_linear(
        x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16(), layer.lora_A.weight,
        layer.lora_B.weight, layer.scaling,
    )
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("kwargs,match", [
    ({"r": 0}, "r must be"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"backend": "nope"}, "backend"),
])
def test_module_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedLoRALinear(8, 8, **kwargs)


# ----------------------------------------------------------------------------- MultiLoRALinear


@pytest.mark.parametrize("backend,device", [("torch", "cpu"), ("triton", TRITON_DEVICE)])
def test_module_load_unload_and_train_two_adapters(backend, device):
    base = torch.nn.Linear(20, 18, device=device)
    m = fused_lora.MultiLoRALinear(base, n_slots=5, max_rank=8, backend=backend)
    assert m.weight is base.weight and not m.weight.requires_grad  # shared, frozen
    a1, b1 = torch.randn(8, 20, device=device), torch.randn(18, 8, device=device)
    a2, b2 = torch.randn(3, 20, device=device), torch.randn(18, 3, device=device)
    m.load_adapter(1, a1, b1, 0.5)
    m.load_adapter(3, a2, b2, 2.0)  # smaller rank: zero-padded, rank 3
    assert m.ranks.tolist() == [0, 8, 0, 3, 0]
    x = torch.randn(2, 6, 20, device=device)
    ids = torch.tensor([[1, 3, -1, 1, 0, 3], [3, 3, 1, -1, -1, 1]], device=device)
    y = m(x, ids)
    expect = ref.multi_lora_linear(x.double(), base.weight.double(), base.bias.double(),
                                   m.lora_A.double(), m.lora_B.double(), m.scales, ids, m.ranks)
    torch.testing.assert_close(y, expect.float(), rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    gA, gB = m.lora_A.grad, m.lora_B.grad
    assert gA.abs()[1].sum() > 0 and gA.abs()[3, :3].sum() > 0 and gB.abs()[[1, 3]].sum() > 0
    assert torch.count_nonzero(gA[[0, 2, 4]]) == 0 and torch.count_nonzero(gB[[0, 2, 4]]) == 0
    assert torch.count_nonzero(gA[3, 3:]) == 0 and torch.count_nonzero(gB[3, :, 3:]) == 0
    assert base.weight.grad is None
    m.unload_adapter(1)
    with torch.no_grad():
        y2 = m(x, ids)
        y_base = F.linear(x, base.weight, base.bias)
    keep = (ids == 3)
    torch.testing.assert_close(y2[~keep], y_base[~keep])


def test_module_bad_input():
    base = torch.nn.Linear(8, 6)
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        fused_lora.MultiLoRALinear(torch.nn.Conv1d(1, 1, 1), 2, 4)
    with pytest.raises(ValueError, match="max_rank must be"):
        fused_lora.MultiLoRALinear(base, 2, 0)
    m = fused_lora.MultiLoRALinear(base, 2, 4)
    with pytest.raises(ValueError, match="adapter rank must be"):
        m.load_adapter(0, torch.randn(5, 8), torch.randn(6, 5), 1.0)
    with pytest.raises(ValueError, match="slot must be"):
        m.load_adapter(2, torch.randn(2, 8), torch.randn(6, 2), 1.0)
    with pytest.raises(ValueError, match="lora_B must be"):
        m.load_adapter(0, torch.randn(2, 8), torch.randn(6, 3), 1.0)
    with pytest.raises(ValueError, match="adapter_ids is required"):
        m(torch.randn(3, 8))
