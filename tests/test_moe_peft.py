"""PEFT target_parameters adapters on MoE experts (issue 12): load_peft_adapter, save_peft_adapter
and from_peft against PEFT itself on tiny Qwen3-MoE and Mixtral models (configs, random weights,
nothing downloaded): logits and gradients equal PEFT's within fp32 tolerance, a save ->
PeftModel.from_pretrained round trip, refusals that leave the model unchanged.

PEFT's layout (peft.tuners.lora.layer.ParamWrapper): lora_A [E*r, in] (expert-major rows),
lora_B [out, E*r] (expert-minor columns); see fused_lora.integrations.moe_io."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from test_integrations import HAS_HF, needs_hf

import fused_lora
from fused_lora.integrations import moe_io
from fused_lora.moe import MoELoRAExperts

if HAS_HF:
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file

pytestmark = needs_hf
VOCAB = 64
TP = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_qwen3_moe(layers: int = 2):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(cfg).eval()


def tiny_mixtral(layers: int = 2):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=layers,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).eval()


def tiny_gpt_oss(layers: int = 2):
    """GPT-OSS: experts stored transposed ([E, in, out], is_transposed=True), with biases (made
    non-zero here) and an interleaved, clamped gate."""
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                       num_experts_per_tok=2, max_position_embeddings=64,
                       layer_types=["full_attention"] * layers)
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "experts" in n and n.endswith("_bias"):
                p.normal_(0, 0.1)
    return model


MODELS = {"qwen3_moe": tiny_qwen3_moe, "mixtral": tiny_mixtral, "gpt_oss": tiny_gpt_oss}


def _randomize(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)


def _peft(base, **kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("target_modules", [])
    kw.setdefault("target_parameters", TP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    _randomize(pm)
    return pm


def _ids():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def _peft_grads(pm):
    """{"<module>.<proj>": (dA, dB)} of a PeftModel's ParamWrappers, in PEFT's layout, plus plain
    LoRA Linear grads under "<module>"."""
    out = {}
    for name, m in pm.base_model.model.named_modules():
        if type(m).__name__ == "ParamWrapper":
            mod = name.replace(".base_layer", "")
            out[f"{mod}.{m.parameter_name}"] = (m.lora_A["default"].weight.grad,
                                                m.lora_B["default"].weight.grad)
        elif type(m).__name__ == "Linear" and hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            out[name] = (m.lora_A["default"].weight.grad, m.lora_B["default"].weight.grad)
    return out


def _our_grads(model):
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, MoELoRAExperts):
            for t in m.targets:
                out[f"{name}.{t}"] = moe_io.to_peft_layout(getattr(m, f"lora_A_{t}").grad,
                                                           getattr(m, f"lora_B_{t}").grad)
        elif isinstance(m, fused_lora.FusedLoRALinear):
            out[name] = (m.lora_A.weight.grad, m.lora_B.weight.grad)
    return out


def _assert_same_grads(ours, theirs):
    assert set(ours) == set(theirs) and ours
    for k, (gA, gB) in ours.items():
        torch.testing.assert_close(gA, theirs[k][0], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k} dA: {m}")
        torch.testing.assert_close(gB, theirs[k][1], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k} dB: {m}")


CASES = {
    # model, LoraConfig overrides: per-projection ranks / alphas, rsLoRA, a Linear target too.
    "qwen3_patterns": ("qwen3_moe", dict(rank_pattern={"down_proj": 2}, alpha_pattern={"gate_up_proj": 5})),
    "mixtral_rslora_attn": ("mixtral", dict(use_rslora=True, target_modules=["q_proj"],
                                            target_parameters=["experts.gate_up_proj", "experts.down_proj"])),
    "qwen3_down_only": ("qwen3_moe", dict(target_parameters=["mlp.experts.down_proj"])),
    "gpt_oss_transposed": ("gpt_oss", dict(rank_pattern={"gate_up_proj": 3})),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_peft_adapter_logits_and_grads_equal_peft(tmp_path, case):
    model_name, kw = CASES[case]
    base = MODELS[model_name]()
    pm = _peft(base, **kw)
    path = str(tmp_path / "ad")
    pm.save_pretrained(path)
    model = copy.deepcopy(base)
    fused_lora.load_peft_adapter(model, path, backend="torch", is_trainable=True)
    experts = [m for m in model.modules() if isinstance(m, MoELoRAExperts)]
    assert len(experts) == 2
    ids = _ids()
    ref = pm(ids).logits
    out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ref.square().mean().backward()
    out.square().mean().backward()
    _assert_same_grads(_our_grads(model), _peft_grads(pm))
    # Only the LoRA weights train.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.interpreter
def test_load_peft_adapter_triton_backend(tmp_path):
    base = tiny_qwen3_moe(layers=1)
    pm = _peft(base, r=2)
    path = str(tmp_path / "ad")
    pm.save_pretrained(path)
    model = copy.deepcopy(base)
    fused_lora.load_peft_adapter(model, path, backend="triton")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pm(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_save_round_trip_through_peft_from_pretrained(tmp_path, model_name):
    base = MODELS[model_name]()
    model = copy.deepcopy(base)
    fused_lora.inject_lora(model, None, r=4, lora_alpha=8, target_parameters=TP, backend="torch",
                           rank_pattern={"down_proj": 2})
    _randomize(model)
    path = str(tmp_path / "ad")
    fused_lora.save_peft_adapter(model, path)
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert cfg["target_modules"] == [] and cfg["lora_dropout"] == 0.0
    assert set(cfg["rank_pattern"].values()) == {2}
    keys = set(load_file(os.path.join(path, "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys  # gate_up: inner
    ids = _ids()
    with torch.no_grad():
        ours = model(ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = PeftModel.from_pretrained(copy.deepcopy(base), path)
        torch.testing.assert_close(pm(ids).logits, ours, rtol=1e-5, atol=1e-5)
        back = copy.deepcopy(base)
        fused_lora.load_peft_adapter(back, path, backend="torch")
        torch.testing.assert_close(back(ids).logits, ours, rtol=1e-6, atol=1e-6)
    # And into an injected model (same ranks): the weights land in its MoELoRAExperts.
    inj = copy.deepcopy(base)
    fused_lora.inject_lora(inj, None, r=4, lora_alpha=1, target_parameters=TP, backend="torch",
                           rank_pattern={"down_proj": 2})
    fused_lora.load_peft_adapter(inj, path, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(inj(ids).logits, ours, rtol=1e-6, atol=1e-6)


def test_dropout_on_experts_saved_as_zero_with_a_warning(tmp_path):
    model = tiny_qwen3_moe(layers=1)
    fused_lora.inject_lora(model, None, r=2, target_parameters=TP, lora_dropout=0.1, backend="torch")
    with pytest.warns(UserWarning, match="PEFT refuses lora_dropout"):
        fused_lora.save_peft_adapter(model, str(tmp_path / "ad"))
    with open(tmp_path / "ad" / "adapter_config.json") as f:
        assert json.load(f)["lora_dropout"] == 0.0


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_from_peft_converts_param_wrappers(model_name):
    base = MODELS[model_name]()
    pm = _peft(base, target_modules=["v_proj"], rank_pattern={"gate_up_proj": 2})
    ids = _ids()
    ref = pm(ids).logits
    ref.square().mean().backward()
    theirs = {k: (a.clone(), b.clone()) for k, (a, b) in _peft_grads(pm).items()}
    pm.zero_grad()
    fused_lora.from_peft(pm, backend="torch")
    inner = pm.base_model.model
    assert not [n for n, m in inner.named_modules() if type(m).__name__ == "ParamWrapper"]
    ex = inner.model.layers[0].mlp.experts
    assert isinstance(ex, MoELoRAExperts) and ex.ranks == {"gate_up_proj": 2, "down_proj": 4}
    out = pm(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    _assert_same_grads(_our_grads(inner), theirs)


def test_from_peft_merged_wrappers_unmerge_first():
    base = tiny_qwen3_moe(layers=1)
    pm = _peft(base)
    ids = _ids()
    with torch.no_grad():
        ref = pm(ids).logits
        pm.base_model.merge_adapter()
        fused_lora.from_peft(pm, backend="torch")
        w = pm.base_model.model.model.layers[0].mlp.experts.gate_up_proj
        torch.testing.assert_close(w, base.model.layers[0].mlp.experts.gate_up_proj, rtol=0, atol=1e-6)
        torch.testing.assert_close(pm(ids).logits, ref, rtol=1e-5, atol=1e-5)


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def _assert_unchanged(model, snap):
    types, params = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, (v, rg) in params.items():
        assert torch.equal(now[n], v) and now[n].requires_grad == rg, n


def test_failed_loads_leave_the_model_unchanged(tmp_path):
    """Refusals found at the last experts module (a lora_B of the wrong width, a missing key, a
    rank that disagrees with rank_pattern, a target parameter that is not a fused experts
    projection) change nothing: the whole plan is checked first."""
    base = tiny_qwen3_moe()
    pm = _peft(base, target_modules=["q_proj"])
    good = str(tmp_path / "good")
    pm.save_pretrained(good)
    late = "base_model.model.model.layers.1.mlp.experts"

    def variant(name, sd_fn=None, **cfg):
        path = str(tmp_path / name)
        os.makedirs(path)
        sd = dict(load_file(os.path.join(good, "adapter_model.safetensors")))
        if sd_fn is not None:
            sd = sd_fn(sd)
        save_file({k: v.contiguous() for k, v in sd.items()},
                  os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(good, "adapter_config.json")) as f:
            c = json.load(f)
        c.update(cfg)
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(c, f)
        return path

    cases = {
        "wide_B": (variant("wide_B", lambda sd: {
            k: (torch.cat([v, v], 1) if k == f"{late}.lora_B.weight" else v) for k, v in sd.items()}),
                   r"layers\.1\.mlp\.experts\.down_proj has 4 experts.*lora_B \(32, 32\)"),
        "missing": (variant("missing", lambda sd: {k: v for k, v in sd.items()
                                                   if k != f"{late}.base_layer.lora_A.weight"}),
                    r"layers\.1\.mlp\.experts\.gate_up_proj has no lora_A weight"),
        "rank": (variant("rank", rank_pattern={"layers.1.mlp.experts.down_proj": 2}),
                 r"layers\.1\.mlp\.experts\.down_proj' has rank 4 in the weights but 2"),
        "not_experts": (variant("not_experts", target_parameters=TP + ["self_attn.q_norm.weight"]),
                        r"q_norm\.weight.*cannot adapt"),
        "absent": (variant("absent", target_parameters=TP + ["mlp.experts.up_proj"]),
                   r"\['mlp\.experts\.up_proj'\] match no parameter"),
    }
    for plain, model in ((True, copy.deepcopy(base)), (False, _injected(base))):
        snap = _snapshot(model)
        for path, match in cases.values():
            with pytest.raises(ValueError, match=match):
                fused_lora.load_peft_adapter(model, path, backend="torch")
            _assert_unchanged(model, snap)
            if plain:
                with pytest.raises(ValueError, match=match):
                    fused_lora.load_peft_adapters_multi(model, {"a": good, "b": path}, backend="torch")
                _assert_unchanged(model, snap)


def _injected(base):
    m = copy.deepcopy(base)
    fused_lora.inject_lora(m, ["q_proj"], r=4, target_parameters=TP, backend="torch")
    return m


def test_failure_midway_rolls_back(tmp_path, monkeypatch):
    """An unforeseen error while building the second MoELoRAExperts (after the first replaced
    its experts module) puts everything back."""
    from fused_lora import moe

    base = tiny_qwen3_moe()
    path = str(tmp_path / "ad")
    _peft(base).save_pretrained(path)
    real = moe.MoELoRAExperts.__init__
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory (simulated)")
        real(self, *a, **k)

    monkeypatch.setattr(moe.MoELoRAExperts, "__init__", flaky)
    for fn in (lambda m: fused_lora.load_peft_adapter(m, path, backend="torch"),
               lambda m: fused_lora.inject_lora(m, None, target_parameters=TP, backend="torch")):
        model = copy.deepcopy(base)
        snap = _snapshot(model)
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="simulated"):
            fn(model)
        _assert_unchanged(model, snap)
    pm = _peft(base)
    snap = _snapshot(pm)
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="simulated"):
        fused_lora.from_peft(pm, backend="torch")
    _assert_unchanged(pm, snap)


def test_inject_lora_target_parameters_freezes_the_base_and_checks():
    model = tiny_qwen3_moe(layers=1)
    names = fused_lora.inject_lora(model, None, r=2, target_parameters=["experts.down_proj"], backend="torch")
    assert names == ["model.layers.0.mlp.experts"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.0.mlp.experts.lora_{ab}_down_proj" for ab in "AB"}
    with pytest.raises(ValueError, match="match no parameter"):
        fused_lora.inject_lora(tiny_qwen3_moe(layers=1), None, target_parameters=["experts.nope"])
    with pytest.raises(ValueError, match="cannot adapt"):
        fused_lora.inject_lora(tiny_qwen3_moe(layers=1), None, target_parameters=["embed_tokens.weight"])


# ----------------------------------------------------------------------------- mixed-adapter serving


def _three_moe_adapters(tmp_path, base):
    """Three PEFT folders over one MoE: both projections (r=4); down_proj only (r=2) plus
    q_proj; both with rsLoRA and a rank_pattern."""
    cfgs = {
        "a": dict(r=4, lora_alpha=8),
        "b": dict(r=2, lora_alpha=3, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"]),
        "c": dict(r=2, lora_alpha=4, use_rslora=True, rank_pattern={"down_proj": 3}),
    }
    paths = {}
    for i, (name, kw) in enumerate(cfgs.items()):
        torch.manual_seed(100 + i)
        paths[name] = str(tmp_path / name)
        _peft(base, **kw).save_pretrained(paths[name])
    return paths


def _alone(base, path, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(copy.deepcopy(base), path)
    return pm(ids).logits


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_multi_adapter_moe_serving_equals_each_adapter_alone(tmp_path, backend):
    """load_peft_adapters_multi with target_parameters adapters: every sequence of a mixed batch
    gets what its adapter alone gives in PEFT (None: the base model); one routing plan per MoE
    layer (plus one for the Linear banks) per forward."""
    from test_moe_lora import CountOps

    from fused_lora.moe import MoEMultiLoRAExperts

    layers = 2 if backend == "torch" else 1
    base = tiny_qwen3_moe(layers=layers)
    paths = _three_moe_adapters(tmp_path, base)
    model = copy.deepcopy(base)
    slots = fused_lora.load_peft_adapters_multi(model, paths, backend=backend)
    assert slots == {"a": 0, "b": 1, "c": 2}
    banks = [m for m in model.modules() if isinstance(m, MoEMultiLoRAExperts)]
    assert len(banks) == layers and banks[0].max_ranks == {"gate_up_proj": 4, "down_proj": 4}
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(3))
    who = ["a", None, "b", "c"]
    with torch.no_grad():
        with fused_lora.adapter_ids(model, who), CountOps() as c:
            out = model(ids).logits
        assert c.counts.get("sort", 0) == layers + 1, c.counts  # MoE layers + the q_proj banks
        for i, name in enumerate(who):
            ref = base(ids[i:i + 1]).logits if name is None else _alone(base, paths[name], ids[i:i + 1])
            torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, n=name: f"{n}: {m}")
        if backend == "triton":
            return
        # Per-token ids [batch, seq] (here constant per sequence), and a decode-style step.
        tok = torch.tensor([0, -1, 1, 2])[:, None].expand(4, 6)
        with fused_lora.adapter_ids(model, tok):
            torch.testing.assert_close(model(ids).logits, out, rtol=1e-6, atol=1e-6)
        with fused_lora.adapter_ids(model, who):
            step = model(ids[:, :1]).logits
        torch.testing.assert_close(step, out[:, :1], rtol=1e-4, atol=1e-4)


def test_multi_loader_moe_refusals_leave_model_unchanged(tmp_path):
    base = tiny_qwen3_moe(layers=1)
    paths = _three_moe_adapters(tmp_path, base)
    model = copy.deepcopy(base)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"max_rank=2 is smaller than rank 4"):
        fused_lora.load_peft_adapters_multi(model, paths, max_rank=2, backend="torch")
    _assert_unchanged(model, snap)
    fused_lora.load_peft_adapters_multi(model, paths, backend="torch")
    with pytest.raises(ValueError, match="already has fused MoE LoRA adapters"):
        fused_lora.load_peft_adapters_multi(model, {"a": paths["a"]}, backend="torch")


def test_gpt_oss_transposed_experts_read_in_place():
    """GPT-OSS's [E, in, out] experts: with zero lora_B the module equals the original (biases,
    interleaved clamped gate and all), and the op reads the stored weights through a transposed
    view: what it saves for backward is that view, not a copy."""
    base = tiny_gpt_oss(layers=1)
    ids = _ids()
    with torch.no_grad():
        ref = base(ids).logits
    model = copy.deepcopy(base)
    fused_lora.inject_lora(model, None, r=2, target_parameters=TP, backend="torch")
    ex = model.model.layers[0].mlp.experts
    assert isinstance(ex, MoELoRAExperts) and ex.is_transposed
    assert ex.proj_shape("gate_up_proj") == (4, 48, 32)
    with torch.no_grad():
        # fp32 tolerance, not bit equality: with transformers 5.24 the original's logits differ
        # from ours by ~1 ulp (max 3e-8 on logits of 0.4 measured: a different summation order
        # in its experts code); an earlier landing's CI saw them bit-equal.
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-6, atol=1e-6)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(ids).logits.sum().backward()
    w = ex.gate_up_proj
    views = [t for t in saved if t.data_ptr() == w.data_ptr() and t.shape == (4, 48, 32)]
    assert views and not views[0].is_contiguous()
    assert not [t for t in saved if t.shape == (4, 48, 32) and t.data_ptr() != w.data_ptr()], "weight copied"


def test_readme_moe_block_runs(tmp_path, monkeypatch):
    """The README's "Mixture of experts" block, exec'd as written on a tiny Qwen3-MoE."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Mixture of experts", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    base = tiny_qwen3_moe(layers=1)
    paths = _three_moe_adapters(tmp_path, base)
    g = torch.Generator().manual_seed(0)
    T, E, S, K, N, r = 6, 4, 2, 8, 5, 2
    ns = {
        "fused_lora": fused_lora, "model": copy.deepcopy(base), "other_base": copy.deepcopy(base),
        "base_model": copy.deepcopy(base),
        "p1": paths["a"], "p2": paths["b"], "input_ids": torch.randint(0, VOCAB, (3, 5)),
        "x": torch.randn(T, K, generator=g), "weight": torch.randn(E, N, K, generator=g),
        "lora_A": torch.randn(E, r, K, generator=g), "lora_B": torch.randn(E, N, r, generator=g),
        "scale": 0.5, "expert_ids": torch.randint(0, E, (T, 2), generator=g),
        "b": torch.randn(E, N, generator=g),
        "A_bank": torch.randn(S, E, r, K, generator=g), "B_bank": torch.randn(S, E, N, r, generator=g),
        "scales": torch.tensor([0.5, 2.0]), "ids": torch.tensor([0, -1, 1, 1, 0, -1]), "E": E, "S": S,
    }
    exec(compile(block, "README.md", "exec"), ns)
    assert ns["logits"].shape == (3, 5, VOCAB) and ns["y"].shape == (T, 2, N)
    assert ns["plan"].n_slots == (S + 1) * E
    assert os.path.isfile(tmp_path / "out" / "adapter_config.json")
