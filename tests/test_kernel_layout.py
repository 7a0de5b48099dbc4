"""The single-adapter Triton kernels' addressing and LoRA-precision paths (kernels/lora_linear.py),
which the kernel audit shaped: tile pointers with 32-bit in-tile offsets and wrapped edge rows
(_tile_ptrs), the bf16 hi / lo split of fp32 LoRA operands ("bf16x3"), the dx configs pruned
for dropout, the fp32-adapter fallback of the in-loop shrink.

Under the interpreter (no GPU) the split's dots are summed in fp32, so what runs here is the
split's rounding; the bf16 tensor-core dots themselves run in the -m gpu tests.
"""

from __future__ import annotations

import pytest
import torch
from _utils import TRITON_DEVICE, assert_close_2x

from fused_lora import reference as ref
from fused_lora.kernels import lora_linear as L


def _args(M, K, N, R, dtype, adapter_dtype, device=TRITON_DEVICE):
    x = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype)
    a = (torch.randn(R, K, device=device) / K**0.5).to(adapter_dtype)
    bb = torch.randn(N, R, device=device).to(adapter_dtype)
    return x, w, b, a, bb


def _pt_fwd(x, w, b, a, bb, scale):
    # PyTorch's own chain in the inputs' dtypes (PEFT: x cast to the adapters' dtype)
    return torch.nn.functional.linear(x, w, b) + (scale * (x.to(a.dtype) @ a.t() @ bb.t())).to(x.dtype)


def test_lora_precision_choice():
    assert L.lora_precision(torch.bfloat16, torch.float32) == "bf16x3"
    assert L.lora_precision(torch.float16, torch.float32) == "bf16x3"
    assert L.lora_precision(torch.float32, torch.float32) == "tf32x3"
    assert L.lora_precision(torch.bfloat16, torch.bfloat16) == "tf32"
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True  # the user asked for TF32: honoured
        assert L.lora_precision(torch.bfloat16, torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _rel(got, r64):
    return ((got.double() - r64).abs().max() / r64.abs().max().clamp_min(1e-300)).item()


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [(37, 70, 50, 5), (5, 48, 33, 16), (70, 40, 96, 80)], ids=str)
def test_fp32_adapters_split_forward_backward(shape):
    # fp32 adapters with fp16 activations take the bf16x3 path in every LoRA dot (shrink,
    # expand, ds, dA, dB, dx). Its contract: the 16-bit output y within the 2x rule of PyTorch's
    # own fp16 / fp32 chain; the fp32 ones (xa, dA, dB) within 2^-14 of their magnitude (the
    # split keeps ~16 of fp32's 24 bits: 2^7 below bf16, 2^5 below fp16 rounding), and at least
    # 16x closer than a plain bf16 dot of the same operands.
    M, K, N, R = shape
    x, w, b, a, bb = _args(M, K, N, R, torch.float16, torch.float32)
    y, xa = L.lora_linear_fwd(x, w, b, a, bb, 0.75, 0.0, 0)
    y64, xa64 = ref.lora_linear_fwd(x.double(), w.double(), b.double(), a.double(), bb.double(), 0.75, 0.0, 0)
    assert_close_2x(y, y64, _pt_fwd(x, w, b, a, bb, 0.75), "y")
    bf16_err = _rel((x.bfloat16().float() @ a.bfloat16().float().t()), xa64)
    assert _rel(xa, xa64) <= min(2**-14, bf16_err / 16), (_rel(xa, xa64), bf16_err)
    dy = torch.randn(M, N).to(torch.float16)
    dx, dA, dB = L.lora_linear_bwd(dy, x, w, a, bb, xa, 0.75, 0.0, 0, True, True, True)
    ref64 = ref.lora_linear_bwd(dy.double(), x.double(), w.double(), a.double(), bb.double(), xa64,
                                0.75, 0.0, 0, True, True, True)
    ds_pt = 0.75 * (dy.float() @ bb)
    assert_close_2x(dx, ref64[0], (dy @ w) + (ds_pt @ a).to(torch.float16), "dx")
    for name, got, r64 in (("dA", dA, ref64[1]), ("dB", dB, ref64[2])):
        assert got.dtype == torch.float32 and not torch.isnan(got).any(), name
        assert _rel(got, r64) <= 2**-14, (name, _rel(got, r64))


@pytest.mark.interpreter
def test_split_keeps_fp32_range():
    # bf16 keeps fp32's exponent range: adapters of 1e-30 and 1e30 magnitude survive the split
    # (an fp16 split would flush or overflow them).
    M, K, N, R = 9, 40, 24, 4
    for mag in (1e-30, 1e30):
        x, w, b, a, bb = _args(M, K, N, R, torch.float16, torch.float32)
        a = a * mag
        bb = bb / mag
        y, xa = L.lora_linear_fwd(x, w, b, a, bb, 1.0, 0.0, 0)
        y64, xa64 = ref.lora_linear_fwd(x.double(), w.double(), b.double(), a.double(), bb.double(),
                                        1.0, 0.0, 0)
        assert torch.isfinite(y).all() and torch.isfinite(xa).all()
        assert _rel(xa, xa64) <= 2**-14, _rel(xa, xa64)
        assert_close_2x(y, y64, _pt_fwd(x, w, b, a, bb, 1.0), "y")


@pytest.mark.interpreter
def test_large_strides_are_copied_not_overflowed():
    # A row stride of 2^22 + 16 elements: a 32-wide tile's 32-bit offsets would still fit, but
    # the launchers copy such views (tile edge x stride must stay < 2^31 at 512-wide tiles).
    M, K, N, R = 3, 48, 20, 4
    big = torch.randn(M, 2**22 + 16)
    x = torch.as_strided(big.to(torch.float16), (M, K), (2**22 + 16, 1))
    assert x.stride(0) >= 2**22 and L._tile_safe(x).is_contiguous()
    _, w, b, a, bb = _args(M, K, N, R, torch.float16, torch.float16)
    y, _ = L.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 0)
    y64, _ = ref.lora_linear_fwd(x.double(), w.double(), b.double(), a.double(), bb.double(), 0.5, 0.0, 0)
    assert_close_2x(y, y64, _pt_fwd(x, w, b, a, bb, 0.5), "y")


@pytest.mark.interpreter
def test_fused_shrink_with_fp32_adapters_takes_the_pre_kernel(monkeypatch):
    # shrink="fused" with fp32 adapters runs the pre-kernel (the in-loop split cost 1.8-5.3x the
    # plain GEMM's instructions per step): the fused GEMM is launched with FUSE_SHRINK=False.
    seen = []
    real = L._lora_fwd_kernel.run

    def spy(*a, **k):
        seen.append(k.get("FUSE_SHRINK"))
        return real(*a, **k)

    monkeypatch.setattr(L._lora_fwd_kernel, "run", spy)
    x, w, b, a, bb = _args(20, 40, 24, 8, torch.float16, torch.float32)
    L.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 0, shrink="fused")
    x, w, b, a, bb = _args(20, 40, 24, 8, torch.float16, torch.float16)
    L.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 0, shrink="fused")
    assert seen == [False, True]


def test_dx_configs_prune_for_dropout():
    # the real (GPU) list: dropout keeps tiles of <= 64 fp32 accumulators per thread
    import triton

    monkey_interp = L.INTERPRET
    try:
        L.INTERPRET = False
        cfgs = L._dx_configs()
    finally:
        L.INTERPRET = monkey_interp
    assert any(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps) > 64 for c in cfgs)
    kept = L._prune_dx_configs(cfgs, {}, HAS_DROPOUT=True)
    assert kept and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] <= 64 * 32 * c.num_warps for c in kept)
    assert L._prune_dx_configs(cfgs, {}, HAS_DROPOUT=False) == cfgs
    # 128 x 256 output tiles (the widest wgmma shape) are on the list for the no-dropout case
    assert any((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]) in ((128, 256), (256, 128)) for c in cfgs)
    assert isinstance(cfgs[0], triton.Config)


def test_configs_pruned_by_shared_memory(monkeypatch):
    # On a GPU, configs whose pipelined tiles exceed its opt-in shared memory are dropped before
    # autotuning; off a GPU (the audit's CPU capture) the whole list stays, and the audit's
    # unlaunchable gate checks every listed config against sm_90a's 227 KB.
    monkeypatch.setattr(L, "INTERPRET", False)
    fwd, dx = L._gemm_configs(small_m=True), L._dx_configs()
    x = torch.empty(8, 8, dtype=torch.bfloat16)
    assert L._prune_fwd_configs(fwd, {"x_ptr": x}) == fwd
    monkeypatch.setattr(L, "_smem_limit", lambda t: 100 * 1024)
    kept = L._prune_fwd_configs(fwd, {"x_ptr": x})
    assert 0 < len(kept) < len(fwd)
    kw = [(c.num_stages, c.kwargs) for c in kept]
    assert all(s * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * 2 <= 100 * 1024 for s, k in kw)
    kept_dx = L._prune_dx_configs(dx, {"dy_ptr": x})
    assert 0 < len(kept_dx) < len(dx)
    assert not any((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]) == (128, 256) for c in kept_dx)


def test_decode_gemm_configs_fill_a_wave(monkeypatch):
    # The gathered (decode) GEMM on a 132-SM GPU at N = 4096: the configs kept launch >= 132
    # CTAs (BN = 16 / 32 tiles); when none can (tiny N), the ones with the most CTAs are kept.
    from fused_lora.kernels import multi_lora as ML

    monkeypatch.setattr(ML, "INTERPRET", False)
    cfgs = ML._gather_configs()
    for M in (1, 16, 64):
        kept = ML._full_wave(cfgs, M, 4096, 132)
        ctas = [triton_cdiv(M, c.kwargs["BLOCK_M"]) * triton_cdiv(4096, c.kwargs["BLOCK_N"]) for c in kept]
        assert kept and min(ctas) >= 132, (M, ctas)
    small = ML._full_wave(cfgs, 1, 64, 132)
    assert small and all(c.kwargs["BLOCK_N"] == 16 for c in small)
    # the gathered-B block stays <= 64 fp32 values per thread
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_RV"] <= 64 * 32 * c.num_warps
               for c in cfgs)
    x = torch.empty(2, 2)
    assert ML._prune_gather_configs(cfgs, {"x_ptr": x, "M": 16, "N": 4096}) == cfgs  # off a GPU


def triton_cdiv(a, b):
    return -(-a // b)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float16, torch.float16),
                                                 (torch.float16, torch.float32),
                                                 (torch.float32, torch.float32)], ids=str)
@pytest.mark.parametrize("shape", [(37, 72, 50, 5), (64, 32, 129, 16), (5, 48, 40, 80), (130, 64, 100, 8)],
                         ids=str)
@pytest.mark.parametrize("persistent", [False, True], ids=["tma", "tma_persistent"])
def test_tma_forward_matches_reference(shape, dtype, adapter_dtype, persistent):
    # backends "triton:tma" / "triton:tma_persistent": x / W0 tiles by tensor descriptors
    # (zero-filled past the edges), through the public functional API, forward and backward
    # (the backward is the pointer one). The persistent kernel runs 3 programs under the
    # interpreter: at 130 x 100 (5 x 4 tiles of 32) each walks 6-7 tiles, at 5 x 40 only two
    # of them have a tile (the grid is min(programs, tiles)).
    import fused_lora

    M, K, N, R = shape
    x, w, b, a, bb = _args(M, K, N, R, dtype, adapter_dtype)
    assert L.tma_unavailable(x, w) == ""
    y, xa = L.lora_linear_fwd(x, w, b, a, bb, 0.75, 0.0, 0, tma=True, persistent=persistent)
    y64, _ = ref.lora_linear_fwd(x.double(), w.double(), b.double(), a.double(), bb.double(), 0.75, 0.0, 0)
    assert_close_2x(y, y64, _pt_fwd(x, w, b, a, bb, 0.75), "y")
    xg = x.clone().requires_grad_()
    entry = "triton:tma_persistent" if persistent else "triton:tma"
    yk = fused_lora.lora_linear(xg, w, b, a, bb, 0.75, backend=entry)
    torch.testing.assert_close(yk, y, rtol=0, atol=0)
    yk.sum().backward()
    assert xg.grad is not None and not torch.isnan(xg.grad).any()


@pytest.mark.interpreter
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float16, torch.float16),
                                                 (torch.float16, torch.float32),
                                                 (torch.float32, torch.float32)], ids=str)
@pytest.mark.parametrize("shape", [(37, 72, 56, 5), (64, 32, 136, 16), (5, 48, 40, 80)], ids=str)
def test_tma_dx_matches_reference(shape, dtype, adapter_dtype, p):
    # the dx GEMM with dy / W0 tiles by TMA (_lora_bwd_dx_tma_kernel, a launch of its own; dA /
    # dB from _lora_bwd_kernel without its dx programs), with and without dropout, against the
    # fp64 reference, and dA / dB equal to the pointer backward's bit for bit
    M, K, N, R = shape
    x, w, b, a, bb = _args(M, K, N, R, dtype, adapter_dtype)
    dy = torch.randn(M, N, dtype=dtype)
    seed = 1234
    _, xa = L.lora_linear_fwd(x, w, b, a, bb, 0.75, p, seed)
    assert L.tma_unavailable(dy, w) == ""
    got = L.lora_linear_bwd(dy, x, w, a, bb, xa, 0.75, p, seed, True, True, True, tma=True)
    ptr = L.lora_linear_bwd(dy, x, w, a, bb, xa, 0.75, p, seed, True, True, True)
    d = torch.float64
    want = ref.lora_linear_bwd(dy.to(d), x.to(d), w.to(d), a.to(d), bb.to(d), xa.to(d), 0.75, p, seed,
                               True, True, True)
    pt = ref.lora_linear_bwd(dy, x, w, a, bb, xa, 0.75, p, seed, True, True, True)
    assert_close_2x(got[0], want[0], pt[0], "dx")
    torch.testing.assert_close(got[1], ptr[1], rtol=0, atol=0)
    torch.testing.assert_close(got[2], ptr[2], rtol=0, atol=0)


@pytest.mark.interpreter
def test_tma_refuses_misaligned_operands_and_falls_back():
    # TMA needs 16-byte aligned rows: K = 70 fp16 rows are 140 B, so the pointer GEMM runs
    x, w, b, a, bb = _args(9, 70, 24, 4, torch.float16, torch.float16)
    assert "16-byte" in L.tma_unavailable(x, w)
    y, _ = L.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 0, tma=True)
    y0, _ = L.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 0)
    torch.testing.assert_close(y, y0, rtol=0, atol=0)


def _cfgs(tiles):
    import triton

    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s,
                          num_warps=w) for bm, bn, bk, s, w in tiles]


def _tiles(cfgs):
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in cfgs]


def test_prune_rules_follow_the_pinned_gpu():
    # The prune functions keep what a launch on the target GPU would: off a GPU (unpinned) every
    # config; pinned as the audit pins them, the arch's own rules (kernels/target.py).
    from fused_lora.kernels import target

    fwd = _cfgs([(128, 256, 64, 3, 8), (128, 128, 32, 4, 4), (32, 64, 128, 4, 4), (64, 64, 64, 4, 4)])
    x16 = a16 = torch.empty(2, 2, dtype=torch.bfloat16)
    a32 = torch.empty(2, 2)
    args = {"x_ptr": x16, "a_ptr": a16, "b_ptr": a16, "R": 16}
    assert L._prune_fwd_configs(fwd, args, FUSE_SHRINK=True) == fwd  # unpinned CPU tensors
    with target.pinned(target.AUDIT_GPUS[90]):
        assert L._prune_fwd_configs(fwd, args, FUSE_SHRINK=True) == fwd
        assert (32, 64, 128, 4) not in _tiles(L._prune_fwd_configs(fwd, {**args, "R": 64}))
    with target.pinned(target.AUDIT_GPUS[80]):
        kept = _tiles(L._prune_fwd_configs(fwd, args, FUSE_SHRINK=True))
        assert (128, 256, 64, 8) not in kept and (128, 128, 32, 4) in kept
        kept = _tiles(L._prune_fwd_configs(fwd, {**args, "R": 64, "a_ptr": a32, "b_ptr": a32}))
        assert (128, 128, 32, 4) not in kept and (64, 64, 64, 4) in kept
    # the shrink / ds configs at 64-rank blocks: no 256-deep tiles; with dropout 8 warps
    small = [triton_config_small(bm, bk, w) for bm, bk, w in [(64, 128, 4), (128, 64, 4), (32, 256, 4),
                                                              (128, 128, 8)]]
    with target.pinned(target.AUDIT_GPUS[90]):
        assert L._prune_small_configs(small, {"x_ptr": x16, "a_ptr": a16, "R": 16}, BLOCK_R=16) == small
        kept = L._prune_small_configs(small, {"x_ptr": x16, "a_ptr": a16, "R": 64}, BLOCK_R=64,
                                      HAS_DROPOUT=True)
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps) for c in kept] == [(128, 128, 8)]
    # sm_80, fp32 adapters at r > 32: 32-rank blocks (the bf16 hi / lo parts live in registers)
    with target.pinned(target.AUDIT_GPUS[80]):
        assert L._rank_block(64, x16, a32) == 32 and L._rank_block(64, x16, a16) == 64
    with target.pinned(target.AUDIT_GPUS[90]):
        assert L._rank_block(64, x16, a32) == 64
    assert L._rank_block(64, x16, a32) == 64  # unpinned CPU


def triton_config_small(bm, bk, w):
    import triton

    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_stages=3, num_warps=w)


def test_dx_prune_keys_on_dropout():
    # the backward's autotune key holds HAS_DROPOUT: its prune keeps other configs with dropout,
    # so a choice cached without dropout must not be reused with it (and the shrink's likewise)
    assert "HAS_DROPOUT" in L._lora_bwd_kernel.keys and "HAS_DROPOUT" in L._lora_shrink_kernel.keys
    assert "HAS_DROPOUT" in L._lora_bwd_dx_tma_kernel.keys
