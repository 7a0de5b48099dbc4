"""Reliability of the PEFT entry points (load_peft_adapter, load_peft_adapters_multi, from_peft,
inject_lora): base-modifying inits (PiSSA, OLoRA, ...) refused by name, failed loads that leave
the model exactly as it was, target_modules that name missing modules, one table of supported
and refused PEFT features for every entry point, damaged adapter files and bad config values
reported with the file / key / module, and the README's "Use it on real models" block run top
to bottom.

Models are tiny and built from configs with random weights: nothing is downloaded."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re

import pytest
import torch
from test_integrations import HAS_HF, LLAMA_TARGETS, needs_hf, randomize_lora, tiny_llama, tokens

import fused_lora
from fused_lora import FusedLoRALinear

if HAS_HF:
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file

pytestmark = needs_hf
ST = "adapter_model.safetensors"
CFG = "adapter_config.json"


def _peft_folder(tmp_path, base, name="ad", **cfg_kw):
    """A PEFT adapter folder saved by real PEFT, with random (non-zero) LoRA weights."""
    cfg_kw.setdefault("r", 2)
    cfg_kw.setdefault("target_modules", ["q_proj", "v_proj"])
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg_kw))
    randomize_lora(pm)
    path = str(tmp_path / name)
    pm.save_pretrained(path)
    return path, pm


def _edit_config(path, **changes):
    with open(os.path.join(path, CFG)) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(path, CFG), "w") as f:
        json.dump(cfg, f)  # allow_nan: NaN / Infinity as Python's json writes and reads them


def snapshot(model):
    """Module types by name, and every parameter's value, dtype and requires_grad."""
    types = {n: type(m) for n, m in model.named_modules()}
    params = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    return types, params


def assert_unchanged(model, snap):
    types, params = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, (v, rg) in params.items():
        p = now[n]
        assert p.dtype == v.dtype and p.requires_grad == rg, n
        assert torch.equal(p.detach().view(torch.uint8), v.view(torch.uint8)), n  # bit-identical


def _both_loaders(model, path):
    """Call each folder loader on a copy of ``model``; yields (loader name, callable)."""
    yield "load_peft_adapter", lambda m: fused_lora.load_peft_adapter(m, path, backend="torch")
    yield "load_peft_adapters_multi", lambda m: fused_lora.load_peft_adapters_multi(
        m, {"a": path}, backend="torch")


def assert_refused(base, path, match, exc=ValueError):
    for _loader, load in _both_loaders(base, path):
        model = copy.deepcopy(base)
        snap = snapshot(model)
        with pytest.raises(exc, match=match):
            load(model)
        assert_unchanged(model, snap)


# ----------------------------------------------------------------- base-modifying inits (PiSSA)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_folders_refused_by_name(tmp_path, init):
    """PiSSA / OLoRA change the base weight at init (W0 -> W0 - s B0 A0) and PEFT's
    from_pretrained re-runs that; a folder saved plainly would load onto the unmodified base
    with wrong outputs, so every loader refuses it, naming the init and the way out."""
    base = tiny_llama(layers=1)
    path, _ = _peft_folder(tmp_path, base, init_lora_weights=init)
    assert_refused(base, path, rf"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion")


@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "loftq", "lora_ga"])
def test_every_base_modifying_init_refused(tmp_path, init):
    base = tiny_llama(layers=1)
    path, _ = _peft_folder(tmp_path, base)
    _edit_config(path, init_lora_weights=init)
    assert_refused(base, path, f"init_lora_weights='{init}'")


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal", "eva", "mica"])
def test_base_preserving_inits_load(tmp_path, init):
    base = tiny_llama(layers=1)
    path, pm = _peft_folder(tmp_path, base)
    _edit_config(path, init_lora_weights=init)
    model = fused_lora.load_peft_adapter(copy.deepcopy(base), path, backend="torch")
    ids = tokens()
    torch.testing.assert_close(model(ids).logits, pm(ids).logits, rtol=1e-5, atol=1e-5)


def test_pissa_converted_folder_and_from_peft_match_peft(tmp_path):
    """A PiSSA adapter saved with path_initial_model_for_weight_conversion is a plain LoRA of
    rank 2r on the unmodified base; from_peft on the live PiSSA model keeps PEFT's modified
    base. Both give the trained PiSSA model's outputs."""
    base = tiny_llama(layers=1)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights="pissa"))
    pm.save_pretrained(str(tmp_path / "init"))
    with torch.no_grad():  # "training"
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "conv"),
                       path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    ids = tokens()
    with torch.no_grad():
        want = pm(ids).logits
        model = fused_lora.load_peft_adapter(copy.deepcopy(base), tmp_path / "conv", backend="torch")
        assert model.model.layers[0].self_attn.q_proj.r == 4
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
        bank = copy.deepcopy(base)
        fused_lora.load_peft_adapters_multi(bank, {"p": tmp_path / "conv"}, backend="torch")
        with fused_lora.adapter_ids(bank, ["p", "p"]):
            torch.testing.assert_close(bank(ids).logits, want, rtol=1e-4, atol=1e-4)
        fused_lora.from_peft(pm, backend="torch")
        assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj, FusedLoRALinear)
        torch.testing.assert_close(pm(ids).logits, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- atomic failed loads


def _retensor(path, fn):
    sd = load_file(os.path.join(path, ST))
    sd = fn(dict(sd))
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(path, ST))


def test_failed_folder_loads_leave_model_untouched(tmp_path):
    """Refusals found at a later module (rank 0, NaN / inf alpha via alpha_pattern) used to
    leave the earlier modules converted; now nothing changes, and the message names the
    module."""
    base = tiny_llama(layers=2)
    late = "model.layers.1.self_attn.v_proj"
    cases = {
        "nan": ({"alpha_pattern": {late: float("nan")}}, None,
                r"'alpha_pattern' entry 'model\.layers\.1\.self_attn\.v_proj'.*got nan"),
        "inf": ({"alpha_pattern": {"layers.1.self_attn.v_proj": float("inf")}}, None,
                r"'alpha_pattern' entry 'layers\.1\.self_attn\.v_proj'.*got inf"),
        "rank0": ({"rank_pattern": {late: 0}},
                  lambda sd: {k: (v[:0] if "lora_A" in k else v[:, :0]) if late in k else v
                              for k, v in sd.items()},
                  r"'rank_pattern' entry 'model\.layers\.1\.self_attn\.v_proj'.*got 0"),
        # Weights of rank 0 where the config says 2: names the module.
        "rank0_weights": ({}, lambda sd: {k: (v[:0] if "lora_A" in k else v[:, :0]) if late in k else v
                                          for k, v in sd.items()},
                          r"'model\.layers\.1\.self_attn\.v_proj' has rank 0 in the weights"),
    }
    for name, (cfg, tensors, match) in cases.items():
        path, _ = _peft_folder(tmp_path, base, name)
        _edit_config(path, **cfg)
        if tensors is not None:
            _retensor(path, tensors)
        assert_refused(base, path, match)


def test_failed_from_peft_leaves_model_untouched():
    """from_peft refusing a later layer (NaN scaling, rank 0, a DoRA layer from a second
    config) converts nothing, and merged PEFT layers stay merged bit-for-bit."""
    base = tiny_llama(layers=2)
    for case in ("nan", "rank0", "merged_nan"):
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=LLAMA_TARGETS))
        randomize_lora(pm)
        late = pm.base_model.model.model.layers[1].mlp.down_proj
        if case.startswith("merged"):
            pm.base_model.merge_adapter()
        if case.endswith("nan"):
            late.scaling["default"] = float("nan")
        else:
            late.r["default"] = 0
        snap = snapshot(pm)
        with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj"):
            fused_lora.from_peft(pm, backend="torch")
        assert_unchanged(pm, snap)


# --------------------------------------------------------------------- target_modules checks


def test_inject_refuses_target_names_the_model_lacks():
    """PEFT: "Target modules {...} not found in the base model". A list entry that matches no
    module (a typo next to good names) is refused too, rather than silently giving fewer
    adapters."""
    model = tiny_llama(layers=1)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"\['q_prj'\] not found in the base model"):
        fused_lora.inject_lora(model, ["q_proj", "q_prj"], backend="torch")
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="not found in the base model"):
        fused_lora.inject_lora(model, ["nope"], backend="torch")
    assert_unchanged(model, snap)
    # Names that exist but are excluded, or match non-Linear modules elsewhere, are fine.
    names = fused_lora.inject_lora(model, ["q_proj", "v_proj"], exclude_modules=["v_proj"], backend="torch")
    assert names == ["model.layers.0.self_attn.q_proj"]


def test_loaders_refuse_config_targets_the_model_lacks(tmp_path):
    base = tiny_llama(layers=1)
    path, _ = _peft_folder(tmp_path, base)
    _edit_config(path, target_modules=["q_proj", "v_proj", "wq"])
    assert_refused(base, path, r"target_modules.*\['wq'\] not found in the base model")


# --------------------------------------------------------------- one table of PEFT features


def test_feature_table_covers_every_lora_config_field():
    """Every field of the installed peft's LoraConfig is either known harmless or names a
    refused feature: a new PEFT feature fails this test instead of loading as plain LoRA."""
    from fused_lora.integrations import features

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = fields - set(features.CONFIG_FEATURES) - set(features.SUPPORTED_CONFIG_KEYS)
    assert not unknown, f"LoraConfig fields missing from the feature table: {sorted(unknown)}"


def test_kasa_refused_by_name_everywhere(tmp_path):
    from peft.tuners.lora.config import KasaConfig

    base = tiny_llama(layers=1)
    path, pm = _peft_folder(tmp_path, base, kasa_config=KasaConfig())
    assert_refused(base, path, "KaSA")
    # The weight key alone (lora_diag) names KaSA too, whatever the config says.
    _edit_config(path, kasa_config=None)
    assert_refused(base, path, "KaSA")
    snap = snapshot(pm)
    with pytest.raises(ValueError, match="KaSA"):
        fused_lora.from_peft(pm, backend="torch")
    assert_unchanged(pm, snap)


class _MhaModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(8, 2)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.mha(x, x, x)[0] + self.lin(x)


def test_mha_lora_refused_by_name_everywhere(tmp_path):
    base = _MhaModel()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["mha", "lin"]))
    pm.save_pretrained(str(tmp_path / "mha"))
    assert_refused(base, str(tmp_path / "mha"), r"MultiheadAttention LoRA.*'mha'")
    snap = snapshot(pm)
    with pytest.raises(ValueError, match=r"MultiheadAttention LoRA.*\.mha'"):
        fused_lora.from_peft(pm, backend="torch")
    assert_unchanged(pm, snap)


def test_mica_supported_everywhere(tmp_path):
    """MiCA's forward is plain LoRA (PEFT's MiCALinearVariant says so) and it leaves the base
    weight alone: every entry point loads it, and lora_B stays frozen when trainable, as in
    PEFT."""
    base = tiny_llama(layers=1)
    path, pm = _peft_folder(tmp_path, base, init_lora_weights="mica")
    ids = tokens()
    want = pm(ids).logits.detach()
    model = fused_lora.load_peft_adapter(copy.deepcopy(base), path, backend="torch", is_trainable=True)
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.weight.requires_grad and not q.lora_B.weight.requires_grad
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    bank = copy.deepcopy(base)
    fused_lora.load_peft_adapters_multi(bank, {"m": path}, backend="torch")
    with torch.no_grad(), fused_lora.adapter_ids(bank, ["m", "m"]):
        torch.testing.assert_close(bank(ids).logits, want, rtol=1e-5, atol=1e-5)
    fused_lora.from_peft(pm, backend="torch")
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, FusedLoRALinear) and not q.lora_B.weight.requires_grad
    torch.testing.assert_close(pm(ids).logits, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- damaged files


def test_damaged_files_raise_value_error_naming_the_file(tmp_path):
    base = tiny_llama(layers=1)
    good, _ = _peft_folder(tmp_path, base, "good")
    cases = {}
    import shutil

    def variant(name):
        p = str(tmp_path / name)
        shutil.copytree(good, p)
        return p

    p = variant("trunc_st")
    data = open(os.path.join(p, ST), "rb").read()
    open(os.path.join(p, ST), "wb").write(data[: len(data) // 2])
    cases[p] = ST
    p = variant("garbage_st")
    open(os.path.join(p, ST), "wb").write(b"\x00" * 64)
    cases[p] = ST
    p = variant("trunc_bin")
    os.remove(os.path.join(p, ST))
    torch.save(load_file(os.path.join(good, ST)), os.path.join(p, "adapter_model.bin"))
    data = open(os.path.join(p, "adapter_model.bin"), "rb").read()
    open(os.path.join(p, "adapter_model.bin"), "wb").write(data[: len(data) // 2])
    cases[p] = "adapter_model.bin"
    p = variant("bad_json")
    open(os.path.join(p, CFG), "w").write('{"r": 2, "lora_alpha": ')
    cases[p] = CFG
    p = variant("list_json")
    open(os.path.join(p, CFG), "w").write("[1, 2]")
    cases[p] = CFG
    p = variant("not_tensors_bin")
    os.remove(os.path.join(p, ST))
    torch.save({"base_model.model.x.lora_A.weight": 3}, os.path.join(p, "adapter_model.bin"))
    cases[p] = "adapter_model.bin"
    for p, fname in cases.items():
        assert_refused(base, p, re.escape(os.path.join(p, fname)))


# --------------------------------------------------------------------------- config values


@pytest.mark.parametrize("changes,match", [
    ({"r": "2"}, r"'r'.*'2'"),
    ({"r": 2.0}, r"'r'.*2\.0"),
    ({"lora_alpha": "8"}, r"'lora_alpha'.*'8'"),
    ({"lora_alpha": None}, r"'lora_alpha'.*None"),
    ({"lora_alpha": True}, r"'lora_alpha'.*True"),
    ({"lora_dropout": "0.1"}, r"'lora_dropout'.*'0.1'"),
    ({"lora_dropout": 1.5}, r"'lora_dropout'.*1\.5"),
    ({"use_rslora": "yes"}, r"'use_rslora'.*'yes'"),
    ({"rank_pattern": {"v_proj": "2"}}, r"'rank_pattern' entry 'v_proj'.*got '2'"),
    ({"alpha_pattern": {"v_proj": "x"}}, r"'alpha_pattern' entry 'v_proj'.*got 'x'"),
    ({"rank_pattern": ["v_proj"]}, r"'rank_pattern'.*\['v_proj'\]"),
    ({"target_modules": 3}, r"'target_modules'.*3"),
])
def test_bad_config_values_name_the_key(tmp_path, changes, match):
    base = tiny_llama(layers=1)
    path, _ = _peft_folder(tmp_path, base)
    _edit_config(path, **changes)
    assert_refused(base, path, match)


def test_rank_zero_in_multi_loader_names_module(tmp_path):
    base = tiny_llama(layers=1)
    path, _ = _peft_folder(tmp_path, base)
    _edit_config(path, r=0)
    _retensor(path, lambda sd: {k: (v[:0] if "lora_A" in k else v[:, :0]) for k, v in sd.items()})
    assert_refused(base, path, r"config key 'r' must be an int >= 1, got 0")


# ------------------------------------------------------------------- the README's usage block


def _readme_block() -> str:
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme.split("## Use it on real models", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_real_models_block_runs_top_to_bottom(tmp_path, monkeypatch):
    """The README block, exec'd as written, on tiny Llamas: inject_lora then load_peft_adapter
    on the same model loads the adapter's weights into the injected layers (same outputs as
    PEFT's from_pretrained), then save, from_peft, serving banks and adapter_ids."""
    monkeypatch.chdir(tmp_path)
    base = tiny_llama(layers=1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    path, pm_ref = _peft_folder(tmp_path, base, "path/to/peft_adapter", r=16, lora_alpha=32,
                                target_modules=targets)
    p1, _ = _peft_folder(tmp_path, base, "p1", r=4, target_modules=["q_proj"])
    p2, _ = _peft_folder(tmp_path, base, "p2", r=2, target_modules=["v_proj", "o_proj"])
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"]))
    input_ids = tokens(3, 5)
    ns = {
        "fused_lora": fused_lora, "torch": torch, "model": copy.deepcopy(base), "peft_model": pm,
        "base_model": copy.deepcopy(base), "p1": p1, "p2": p2, "input_ids": input_ids,
    }
    exec(compile(_readme_block(), "README.md", "exec"), ns)
    model = ns["model"]
    assert isinstance(model.model.layers[0].self_attn.k_proj, FusedLoRALinear)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, pm_ref(input_ids).logits, rtol=1e-5, atol=1e-5)
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out"))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids).logits, pm_ref(input_ids).logits, rtol=1e-5, atol=1e-5)
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj, FusedLoRALinear)
    assert ns["logits"].shape == (3, 5, 64)


def test_load_into_injected_model_checks_ranks_and_coverage(tmp_path):
    """Loading into FusedLoRALinear layers that inject_lora made: a rank that differs, or an
    injected layer the adapter has no weights for, is refused naming the module; nothing
    changes."""
    base = tiny_llama(layers=1)
    path, pm = _peft_folder(tmp_path, base, r=2, target_modules=["q_proj", "v_proj"])
    model = copy.deepcopy(base)
    fused_lora.inject_lora(model, ["q_proj", "v_proj"], r=4, backend="torch")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"q_proj.*rank 4.*rank 2"):
        fused_lora.load_peft_adapter(model, path, backend="torch")
    assert_unchanged(model, snap)
    model = copy.deepcopy(base)
    fused_lora.inject_lora(model, ["q_proj", "v_proj", "k_proj"], r=2, backend="torch")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"k_proj.*no weights"):
        fused_lora.load_peft_adapter(model, path, backend="torch")
    assert_unchanged(model, snap)
    model = copy.deepcopy(base)
    fused_lora.inject_lora(model, ["q_proj", "v_proj"], r=2, lora_alpha=99, backend="torch")
    fused_lora.load_peft_adapter(model, path, backend="torch", is_trainable=True)
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_alpha == 8 and q.scaling == pytest.approx(4.0)
    assert q.lora_A.weight.requires_grad
    ids = tokens()
    torch.testing.assert_close(model(ids).logits, pm(ids).logits, rtol=1e-5, atol=1e-5)
    assert not math.isnan(float(model(ids).logits.sum()))


def test_failure_midway_through_apply_rolls_back(tmp_path, monkeypatch):
    """An error no check foresees (here: the 3rd layer constructor raising, as an out-of-memory
    would) after earlier modules were replaced, weights loaded into injected layers, or merged
    PEFT layers unmerged: the transaction puts all of it back, bit for bit."""
    from fused_lora.integrations import inject, live_peft, peft_io

    real = inject._wrap
    calls = {"n": 0}

    def flaky(m, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(m, **kw)

    base = tiny_llama(layers=2)
    path, _ = _peft_folder(tmp_path, base, target_modules=LLAMA_TARGETS)
    for mod in (inject, peft_io, live_peft):
        monkeypatch.setattr(mod, "_wrap", flaky)
    # Plain base: two modules replaced, then the failure.
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="simulated"):
        fused_lora.load_peft_adapter(model, path, backend="torch")
    assert_unchanged(model, snap)
    # Half-injected model: weights copied into the injected q/k/v layers, then a wrap fails.
    model = copy.deepcopy(base)
    monkeypatch.setattr(inject, "_wrap", real)
    fused_lora.inject_lora(model, ["q_proj", "k_proj", "v_proj"], r=2, lora_alpha=5, backend="torch")
    monkeypatch.setattr(inject, "_wrap", flaky)
    randomize_lora(model)
    snap = snapshot(model)
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="simulated"):
        fused_lora.load_peft_adapter(model, path, backend="torch")
    assert_unchanged(model, snap)
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_alpha == 5 and q.r == 2  # attributes put back too
    # from_peft of a merged PeftModel: unmerged layers are merged again (weights bit-identical).
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=LLAMA_TARGETS))
    randomize_lora(pm)
    pm.base_model.merge_adapter()
    snap = snapshot(pm)
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="simulated"):
        fused_lora.from_peft(pm, backend="torch")
    assert_unchanged(pm, snap)
    assert all(m.merged for m in pm.modules() if hasattr(m, "merged_adapters"))
    # inject_lora itself.
    model = copy.deepcopy(base)
    snap = snapshot(model)
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="simulated"):
        fused_lora.inject_lora(model, LLAMA_TARGETS, backend="torch")
    assert_unchanged(model, snap)
