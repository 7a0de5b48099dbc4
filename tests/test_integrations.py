"""Model-level integration: inject_lora into transformers models (Llama-style with GQA, GPT-2
Conv1D), PEFT parity of logits and gradients, PEFT adapter folders (load / save / round trip
through real peft), from_peft, merge/unmerge, refusals, torch.compile(fullgraph=True).

Models are tiny and built from configs with random weights: nothing is downloaded."""

from __future__ import annotations

import copy
import json
import os
import shutil
import types

import pytest
import torch
from _utils import HAS_CUDA, INTERPRET

import fused_lora
from fused_lora import FusedLoRALinear

# peft / transformers / safetensors come with the `test` extra; a machine without them (e.g. a
# GPU box with no package registry) still runs the torch-only tests here (refusals, CUDA graphs).
try:
    import safetensors  # noqa: F401
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    HAS_HF = True
except ImportError:
    HAS_HF = False
needs_hf = pytest.mark.skipif(not HAS_HF, reason="needs peft, transformers, safetensors (test extra)")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 64


def tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    # GQA: 4 query heads share 2 key/value heads, so k_proj/v_proj are [16, 32], q_proj [32, 32].
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    return GPT2LMHeadModel(cfg).eval()


def tokens(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq))


class TinyBlock(torch.nn.Module):
    """A Llama-style decoder block (GQA attention, SwiGLU MLP) from plain nn.Linear layers: the
    torch-only model of the tests that must run without transformers."""

    def __init__(self, d: int = 32, heads: int = 4, kv_heads: int = 2, ff: int = 64) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        lin = torch.nn.Linear
        self.embed = torch.nn.Embedding(VOCAB, d)
        self.q_proj, self.o_proj = lin(d, d, bias=False), lin(d, d, bias=False)
        self.k_proj = lin(d, kv_heads * self.hd, bias=False)
        self.v_proj = lin(d, kv_heads * self.hd, bias=False)
        self.gate_proj, self.up_proj, self.down_proj = lin(d, ff), lin(d, ff), lin(ff, d)
        self.lm_head = lin(d, VOCAB)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor = None):
        F = torch.nn.functional
        x = self.embed(ids)
        b, t, d = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o_proj(a)
        x = x + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return types.SimpleNamespace(logits=logits, loss=loss)


def arch_model(arch: str) -> tuple:
    """(model, target_modules) for 'block' (torch only), 'llama' or 'gpt2' (transformers)."""
    if arch == "block":
        return TinyBlock().eval(), LLAMA_TARGETS
    if arch == "llama":
        return tiny_llama(layers=1), ["q_proj", "v_proj", "down_proj"]
    return tiny_gpt2(), ["c_attn", "c_fc"]


def randomize_lora(model: torch.nn.Module) -> None:
    """Non-zero lora_B everywhere, so the adapters change the output."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)


def lora_grads(model: torch.nn.Module) -> dict:
    """{module-relative key without PEFT's prefix/adapter name: grad} for LoRA parameters."""
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n and p.grad is not None:
            out[n.replace("base_model.model.", "").replace(".default", "")] = p.grad
    return out


def assert_parity(peft_model, fused_model, ids, atol=1e-5):
    """Same logits and the same LoRA gradients (fp32)."""
    o1 = peft_model(ids, labels=ids)
    o2 = fused_model(ids, labels=ids)
    torch.testing.assert_close(o2.logits, o1.logits, rtol=1e-5, atol=atol)
    o1.loss.backward()
    o2.loss.backward()
    g1, g2 = lora_grads(peft_model), lora_grads(fused_model)
    assert set(g1) == set(g2) and g1
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=k)


# ------------------------------------------------------------------ FusedLoRALinear(fan_in_fan_out)


def test_fan_in_fan_out_layer_equals_transposed_layer():
    """A layer storing W0 as [in, out] computes what the [out, in] layer with W0^T does;
    merge/unmerge act on the stored layout (bit-exact unmerge); lora_A/B keep PEFT's shapes."""
    t = FusedLoRALinear(12, 20, r=3, lora_alpha=6, fan_in_fan_out=True)
    assert t.weight.shape == (12, 20)
    assert t.lora_A.weight.shape == (3, 12) and t.lora_B.weight.shape == (20, 3)
    torch.nn.init.normal_(t.lora_B.weight)
    n = FusedLoRALinear(12, 20, r=3, lora_alpha=6)
    with torch.no_grad():
        n.weight.copy_(t.weight.t())
        n.bias.copy_(t.bias)
    n.lora_A.weight.data.copy_(t.lora_A.weight)
    n.lora_B.weight.data.copy_(t.lora_B.weight)
    x = torch.randn(4, 12, requires_grad=True)
    torch.testing.assert_close(t(x), n(x))
    torch.testing.assert_close(t.delta_weight(), n.delta_weight().t())
    gt = torch.autograd.grad(t(x).square().sum(), (x, t.lora_A.weight, t.lora_B.weight))
    gn = torch.autograd.grad(n(x).square().sum(), (x, n.lora_A.weight, n.lora_B.weight))
    for a, b in zip(gt, gn):
        torch.testing.assert_close(a, b)
    w0 = t.weight.clone()
    t.eval()
    t.merge()
    torch.testing.assert_close(t(x), n(x), rtol=1e-5, atol=1e-5)
    t.unmerge()
    assert torch.equal(t.weight, w0)
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        FusedLoRALinear(12, 20, fan_in_fan_out=True, _base=torch.nn.Linear(12, 20))
    with pytest.raises(TypeError, match="Conv1D"):
        FusedLoRALinear.from_conv1d(torch.nn.Linear(3, 3))


# ---------------------------------------------------------------------------------------- inject


@needs_hf
def test_inject_llama_replaces_shares_and_freezes():
    model = tiny_llama()
    ids = tokens()
    ref = model(ids).logits
    q_w = model.model.layers[0].self_attn.q_proj.weight
    names = fused_lora.inject_lora(model, LLAMA_TARGETS, r=4, lora_alpha=8)
    assert len(names) == 2 * 7
    assert names[0] == "model.layers.0.self_attn.q_proj"
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, FusedLoRALinear) and q.weight is q_w  # shared, not copied
    k = model.model.layers[0].self_attn.k_proj
    assert k.lora_B.weight.shape == (16, 4)  # GQA: k/v project to 2 heads x 8
    assert not isinstance(model.lm_head, FusedLoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(names)
    # lora_B starts at zero: the injected model equals the base model.
    torch.testing.assert_close(model(ids).logits, ref)
    sd = fused_lora.lora_state_dict(model)
    assert set(sd) == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert all(k.startswith("base_model.model.") for k in fused_lora.lora_state_dict(model, peft_format=True))


@needs_hf
def test_inject_regex_all_linear_exclude_and_patterns():
    model = tiny_llama()
    names = fused_lora.inject_lora(model, r".*\.self_attn\.(q|v)_proj", r=4)
    assert names == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]

    model = tiny_llama()
    names = fused_lora.inject_lora(model, "all-linear", r=4, exclude_modules=["down_proj"])
    assert len(names) == 2 * 6 and "lm_head" not in names  # PEFT's all-linear skips the output layer

    model = tiny_llama()
    fused_lora.inject_lora(model, LLAMA_TARGETS, r=8, lora_alpha=16, use_rslora=True,
                           rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.up_proj": 3},
                           alpha_pattern={"o_proj": 4})
    at0, at1 = model.model.layers[0].self_attn, model.model.layers[1]
    assert at0.v_proj.r == 2 and at0.q_proj.r == 8 and at1.mlp.up_proj.r == 3
    assert model.model.layers[0].mlp.up_proj.r == 8
    assert at0.o_proj.lora_alpha == 4 and at0.o_proj.scaling == pytest.approx(4 / 8 ** 0.5)
    assert at0.q_proj.scaling == pytest.approx(16 / 8 ** 0.5)


@needs_hf
def test_inject_gpt2_conv1d_fan_in_fan_out():
    model = tiny_gpt2()
    ids = tokens()
    ref = model(ids).logits
    conv = model.transformer.h[0].attn.c_attn
    names = fused_lora.inject_lora(model, ["c_attn", "c_proj", "c_fc"], r=4)
    assert len(names) == 2 * 4  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    layer = model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.weight is conv.weight
    assert (layer.in_features, layer.out_features) == (32, 96)
    assert layer.lora_A.weight.shape == (4, 32) and layer.lora_B.weight.shape == (96, 4)
    torch.testing.assert_close(model(ids).logits, ref)


@needs_hf
def test_inject_equals_peft_with_same_init():
    """inject_lora + PEFT's init copied in == get_peft_model, logits and grads."""
    base = tiny_llama()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    randomize_lora(pm)
    model = copy.deepcopy(base)
    fused_lora.inject_lora(model, LLAMA_TARGETS, r=4, lora_alpha=8)
    sd = {k.replace("base_model.model.", "").replace(".default", ""): v
          for k, v in pm.state_dict().items() if "lora_" in k}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    assert_parity(pm, model, tokens())


# ---------------------------------------------------------------------------------- PEFT folders


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@needs_hf
def test_load_peft_adapter_llama_parity(tmp_path, use_rslora):
    base = tiny_llama()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_rslora=use_rslora,
                     rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 6},
                     alpha_pattern={"gate_proj": 3})
    pm = get_peft_model(copy.deepcopy(base), cfg)
    randomize_lora(pm)
    pm.save_pretrained(str(tmp_path))
    model = fused_lora.load_peft_adapter(copy.deepcopy(base), str(tmp_path), is_trainable=True)
    assert model.model.layers[1].mlp.down_proj.r == 6 and model.model.layers[0].self_attn.v_proj.r == 2
    assert model.model.layers[0].mlp.gate_proj.lora_alpha == 3
    assert_parity(pm, model, tokens())


@needs_hf
def test_load_peft_adapter_layer_selection_and_causal_lm_task(tmp_path):
    """layers_to_transform / exclude_modules select modules in PEFT; the checkpoint names them,
    so loading follows. A CAUSAL_LM PeftModel (different wrapper class) saves the same keys."""
    base = tiny_llama()
    cfg = LoraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=[1],
                     exclude_modules=["up_proj"], task_type="CAUSAL_LM")
    pm = get_peft_model(copy.deepcopy(base), cfg)
    randomize_lora(pm)
    pm.save_pretrained(str(tmp_path))
    model = fused_lora.load_peft_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    fused = [n for n, m in model.named_modules() if isinstance(m, FusedLoRALinear)]
    assert fused == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert_parity(pm, model, tokens())
    fused_lora.save_peft_adapter(model, tmp_path / "back", task_type="CAUSAL_LM")
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back"))
    assert type(back).__name__ == "PeftModelForCausalLM"
    ids = tokens()
    torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@needs_hf
def test_load_peft_adapter_gpt2_parity_and_bin(tmp_path):
    base = tiny_gpt2()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=16, fan_in_fan_out=True,
                                                        target_modules=["c_attn", "c_proj", "c_fc"]))
    randomize_lora(pm)
    pm.save_pretrained(str(tmp_path / "st"))
    pm.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert os.path.isfile(tmp_path / "bin" / "adapter_model.bin")
    m_bin = fused_lora.load_peft_adapter(copy.deepcopy(base), str(tmp_path / "bin"))
    model = fused_lora.load_peft_adapter(copy.deepcopy(base), str(tmp_path / "st"), is_trainable=True)
    assert model.transformer.h[0].attn.c_attn.fan_in_fan_out
    ids = tokens()
    torch.testing.assert_close(m_bin(ids).logits, model(ids).logits)
    assert not any(p.requires_grad for p in m_bin.parameters())  # PEFT's is_trainable=False
    assert_parity(pm, model, ids)


@needs_hf
def test_save_peft_adapter_round_trip_through_peft(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    fused_lora.inject_lora(model, LLAMA_TARGETS, r=4, lora_alpha=8, rank_pattern={"k_proj": 2},
                           alpha_pattern={"up_proj": 5})
    randomize_lora(model)
    fused_lora.save_peft_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == sorted(LLAMA_TARGETS)
    ids = tokens()
    want = model(ids).logits
    # Real PEFT loads it and computes the same thing.
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(pm(ids).logits, want, rtol=1e-5, atol=1e-5)
    # ...and so does fused_lora.
    back = fused_lora.load_peft_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(back(ids).logits, want)
    for k, v in fused_lora.lora_state_dict(model).items():
        assert torch.equal(fused_lora.lora_state_dict(back)[k], v)


@needs_hf
def test_save_peft_adapter_gpt2_and_exact_names(tmp_path):
    """Conv1D layers, and a selection that suffixes cannot express (only layer 0's c_proj
    under attn): the config lists exact names, and PEFT still loads it."""
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    names = fused_lora.inject_lora(model, ["c_attn", "transformer.h.0.attn.c_proj"], r=2, lora_alpha=4)
    assert len(names) == 3
    randomize_lora(model)
    fused_lora.save_peft_adapter(model, tmp_path, safe_serialization=False)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "transformer.h.0.attn.c_proj" in cfg["target_modules"] and cfg["fan_in_fan_out"]
    ids = tokens()
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(pm(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@needs_hf
def test_from_peft_in_place_keeps_params_and_outputs():
    base = tiny_llama()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                        rank_pattern={"o_proj": 2}))
    randomize_lora(pm)
    ref = copy.deepcopy(pm)
    peft_q = pm.base_model.model.model.layers[0].self_attn.q_proj
    a_param, w_param = peft_q.lora_A["default"].weight, peft_q.base_layer.weight
    pm.base_model.model.model.layers[0].self_attn.q_proj.set_scale("default", 0.5)
    ref.base_model.model.model.layers[0].self_attn.q_proj.set_scale("default", 0.5)
    out = fused_lora.from_peft(pm)
    assert out is pm
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, FusedLoRALinear)
    assert q.lora_A.weight is a_param and q.weight is w_param  # same Parameter objects
    assert q.scaling == pytest.approx(2.0 * 0.5)
    assert pm.base_model.model.model.layers[0].self_attn.o_proj.r == 2
    assert_parity(ref, pm, tokens())


@needs_hf
def test_from_peft_then_save_loads_in_peft(tmp_path):
    base = tiny_gpt2()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn"],
                                                        use_rslora=True))
    randomize_lora(pm)
    ids = tokens()
    want = pm(ids).logits
    fused_lora.from_peft(pm)
    fused_lora.save_peft_adapter(pm, tmp_path)  # a converted PeftModel is unwrapped
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(back(ids).logits, want, rtol=1e-5, atol=1e-5)


@needs_hf
def test_from_peft_gpt2_and_merged_layers():
    base = tiny_gpt2()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn", "c_fc"],
                                                        fan_in_fan_out=True))
    randomize_lora(pm)
    ids = tokens()
    want = pm(ids).logits
    pm.base_model.merge_adapter()  # a merged PEFT layer is unmerged before conversion
    fused_lora.from_peft(pm)
    assert pm.base_model.model.transformer.h[1].mlp.c_fc.fan_in_fan_out
    torch.testing.assert_close(pm(ids).logits, want, rtol=1e-5, atol=1e-5)


@needs_hf
def test_merge_unmerge_model_exact():
    for model, targets in ((tiny_llama(), LLAMA_TARGETS), (tiny_gpt2(), ["c_attn", "c_fc", "c_proj"])):
        fused_lora.inject_lora(model, targets, r=4)
        randomize_lora(model)
        ids = tokens()
        want = model(ids).logits
        before = {n: p.clone() for n, p in model.named_parameters()}
        names = fused_lora.merge_lora(model)
        assert names and all(m.merged for m in model.modules() if isinstance(m, FusedLoRALinear))
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
        fused_lora.unmerge_lora(model)
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n  # bit-exact unmerge
        torch.testing.assert_close(model(ids).logits, want)


# -------------------------------------------------------------------------------------- refusals


def _save_peft(tmp_path, base, cfg, name="ad"):
    pm = get_peft_model(copy.deepcopy(base), cfg)
    pm.save_pretrained(str(tmp_path / name))
    return str(tmp_path / name)


@needs_hf
def test_load_refuses_unsupported_adapters(tmp_path):
    from peft import LoHaConfig

    base = tiny_llama(layers=1)
    cases = {
        "DoRA": LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
        "peft_type='LOHA'": LoHaConfig(r=2, target_modules=["q_proj"]),
        "embedding LoRA": LoraConfig(r=2, target_modules=["embed_tokens"]),
        "lora_bias": LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True),
        "modules_to_save": LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    }
    for i, (feature, cfg) in enumerate(cases.items()):
        path = _save_peft(tmp_path, base, cfg, f"ad{i}")
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match=feature.replace("(", r"\(").replace(")", r"\)")):
            fused_lora.load_peft_adapter(model, path)
        assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())  # untouched

    # A checkpoint whose modules the model lacks (wrong base model).
    path = _save_peft(tmp_path, base, LoraConfig(r=2, target_modules=["q_proj"]), "ok")
    with pytest.raises(ValueError, match="not found in the base model"):
        fused_lora.load_peft_adapter(tiny_gpt2(), path)
    # Config target names that exist, but checkpoint modules that do not.
    edited = str(tmp_path / "edited")
    shutil.copytree(path, edited)
    cfg_file = os.path.join(edited, "adapter_config.json")
    cfg = json.loads(open(cfg_file).read())
    cfg["target_modules"] = ["c_attn"]
    open(cfg_file, "w").write(json.dumps(cfg))
    with pytest.raises(ValueError, match="no such module"):
        fused_lora.load_peft_adapter(tiny_gpt2(), edited)
    with pytest.raises(ValueError, match="adapter_config.json"):
        fused_lora.load_peft_adapter(copy.deepcopy(base), str(tmp_path))
    with pytest.raises(ValueError, match="PeftModel"):
        fused_lora.load_peft_adapter(PeftModel.from_pretrained(copy.deepcopy(base), path), path)


@needs_hf
def test_from_peft_refusals():
    base = tiny_llama(layers=1)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        fused_lora.from_peft(pm)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"]))
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    pm.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="active adapters"):
        fused_lora.from_peft(pm)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ValueError, match="embedding"):
        fused_lora.from_peft(pm)


class _FakeBnbLinear(torch.nn.Linear):
    """Stands in for bitsandbytes' Linear4bit (a Linear subclass from the bitsandbytes package)."""


_FakeBnbLinear.__module__ = "bitsandbytes.nn.modules"


def test_inject_refuses_bad_targets_and_args():
    model = torch.nn.Sequential()
    model.add_module("emb", torch.nn.Embedding(10, 8))
    model.add_module("conv", torch.nn.Conv2d(2, 2, 1))
    model.add_module("q", _FakeBnbLinear(8, 8))
    model.add_module("mha", torch.nn.MultiheadAttention(8, 2))
    model.add_module("lin", torch.nn.Linear(8, 8))
    for target, msg in (("emb", "embedding LoRA"), ("conv", "convolution LoRA"), ("q", "quantized"),
                        ("mha", "MultiheadAttention"), ("mha.out_proj", "subclass of nn.Linear")):
        with pytest.raises(ValueError, match=msg):
            fused_lora.inject_lora(model, [target])
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())
    with pytest.raises(ValueError, match="not found in the base model"):
        fused_lora.inject_lora(model, ["nope"])
    with pytest.raises(TypeError, match="target_modules"):
        fused_lora.inject_lora(model, [])
    with pytest.raises(ValueError, match="regular expression"):
        fused_lora.inject_lora(model, "(")
    with pytest.raises(ValueError, match="r must be"):
        fused_lora.inject_lora(model, ["lin"], r=0)
    with pytest.raises(ValueError, match="rank_pattern"):
        fused_lora.inject_lora(model, ["lin"], rank_pattern={"lin": -1})
    with pytest.raises(ValueError, match="lora_dropout"):
        fused_lora.inject_lora(model, ["lin"], lora_dropout=1.0)
    with pytest.raises(TypeError, match="model"):
        fused_lora.inject_lora("model", ["lin"])
    fused_lora.inject_lora(model, ["lin"])
    with pytest.raises(ValueError, match="already"):
        fused_lora.inject_lora(model, ["lin"])
    with pytest.raises(ValueError, match="no FusedLoRALinear"):
        fused_lora.save_peft_adapter(torch.nn.Linear(2, 2), "unused")


@needs_hf
def test_save_refuses_merged(tmp_path):
    model = tiny_llama(layers=1)
    fused_lora.inject_lora(model, ["q_proj"], r=2)
    fused_lora.merge_lora(model)
    with pytest.raises(ValueError, match="unmerge"):
        fused_lora.save_peft_adapter(model, tmp_path)


# ------------------------------------------------------------------------- compile, triton, gpu


@needs_hf
def test_gradient_checkpointing_with_dropout_replays_masks():
    """HF gradient checkpointing recomputes each layer's forward in backward: the fused dropout
    must draw the same mask again (its seed comes from the CPU RNG that checkpointing restores),
    so grads equal those without checkpointing (PEFT issue #3020's setting)."""
    base = tiny_llama()
    fused_lora.inject_lora(base, LLAMA_TARGETS, r=4, lora_dropout=0.3)
    randomize_lora(base)
    grads = []
    for ckpt in (False, True):
        model = copy.deepcopy(base)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(1)
        ids = tokens()
        model(ids, labels=ids).loss.backward()
        grads.append(lora_grads(model))
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


@needs_hf
def test_bf16_base_with_fp32_adapters_matches_peft(tmp_path):
    """PEFT keeps adapters in fp32 on a bf16 model (autocast_adapter_dtype); so does
    load_peft_adapter, and the outputs agree to bf16 rounding."""
    base = tiny_llama()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    randomize_lora(pm)
    pm.save_pretrained(str(tmp_path))
    ids = tokens()
    pm_bf16 = PeftModel.from_pretrained(copy.deepcopy(base).to(torch.bfloat16), str(tmp_path))
    model = fused_lora.load_peft_adapter(copy.deepcopy(base).to(torch.bfloat16), tmp_path)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.weight.dtype == torch.float32
    want = pm(ids).logits  # fp32 reference
    got, peft_got = model(ids).logits.float(), pm_bf16(ids).logits.float()
    err, peft_err = (got - want).abs().max().item(), (peft_got - want).abs().max().item()
    assert err <= 2 * peft_err + 1e-2, (err, peft_err)


@needs_hf
def test_example_script_runs():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "finetune_causal_lm.py")
    spec = importlib.util.spec_from_file_location("finetune_causal_lm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--steps", "3", "--hidden", "32", "--layers", "1", "--seq", "8", "--batch", "4"]) == 0


@needs_hf
def test_compile_fullgraph_llama_forward_and_train_step():
    """No graph breaks through a whole transformers model with fused LoRA layers (torch backend
    on CPU; the custom ops are what Dynamo sees for every backend)."""
    torch._dynamo.reset()
    model = tiny_llama()
    fused_lora.inject_lora(model, LLAMA_TARGETS, r=4)
    randomize_lora(model)
    model.train()
    ref = copy.deepcopy(model)
    ids = tokens()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt_ref = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    logits = []
    for m, o in ((compiled, opt), (ref, opt_ref)):
        out = m(ids, labels=ids)
        out.loss.backward()
        o.step()
        logits.append(out.logits.detach())
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
@pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("arch", ["block", pytest.param("llama", marks=needs_hf),
                                  pytest.param("gpt2", marks=needs_hf)])
def test_triton_backend_model_matches_torch(arch):
    """The Triton kernels inside a real model; for GPT-2 they read Conv1D's [in, out] weight
    through a transposed (strided) view."""
    dev = "cuda" if HAS_CUDA else "cpu"
    base, targets = arch_model(arch)
    base = base.to(dev)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    fused_lora.inject_lora(a, targets, r=4, backend="triton")
    fused_lora.inject_lora(b, targets, r=4, backend="torch")
    randomize_lora(a)
    b.load_state_dict(a.state_dict())
    ids = tokens(1, 5).to(dev)
    oa, ob = a(ids, labels=ids), b(ids, labels=ids)
    torch.testing.assert_close(oa.logits, ob.logits, rtol=1e-4, atol=1e-4)
    oa.loss.backward()
    ob.loss.backward()
    ga, gb = lora_grads(a), lora_grads(b)
    for k in gb:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["block", pytest.param("llama", marks=needs_hf)])
def test_cuda_graph_capture(arch):
    """A model with fused LoRA layers captures into a CUDA graph (forward, and a whole
    forward + backward) and replays the same results; torch.compile(mode="reduce-overhead") too."""
    model, _ = arch_model(arch)
    model = model.cuda()
    fused_lora.inject_lora(model, LLAMA_TARGETS, r=4)
    randomize_lora(model)
    kw = {"use_cache": False} if arch == "llama" else {}
    ids = tokens().cuda()
    with torch.no_grad():
        want = model(ids, **kw).logits.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm up (autotuning, lazy init) outside the capture
                model(ids, **kw)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = model(ids, **kw).logits
        out.zero_()
        g.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)

    # Forward + backward captured, gradients accumulating into static .grad buffers.
    model.train()
    ref = copy.deepcopy(model)
    ref(ids, labels=ids, **kw).loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            model(ids, labels=ids, **kw).loss.backward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        model(ids, labels=ids, **kw).loss.backward()
    for _, p in params:
        p.grad.zero_()
    g.replay()
    torch.cuda.synchronize()
    ref_grads = dict((n, q.grad) for n, q in ref.named_parameters() if q.requires_grad)
    for n, p in params:
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-3, atol=1e-5, msg=n)

    # reduce-overhead (CUDA graphs through torch.compile) gives the same result.
    model.eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            got = compiled(ids, **kw).logits.clone()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------- mixed-adapter serving banks


def _two_adapters(tmp_path, base):
    """Two PEFT adapters on different module sets, ranks and scalings (one rsLoRA)."""
    cfgs = {
        "alpha": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            rank_pattern={"down_proj": 2}),
        "beta": LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "o_proj", "up_proj"],
                           use_rslora=True),
    }
    paths, peft_models = {}, {}
    for name, cfg in cfgs.items():
        torch.manual_seed(len(name))
        pm = get_peft_model(copy.deepcopy(base), cfg)
        randomize_lora(pm)
        paths[name] = str(tmp_path / name)
        pm.save_pretrained(paths[name])
        peft_models[name] = pm
    return paths, peft_models


@needs_hf
def test_load_peft_adapters_multi_mixed_batch_matches_peft(tmp_path):
    from fused_lora import MultiLoRALinear

    base = tiny_llama()
    paths, peft_models = _two_adapters(tmp_path, base)
    model = copy.deepcopy(base)
    q_w = model.model.layers[0].self_attn.q_proj.weight
    slots = fused_lora.load_peft_adapters_multi(model, paths)
    assert slots == {"alpha": 0, "beta": 1} and model.fused_lora_adapter_slots == slots
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, MultiLoRALinear) and isinstance(attn.o_proj, MultiLoRALinear)
    assert not isinstance(attn.k_proj, MultiLoRALinear)  # no adapter targets it
    assert attn.q_proj.max_rank == 6 and attn.q_proj.weight is q_w  # shared base weight
    assert attn.q_proj.ranks.tolist() == [4, 6]
    assert model.model.layers[0].mlp.down_proj.ranks.tolist() == [2, 0]
    assert not any(p.requires_grad for p in model.parameters())

    ids = tokens(4, 7)
    with torch.no_grad():
        want = torch.stack([
            peft_models["alpha"](ids[0:1]).logits[0],
            peft_models["beta"](ids[1:2]).logits[0],
            base(ids[2:3]).logits[0],
            peft_models["beta"](ids[3:4]).logits[0],
        ])
        with fused_lora.adapter_ids(model, ["alpha", "beta", None, 1]) as t:
            assert t.tolist() == [0, 1, -1, 1]
            got = model(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # Per-token ids [batch, seq]: the whole of row 0 on beta, row 1 half alpha / half base.
        tok = torch.full((2, 7), 1)
        tok[1, :4], tok[1, 4:] = 0, -1
        with fused_lora.adapter_ids(model, tok):
            got = model(ids[:2]).logits
        torch.testing.assert_close(got[0], peft_models["beta"](ids[:1]).logits[0], rtol=1e-5, atol=1e-5)
    # Outside the context the ids are gone again.
    assert attn.q_proj.default_adapter_ids is None
    with pytest.raises(ValueError, match="adapter_ids"):
        model(ids)


@needs_hf
def test_load_peft_adapters_multi_refusals_and_compile(tmp_path):
    base = tiny_llama(layers=1)
    paths, _ = _two_adapters(tmp_path, base)
    with pytest.raises(ValueError, match="max_rank"):
        fused_lora.load_peft_adapters_multi(copy.deepcopy(base), paths, max_rank=4)
    with pytest.raises(ValueError, match="n_slots"):
        fused_lora.load_peft_adapters_multi(copy.deepcopy(base), paths, n_slots=1)
    dora = _save_peft(tmp_path, base, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "dora")
    with pytest.raises(ValueError, match="DoRA"):
        fused_lora.load_peft_adapters_multi(copy.deepcopy(base), {"a": paths["alpha"], "d": dora})
    gpt = _save_peft(tmp_path, tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]), "gpt")
    with pytest.raises(ValueError, match="Conv1D"):
        fused_lora.load_peft_adapters_multi(tiny_gpt2(), {"g": gpt})

    model = copy.deepcopy(base)
    fused_lora.load_peft_adapters_multi(model, paths, n_slots=4)
    with pytest.raises(ValueError, match="unknown adapter"):
        with fused_lora.adapter_ids(model, ["gamma"]):
            pass
    with pytest.raises(ValueError, match="n_slots"):
        with fused_lora.adapter_ids(model, [4]):
            pass
    # A whole transformers model with banks compiles without graph breaks.
    torch._dynamo.reset()
    ids = tokens(3, 5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), fused_lora.adapter_ids(model, ["beta", None, "alpha"]):
        want = model(ids).logits
        got = compiled(ids).logits
    torch.testing.assert_close(got, want)


@needs_hf
def test_load_peft_adapters_multi_banks_in_model_dtype(tmp_path):
    """Serving banks take the base model's dtype (bf16 here: half the bytes a decode step reads
    from fp32 banks), fp32 only with adapter_dtype=torch.float32; both stay close to PEFT's
    fp32 outputs (bf16 rounding). A non-dtype adapter_dtype is a TypeError naming it."""
    base = tiny_llama(layers=1)
    paths, peft_models = _two_adapters(tmp_path, base)
    ids = tokens(2, 5)
    with torch.no_grad():
        want = torch.cat([peft_models["alpha"](ids[:1]).logits, peft_models["beta"](ids[1:]).logits])
    for dtype, kw in ((torch.bfloat16, {}), (torch.float32, {"adapter_dtype": torch.float32})):
        model = copy.deepcopy(base).to(torch.bfloat16)
        fused_lora.load_peft_adapters_multi(model, paths, backend="torch", **kw)
        q = model.model.layers[0].self_attn.q_proj
        assert q.weight.dtype == torch.bfloat16
        assert q.lora_A.dtype == dtype and q.lora_B.dtype == dtype, kw
        with torch.no_grad(), fused_lora.adapter_ids(model, ["alpha", "beta"]):
            got = model(ids).logits.float()
        assert (got - want).abs().max().item() < 0.1, kw
    with pytest.raises(TypeError, match="adapter_dtype"):
        fused_lora.load_peft_adapters_multi(copy.deepcopy(base), paths, adapter_dtype="float32")
