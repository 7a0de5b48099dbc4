"""The Hopper GEMM (gemm_wgmma_kernel in csrc/gemm.cu) under the SIMT emulator.

The ops' gemm=2 (wgmma, 128x128 tiles) or gemm=3 (wgmma256, 128x256) makes every fp16/bf16
tensor-core GEMM of the CUDA ops (forward y, dx, mixed-adapter forward and dx) run the wgmma
kernel instead of the mma.sync one. The emulator queues each wgmma.mma_async and performs it
only when wgmma_wait retires its group, reading the 128-byte-swizzled shared memory through the
decoded descriptors (tools/simt_emu/src/simt_emu.cpp), with the dynamic shared memory at a
shared address that is not 1024-byte aligned. The ops on it are the sim_wgmma / sim_wgmma256
backends of tests/ops/test_<op>.py (test_raw_gemm_variants, test_raw_wgmma_*, the wgmma cases
of test_raw_multi_fwd_bwd and test_raw_routing_plan_matches_unplanned), which fail for a wrong
swizzle or descriptor, unaligned swizzle atoms, a stage overwritten while its MMAs are in flight
(the pipeline's slot reuse), a wrong accumulator fragment map, and the edge, split-K,
grouped-order and row_map paths the kernel shares with gemm_tc_kernel.

Here: the self-tests (selftest_wgmma) that pin the emulator's own semantics -- operands read at
retirement, and the kernel bugs it reports (partial warpgroups, pending groups at exit,
unsupported descriptors, addresses outside the dynamic shared memory) -- and that the default
GEMM (gemm=0) is mma.sync in the emulator. What they cannot show: that the PTX ISA reading
shared by the kernel and the emulator is the hardware's (the cuda_mma / cuda_wgmma* backends of
tests/ops run both GEMMs on a GPU), and anything about speed.
"""

from __future__ import annotations

import functools

import pytest
import torch
from _utils import check_op_vs_reference, lora_inputs
from simt_emu import build_sim, sim_unavailable_reason

from fused_lora import reference

_REASON = sim_unavailable_reason()
if _REASON is not None:
    pytest.skip(f"SIMT emulator unavailable: {_REASON}", allow_module_level=True)

SEED = (4242 << 31) | 99


GEMM_MMA, GEMM_WGMMA, GEMM_WGMMA256 = 1, 2, 3  # the ops' `gemm` argument (csrc/lora.h)
_GEMM_OPS = ("lora_linear_fwd", "lora_linear_bwd", "multi_lora_linear_fwd",
             "multi_lora_linear_bwd")


class _WithGemm:
    """torch.ops.fused_lora_sim with gemm=<variant> passed to every op that takes it."""

    def __init__(self, ops, gemm):
        self._ops, self.gemm = ops, gemm

    def __getattr__(self, name):
        fn = getattr(self._ops, name)
        return functools.partial(fn, gemm=self.gemm) if name in _GEMM_OPS else fn


@pytest.fixture(scope="module")
def ops():
    return build_sim()


@pytest.fixture(params=[GEMM_WGMMA, GEMM_WGMMA256], ids=["wgmma", "wgmma256"])
def sim(ops, request):
    """Both tile widths: 128x128 (m64n128k16, the init in registers of its own) and 128x256
    (m64n256k16, the GEMM tile parked in shared memory for the init)."""
    return _WithGemm(ops, request.param)


def _fwd_bwd(sim, x, w, b, a, bb, p=0.3):
    fargs = (x, w, b, a, bb, 0.7, p, SEED)
    y, xa = sim.lora_linear_fwd(*fargs)
    check_op_vs_reference((y, xa), reference.lora_linear_fwd, fargs, ("y", "xa"))
    dy = torch.randn(x.shape[0], w.shape[0]).to(x.dtype)
    bargs = (dy, x, w, a, bb, xa, 0.7, p, SEED, True, True, True)
    check_op_vs_reference(sim.lora_linear_bwd(*bargs), reference.lora_linear_bwd, bargs,
                          ("dx", "dA", "dB"))


def test_default_is_mma_in_the_emulator(ops):
    # gemm=0 (auto, also the schema default) and 1: mma.sync in the emulator (on a GPU, auto is
    # wgmma where fl_has_wgmma()); gemm_choice says the same.
    for sim in (_WithGemm(ops, 0), _WithGemm(ops, GEMM_MMA), ops):
        before = ops.sim_stats()
        _fwd_bwd(sim, *lora_inputs(129, 64, 128, 4, torch.float16))
        after = ops.sim_stats()
        assert after[6] == before[6] and after[5] > before[5]
    assert [ops.gemm_choice(g, 0) for g in (0, 1, 2, 3)] == [1, 1, 2, 3]
    for bad in (4, -1):
        with pytest.raises(RuntimeError, match=r"gemm must be 0 \(auto\), 1 \(mma\), 2 "
                                               r"\(wgmma\) or 3 \(wgmma256\), got " + str(bad)):
            _fwd_bwd(_WithGemm(ops, bad), *lora_inputs(129, 64, 128, 4, torch.float16))
        with pytest.raises(RuntimeError, match="gemm must be"):
            ops.gemm_choice(bad, 0)
    # M = 0: no launch at all, and still the same error (checked before any size test)
    with pytest.raises(RuntimeError, match="gemm must be"):
        _WithGemm(ops, 9).lora_linear_fwd(*lora_inputs(0, 64, 128, 4, torch.float16), 0.5, 0.0, 1)


def test_wgmma_reads_operands_when_retired(sim):
    assert torch.equal(sim.selftest_wgmma(0), torch.full((128, 64), 16.0))
    # Shared memory overwritten between issue and wgmma_wait: the retirement reads the new data
    # (2s), so a pipeline that reuses a stage too early produces wrong results under test.
    assert torch.equal(sim.selftest_wgmma(1), torch.full((128, 64), 32.0))


@pytest.mark.parametrize("what,match", [
    (10, r"in a block of 64 threads: warpgroups need a multiple of 128"),
    (11, r"thread \d+ of the warpgroup has exited|exited while its warpgroup waits"),
    (12, r"exited with wgmma operations of its warpgroup not waited for"),
    (13, r"the emulator models the 128-byte swizzle with base offset 0 only"),
    (14, r"outside the dynamic shared memory"),
    (15, r"gives shared-window addresses to the dynamic shared memory only"),
])
def test_wgmma_bugs_raise(sim, what, match):
    with pytest.raises(RuntimeError, match=match):
        sim.selftest_wgmma(what)
    assert torch.equal(sim.selftest_wgmma(0), torch.full((128, 64), 16.0))  # still usable
