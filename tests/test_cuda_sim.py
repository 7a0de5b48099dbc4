"""The CUDA kernels of csrc/ run on CPU under the SIMT emulator (tools/simt_emu/).

The same kernel and launcher sources that nvcc builds into fused_lora._C are compiled as host
C++ (-DFUSED_LORA_SIM): every CUDA thread is a fiber, with __syncthreads, warp collectives,
cp.async, ldmatrix and mma.sync emulated from the PTX ISA, shared memory poisoned (0xFF = NaN)
at every block start. Here the emulator itself: warp collectives, mma/ldmatrix fragment
layouts (exact on integer data), cp.async commit-group semantics, shared-memory poison, and the
kernel bugs it must report as a RuntimeError (divergent collectives, deadlocks, misaligned or
non-shared cp.async/ldmatrix, launch limits).

The CUDA ops under it, torch.ops.fused_lora_sim.{lora_linear_fwd, lora_linear_bwd,
multi_lora_linear_fwd, multi_lora_linear_bwd} (the arguments of torch.ops.fused_lora_C.*), are
the `sim*` backends of the per-op tests, tests/ops/test_<op>.py: fp32 / fp16 / bf16, tile edges,
bias, dropout (bit-exact mask), fp32 adapters, strided views, every needs_* combination, mixed
adapters, reversed thread order (sim_rev), the Hopper wgmma GEMM (sim_wgmma*), seeded random
cases.

Plus, in subprocesses with gcc's libasan preloaded, a subset of both under the
AddressSanitizer build of the emulator (FUSED_LORA_SIM_ASAN=1): an out-of-bounds global access in
a kernel is reported there (plain builds read garbage silently).

Skipped when the CUDA toolkit headers or the source checkout are missing (the reason is shown).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from simt_emu import asan_runtime, build_sim, sim_unavailable_reason

_REASON = sim_unavailable_reason()
if _REASON is not None:
    pytest.skip(f"SIMT emulator unavailable: {_REASON}", allow_module_level=True)



@pytest.fixture(scope="module")
def sim():
    return build_sim()


@pytest.fixture
def reverse_schedule(sim):
    sim.set_schedule(1)
    yield
    sim.set_schedule(0)


# --------------------------------------------------------------------------------------------
# The emulator
# --------------------------------------------------------------------------------------------


def test_warp_collectives(sim):
    x = torch.tensor([(7 * i * i - 31 * i + 5) % 97 - 40 for i in range(64)], dtype=torch.int32)
    out = sim.selftest_warp(x)
    v = x.tolist()
    for t in range(64):
        w, lane = divmod(t, 32)
        wv = v[32 * w: 32 * w + 32]
        o = out[t].tolist()
        assert o[0] == sum(wv), t
        assert o[1] == wv[5]
        assert o[2] == wv[(lane + 1) % 32]
        assert o[3] == (wv[lane + 3] if lane + 3 < 32 else wv[lane])
        assert o[4] == (wv[lane - 2] if lane >= 2 else wv[lane])
        assert o[5] == wv[(lane // 8) * 8 + 3]
        assert o[6] == sum(1 << i for i in range(32) if wv[i] > 0)
        assert o[7] == int(any(e > 100 for e in wv)) and o[8] == 1
        assert o[9] == sum(wv)
        u = v[t] & 0xFFFFFFFF
        assert o[10] == bin(u).count("1")
        ffs = (u & -u).bit_length()
        clz = 32 - u.bit_length()
        assert o[11] == ffs * 100 + clz
        assert o[12] == (wv[lane ^ 8] if lane < 16 else wv[lane ^ 4])
        assert o[13] == wv[lane ^ 1]
        assert o[14] == sum(v)  # shared atomicAdd over the block
        assert o[15] == max(v[t], 7) + min(v[t], 3)


def _int_matrix(*shape, dtype):
    return torch.randint(-4, 5, shape).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4])
def test_mma_ldmatrix_layouts(sim, dtype, mode):
    # Integer data: every product and sum is exact in fp32, so any fragment-layout error (a
    # wrong element anywhere) changes the result. Mode 0 builds fragments straight from the ISA
    # tables; 1-4 load them with each ldmatrix variant from cp.async-filled shared memory.
    M, N, K = 32, 48, 64
    a = _int_matrix(M, K, dtype=dtype)
    b = _int_matrix(K, N, dtype=dtype)
    a_arg = a.t().contiguous() if mode == 3 else a
    b_arg = b.t().contiguous() if mode in (1, 3) else b
    c = sim.selftest_gemm(a_arg, b_arg, mode, 0)
    assert torch.equal(c, a.double().matmul(b.double()).float())


def test_mma_rounding_fp16(sim):
    a = torch.randn(16, 32).half()
    b = torch.randn(32, 16).half()
    c = sim.selftest_gemm(a, b, 4, 0)
    torch.testing.assert_close(c, a.double().matmul(b.double()).float(), atol=1e-5, rtol=1e-5)


def test_cp_async_wait_before_read_is_needed(sim):
    # A kernel that reads a stage without cp_async_wait reads the poison (NaN) or a stale stage.
    a = _int_matrix(16, 32, dtype=torch.float16)
    b = _int_matrix(32, 16, dtype=torch.float16)
    c = sim.selftest_gemm(a, b, 4, 1)
    assert torch.isnan(c).any()
    assert not torch.equal(torch.nan_to_num(c), a.float() @ b.float())


def test_cp_async_zero_fill_never_reads_source(sim):
    a = _int_matrix(16, 16, dtype=torch.float16)
    c = sim.selftest_gemm(a, a, 4, 3)  # src address 64 (unmapped) with pred = false
    assert torch.equal(c, torch.zeros_like(c))


def test_cp_async_commit_groups(sim):
    src = torch.arange(64, dtype=torch.uint8) + 1
    snaps = sim.selftest_cp_async(src)
    poison = torch.full((16,), 255, dtype=torch.uint8)
    chunk = [src[16 * i: 16 * i + 16] for i in range(4)]

    def at(step, i):
        return snaps[step, 16 * i: 16 * i + 16]

    for step in (0, 1):  # nothing lands before a wait that needs it
        for i in range(4):
            assert torch.equal(at(step, i), poison), (step, i)
    assert torch.equal(at(2, 0), chunk[0]) and torch.equal(at(2, 1), poison)
    assert torch.equal(at(3, 1), chunk[1]) and torch.equal(at(3, 2), poison)  # uncommitted
    assert torch.equal(at(4, 2), chunk[2])
    assert torch.equal(at(5, 3), torch.zeros(16, dtype=torch.uint8))
    assert snaps[6, 0] == 7
    assert torch.equal(at(7, 0), chunk[3])


def test_unwritten_shared_memory_reads_nan(sim):
    out = sim.selftest_smem(0)  # dynamic smem nobody wrote
    assert torch.isnan(out).all()
    out = sim.selftest_smem(1)  # static smem written by block 0 only: poisoned again for block 1
    assert torch.equal(out[0], torch.arange(64, dtype=torch.float32))
    assert torch.isnan(out[1]).all()


def test_schedule_order_changes_what_a_race_reads(sim, reverse_schedule):
    # Thread t reads element t-1 without a barrier: run in reverse order, 63 threads read poison
    # (the default order hides all but one); the op tests below also run in both orders.
    rev = sim.selftest_smem(2)
    assert int(torch.isnan(rev[0]).sum()) == 63
    sim.set_schedule(0)
    fwd = sim.selftest_smem(2)
    assert int(torch.isnan(fwd[0]).sum()) == 1


BUGS = [
    (0, r"lane 16\): exited while lane 0 of its warp waits at __shfl_xor_sync\(mask 0xffffffff\)"),
    (1, r"deadlock.*__shfl_xor_sync.*__syncthreads\(\).*divergent"),
    (2, r"deadlock.*__syncwarp\(mask 0x00000003\).*lane 1 of its mask is at __syncthreads"),
    (3, r"cp_async16: the shared address .* is not 16-byte aligned"),
    (4, r"cp_async16: the global address .* is not 16-byte aligned"),
    (5, r"cp_async16: the destination .* is not in shared memory"),
    (6, r"ldmatrix_x4: the row address .* is not in shared memory"),
    (7, r"lane 0 reads lane 20, which is not in the mask"),
    (8, r"FL_SET_SMEM\(bug_kernel, 233472\): more than"),
    (9, r"65536 bytes of dynamic shared memory, over the kernel's limit of 49152"),
    (10, r"invalid block \(1025,1,1\)"),
    (11, r"thread \(5,0,0\).*the kernel threw: device-side check failed in thread 5"),
    (12, r"the mask does not include the calling lane"),
    (13, r"exited while lane 0 of its warp waits at mma_16816<f16>\(mask 0xffffffff\)"),
    (14, r"a kernel launch from inside a kernel"),
]


@pytest.mark.parametrize("what,match", BUGS, ids=[str(b[0]) for b in BUGS])
def test_kernel_bugs_raise(sim, what, match):
    with pytest.raises(RuntimeError, match=match) as e:
        sim.selftest_bug(what)
    if what not in (8, 9, 10):
        assert "kernel bug_kernel" in str(e.value) or "smem_kernel" in str(e.value)
    # The emulator is usable after the error.
    assert torch.equal(sim.selftest_smem(1)[0], torch.arange(64, dtype=torch.float32))


@pytest.mark.parametrize("bug,match", [
    (2, "cp_async16: the shared address"),
    (4, "ldmatrix_x4: the row address .* of lane 0 is not 16-byte aligned"),
    (5, "exited while lane 0 of its warp waits at mma_16816<f16>"),
])
def test_mini_gemm_bugs_raise(sim, bug, match):
    a = _int_matrix(16, 16, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=match):
        sim.selftest_gemm(a, a, 0 if bug == 5 else 4, bug)


def test_fiber_stacks_fit(sim):
    # (after the kernels launched by the tests above in this process)
    launches, blocks, switches, used, size = sim.sim_stats()[:5]
    assert launches > 0 and blocks > 0 and switches > 0
    assert 0 < used < size // 2, f"fiber stacks: {used} of {size} bytes used"


# --------------------------------------------------------------------------------------------
# AddressSanitizer build (subprocesses: libasan must be preloaded before Python starts)
# --------------------------------------------------------------------------------------------

IN_ASAN = os.environ.get("FUSED_LORA_SIM_ASAN", "0") == "1"
_ROOT = Path(__file__).resolve().parent.parent
# Every kernel, launcher and path once or twice: GEMV / tensor-core / SIMT GEMMs at ragged
# edges, the backward reductions, the mixed-adapter decode and prefill paths, strided views
# (the `sim` backend of tests/ops), and the emulator's bug reports and cp.async.
ASAN_FILES = ("test_cuda_sim.py", os.path.join("ops", "test_lora_linear.py"),
              os.path.join("ops", "test_multi_lora_linear.py"))
ASAN_SUBSET = ("(test_raw_fwd_bwd and sim- and (5x67 or 257x72) and not bfloat16) or "
               "(test_raw_multi_fwd_bwd and sim- and (f16 or f32) and not bf16) or "
               "(test_raw_strided_views and sim- and float16) or test_kernel_bugs_raise or test_cp_async")


def _asan_env():
    libs = asan_runtime()
    if libs is None:
        pytest.skip("no libasan / libstdc++ of the C++ compiler to preload")
    # The subprocesses import fused_lora from this checkout and simt_emu from its tools/.
    path = [str(_ROOT), str(_ROOT / "tools")] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return dict(os.environ, FUSED_LORA_SIM_ASAN="1", LD_PRELOAD=" ".join(libs),
                ASAN_OPTIONS="detect_leaks=0", PYTHONPATH=os.pathsep.join(path))


@pytest.mark.skipif(IN_ASAN, reason="already under ASan")
def test_asan_reports_out_of_bounds_reads():
    code = (
        "import torch\n"
        "from simt_emu import build_sim\n"
        "ops = build_sim()\n"
        "assert ops.is_asan()\n"
        "ops.selftest_oob(torch.zeros(64), 0)\n"
        "print('in bounds: ok', flush=True)\n"
        "ops.selftest_oob(torch.zeros(64), 1)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=_asan_env(), capture_output=True,
                       text=True, timeout=900)
    assert "in bounds: ok" in r.stdout, r.stderr[-4000:]
    assert r.returncode != 0
    assert "heap-buffer-overflow" in r.stderr and "oob_kernel" in r.stderr, r.stderr[-4000:]


@pytest.mark.skipif(IN_ASAN, reason="already under ASan")
def test_asan_op_subset():
    r = subprocess.run(
        [sys.executable, "-m", "pytest", *ASAN_FILES, "-q", "-x", "-p", "no:cacheprovider",
         "-k", ASAN_SUBSET],
        env=_asan_env(), capture_output=True, text=True, timeout=1200,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    assert r.returncode == 0 and " passed" in r.stdout, (r.stdout[-4000:] + r.stderr[-4000:])


# --------------------------------------------------------------------------------------------
# The emulator is development tooling: not in the runtime package
# --------------------------------------------------------------------------------------------


def test_emulator_is_not_in_the_runtime_package():
    import simt_emu

    import fused_lora

    pkg = Path(fused_lora.__file__).resolve().parent
    assert Path(simt_emu.__file__).resolve().parent == _ROOT / "tools" / "simt_emu"
    assert not (pkg / "_sim.py").exists() and not (_ROOT / "csrc" / "sim").exists()
    for f in pkg.rglob("*.py"):  # nothing of the package imports it
        text = f.read_text()
        assert "simt_emu" not in text and "fused_lora._sim" not in text, f
    setup = (_ROOT / "setup.py").read_text()
    assert "tools" not in setup.split("setup(", 1)[1], "setup() must not ship tools/"
    code = ("import sys, fused_lora, fused_lora._ext, fused_lora.ops\n"
            "bad = [m for m in sys.modules if 'simt_emu' in m or m == 'fused_lora._sim']\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=str(_ROOT))
    assert r.returncode == 0, r.stderr[-4000:]
