"""Seeded random cases of every CUDA op under the SIMT emulator, against fused_lora.reference.

The hand-picked shapes of test_cuda_sim*.py cover the tile edges we thought of; these draw
shapes, dtypes, strides, dropout, rank patterns and adapter ids at random (a fixed seed per
case, so a failure reproduces by its id) to reach the combinations nobody listed: GEMV vs
tensor-core vs split-K vs SIMT paths, decode vs prefill, vectorized vs scalar loads. Sizes stay
small (the emulator runs every CUDA thread as a fiber on CPU). Even seeds run the fp16/bf16
GEMMs on the mma.sync kernel, odd seeds on the Hopper wgmma kernel with 128- or 256-wide tiles
(the ops' gemm argument: 1, 2 or 3).
Tolerance: the 2x rule of tests/test_lora_linear.py.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
from _utils import check_op_vs_reference
from simt_emu import build_sim, sim_unavailable_reason

from fused_lora import reference

_REASON = sim_unavailable_reason()
if _REASON is not None:
    pytest.skip(f"SIMT emulator unavailable: {_REASON}", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
N_CASES = 300


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


@pytest.fixture
def sim(ops, request):
    """The ops with gemm = mma (1), wgmma (2), mma, wgmma256 (3) by seed % 4."""
    seed = request.node.callspec.params["seed"]
    return _WithGemm(ops, (1, 2, 1, 3)[seed % 4])


def _check(got, ref_fn, args, names):
    """The 2x rule, with the absolute floor scaled by the output's magnitude (as
    tests/test_cuda_ext.py does): random draws reach |dA| ~ 100 in fp32, where a few ulps of an
    fp32 sum exceed a fixed 1e-5 that PyTorch's own sum may happen to meet. fp32 outputs
    (fp32 adapters' dA / dB, fp32 activations) get 4x: with fp32 operands split into three
    bf16 terms for the tensor cores (bwd_ds_db_kernel), ds is three fp32-accumulated passes,
    ~2-4x the rounding of one fp32 dot, which a cancelling sum such as dA then shows (seen: dA
    at 4.2x PyTorch's error, 4e-5 relative, M = 130, N = 264, r = 1)."""
    check_op_vs_reference(got, ref_fn, args, names, scaled_atol=True, fp32_factor=4.0)


def _maybe_strided(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """t itself, a row-padded view (unit inner stride, odd or aligned row pitch) or a transposed
    copy viewed back (inner stride != 1): the same values, other strides."""
    kind = rng.choice(["contig", "contig", "padded", "transposed"])
    if kind == "padded":
        pad = rng.choice([1, 8])
        big = torch.empty(t.shape[0], t.shape[1] + pad, dtype=t.dtype)
        big[:, : t.shape[1]] = t
        return big[:, : t.shape[1]]
    if kind == "transposed":
        return t.t().contiguous().t()
    return t


def _draw(seed: int) -> dict:
    rng = random.Random(seed)
    M = rng.choice([1, 2, 5, 8, 9, 16, 33, 64, 65, 100, 130, 257])
    K = rng.choice([1, 7, 16, 36, 64, 67, 130, 264, 520])
    N = rng.choice([1, 8, 17, 40, 72, 129, 264])
    R = rng.choice([1, 4, 16, 17])
    dtype = rng.choice(DTYPES)
    adapter_dtype = torch.float32 if dtype != torch.float32 and rng.random() < 0.3 else dtype
    return dict(rng=rng, M=M, K=K, N=N, R=R, dtype=dtype, adapter_dtype=adapter_dtype,
                bias=rng.random() < 0.6, dropout=rng.choice([0.0, 0.0, 0.25]),
                needs=tuple(rng.random() < 0.8 for _ in range(3)))


@pytest.mark.parametrize("seed", range(N_CASES))
def test_fuzz_single(sim, seed):
    c = _draw(seed)
    rng, M, K, N, R, dt, ad = c["rng"], c["M"], c["K"], c["N"], c["R"], c["dtype"], c["adapter_dtype"]
    g = torch.Generator().manual_seed(seed)
    x = _maybe_strided(torch.randn(M, K, generator=g).to(dt), rng)
    w = _maybe_strided((torch.randn(N, K, generator=g) / K**0.5).to(dt), rng)
    b = torch.randn(N, generator=g).to(dt) if c["bias"] else None
    a = (torch.randn(R, K, generator=g) / K**0.5).to(ad)
    bb = torch.randn(N, R, generator=g).to(ad)
    s, p, sd = 0.8, c["dropout"], 1000 + seed
    fwd = (x, w, b, a, bb, s, p, sd)
    y, xa = sim.lora_linear_fwd(*fwd)
    _check((y, xa), reference.lora_linear_fwd, fwd, ("y", "xa"))
    dy = _maybe_strided(torch.randn(M, N, generator=g).to(dt), rng)
    bwd = (dy, x, w, a, bb, xa, s, p, sd, *c["needs"])
    _check(sim.lora_linear_bwd(*bwd), reference.lora_linear_bwd, bwd, ("dx", "dA", "dB"))


@pytest.mark.parametrize("seed", range(N_CASES))
def test_fuzz_multi(sim, seed):
    c = _draw(10_000 + seed)
    rng, M, K, N, R, dt, ad = c["rng"], c["M"], c["K"], c["N"], c["R"], c["dtype"], c["adapter_dtype"]
    S = rng.choice([1, 2, 5, 12])
    g = torch.Generator().manual_seed(seed)
    x = _maybe_strided(torch.randn(M, K, generator=g).to(dt), rng)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dt)
    b = torch.randn(N, generator=g).to(dt) if c["bias"] else None
    a = (torch.randn(S, R, K, generator=g) / K**0.5).to(ad)
    bb = torch.randn(S, N, R, generator=g).to(ad)
    scales = torch.rand(S, generator=g) + 0.5
    # ids: -1, slots (sometimes all one slot, sometimes already sorted), out of range both ways
    pattern = rng.choice(["mixed", "one", "sorted"])
    if pattern == "one":
        ids = torch.full((M,), rng.randrange(S), dtype=torch.int64)
    else:
        ids = torch.randint(-1, S + 2, (M,), generator=g)
        ids[torch.rand(M, generator=g) < 0.1] = -7
        if pattern == "sorted":
            ids = ids.sort().values
    rk = None
    if rng.random() < 0.5:
        rk = torch.randint(0, R + 1, (S,), generator=g)
        for i in range(S):  # dead columns hold NaN: reading them fails the test
            a[i, int(rk[i]):] = float("nan")
            bb[i, :, int(rk[i]):] = float("nan")
    fwd = (x, w, b, a, bb, scales, ids, rk)
    y, xa = sim.multi_lora_linear_fwd(*fwd)
    _check((y, xa), reference.multi_lora_linear_fwd, fwd, ("y", "xa"))
    dy = _maybe_strided(torch.randn(M, N, generator=g).to(dt), rng)
    bwd = (dy, x, w, a, bb, scales, ids, rk, xa, *c["needs"])
    _check(sim.multi_lora_linear_bwd(*bwd), reference.multi_lora_linear_bwd, bwd, ("dx", "dA", "dB"))
