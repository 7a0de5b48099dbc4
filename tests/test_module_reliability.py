"""Module footguns (issue 14): merged state through state dicts, train mode and tied weights;
constructor validation; atomic MultiLoRALinear.load_adapter; meta-device construction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_lora import FusedLoRALinear, MultiLoRALinear
from fused_lora.modules import MERGED_KEY, shared_weight_names


def _layer(seed: int, dtype: torch.dtype = torch.float32, **kw) -> FusedLoRALinear:
    torch.manual_seed(seed)
    layer = FusedLoRALinear(24, 16, r=4, lora_alpha=8, backend="torch", dtype=dtype, **kw)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    return layer


def _expected(layer: FusedLoRALinear, x: torch.Tensor) -> torch.Tensor:
    # Unmerged output in fp64 from the layer's current W0, A, B.
    return F.linear(x.double(), layer.weight.double(), layer.bias.double()) + layer.scaling * (
        x.double() @ layer.lora_A.weight.double().t() @ layer.lora_B.weight.double().t()
    )


# ------------------------------------------------------------------ merged state, state dicts


def test_unmerged_state_dict_keeps_peft_keys():
    # The merged marker appears only when merged: unmerged checkpoints are unchanged.
    layer = _layer(0)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    layer.eval().merge()
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight", MERGED_KEY}
    layer.unmerge()
    assert MERGED_KEY not in layer.state_dict()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_load_unmerged_state_into_merged_layer(dtype):
    # Old code: the loaded W0 was taken as the merged weight (forward lost the adapter) and
    # unmerge() then subtracted the new adapter from it, corrupting W0.
    dst, src = _layer(0, dtype).eval(), _layer(1, dtype).eval()
    dst.merge()
    dst.load_state_dict(src.state_dict())
    assert dst.merged  # it stays in the mode the user put it in, now with src's adapter
    x = torch.randn(5, 24, dtype=dtype)
    torch.testing.assert_close(dst(x), src(x), rtol=2e-2, atol=2e-2)
    dst.unmerge()
    assert torch.equal(dst.weight, src.weight)  # W0 exactly the loaded one
    assert torch.equal(dst(x), src(x))


def test_load_adapter_only_into_merged_layer():
    # strict=False with only the adapter keys (the usual "load an adapter" call): the merged
    # weight must be rebuilt from W0 and the new adapter, and W0 must survive.
    dst, src = _layer(0).eval(), _layer(1).eval()
    w0 = dst.weight.detach().clone()
    dst.merge()
    adapter = {k: v for k, v in src.state_dict().items() if k.startswith(("lora_A.", "lora_B."))}
    dst.load_state_dict(adapter, strict=False)
    x = torch.randn(5, 24)
    want = F.linear(x, w0, dst.bias) + src.scaling * (x @ src.lora_A.weight.t() @ src.lora_B.weight.t())
    torch.testing.assert_close(dst(x), want, rtol=1e-5, atol=1e-5)
    dst.unmerge()
    assert torch.equal(dst.weight, w0)


def test_merged_state_into_fresh_eval_layer_is_not_applied_twice():
    src = _layer(0).eval()
    w0 = src.weight.detach().clone()
    x = torch.randn(5, 24)
    want = _expected(src, x)
    src.merge()
    dst = _layer(7).eval()
    dst.load_state_dict(src.state_dict())
    assert dst.merged
    assert torch.equal(dst(x), src(x))  # the same merged GEMM
    torch.testing.assert_close(dst(x).double(), want, rtol=1e-5, atol=1e-5)
    dst.unmerge()  # no exact record travels in a state dict: within one rounding
    torch.testing.assert_close(dst.weight, w0, rtol=0, atol=1e-6)


def test_merged_state_into_training_layer_is_unmerged():
    # A training layer must not hold a merged weight (its forward would have no LoRA grads).
    src = _layer(0).eval()
    w0 = src.weight.detach().clone()
    src.merge()
    dst = _layer(7)  # train mode
    dst.load_state_dict(src.state_dict())
    assert not dst.merged
    torch.testing.assert_close(dst.weight, w0, rtol=0, atol=1e-6)
    x = torch.randn(5, 24)
    dst(x).sum().backward()
    assert dst.lora_B.weight.grad is not None


def test_merged_weight_without_its_adapter_is_refused():
    src = _layer(0).eval()
    src.merge()
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith(("lora_A.", "lora_B."))}
    assert MERGED_KEY in sd
    with pytest.raises(RuntimeError, match="merged"):
        _layer(7).eval().load_state_dict(sd, strict=False)


def test_merged_state_into_plain_linear_fails_strict_load():
    # The marker makes a merged checkpoint fail loudly where it is not understood.
    src = _layer(0).eval()
    src.merge()
    plain = nn.Linear(24, 16)
    plain.lora_A, plain.lora_B = nn.Linear(24, 4, bias=False), nn.Linear(4, 16, bias=False)
    with pytest.raises(RuntimeError, match=MERGED_KEY):
        plain.load_state_dict(src.state_dict())


def test_adapter_changed_while_merged_still_unmerges_to_w0():
    # unmerge() subtracts the adapter merge() added, not whatever A/B hold now.
    layer = _layer(0).eval()
    w0 = layer.weight.detach().clone()
    layer.merge()
    nn.init.normal_(layer.lora_B.weight)
    with torch.no_grad():
        layer.lora_alpha = 3.0
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("exact", [True, False])
def test_merged_layer_survives_to_dtype_and_device(exact):
    # The unmerge records follow .to(): a merged fp32 layer converted to fp64 unmerges.
    layer = _layer(0).eval()
    w0 = layer.weight.detach().clone()
    layer.merge(exact_unmerge=exact)
    layer.double()
    layer.unmerge()
    assert layer.weight.dtype == torch.float64
    torch.testing.assert_close(layer.weight, w0.double(), rtol=0, atol=1e-6)


def test_merge_in_train_mode_is_refused():
    layer = _layer(0)
    w0 = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"eval\(\)"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, w0)
    layer.eval().merge()
    assert layer.merged


def test_train_with_non_bool_mode_keeps_merged_state():
    layer = _layer(0).eval()
    layer.merge()
    merged_w = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="boolean"):
        layer.train("no")
    assert layer.merged and not layer.training and torch.equal(layer.weight, merged_w)


# ------------------------------------------------------------------ tied weights


class _Tied(nn.Module):
    def __init__(self, share_storage_only: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 24)
        self.head = FusedLoRALinear(24, 16, r=2, bias=False, backend="torch")
        if share_storage_only:
            self.head.weight = nn.Parameter(self.embed.weight.data, requires_grad=False)
        else:
            self.head.weight = self.embed.weight  # lm_head tied to the embedding
        nn.init.normal_(self.head.lora_B.weight)


@pytest.mark.parametrize("share_storage_only", [False, True])
def test_merge_refuses_tied_weight(share_storage_only):
    model = _Tied(share_storage_only).eval()
    e0 = model.embed.weight.detach().clone()
    assert shared_weight_names(model, model.head) == ["embed.weight"]
    with pytest.raises(RuntimeError, match=r"embed\.weight"):
        model.head.merge(model=model)
    assert not model.head.merged and torch.equal(model.embed.weight, e0)


def test_shared_weight_names_ignores_disjoint_views_and_reused_layer():
    # Slices of one fused parameter that do not overlap are not ties; the same layer reached
    # under two names is the same layer.
    fused = nn.Parameter(torch.randn(32, 24), requires_grad=False)
    model = nn.Module()
    model.q = FusedLoRALinear(24, 16, r=2, bias=False, backend="torch")
    model.k = FusedLoRALinear(24, 16, r=2, bias=False, backend="torch")
    model.q.weight = nn.Parameter(fused.data[:16], requires_grad=False)
    model.k.weight = nn.Parameter(fused.data[16:], requires_grad=False)
    model.q_again = model.q
    assert shared_weight_names(model, model.q) == []
    model.eval()
    model.q.merge(model=model)
    assert model.q.merged


def test_from_linear_with_base_still_in_model_is_a_tie():
    model = nn.Module()
    model.base = nn.Linear(24, 16)
    model.lora = FusedLoRALinear.from_linear(model.base, r=2, backend="torch")
    assert shared_weight_names(model, model.lora) == ["base.weight", "base.bias"]


# ------------------------------------------------------------------ constructor validation


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"lora_alpha": float("nan")}, ValueError, "lora_alpha must be finite"),
    ({"lora_alpha": float("inf")}, ValueError, "lora_alpha must be finite"),
    ({"lora_alpha": "8"}, TypeError, "lora_alpha must be a real number"),
    ({"lora_alpha": None}, TypeError, "lora_alpha must be a real number"),
    ({"lora_alpha": True}, TypeError, "lora_alpha must be a real number"),
    ({"r": 2.0}, TypeError, "r must be an int"),
    ({"r": "8"}, TypeError, "r must be an int"),
    ({"r": -1}, ValueError, "r must be >= 1"),
    ({"lora_dropout": "0.1"}, TypeError, "lora_dropout must be a real number"),
    ({"lora_dropout": float("nan")}, ValueError, r"lora_dropout must be in \[0, 1\)"),
    ({"lora_dropout": -0.1}, ValueError, r"lora_dropout must be in \[0, 1\)"),
    ({"use_rslora": 1}, TypeError, "use_rslora must be a bool"),
    ({"use_rslora": "False"}, TypeError, "use_rslora must be a bool"),
    ({"bias": None}, TypeError, "bias must be a bool"),
    ({"fan_in_fan_out": 0}, TypeError, "fan_in_fan_out must be a bool"),
    ({"adapter_dtype": torch.int32}, TypeError, "adapter_dtype must be a floating"),
    ({"adapter_dtype": "float32"}, TypeError, "adapter_dtype must be a floating"),
])
def test_constructor_validates_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FusedLoRALinear(8, 8, backend="torch", **kwargs)


@pytest.mark.parametrize("in_f,out_f,exc,match", [
    (-1, 8, ValueError, "in_features must be >= 0"),
    (8, -2, ValueError, "out_features must be >= 0"),
    (8.0, 8, TypeError, "in_features must be an int"),
    (8, True, TypeError, "out_features must be an int"),
])
def test_constructor_validates_sizes(in_f, out_f, exc, match):
    with pytest.raises(exc, match=match):
        FusedLoRALinear(in_f, out_f, backend="torch")


def test_numeric_alpha_kinds_still_accepted():
    assert FusedLoRALinear(8, 8, r=4, lora_alpha=16, backend="torch").scaling == 4.0
    assert FusedLoRALinear(8, 8, r=4, lora_alpha=0, backend="torch").scaling == 0.0
    layer = FusedLoRALinear(8, 8, r=4, lora_alpha=torch.tensor(2.0).item(), backend="torch")
    assert layer.scaling == 0.5


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_in_features_zero_works_like_nn_linear():
    layer = FusedLoRALinear(0, 5, r=2, backend="torch")
    x = torch.randn(3, 4, 0)
    y = layer(x)
    assert y.shape == (3, 4, 5)
    torch.testing.assert_close(y, layer.bias.expand(3, 4, 5))
    y.sum().backward()
    assert torch.count_nonzero(layer.lora_B.weight.grad) == 0 and layer.lora_B.weight.grad.shape == (5, 2)
    layer.eval().merge()
    torch.testing.assert_close(layer(x), layer.bias.expand(3, 4, 5))
    layer.unmerge()
    nobias = FusedLoRALinear(0, 5, r=2, bias=False, backend="torch")
    assert torch.equal(nobias(torch.randn(2, 0)), torch.zeros(2, 5))


# ------------------------------------------------------------------ MultiLoRALinear


def _bank(**kw) -> MultiLoRALinear:
    return MultiLoRALinear(nn.Linear(8, 6), n_slots=3, max_rank=4, backend="torch", **kw)


def _state(m: MultiLoRALinear, slot: int) -> tuple:
    return (m.lora_A[slot].detach().clone(), m.lora_B[slot].detach().clone(), m.scales[slot].item(),
            m.ranks[slot].item())


def _same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]


@pytest.mark.parametrize("bad", ["meta_A", "meta_B", "nan_scale", "str_scale"])
def test_load_adapter_is_atomic(bad):
    m = _bank()
    m.load_adapter(1, torch.randn(2, 8), torch.randn(6, 2), 0.5)
    before = _state(m, 1)
    A, B, scale = torch.randn(3, 8), torch.randn(6, 3), 2.0
    if bad == "meta_A":
        A = A.to("meta")
    elif bad == "meta_B":
        B = B.to("meta")
    elif bad == "nan_scale":
        scale = math.nan
    else:
        scale = "2"
    with pytest.raises((TypeError, ValueError)):
        m.load_adapter(1, A, B, scale)
    assert _same(_state(m, 1), before)


def test_load_adapter_meta_message_names_argument():
    m = _bank()
    with pytest.raises(ValueError, match="lora_B is on the meta device"):
        m.load_adapter(0, torch.randn(2, 8), torch.randn(6, 2, device="meta"), 1.0)


def test_load_adapter_copy_failure_keeps_slot(monkeypatch):
    # Even a failure validation cannot foresee (here: the second copy raising) leaves the slot
    # as it was: the copies go to temporaries before the slot is touched.
    m = _bank()
    m.load_adapter(2, torch.randn(4, 8), torch.randn(6, 4), 0.25)
    before = _state(m, 2)

    class Exploding(torch.Tensor):
        pass

    B = torch.randn(6, 3).as_subclass(Exploding)
    real_copy = torch.Tensor.copy_

    def copy_(self, src, *a, **k):
        if isinstance(src, Exploding):
            raise RuntimeError("copy failed")
        return real_copy(self, src, *a, **k)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    with pytest.raises(RuntimeError, match="copy failed"):
        m.load_adapter(2, torch.randn(3, 8), B, 1.0)
    monkeypatch.undo()
    assert _same(_state(m, 2), before)


def test_multi_on_meta_then_to_empty_and_load():
    ref = _bank()
    ref.load_adapter(0, torch.randn(4, 8), torch.randn(6, 4), 0.5)
    ref.load_adapter(2, torch.randn(1, 8), torch.randn(6, 1), 3.0)
    m = MultiLoRALinear(nn.Linear(8, 6, device="meta"), n_slots=3, max_rank=4, backend="torch")
    assert m.lora_A.device.type == "meta" and m.ranks.device.type == "meta"
    m.load_adapter(1, torch.randn(2, 8), torch.randn(6, 2), 1.0)  # shape bookkeeping only
    m.to_empty(device="cpu")
    m.load_state_dict(ref.state_dict())
    for name, t in ref.state_dict().items():
        assert torch.equal(m.state_dict()[name], t), name
    # assign=True (transformers' low-memory loading) works on the meta module too.
    m2 = MultiLoRALinear(nn.Linear(8, 6, device="meta"), n_slots=3, max_rank=4, backend="torch")
    m2.load_state_dict(ref.state_dict(), assign=True)
    assert m2.lora_A.device.type == "cpu" and torch.equal(m2.ranks, ref.ranks)
    assert m2.lora_A.requires_grad and not m2.weight.requires_grad


def test_multi_to_empty_then_reset_parameters_gives_empty_bank():
    # to_empty leaves buffers uninitialized (ranks could be any int64): reset_parameters, the
    # hook meta-init frameworks call, must give a valid, empty bank.
    m = MultiLoRALinear(nn.Linear(8, 6, device="meta"), n_slots=3, max_rank=4, backend="torch")
    m.to_empty(device="cpu")
    m.reset_parameters()
    assert m.ranks.tolist() == [0, 0, 0] and m.scales.tolist() == [0.0, 0.0, 0.0]
    assert torch.count_nonzero(m.lora_A) == 0 and torch.count_nonzero(m.lora_B) == 0
    assert torch.isfinite(m.weight).all() and torch.isfinite(m.bias).all()
    assert m.weight.abs().max() <= 1 / math.sqrt(8)  # nn.Linear's kaiming-uniform bound


def test_fused_on_meta_then_to_empty_and_reset():
    with torch.device("meta"):
        layer = FusedLoRALinear(8, 6, r=2, backend="torch")
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.isfinite(layer.lora_A.weight).all()
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_multi_constructor_validates_trainable_and_dtype():
    with pytest.raises(TypeError, match="trainable must be a bool"):
        _bank(trainable="yes")
    with pytest.raises(TypeError, match="adapter_dtype must be a floating"):
        _bank(adapter_dtype=torch.int64)
