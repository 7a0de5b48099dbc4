"""The CUDA single-adapter backward (csrc/lora_linear_cuda.cu: bwd_ds_db_kernel /
bwd_ds_db_simt_kernel + finalize, reduce_m_kernel, the dx GEMM) run on CPU through the SIMT
emulator (tools/simt_emu, torch.ops.fused_lora_sim) against fused_lora.reference.

Shapes are chosen for the backward's tiles with the emulator's 4 SMs (FUSED_LORA_SIM_SMS):
  * tensor-core path (fp16/bf16 dY, N % 8 == 0, 16-byte rows): 512-col chunks x 32-row steps,
    16-rank chunks; N = 520 gives two col chunks, one of 8 cols; M = 300 gives 4 row chunks of
    96 rows = 3 pipeline steps each, the last chunk 12 rows; R = 17 / 40 two / three rank chunks.
  * SIMT path (fp32 dY, N % 8 != 0, non-contiguous or misaligned dY): 256-col chunks x 64-col
    tiles x 32-row tiles.
Tolerance: the project's rule (tests/_utils.assert_close_2x): max error against an fp64 reference
at most 2x that of PyTorch's own chain in the inputs' dtypes + a small atol; dropout masks are
bit-exact (a wrong mask fails by O(1)). Skipped with the builder's reason when
the emulator cannot be built here.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _utils import assert_close_2x
from simt_emu import SimUnavailable, build_sim

from fused_lora import reference

try:
    OPS = build_sim()
except SimUnavailable as e:
    pytest.skip(f"SIMT emulator unavailable: {e}", allow_module_level=True)

SEED = (12345 << 31) | 678  # both 31-bit hash keys nonzero
ALL = (True, True, True)


def _inputs(M, K, N, R, dtype, adapter_dtype, dropout, dy_layout="contiguous"):
    g = torch.Generator().manual_seed(M * 1000003 + K * 1009 + N * 31 + R)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    a = (torch.randn(R, K, generator=g) / K**0.5).to(adapter_dtype)
    b = torch.randn(N, R, generator=g).to(adapter_dtype)
    xa = reference.lora_linear_fwd(x, w, None, a, b, 0.7, dropout, SEED)[1]
    if dy_layout == "transposed":  # stride (1, M): no vector loads
        dy = torch.randn(N, M, generator=g).to(dtype).t()
    elif dy_layout == "misaligned":  # rows 16-byte aligned in stride, base pointer 2 bytes off
        dy = torch.randn(M * N + 1, generator=g).to(dtype)[1:].view(M, N)
    else:
        dy = torch.randn(M, N, generator=g).to(dtype)
    return dy, x, w, a, b, xa


def _check(M, K, N, R, dtype, adapter_dtype=None, dropout=0.0, needs=ALL, dy_layout="contiguous"):
    ad = adapter_dtype or dtype
    dy, x, w, a, b, xa = _inputs(M, K, N, R, dtype, ad, dropout, dy_layout)
    got = OPS.lora_linear_bwd(dy, x, w, a, b, xa, 0.7, dropout, SEED, *needs)
    # PyTorch's chain in the inputs' dtypes (fp32 accumulation) and the fp64 truth.
    pt = reference.lora_linear_bwd(dy, x, w, a, b, xa, 0.7, dropout, SEED, *needs)
    d = [t.double() for t in (dy, x, w, a, b, xa)]
    ref64 = reference.lora_linear_bwd(*d, 0.7, dropout, SEED, *needs)
    for name, g_, p_, r_, need in zip(("dx", "dA", "dB"), got, pt, ref64, needs):
        assert g_.dtype == p_.dtype, name
        if not need:
            assert g_.numel() == 0, f"{name} not needed but computed"
            continue
        assert_close_2x(g_, r_, p_, name)
    return got


# (M, K, N, R, dtype, adapter dtype, dropout)
CASES = [
    # tensor-core path
    (300, 19, 520, 16, torch.bfloat16, None, 0.0),
    (300, 19, 520, 17, torch.bfloat16, None, 0.3),
    (37, 21, 40, 1, torch.float16, None, 0.3),
    (300, 19, 520, 40, torch.float16, None, 0.0),
    (70, 19, 520, 17, torch.bfloat16, torch.float32, 0.3),
    (70, 19, 40, 40, torch.float16, torch.float32, 0.0),
    (1, 8, 16, 16, torch.bfloat16, None, 0.0),  # M = 1
    # SIMT path
    (300, 17, 300, 16, torch.float32, None, 0.3),  # two col chunks, 5 row chunks
    (37, 19, 33, 17, torch.float32, None, 0.0),
    (37, 19, 33, 40, torch.bfloat16, None, 0.3),  # N % 8 != 0
    (37, 19, 33, 1, torch.float16, torch.float32, 0.0),
    (1, 5, 7, 1, torch.float32, None, 0.3),
]


@pytest.mark.parametrize("M,K,N,R,dtype,adapter_dtype,dropout", CASES)
def test_sim_bwd_matches_reference(M, K, N, R, dtype, adapter_dtype, dropout):
    _check(M, K, N, R, dtype, adapter_dtype, dropout)


SUBSETS = [n for n in itertools.product([False, True], repeat=3) if n != ALL]


# Every subset of gradients on the tensor-core engine (a skipped ds or dB must not break the
# others), and the ds-only / dB-only launches on the SIMT engine.
@pytest.mark.parametrize(
    "needs,dtype",
    [(n, torch.bfloat16) for n in SUBSETS]
    + [((True, False, False), torch.float32), ((False, False, True), torch.float32)],
)
def test_sim_bwd_needs_subsets(needs, dtype):
    _check(70, 19, 40, 17, dtype, None, 0.3, needs)


@pytest.mark.parametrize("layout", ["transposed", "misaligned"])
def test_sim_bwd_dy_layouts(layout):
    # Non-contiguous / misaligned dY falls back to the SIMT engine with strided loads.
    _check(37, 19, 40, 17, torch.float16, None, 0.3, (layout == "transposed", True, True),
           dy_layout=layout)


def test_sim_bwd_dx_misaligned_dy():
    _check(37, 19, 40, 17, torch.float16, None, 0.3, (True, False, False), dy_layout="misaligned")


def test_sim_bwd_deterministic():
    # Fixed-order partial sums: two runs are bitwise equal.
    first = _check(300, 19, 520, 17, torch.bfloat16, torch.float32, 0.3)
    dy, x, w, a, b, xa = _inputs(300, 19, 520, 17, torch.bfloat16, torch.float32, 0.3)
    again = OPS.lora_linear_bwd(dy, x, w, a, b, xa, 0.7, 0.3, SEED, *ALL)
    for f, s in zip(first, again):
        assert torch.equal(f, s)


def test_sim_bwd_fp16_large_xa_no_overflow():
    # fp16 dY with |xa| ~ 1e6 (beyond fp16's 65504) and lora_B ~ 1e-6 (fp16 subnormals): the
    # tensor-core engine's per-rank power-of-two scaling keeps hi/lo in range.
    dy, x, w, a, b, xa = _inputs(70, 19, 40, 17, torch.float16, torch.float32, 0.0)
    xa = xa * 1e6
    b = b * 1e-6
    got = OPS.lora_linear_bwd(dy, x, w, a, b, xa, 0.7, 0.0, SEED, *ALL)
    ref = reference.lora_linear_bwd(dy, x, w, a, b, xa, 0.7, 0.0, SEED, *ALL)
    for name, g_, r_ in zip(("dx", "dA", "dB"), got, ref):
        assert torch.isfinite(g_).all(), name
        scale = r_.abs().max().clamp_min(1e-30)
        assert ((g_.double() - r_.double()).abs().max() / scale).item() < 2e-3, name
