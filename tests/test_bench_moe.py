"""``python -m fused_lora.bench moe --quick`` on the CPU end to end (issue 12 item 4): one MoE
layer with LoRA (Qwen3-30B-A3B / Mixtral-8x7B structure at small widths) against PEFT
target_parameters, transformers' loop and the merged-weight bound, and mixed-adapter decode with
its bandwidth; results JSON / CSV in a temporary directory (never bench/results)."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import pytest
import torch

from fused_lora.bench import __main__ as cli
from fused_lora.bench import harness as H
from fused_lora.bench import suite_moe


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_moe")
    results = sorted(p.name for p in cli.DEFAULT_RESULTS.iterdir()) if cli.DEFAULT_RESULTS.exists() else []
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["moe", "--quick", "--device", "cpu", "--out", str(out), "--quiet", "--no-plots"])
    after = sorted(p.name for p in cli.DEFAULT_RESULTS.iterdir()) if cli.DEFAULT_RESULTS.exists() else []
    assert after == results, "a run with --out must not write into bench/results"
    return rc, out, buf.getvalue()


def test_moe_quick_cpu_run(quick_run):
    rc, out, text = quick_run
    assert rc == 0
    (jpath,) = out.glob("cpu-moe-*.json")
    data = json.loads(jpath.read_text())
    env, rows = data["env"], data["rows"]
    for k in H.ENV_KEYS:
        assert k in env
    assert env["gpu"] is None and env["torch"] == torch.__version__ and "--quick" in env["command"]
    assert "not GPU speed" in env["timings_note"] and env["peak_bw_gbs"] > 0
    assert env["shapes"]["qwen3-30b-a3b"] == {"E": 128, "top_k": 8, "H": 2048, "I": 768}
    assert "fused_triton" in env["skipped"]  # never timed under the interpreter
    assert "## moe (CPU: shows the code runs, not GPU speed" in text
    for row in rows:
        for k in H.ROW_KEYS:
            assert k in row
        assert row["pass"] is True, row
        assert row["ms"] > 0 and row["ms_p20"] <= row["ms"] <= row["ms_p80"]
    train = [r for r in rows if r["phase"] == "train"]
    assert {r["model"] for r in train} == {"qwen3-30b-a3b", "mixtral-8x7b"}
    assert {r["mode"] for r in train} == {"fwd", "fwd_bwd"}
    impls = {r["impl"] for r in train}
    assert {"fused_torch", "hf_loop", "merged_fused"} <= impls
    assert "peft" in impls or "peft" in env["skipped"]
    assert all(r["x_merged"] > 0 for r in train)
    decode = [r for r in rows if r["phase"] == "decode"]
    assert {r["M"] for r in decode} == {1, 8, 64}
    assert {r["impl"] for r in decode} == {"fused_torch", "base_fused", "hf_loop"}
    assert all(r["gbs"] > 0 and 0 < r["pct_peak"] for r in decode)
    fused = [r for r in decode if r["impl"] == "fused_torch"]
    assert all(r["bytes"] > next(b for b in decode if b["impl"] == "base_fused" and b["M"] == r["M"])["bytes"]
               for r in fused)  # the adapters' bytes count
    with open(jpath.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_grid_has_the_real_shapes_on_gpu():
    cfg = H.Config(device=torch.device("cuda"), dtypes=[torch.bfloat16], size="full")
    g = suite_moe.grid(cfg)
    assert dict(g["train"]) == {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}
    assert 4096 in g["tokens"] and g["r"] == 16 and g["decode"] == [1, 2, 4, 8, 16, 32, 64]
    assert "moe" in cli.SUITES
