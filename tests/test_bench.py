"""The benchmark CLI (``python -m fused_lora.bench``): every suite's smallest CPU path end to
end into a temporary directory, the results schema, and argument errors."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from fused_lora import backends, dispatch
from fused_lora.bench import __main__ as cli
from fused_lora.bench import harness as H
from fused_lora.bench import suite_dispatch, suite_linear, suite_multi

SUITES = list(cli.SUITES)
PLOTTED = {"linear", "adapters"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """All suites once at their smallest sizes on the CPU (about 30 s on a shared 2-core
    machine, most of it importing peft when it is installed); (exit code, out dir, stdout)."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    table = dispatch.MEASURED_TABLE_PATH.read_text()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["--smoke", "--device", "cpu", "--out", str(out), "--quiet"])
    assert torch.get_num_threads() == threads, "the CLI must restore torch's thread count"
    assert dispatch.MEASURED_TABLE_PATH.read_text() == table, "a --smoke run must not write the table"
    return rc, out, buf.getvalue()


def test_cli_exit_code(smoke_run):
    rc, _, _ = smoke_run
    assert rc == 0


@pytest.mark.parametrize("suite", SUITES)
def test_results_schema(smoke_run, suite):
    _, out, _ = smoke_run
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
    _, out, _ = smoke_run
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
    assert run == [] and "does not exist" in skip["fused_torch"] and "cpp_cpu" in skip


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


# ----------------------------------------------------------- variants through the public API (issue 11)
def test_bench_reads_no_environment_variable():
    """Variants are registry entries passed as backend=; no FUSED_LORA_* variable is set or read."""
    src = Path(cli.__file__).parent
    hits = [f"{f.name}:{i}" for f in sorted(src.glob("*.py"))
            for i, line in enumerate(f.read_text().splitlines(), 1)
            if "FUSED_LORA_" in line or "os.environ" in line]
    assert hits == []


def test_linear_times_every_variant_by_entry_name(monkeypatch):
    """On a GPU where every entry runs, suite linear times each variant once, named after its
    entry, and its call passes the entry as backend= (no shim around the op)."""
    cfg = H.Config(device=torch.device("cuda"), dtypes=[torch.bfloat16], size="quick", verbose=False)
    monkeypatch.setattr(H, "entry_reason", lambda op, entry, device, dtype=None: "")
    run, skip = suite_linear.impl_names(cfg)
    fused = dict(run)
    assert {k: v for k, v in fused.items() if v} == {
        "fused_cuda": "cuda", "fused_cuda_mma": "cuda:mma", "fused_cuda_wgmma256": "cuda:wgmma256",
        "fused_triton": "triton", "fused_triton_inloop": "triton:inloop", "fused_triton_tma": "triton:tma",
        "fused_triton_tma_persistent": "triton:tma_persistent"}
    # cuda:wgmma is what backend "cuda" picks where wgmma runs: timed once, as fused_cuda.
    assert "fused_cuda" in skip["fused_cuda_wgmma"] and "fused_torch" in skip
    seen = []
    monkeypatch.setattr(suite_linear, "lora_linear", lambda *a, backend: seen.append(backend))
    t = torch.zeros(2, 2)
    for name, entry in run:
        if entry:
            suite_linear.build(name, entry, t, t[0], t, t, 1.0).fn(t)
    assert seen == [e for _, e in run if e]


def test_linear_variant_unavailable_is_skipped_with_reason(monkeypatch):
    cfg = H.Config(device=torch.device("cuda"), dtypes=[torch.bfloat16], size="quick", verbose=False)
    monkeypatch.setattr(H, "entry_reason", lambda op, entry, device, dtype=None:
                        "no wgmma here" if "wgmma" in entry else "")
    run, skip = suite_linear.impl_names(cfg)
    assert skip["fused_cuda_wgmma256"] == "no wgmma here" and "fused_cuda_wgmma256" not in dict(run)
    # Without wgmma, "cuda" runs mma.sync: fused_cuda_mma would time the same GEMM twice.
    assert "fused_cuda_mma" not in dict(run) and "fused_cuda" in dict(run)


def test_entry_reason_records_a_probe_that_raises(monkeypatch):
    """A registry entry whose call raises (an op signature mid-change) is skipped with the error
    as its reason, instead of ending the run."""
    import fused_lora

    def boom(*a, **k):
        raise TypeError("lora_linear_fwd() got an unexpected keyword argument 'gemm'")

    monkeypatch.setattr(fused_lora, "lora_linear", boom)
    monkeypatch.setattr(H, "_PROBED", {})
    why = H.entry_reason("lora_linear", "torch", torch.device("cpu"), torch.float32)
    assert why.startswith("a probe call raised TypeError") and "'gemm'" in why
    monkeypatch.setattr(H, "_PROBED", {})
    assert "GEMM variant" in H.entry_reason("lora_linear", "cuda:mma", torch.device("cpu"))


# ------------------------------------------------------------------ CPU output (issue 14)
def test_cpu_output_says_not_gpu_speed(smoke_run):
    _, out, text = smoke_run
    for suite in SUITES:
        env = json.loads(next(out.glob(f"cpu-{suite}-*.json")).read_text())["env"]
        assert "not GPU speed" in env["timings_note"]
        assert re.search(rf"^## {suite} \(CPU: shows the code runs, not GPU speed", text, re.M), suite
    assert text.count(H.CPU_NOTE) == len(SUITES)  # one footer per table


def test_cpu_names_the_cpp_kernels(smoke_run):
    """On CPU the extension runs C++ code: its rows are cpp_cpu, never fused_cuda*; where it
    cannot run, the results say why."""
    _, out, _ = smoke_run
    cpp_ok = H.entry_reason("lora_linear", "cuda", torch.device("cpu"), torch.float32) == ""
    for suite in ("linear", "multi", "train", "dispatch"):
        data = json.loads(next(out.glob(f"cpu-{suite}-*.json")).read_text())
        impls = {r["impl"] for r in data["rows"]}
        assert not any(i.startswith("fused_cuda") for i in impls), (suite, impls)
        skipped = data["env"].get("skipped") or data["env"].get("skipped_backends")
        if suite == "linear":
            assert ("cpp_cpu" in impls) == cpp_ok
            assert cpp_ok or "cpp_cpu" in skipped
    assert H.impl_label("cuda", torch.device("cpu")) == "cpp_cpu"
    assert H.impl_label("cuda:mma", torch.device("cuda")) == "fused_cuda_mma"


def _header(text, suite):
    block = text.split(f"## {suite} (", 1)[1]
    return block.splitlines()[1].split()


def test_cpu_tables_drop_always_empty_columns(smoke_run):
    _, _, text = smoke_run
    linear = _header(text, "linear")
    # peak memory, CUDA-graph flag and x triton are never filled on a CPU.
    assert "MiB" not in linear and "graph" not in linear and "triton" not in linear
    assert {"case", "impl", "ms", "p20-p80", "base", "eager", "check"} <= set(linear)
    assert "MiB" not in _header(text, "train") and "graph" not in _header(text, "adapters")
    cols = [("a", lambda r: r["a"]), ("empty", lambda r: None), ("blank", lambda r: "")]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        H.print_table("t", [{"a": 1}, {"a": 2}], cols)
    assert buf.getvalue().splitlines()[2].split() == ["a"]


@pytest.mark.parametrize("row, ref, want", [
    ({"ms": 1.0, "ms_p20": 0.9, "ms_p80": 1.1}, {"ms": 2.0, "ms_p20": 1.9, "ms_p80": 2.1}, False),
    ({"ms": 1.0, "ms_p20": 0.5, "ms_p80": 2.0}, {"ms": 2.0, "ms_p20": 1.9, "ms_p80": 2.1}, True),
    ({"ms": 1.0, "ms_p20": 0.9, "ms_p80": 1.1}, {"ms": 1.1, "ms_p20": 0.8, "ms_p80": 1.5}, True),
    ({"ms": 1.0, "ms_p20": 0.9, "ms_p80": 1.1}, {"ms": None, "ms_p20": None, "ms_p80": None}, None),
])
def test_is_noisy(row, ref, want):
    assert H.is_noisy(row, ref) is want


def test_cpu_rows_flag_noise(smoke_run):
    """Every ratio a row reports carries whether it is inside the p20-p80 noise; the flag is
    the rule of is_noisy applied to the row and what it is compared with."""
    _, out, text = smoke_run
    rows = json.loads(next(out.glob("cpu-linear-*.json")).read_text())["rows"]
    eager = {(r["case"], r["mode"]): r for r in rows if r["impl"] == "unfused_eager"}
    for r in rows:
        if r.get("speedup_vs_eager") is not None and r["impl"] != "unfused_eager":
            assert r["noisy"] is H.is_noisy(r, eager[(r["case"], r["mode"])]), r
    rows = json.loads(next(out.glob("cpu-dispatch-*.json")).read_text())["rows"]
    assert all("noisy" in r for r in rows)
    if any(r.get("noisy") for r in rows):
        assert "noisy = yes" in text


# ------------------------------------------------------------------ CPU dispatch table (issue 11 item 5)
def _cpu_rows(ms_cuda, ms_torch, rows=16, mode="fwd"):
    return [{"op": "multi_lora_linear", "mode": mode, "dtype": "fp32", "M": rows, "K": 1024, "N": 1024,
             "r": 16, "impl": H.impl_label(be, torch.device("cpu")), "backend": be, "ms": ms,
             "ms_p20": ms * 0.9, "ms_p80": ms * 1.1, "pass": True}
            for be, ms in (("cuda", ms_cuda), ("torch", ms_torch))]


def test_cpu_table_entries_and_merge(tmp_path):
    env = {"gpu": None, "torch": "2.14.1", "triton": "3.8.0"}
    entries = suite_dispatch.table_entries(_cpu_rows(0.5, 1.5), env, "cpu-dispatch-x.json")
    assert len(entries) == 1
    e = entries[0]
    assert e["device"] == "cpu" and "gpu" not in e
    assert e["ms"] == {"cuda": 0.5, "torch": 1.5}  # keyed by registry entry, not by display name
    assert e["dtype"] == "float32" and e["rows"] == 16 and e["noisy"] is False
    gpu = {"gpu": "NVIDIA H100 80GB HBM3", "op": "multi_lora_linear", "mode": "fwd", "dtype": "float32",
           "rows": 16, "ms": {"triton": 1.0}}
    old_cpu = dict(e, ms={"cuda": 9.0, "torch": 1.0})
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"entries": [gpu, old_cpu]}))
    table = suite_dispatch.merge_table(path, entries)
    assert len(table["entries"]) == 2 and gpu in table["entries"] and e in table["entries"]
    assert dispatch.measured_choice("multi_lora_linear", torch.device("cpu"), "fwd", 16, torch.float32,
                                    table=table["entries"]) == (
        "cuda" if not backends.unavailable_reason("multi_lora_linear", "cuda", torch.device("cpu"),
                                                  torch.float32) else "torch")


def test_table_written_only_into_committed_results(tmp_path, monkeypatch):
    target = tmp_path / "dispatch_table.json"
    monkeypatch.setattr(dispatch, "MEASURED_TABLE_PATH", target)
    rows = _cpu_rows(0.5, 1.5)
    env = {"gpu": None, "torch": "t", "triton": "t"}
    cfg = H.Config(device=torch.device("cpu"), dtypes=[torch.float32], size="quick", verbose=False)
    suite_dispatch.after_write(cfg, rows, env, [tmp_path / "cpu-dispatch-x.json"])
    assert not target.exists()  # results outside bench/results: the table would name a lost file
    results = Path(suite_dispatch.__file__).resolve().parent / "results"
    for size in ("smoke", "quick"):  # a CPU table comes from the full run only
        small = H.Config(device=torch.device("cpu"), dtypes=[torch.float32], size=size, verbose=False)
        suite_dispatch.after_write(small, rows, env, [results / "cpu-dispatch-x.json"])
        assert not target.exists(), size
    cfg.size = "full"
    try:
        suite_dispatch.after_write(cfg, rows, env, [results / "cpu-dispatch-x.json"])
        assert json.loads(target.read_text())["entries"][0]["source"] == "cpu-dispatch-x.json"
    finally:
        dispatch.measured_table.cache_clear()


def _shipped_cpu_entries():
    return [e for e in json.loads(dispatch.MEASURED_TABLE_PATH.read_text())["entries"]
            if (e.get("device") or e.get("gpu")) == "cpu"]


def test_shipped_cpu_table_is_valid():
    entries = _shipped_cpu_entries()
    assert entries, "dispatch_table.json has no CPU entries: run python -m fused_lora.bench dispatch on a CPU"
    results = Path(suite_dispatch.__file__).resolve().parent / "results"
    for e in entries:
        assert {"op", "mode", "dtype", "rows", "ms", "source", "torch", "triton", "K", "N", "r"} <= set(e)
        assert e["device"] == "cpu" and e["dtype"] == "float32" and e["mode"] in ("fwd", "fwd+bwd")
        assert set(e["ms"]) <= set(backends.names(e["op"])) and e["ms"], e
        src = results / e["source"]
        assert src.is_file(), f"{e['source']} is not in bench/results"
        # The numbers are the run's: the source file's rows give exactly these medians.
        data = json.loads(src.read_text())
        assert data["env"]["device"] == "cpu" and data["env"]["suite"] == "dispatch"
        measured = {r["backend"]: r["ms"] for r in data["rows"]
                    if (r["op"], r["mode"], r["M"]) == (e["op"], e["mode"], e["rows"]) and r["pass"]}
        assert measured == e["ms"], e


def test_auto_on_cpu_follows_the_shipped_table():
    dispatch.measured_table.cache_clear()
    cpu = torch.device("cpu")
    for e in _shipped_cpu_entries():
        ok = {b: ms for b, ms in e["ms"].items()
              if not backends.unavailable_reason(e["op"], b, cpu, torch.float32)}
        want = min(ok, key=ok.get) if ok else "torch"
        got = backends.select(e["op"], "auto", cpu, torch.float32, e["mode"], e["rows"])
        assert got == want, (e, got)


def test_multi_times_every_variant_by_entry_name(monkeypatch):
    """On a GPU where every entry runs, suite multi times each registry entry of the op once,
    variants included, named after the entry (no shim: the entry is passed as backend=)."""
    cfg = H.Config(device=torch.device("cuda"), dtypes=[torch.bfloat16], size="quick", verbose=False)
    monkeypatch.setattr(H, "entry_reason", lambda op, entry, device, dtype=None: "")
    run, skip = suite_multi.fused_impls(cfg)
    got = dict(run)
    for entry in ("triton", "triton:decode", "triton:prefill", "triton:hybrid", "cuda"):
        assert got[H.impl_label(entry, cfg.device)] == entry
    assert "fused_torch" in skip
