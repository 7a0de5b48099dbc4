"""Seeded random cases of the raw ops under the SIMT emulator (test_raw_fuzz in
tests/ops/test_<op>.py), against fused_lora.reference.

The hand-picked shapes of the raw-op tests cover the tile edges we thought of; these draw
shapes, dtypes, strides, dropout, rank patterns and adapter ids at random (a fixed seed per
case, so a failure reproduces by its id) to reach the combinations nobody listed: GEMV vs
tensor-core vs split-K vs SIMT paths, decode vs prefill, vectorized vs scalar loads. Sizes stay
small (the emulator runs every CUDA thread as a fiber on CPU). Seeds by % 4 run the fp16/bf16
GEMMs on mma.sync, wgmma, mma.sync, wgmma256 (the ops' gemm argument: 1, 2, 1, 3).
"""

from __future__ import annotations

import random

import torch
from _utils import check_op_vs_reference, relayout

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

N_FUZZ = 300
FUZZ_GEMMS = (1, 2, 1, 3)


def fuzz_check(got, ref_fn, args, names):
    """The 2x rule, with the absolute floor scaled by the output's magnitude (as the GPU tests
    do): random draws reach |dA| ~ 100 in fp32, where a few ulps of an fp32 sum exceed a fixed
    1e-5 that PyTorch's own sum may happen to meet. fp32 outputs (fp32 adapters' dA / dB, fp32
    activations) get 4x: with fp32 operands split into three bf16 terms for the tensor cores
    (bwd_ds_db_kernel), ds is three fp32-accumulated passes, ~2-4x the rounding of one fp32 dot,
    which a cancelling sum such as dA then shows (seen: dA at 4.2x PyTorch's error, 4e-5
    relative, M = 130, N = 264, r = 1)."""
    check_op_vs_reference(got, ref_fn, args, names, scaled_atol=True, fp32_factor=4.0)


def fuzz_layout(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """t itself, a row-padded view (unit inner stride, odd or aligned row pitch) or a transposed
    copy viewed back (inner stride != 1): the same values, other strides."""
    kind = rng.choice(["contig", "contig", "padded", "transposed"])
    if kind == "padded":
        return relayout(t, rng.choice(["padded", "padded8"]))
    return relayout(t, "transposed") if kind == "transposed" else t


def fuzz_draw(seed: int) -> dict:
    rng = random.Random(seed)
    M = rng.choice([1, 2, 5, 8, 9, 16, 33, 64, 65, 100, 130, 257])
    K = rng.choice([1, 7, 16, 36, 64, 67, 130, 264, 520])
    N = rng.choice([1, 8, 17, 40, 72, 129, 264])
    R = rng.choice([1, 4, 16, 17])
    dtype = rng.choice([F32, F16, BF16])
    adapter_dtype = F32 if dtype != F32 and rng.random() < 0.3 else dtype
    return dict(rng=rng, M=M, K=K, N=N, R=R, dtype=dtype, adapter_dtype=adapter_dtype,
                bias=rng.random() < 0.6, dropout=rng.choice([0.0, 0.0, 0.25]),
                needs=tuple(rng.random() < 0.8 for _ in range(3)))
