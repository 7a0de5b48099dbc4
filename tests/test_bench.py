"""The benchmark CLI (``python -m fused_lora.bench``): every suite's smallest CPU path end to
end into a temporary directory, the results schema, and argument errors."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

from fused_lora.bench import __main__ as cli
from fused_lora.bench import harness as H
from fused_lora.bench import suite_multi

SUITES = list(cli.SUITES)
PLOTTED = {"linear", "adapters"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """All suites once at their smallest sizes on the CPU (about 15 s, most of it importing
    peft when it is installed)."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    rc = cli.main(["--smoke", "--device", "cpu", "--out", str(out), "--quiet"])
    assert torch.get_num_threads() == threads, "the CLI must restore torch's thread count"
    return rc, out


def test_cli_exit_code(smoke_run):
    rc, _ = smoke_run
    assert rc == 0


@pytest.mark.parametrize("suite", SUITES)
def test_results_schema(smoke_run, suite):
    _, out = smoke_run
    jsons = sorted(out.glob(f"cpu-{suite}-*.json"))
    assert len(jsons) == 1, f"expected one cpu-{suite}-*.json in {list(out.iterdir())}"
    data = json.loads(jsons[0].read_text())
    env, rows = data["env"], data["rows"]
    for k in H.ENV_KEYS:
        assert k in env, f"env lacks {k!r}"
    assert env["device"] == "cpu" and env["gpu"] is None
    assert env["torch"] == torch.__version__
    assert "--smoke" in env["command"]
    assert rows, "no rows"
    for row in rows:
        for k in H.ROW_KEYS:
            assert k in row, f"row lacks {k!r}: {row}"
        assert row["suite"] == suite
        assert row["pass"] is True, f"failed check: {row}"
        assert row["ms"] is not None and row["ms"] > 0
        assert row["ms_p20"] <= row["ms"] <= row["ms_p80"]
        assert row["dtype"] == "fp32"
    # Triton is never timed on CPU (the interpreter's timings mean nothing), even though the
    # test session turns the interpreter on.
    assert not any(r["impl"] == "fused_triton" for r in rows)
    with open(jsons[0].with_suffix(".csv")) as f:
        crow = list(csv.DictReader(f))
    assert len(crow) == len(rows)
    assert list(crow[0])[: len(H.ROW_KEYS)] == list(H.ROW_KEYS)
    png = jsons[0].with_suffix(".png")
    if suite in PLOTTED and H.have_matplotlib():
        assert png.exists() and png.stat().st_size > 0


def test_expected_competitors(smoke_run):
    _, out = smoke_run
    rows = json.loads(next(out.glob("cpu-linear-*.json")).read_text())["rows"]
    impls = {r["impl"] for r in rows}
    assert {"base", "unfused_eager", "fused_torch"} <= impls
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd_bwd"}
    rows = json.loads(next(out.glob("cpu-adapters-*.json")).read_text())["rows"]
    assert {r["impl"] for r in rows} == {"none", "adapter_h", "adapter_l", "lora_fused", "lora_merged"}
    assert all("slowdown_pct" in r for r in rows)
    rows = json.loads(next(out.glob("cpu-multi-*.json")).read_text())["rows"]
    assert {"base", "loop", "gather_bmm"} <= {r["impl"] for r in rows}
    assert all(r["x_floor"] > 0 for r in rows if r["phase"] == "decode")
    rows = json.loads(next(out.glob("cpu-train-*.json")).read_text())["rows"]
    assert {"unfused_eager", "fused_torch"} <= {r["impl"] for r in rows}
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_multi_skips_without_op(monkeypatch):
    import fused_lora

    monkeypatch.delattr(fused_lora, "multi_lora_linear", raising=False)
    cfg = H.Config(device=torch.device("cpu"), dtypes=[torch.float32], size="smoke", verbose=False)
    run, skip = suite_multi.fused_impls(cfg)
    assert run == [] and "does not exist" in skip["fused_torch"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nosuch"], "unknown suite 'nosuch'"),
        (["--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_cli_rejects_bad_args(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_rejects_cuda_without_gpu(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--device", "cuda"])
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_cpu_defaults():
    _, cfg = cli.parse_args(["--device", "cpu", "--quick"])
    assert cfg.dtypes == [torch.float32] and cfg.size == "quick"
    args, cfg = cli.parse_args(["linear", "train", "--dtype", "bf16,fp16", "--device", "cpu"])
    assert args.suites == ["linear", "train"] and cfg.dtypes == [torch.bfloat16, torch.float16]
    assert cli.parse_args([])[0].suites == SUITES


def test_help_lists_suites(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = capsys.readouterr().out
    assert all(s in text for s in SUITES) and "--quick" in text and "--smoke" not in text


def test_module_entry_point():
    # python -m fused_lora.bench resolves to this package's __main__ (installed from bench/).
    import importlib.util

    spec = importlib.util.find_spec("fused_lora.bench.__main__")
    assert spec is not None and spec.origin is not None
    assert callable(cli.main) and sys.modules["fused_lora.bench.__main__"] is cli


def test_env_scoped_covers_forward_and_backward(monkeypatch):
    """fused_cuda_mma / fused_triton_inloop: the launchers read their variable per call, in the
    forward and in the backward (which autograd runs later): both must see it, nothing after."""
    import os

    from fused_lora.bench.suite_linear import _env_scoped

    monkeypatch.delenv("FUSED_LORA_TEST_VAR", raising=False)
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("fwd", os.environ.get("FUSED_LORA_TEST_VAR")))
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(("bwd", os.environ.get("FUSED_LORA_TEST_VAR")))
            return g * 2

    fn = _env_scoped(Probe.apply, "FUSED_LORA_TEST_VAR", "on")
    x = torch.randn(3, requires_grad=True)
    y = fn(x)
    assert os.environ.get("FUSED_LORA_TEST_VAR") is None
    y.sum().backward(retain_graph=True)  # the bwd mode replays one graph's backward
    y.sum().backward()
    assert seen == [("fwd", "on"), ("bwd", "on"), ("bwd", "on")]
    assert os.environ.get("FUSED_LORA_TEST_VAR") is None
    assert torch.equal(x.grad, torch.full((3,), 4.0))
