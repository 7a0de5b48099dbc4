"""The routing plan (fused_lora.routing): built once per batch, reused by every layer and by
backward (the sort-count gate), fixed buffers updated in place, and torch.compile with changing
batch sizes (no graph break, no recompile beyond what Dynamo does for nn.Linear)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_lora
from fused_lora import routing
from fused_lora.routing import RoutingPlan

try:
    from peft import LoraConfig, get_peft_model
    from test_integrations import VOCAB, randomize_lora, tiny_llama

    HAS_HF = True
except ImportError:
    HAS_HF = False
needs_hf = pytest.mark.skipif(not HAS_HF, reason="needs peft, transformers (test extra)")


class CountOps(TorchDispatchMode):
    """Counts aten ops by name (sort, searchsorted, ...) under the mode."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- plan contents


def _brute(ids: torch.Tensor, n_slots: int, block_m: int):
    key = [i if 0 <= i < n_slots else -1 for i in ids.tolist()]
    order = sorted(range(len(key)), key=lambda t: (key[t], t))
    segs = []
    for t in order:
        if segs and segs[-1][0] == key[t]:
            segs[-1][2] += 1
        else:
            segs.append([key[t], len([s for s in segs for _ in range(s[2])]), 1])
    tiles = []
    for slot, start, n in segs:
        for r0 in range(start, start + n, block_m):
            tiles.append((r0, start + n, slot))
    return key, order, segs, tiles


@pytest.mark.parametrize("ids,n_slots", [
    ([3, -1, 0, 3, 1, -1, 3, 2], 4),
    ([5] * 9, 6),                   # single adapter: no sort
    ([-1] * 5, 3),                  # no adapter: no sort
    (list(range(20)) * 2, 20),      # many segments, partial tiles
    ([], 4),
])
def test_plan_matches_brute_force(ids, n_slots):
    t = torch.tensor(ids, dtype=torch.int64)
    plan = RoutingPlan.build(t, n_slots, block_m=4)
    v = plan.view()
    key, order, segs, tiles = _brute(t, n_slots, 4)
    assert v.ids.tolist() == key and v.order.tolist() == order
    assert v.keys.tolist() == sorted(key)
    S = v.seg_len.numel()
    got = [(int(v.seg_slot[j]), int(v.seg_start[j]), int(v.seg_len[j])) for j in range(S) if v.seg_len[j]]
    assert got == [tuple(s) for s in segs]
    gt = [(int(a), int(b), int(c)) for a, b, c in zip(v.tile_row0, v.tile_row1, v.tile_slot) if b > a]
    assert gt == tiles
    assert len(ids) == 0 or plan.no_adapter == all(k == -1 for k in key)
    assert len(ids) == 0 or plan.single_adapter == (len(set(key)) == 1 and key[0] >= 0)


def test_plan_validation_and_unchecked_ids():
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, n_slots=4\).*got 7"):
        RoutingPlan.build(torch.tensor([0, 7]), 4)
    with pytest.raises(TypeError, match="integer tensor"):
        RoutingPlan.build(torch.tensor([0.0]), 4)
    with pytest.raises(ValueError, match="n_slots"):
        RoutingPlan.build(torch.tensor([0]), 0)
    # validate=False: out-of-range ids (even past 2**31) act as -1, never index a slot.
    plan = RoutingPlan.build(torch.tensor([2, 1 << 40, -5, 0]), 4, validate=False)
    assert plan.ids.tolist() == [2, -1, -1, 0]


def test_update_in_place_equals_fresh_build():
    a = torch.tensor([1, 0, -1, 1, 2, 2, 0])
    b = torch.tensor([2, 2, 2, -1, 0, 1, 1])
    plan = RoutingPlan.build(a, 3)
    buf = plan.data
    plan.update_(b)
    assert plan.data is buf  # same storage: a captured CUDA graph replays the new routing
    assert torch.equal(plan.data, RoutingPlan.build(b, 3).data)
    with pytest.raises(ValueError, match="built for 7 tokens"):
        plan.update_(torch.tensor([0, 1]))


def test_plan_checked_against_the_layer():
    base = torch.nn.Linear(8, 6)
    bank = fused_lora.MultiLoRALinear(base, n_slots=3, max_rank=2, backend="torch")
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="built for n_slots=4"):
        bank(x, RoutingPlan.build(torch.zeros(2, 5, dtype=torch.int64), 4))
    with pytest.raises(ValueError, match="leading shape"):
        bank(x, RoutingPlan.build(torch.zeros(3, 5, dtype=torch.int64), 3))
    with pytest.raises(ValueError, match="plan must be the int64 data of a RoutingPlan"):
        torch.ops.fused_lora.multi_lora_linear_fwd(
            x[0], base.weight.detach(), None, bank.lora_A, bank.lora_B, bank.scales, None,
            torch.zeros(3, dtype=torch.int64), "torch")


# ----------------------------------------------------------------------------- the sort gate


def _three_adapter_model(tmp_path):
    base = tiny_llama(layers=2)
    cfgs = {
        "a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "b": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "up_proj"]),
        "c": LoraConfig(r=3, lora_alpha=3, target_modules=["k_proj", "gate_proj"]),
    }
    paths = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(ord(name))
        pm = get_peft_model(copy.deepcopy(base), cfg)
        randomize_lora(pm)
        paths[name] = str(tmp_path / name)
        pm.save_pretrained(paths[name])
    model = copy.deepcopy(base)
    fused_lora.load_peft_adapters_multi(model, paths, backend="torch")
    return model


@needs_hf
def test_one_sort_per_model_forward_none_in_backward(tmp_path):
    """Gate: at most 1 device sort per model forward (0 for an all -1 or single-adapter batch),
    none in backward. 14 LoRA modules here sorted 14 times before the plan existed."""
    model = _three_adapter_model(tmp_path)
    banks = [m for m in model.modules() if isinstance(m, fused_lora.MultiLoRALinear)]
    assert len(banks) == 14
    for b in banks:  # train the banks so a backward runs through every one
        b.lora_A.requires_grad_(True)
        b.lora_B.requires_grad_(True)
    ids = torch.randint(0, VOCAB, (4, 24))
    with fused_lora.adapter_ids(model, ["a", "b", None, "c"]):
        with CountOps() as fwd:
            out = model(ids).logits
        with CountOps() as bwd:
            out.square().mean().backward()
    assert fwd.counts.get("sort", 0) == 1, fwd.counts
    assert fwd.counts.get("searchsorted", 0) <= 3, fwd.counts  # segment bounds + tiles, once (was 42)
    assert bwd.counts.get("sort", 0) == 0, bwd.counts
    assert all(b.lora_A.grad is not None for b in banks)
    for batch in (["b", "b", "b", "b"], [None] * 4):
        with fused_lora.adapter_ids(model, batch), torch.no_grad(), CountOps() as c:
            model(ids)
        assert c.counts.get("sort", 0) == 0, (batch, c.counts)


def test_backward_reuses_the_forward_plan():
    base = torch.nn.Linear(16, 16)
    bank = fused_lora.MultiLoRALinear(base, n_slots=4, max_rank=3, backend="torch")
    torch.nn.init.normal_(bank.lora_A)
    torch.nn.init.normal_(bank.lora_B)
    bank.ranks.fill_(3)
    bank.scales.fill_(0.5)
    x = torch.randn(30, 16, requires_grad=True)
    plan = RoutingPlan.build(torch.randint(-1, 4, (30,)), 4)
    with CountOps() as c:
        y = bank(x, plan)
        y2 = bank(y, plan)  # a second layer on the same plan
        y2.sum().backward()
    assert c.counts.get("sort", 0) == 0  # the plan was built before: nothing sorted again


# ----------------------------------------------------------------------------- compile, changing M


SIZES = (1, 7, 64, 65, 300)


def _frame_count(fn, make_input, dynamic):
    """Graphs Dynamo made for a forward compiled with fullgraph, run (with a backward through
    the compiled graph: AOT autograd compiles that too) at every size of SIZES."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for m in SIZES:
        compiled(make_input(m)).square().mean().backward()
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("dynamic", [True, None])
@pytest.mark.parametrize("kind", ["fused", "multi"])
def test_compile_changing_batch_no_extra_recompiles(kind, dynamic):
    """fullgraph over M in (1, 7, 64, 65, 300), forward and a training step: no graph break,
    no error, and no more graphs than Dynamo makes for a plain nn.Linear doing the same."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 12)
    if kind == "fused":
        layer = fused_lora.FusedLoRALinear.from_linear(copy.deepcopy(lin), r=4, backend="torch")
        torch.nn.init.normal_(layer.lora_B.weight)

        def run(x):
            return layer(x)
    else:
        layer = fused_lora.MultiLoRALinear(copy.deepcopy(lin), n_slots=3, max_rank=4, backend="torch")
        torch.nn.init.normal_(layer.lora_A)
        torch.nn.init.normal_(layer.lora_B)
        layer.ranks.copy_(torch.tensor([4, 2, 3]))
        layer.scales.fill_(0.5)

        def run(x):
            ids = (torch.arange(x.shape[0]) % 4) - 1  # -1, 0, 1, 2, ...
            return layer(x, ids)

    def plain(x):
        return lin(x)

    def make(m):
        return torch.randn(m, 16, requires_grad=True)

    torch._dynamo.utils.counters.clear()
    base_graphs = _frame_count(plain, make, dynamic)
    torch._dynamo.utils.counters.clear()
    ours = _frame_count(run, make, dynamic)
    assert ours <= base_graphs, (ours, base_graphs)
    # And the compiled result is right at a size it was not first compiled for.
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for m in (3, 65):
        x = make(m)
        torch.manual_seed(1)
        got = compiled(x)
        x2 = x.detach().clone().requires_grad_(True)
        torch.testing.assert_close(got, run(x2), rtol=1e-5, atol=1e-5)


@needs_hf
@pytest.mark.parametrize("dynamic", [True, None])
def test_compile_transformers_model_changing_sequence(dynamic):
    """A whole transformers model with fused LoRA layers, a training step at several sequence
    lengths and batch sizes: fullgraph, no error, graphs no more than the model without LoRA."""
    def count(model):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, fullgraph=True, dynamic=dynamic, backend="aot_eager")
        for b, s in ((1, 5), (2, 7), (2, 17), (3, 9)):
            ids = torch.randint(0, VOCAB, (b, s))
            compiled(ids, labels=ids).loss.backward()  # the backward graph is compiled too
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]

    torch.manual_seed(0)
    plain = tiny_llama(layers=1).train()
    model = copy.deepcopy(plain)
    fused_lora.inject_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, backend="torch")
    randomize_lora(model)
    model.train()
    assert count(model) <= count(plain)


def test_routing_block_m_is_the_kernels():
    from fused_lora.kernels import multi_lora as ML

    assert ML._SEG_BLOCK_M == routing.BLOCK_M
