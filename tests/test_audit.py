"""The kernel audit (python -m fused_lora.kernels.audit): its parsers on captured tool output,
its machinery on cases with known answers, and the CI gates over the hot kernels.

The compiling tests run the audit once, in a subprocess with TRITON_INTERPRET unset (conftest
sets it, and under the interpreter kernels cannot be compiled): the CI subset (--cases ci:
training 8192 x 4096^2 r=16 with bf16 and fp32 adapters, decode M=16 over 64 adapters,
prefill 4096 tokens over 8 adapters, a Qwen3-30B-A3B MoE gate_up) plus the self-test case, for
sm_90a.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fused_lora.kernels import audit

# ptxas -v output in the format Triton's TRITON_DUMP_PTXAS_LOG prints, with the figures and note the
# audit recorded for the in-loop-shrink forward (_lora_fwd_kernel, FUSE_SHRINK, bf16, 128x256x64
# s3 w8, sm_90a; Triton 3.8's bundled ptxas 12.9).
PTXAS_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_lora_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _lora_fwd_kernel
    552 bytes stack frame, 1600 bytes spill stores, 1088 bytes spill loads
ptxas warning : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized \
due to insufficient register resources for the function '_lora_fwd_kernel'
ptxas info    : Used 255 registers, used 1 barriers, 552 bytes cumulative stack size
ptxas info    : Compile time = 1342.117 ms
"""

# cuobjdump -sass excerpt: a cp.async + wgmma main loop (0x32b0..0x3ac0 in the real kernel,
# shortened), an expand loop before it with TF32 MMAs, and a spill.
SASS_SAMPLE = """\
        /*1550*/                   DEPBAR.LE SB0, 0x2 ;                      /* 0x000080800000791a */
        /*1560*/                   HGMMA.64x256x8.F32.TF32 R24, gdesc[UR20], R24 ;   /* 0x0 */
        /*1570*/                   HGMMA.64x256x8.F32.TF32 R24, gdesc[UR12], R24, gsb0 ; /* 0x0 */
        /*1580*/              @!P4 BRA 0x1550 ;                              /* 0xfffffff80040c947 */
        /*32b0*/                   DEPBAR.LE SB0, 0x2 ;                      /* 0x000080800000791a */
        /*32c0*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR12], R24 ;  /* 0x0 */
        /*32d0*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR12], R24 ;  /* 0x0 */
        /*32e0*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR20], R24 ;  /* 0x0 */
        /*32f0*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ; /* 0x0 */
        /*3300*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;           /* 0x00008000000079c5 */
        /*3310*/                   LDGSTS.E.BYPASS.128 [R183+0x18000], desc[UR40][R172.64], P6 ; /* 0x0 */
        /*3320*/                   LDG.E.U16 R3, desc[UR40][R4.64] ;         /* 0x0 */
        /*3330*/                   STL [R1], R3 ;                            /* 0x0 */
        /*3340*/                   LDGDEPBAR ;                               /* 0x00000000000079af */
        /*3350*/              @!P5 BRA 0x32b0 ;                              /* 0xfffffff400f8d947 */
        /*3360*/                   EXIT ;                                    /* 0x000000000000794d */
"""

RES_USAGE_SAMPLE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _lora_fwd_kernel:
  REG:211 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:656 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_ptxas_sample():
    p = audit.parse_ptxas(PTXAS_SAMPLE)
    assert p["ptxas_regs"] == 255
    assert (p["stack"], p["spill_stores"], p["spill_loads"]) == (552, 1600, 1088)
    assert [n.split()[0] for n in p["notes"]] == ["C7512"]
    assert audit.is_serialised(p["notes"][0])


def test_parse_ptxas_clean():
    p = audit.parse_ptxas("ptxas info    : Function properties for k\n"
                          "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
                          "ptxas info    : Used 211 registers, used 1 barriers\n")
    assert (p["ptxas_regs"], p["stack"], p["spill_stores"], p["notes"]) == (211, 0, 0, [])


def test_parse_res_usage_sample():
    assert audit.parse_res_usage(RES_USAGE_SAMPLE) == {
        "_lora_fwd_kernel": {"REG": 211, "STACK": 0, "SHARED": 1024, "LOCAL": 0}}


def test_parse_sass_picks_the_main_loop():
    s = audit.parse_sass(SASS_SAMPLE, "BF16")
    lp = s["loop"]
    assert lp["range"] == ["0x32b0", "0x3350"]  # not the TF32 expand loop
    assert lp["instrs"] == 11
    assert lp["mma"] == {"HGMMA.64x256x16.F32.BF16": 4}
    assert lp["loads"] == {"LDG16": 1, "LDGSTS128": 1}
    assert (lp["stl"], lp["async_in_flight"], lp["wgmma_in_flight"]) == (1, 2, 1)
    assert s["kernel"]["stl"] == 1 and s["kernel"]["mma"]["HGMMA.64x256x8.F32.TF32"] == 2
    # one cp.async wait per K step; 4 HGMMA 64x256x16 per warpgroup x 2 warpgroups = 128x256x64
    assert lp["async_waits"] == 1 and audit._steps(lp, (128, 256, 64), 8) == 1
    assert audit._steps(dict(lp, async_waits=3), (128, 256, 64), 8) == 1  # sm_80: 3 waits a step
    assert audit._steps(dict(lp, async_waits=2), (128, 256, 32), 8) == 2  # unrolled twice
    assert audit._steps_by_mma(lp, (128, 256, 64), 8) == 1.0
    assert audit._steps_by_mma(lp, (128, 256, 32), 8) == 2.0


def _row(**kw):
    r = dict(arch="sm_90a", case="c", variant="v", kernel="_lora_fwd_kernel", config="128x256x64 s3 w8",
             hot=True, launches=True, ratio=1.0, instrs_per_step=99.0, plain_instrs_per_step=99.0,
             metrics=dict(error=None, notes=[], stack=0, spill_stores=0, spill_loads=0, shared=1,
                          kernel=dict(ldl=0, stl=0), loop={}))
    r.update(kw)
    return r


def test_gates_on_synthetic_rows():
    rep = dict(shared_limit=audit.SHARED_LIMIT, ratio_limit=audit.RATIO_LIMIT, extension={}, rows=[
        _row(),
        _row(kernel="_lora_bwd_kernel", ratio=1.16, instrs_per_step=116.0, plain_instrs_per_step=100.0),
        _row(kernel="_mlora_fwd_gather", ratio=1.6),  # not ratio-gated: reported only
        _row(launches=False),
        _row(metrics={**_row()["metrics"], "notes": ["C7515 Potential Performance Loss"], "stack": 200}),
        _row(hot=False, metrics={**_row()["metrics"], "stack": 200}),
        # the in-loop shrink's loop holds the shrink's MMA on purpose: ratio reported, not gated
        _row(variant="fwd fused p=0", ratio=1.3, instrs_per_step=130.0),
        _row(variant="fwd pre p=0", kernel="_lora_fwd_kernel", config="64x64x64 s4 w4", ratio=1.3,
             instrs_per_step=130.0),
    ])
    got = sorted((g["gate"], g["kernel"]) for g in audit.gates(rep))
    assert got == [("ratio", "_lora_bwd_kernel"), ("ratio", "_lora_fwd_kernel"),
                   ("spill", "_lora_fwd_kernel"),
                   ("unlaunchable", "_lora_fwd_kernel"), ("wgmma-serialised", "_lora_fwd_kernel")]


# --------------------------------------------------------------------------------------------
# Compiling: one audit run for every test below
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "audit.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fused_lora.kernels.audit", "--arch", "90a", "--cases", "ci,selftest",
         "--plain", "gated", "--gate", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=2400,  # ~5 min on 2 free cores; slack for shared CI
    )
    text = proc.stdout + proc.stderr
    if "ptxas" in text and "not found" in text:
        pytest.skip("Triton's bundled ptxas is not available")
    if not out.exists():  # not an AssertionError: the strict xfails below must not swallow it
        raise RuntimeError(f"the audit wrote no report (rc {proc.returncode}):\n{text[-6000:]}")
    rep = json.loads(out.read_text())
    rep["_rc"], rep["_text"] = proc.returncode, text
    return rep


def _rows(rep, **kw):
    return [r for r in rep["rows"] if all(r[k] == v for k, v in kw.items())]


@pytest.mark.slow
def test_selftest_plain_gemm_known_answers(report):
    (ok,) = _rows(report, case="selftest", config="128x256x64 s3 w8")
    m = ok["metrics"]
    assert m["error"] is None
    assert ok["launches"] is True and m["shared"] == 3 * (128 * 64 + 64 * 256) * 2
    assert m["stack"] == 0 and m["spill_stores"] == 0 and m["kernel"]["stl"] == 0
    assert list(m["loop"]["mma"]) == ["HGMMA.64x256x16.F32.BF16"]
    assert not [n for n in m["notes"] if audit.is_serialised(n)]
    assert ok["ratio"] == 1.0
    (big,) = _rows(report, case="selftest", config="256x256x128 s4 w8")
    assert big["launches"] is False and big["metrics"]["shared"] > audit.SHARED_LIMIT[90]
    assert any(g["gate"] == "unlaunchable" and g["case"] == "selftest" for g in report["gates"])


@pytest.mark.slow
def test_audit_covers_every_hot_kernel_and_config(report, monkeypatch):
    assert report["_rc"] == (1 if report["gates"] else 0), report["_text"][-3000:]
    seen = {r["kernel"] for r in report["rows"] if r["case"] not in ("plain", "selftest")}
    assert seen == audit.HOT
    # every config autotune may pick is compiled: the forward GEMM's whole list
    fwd = {r["config"] for r in _rows(report, case="train-bf16-r16", kernel="_lora_fwd_kernel")}
    # the GPU list, not this process's: under TRITON_INTERPRET=1 the kernel module keeps one config
    monkeypatch.setattr(audit.L, "INTERPRET", False)
    assert len(fwd) == len(audit.L._gemm_configs(small_m=True))
    fwd_rows = _rows(report, case="train-bf16-r16", kernel="_lora_fwd_kernel")
    assert {r["n_configs"] for r in fwd_rows} == {len(fwd)}
    assert all(r["ratio"] is not None for r in _rows(report, kernel="_lora_fwd_kernel"))


def _gate(report, name):
    return [g for g in report["gates"] if g["gate"] == name and g["case"] != "selftest"]


def _fmt(fails):
    return "\n".join(f"{g['arch']} {g['kernel']} {g['config']} [{g['case']} {g['variant']}] {g['detail']}"
                     for g in fails[:40])


@pytest.mark.slow
def test_gate_compile(report):
    assert not _gate(report, "compile"), _fmt(_gate(report, "compile"))


@pytest.mark.slow
def test_gate_extension_hgmma(report):
    assert not _gate(report, "ext-no-hgmma"), _fmt(_gate(report, "ext-no-hgmma"))


# Every gate holds on the CI subset (sm_90a, Triton 3.8) since the kernel fixes of issue 13:
# LoRA terms after the main loop, bf16x3 for fp32 adapters, the tutorial's addressing, dx
# configs of its own, the segmented expand after the loop. A regression fails here; do not
# loosen the gates.
@pytest.mark.slow
@pytest.mark.parametrize("gate", ["wgmma-serialised", "spill", "unlaunchable", "ratio"])
def test_gate(report, gate):
    assert not _gate(report, gate), _fmt(_gate(report, gate))


def test_markdown_table_of_headline_configs():
    rep = dict(rows=[_row(), _row(config="64x64x64 s4 w4"), _row(case="plain")])
    md = audit.markdown(rep).splitlines()
    assert md[0].startswith("| arch | case |") and len(md) == 3  # header, rule, one headline row
    assert "`_lora_fwd_kernel`" in md[2] and "128x256x64 s3 w8" in md[2] and "| 1.00 |" in md[2]
