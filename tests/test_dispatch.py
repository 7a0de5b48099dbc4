"""backend="auto" follows measurements: dispatch.measured_choice / backends.select over a table like the
one `python -m fused_lora.bench dispatch` writes on a GPU, and the bench's table writer
(table_entries, merge_table). No GPU needed: the device name and availability are stubbed."""

from __future__ import annotations

import json

import pytest
import torch

from fused_lora import backends, dispatch
from fused_lora.bench import suite_dispatch

GPU = "NVIDIA H100 80GB HBM3"
CUDA = torch.device("cuda", 0)


def _entry(rows, triton, cuda, op="lora_linear", mode="fwd", dtype="bfloat16", gpu=GPU):
    return {"gpu": gpu, "op": op, "mode": mode, "dtype": dtype, "rows": rows,
            "ms": {"triton": triton, "cuda": cuda}}


TABLE = [
    _entry(1, 0.020, 0.012),        # decode: CUDA faster
    _entry(16, 0.024, 0.018),
    _entry(1024, 0.300, 0.420),     # large: Triton faster
    _entry(8192, 2.10, 2.70),
    _entry(8192, 5.0, 4.0, mode="fwd+bwd"),
    _entry(16, 0.05, 0.09, op="multi_lora_linear"),
]


@pytest.fixture
def stub(monkeypatch):
    """A visible 'H100' on which every backend is available; the table above."""
    available = {"triton", "cuda", "torch"}
    monkeypatch.setattr(dispatch, "device_key", lambda device: GPU if device.type == "cuda" else "cpu")
    real = backends.unavailable_reason
    def reason(op, b, d, dt=None):
        if d.type != "cuda":
            return real(op, b, d, dt)
        return "" if b in available else "stubbed out"

    monkeypatch.setattr(backends, "unavailable_reason", reason)
    monkeypatch.setattr(dispatch, "measured_table", lambda: tuple(TABLE))
    return available


def resolve(backend, device, op="lora_linear", mode="fwd", rows=0, dtype=torch.bfloat16):
    return backends.select(op, backend, device, dtype, mode, rows)


@pytest.mark.parametrize("rows, want", [(1, "cuda"), (2, "cuda"), (12, "cuda"), (16, "cuda"),
                                        (200, "triton"), (1024, "triton"), (100000, "triton")])
def test_nearest_rows_in_log2(stub, rows, want):
    assert dispatch.measured_choice("lora_linear", CUDA, "fwd", rows, torch.bfloat16) == want
    assert resolve("auto", CUDA, "lora_linear", "fwd", rows, torch.bfloat16) == want


def test_mode_op_dtype_and_gpu_select_the_entry(stub, monkeypatch):
    assert dispatch.measured_choice("lora_linear", CUDA, "fwd+bwd", 8192, torch.bfloat16) == "cuda"
    assert dispatch.measured_choice("multi_lora_linear", CUDA, "fwd", 8192, torch.bfloat16) == "triton"
    # Nothing measured for fp16, for this mode of the multi op, or for another GPU: the
    # AUTO_TABLE order decides (Triton first).
    assert dispatch.measured_choice("lora_linear", CUDA, "fwd", 1, torch.float16) is None
    assert dispatch.measured_choice("multi_lora_linear", CUDA, "fwd+bwd", 16, torch.bfloat16) is None
    assert resolve("auto", CUDA, "lora_linear", "fwd", 1, torch.float16) == "triton"
    monkeypatch.setattr(dispatch, "device_key", lambda device: "NVIDIA A100-SXM4-80GB")
    assert dispatch.measured_choice("lora_linear", CUDA, "fwd", 1, torch.bfloat16) is None
    # rows unknown (0: a symbolic size under torch.compile): no measurement is consulted.
    monkeypatch.setattr(dispatch, "device_key", lambda device: GPU)
    assert resolve("auto", CUDA, "lora_linear", "fwd", 0, torch.bfloat16) == "triton"


def test_unavailable_fastest_falls_to_the_next_measured(stub):
    stub.discard("cuda")
    assert dispatch.measured_choice("lora_linear", CUDA, "fwd", 1, torch.bfloat16) == "triton"


def test_explicit_backend_and_cpu_ignore_the_table(stub):
    assert resolve("cuda", CUDA, "lora_linear", "fwd", 8192, torch.bfloat16) == "cuda"
    assert resolve("auto", torch.device("cpu"), "lora_linear", "fwd", 1) == "torch"


def test_shipped_table_is_valid_json_with_entries_list():
    data = json.loads(dispatch.MEASURED_TABLE_PATH.read_text())
    assert isinstance(data["entries"], list)
    for e in data["entries"]:  # every entry names where its numbers came from
        assert {"op", "mode", "dtype", "rows", "ms", "source", "torch", "triton"} <= set(e)
        assert (e.get("gpu") or e.get("device")) and e["source"].endswith(".json")


def test_bench_table_writer_round_trip(stub, tmp_path):
    rows = []
    for impl, ms in (("triton", 0.5), ("cuda", 0.4)):
        rows.append({"op": "lora_linear", "mode": "fwd", "dtype": "bf16", "M": 64, "K": 4096,
                     "N": 4096, "r": 16, "impl": impl, "ms": ms, "pass": True})
    rows.append({"op": "lora_linear", "mode": "fwd", "dtype": "bf16", "M": 128, "K": 4096,
                 "N": 4096, "r": 16, "impl": "cuda", "ms": None, "pass": False})  # failed: dropped
    env = {"gpu": GPU, "torch": "2.11.0", "triton": "3.6.0"}
    entries = suite_dispatch.table_entries(rows, env, "gpu-dispatch-x.json")
    assert len(entries) == 1 and entries[0]["ms"] == {"triton": 0.5, "cuda": 0.4}
    assert entries[0]["dtype"] == "bfloat16" and entries[0]["rows"] == 64
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"entries": [_entry(64, 9.0, 9.0), _entry(1, 1.0, 2.0)]}))
    table = suite_dispatch.merge_table(path, entries)
    assert len(table["entries"]) == 2  # the rows=64 entry replaced, rows=1 kept
    assert json.loads(path.read_text()) == table
    # The written table drives the choice: CUDA measured faster at 64 rows.
    assert dispatch.measured_choice("lora_linear", CUDA, "fwd", 64, torch.bfloat16,
                                    table=table["entries"]) == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_backend_on_cuda_is_a_kernel():
    assert backends.select("lora_linear", "auto", torch.device("cuda"), torch.bfloat16) in ("triton", "cuda")
