"""The C++/CUDA extension fused_lora._C (csrc/): its ops in torch.ops.fused_lora_C.

On CPU (CI): the C++ CPU kernels against fused_lora.reference (odd shapes, bias, dropout with a
bit-exact mask, fp32 adapters with fp16 x, every needs_* combination), opcheck, the TORCH_CHECK
messages, that the CUDA kernels are registered when the build has them, that the C++ schemas
match the Python custom ops', and the package without the extension. On a GPU (-m gpu): every
CUDA op against the reference in fp16 / bf16 / fp32 at odd shapes, forward and backward, and
CUDA-graph replay. tests/run_sanitizer.sh runs the GPU tests under compute-sanitizer.

Skipped as a whole when the extension is not built (FUSED_LORA_SKIP_EXT=1) or not loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _utils import ATOL, HAS_CUDA, max_err

from fused_lora import _ext, reference

if _ext.ext_error() is not None:
    pytest.skip(f"C++ extension unavailable: {_ext.ext_error()}", allow_module_level=True)

C = torch.ops.fused_lora_C
# (M, K, N, R): edges of every tile size the kernels use (TC 128x128x32, SIMT 64x64x16,
# shrink 32 rows x 16 ranks x 64 k, reduce 64 cols x 16 ranks x 32 rows), K odd (no 16-byte
# loads), R > 16 (two rank chunks).
CPU_SHAPES = [(1, 1, 1, 1), (13, 20, 18, 4), (37, 67, 33, 17)]
SEED = (12345 << 31) | 678  # both 31-bit hash keys nonzero


def _args(device="cpu", dtype=torch.float32, adapter_dtype=None, M=13, K=20, N=18, R=4, bias=True):
    ad = adapter_dtype or dtype
    x = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    a = (torch.randn(R, K, device=device) / K**0.5).to(ad)
    bb = torch.randn(N, R, device=device).to(ad)
    return x, w, b, a, bb


def _close(out, ref, name):
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}
    assert out.dtype == ref.dtype and out.shape == ref.shape, name
    torch.testing.assert_close(out, ref, atol=tol[out.dtype], rtol=tol[out.dtype], msg=name)


# --------------------------------------------------------------------------------------------
# C++ CPU kernels vs reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_cpu_fwd_matches_reference(shape, dtype, bias, dropout):
    M, K, N, R = shape
    x, w, b, a, bb = _args(dtype=dtype, M=M, K=K, N=N, R=R, bias=bias)
    y, xa = C.lora_linear_fwd(x, w, b, a, bb, 0.7, dropout, SEED)
    y_ref, xa_ref = reference.lora_linear_fwd(x, w, b, a, bb, 0.7, dropout, SEED)
    _close(y, y_ref, "y")
    _close(xa, xa_ref, "xa")


def test_cpu_fp32_adapters_with_fp16_x():
    x, w, b, a, bb = _args(dtype=torch.float16, adapter_dtype=torch.float32, M=21, K=35, N=19, R=5)
    y, xa = C.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.1, 9)
    y_ref, xa_ref = reference.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.1, 9)
    _close(y, y_ref, "y")
    _close(xa, xa_ref, "xa")
    dy = torch.randn_like(y)
    got = C.lora_linear_bwd(dy, x, w, a, bb, xa, 0.5, 0.1, 9, True, True, True)
    ref = reference.lora_linear_bwd(dy, x, w, a, bb, xa_ref, 0.5, 0.1, 9, True, True, True)
    for g, r, name in zip(got, ref, ("dx", "dA", "dB")):
        _close(g, r, name)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32


@pytest.mark.parametrize("seed", [0, 1, SEED, (1 << 62) - 1])
def test_cpu_dropout_mask_bit_exact(seed):
    # With A = I (r = K) and x = 1, xa = keep / (1 - p): its support is the keep mask.
    M, K, p = 29, 37, 0.4
    x = torch.ones(M, K)
    eye = torch.eye(K)
    _, xa = C.lora_linear_fwd(x, torch.zeros(3, K), None, eye, torch.zeros(3, K), 1.0, p, seed)
    keep = reference.dropout_keep_mask(seed, M, K, p)
    assert torch.equal(xa != 0, keep)
    torch.testing.assert_close(xa[keep], torch.full_like(xa[keep], 1.0 / (1.0 - p)))


NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
         (False, True, True), (False, False, False)]


@pytest.mark.parametrize("needs", NEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_cpu_bwd_matches_reference(needs, dtype, dropout):
    M, K, N, R = 37, 67, 33, 17
    x, w, _, a, bb = _args(dtype=dtype, M=M, K=K, N=N, R=R)
    _, xa = reference.lora_linear_fwd(x, w, None, a, bb, 0.6, dropout, SEED)
    dy = torch.randn(M, N).to(dtype)
    got = C.lora_linear_bwd(dy, x, w, a, bb, xa, 0.6, dropout, SEED, *needs)
    ref = reference.lora_linear_bwd(dy, x, w, a, bb, xa, 0.6, dropout, SEED, *needs)
    for g, r, need, name in zip(got, ref, needs, ("dx", "dA", "dB")):
        if need:
            _close(g, r, name)
        else:
            assert g.numel() == 0 and g.dtype == r.dtype, name


@pytest.mark.parametrize("M,K,N", [(0, 5, 4), (3, 0, 4), (3, 5, 0)])
def test_cpu_degenerate_sizes(M, K, N):
    x, w, b, a, bb = _args(M=M, K=K, N=N, R=2)
    y, xa = C.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 0)
    y_ref, xa_ref = reference.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 0)
    _close(y, y_ref, "y")
    _close(xa, xa_ref, "xa")
    dy = torch.randn(M, N)
    got = C.lora_linear_bwd(dy, x, w, a, bb, xa, 0.5, 0.0, 0, True, True, True)
    ref = reference.lora_linear_bwd(dy, x, w, a, bb, xa_ref, 0.5, 0.0, 0, True, True, True)
    for g, r, name in zip(got, ref, ("dx", "dA", "dB")):
        _close(g, r, name)


# --------------------------------------------------------------------------------------------
# Mixed adapters (multi_lora_linear_*): -1 rows, out-of-range ids, mixed ranks, NaN past a rank
# --------------------------------------------------------------------------------------------


def _multi_args(device="cpu", dtype=torch.float32, adapter_dtype=None, M=23, K=37, N=29, S=3,
                R=17, bias=True, ranks=True):
    ad = adapter_dtype or dtype
    x = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    a = (torch.randn(S, R, K, device=device) / K**0.5).to(ad)
    bb = torch.randn(S, N, R, device=device).to(ad)
    scales = torch.rand(S, device=device) + 0.5
    # every kind of id: -1, each slot, out of range both ways (act as -1, never indexed)
    pool = torch.tensor([-1, 0, 1, 2, S, S + 5, -7], device=device)
    ids = pool[torch.randint(0, len(pool), (M,), device=device)]
    rk = None
    if ranks:
        rk = torch.tensor([R, 0, max(1, R // 3)] + [R] * (S - 3), device=device)[:S]
        for i in range(S):  # dead columns hold NaN: a kernel that reads them fails
            a[i, int(rk[i]):] = float("nan")
            bb[i, :, int(rk[i]):] = float("nan")
    return x, w, b, a, bb, scales, ids, rk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("ranks", [True, False])
def test_cpu_multi_fwd_matches_reference(dtype, bias, ranks):
    args = _multi_args(dtype=dtype, bias=bias, ranks=ranks)
    y, xa = C.multi_lora_linear_fwd(*args)
    y_ref, xa_ref = reference.multi_lora_linear_fwd(*args)
    _close(y, y_ref, "y")
    _close(xa, xa_ref, "xa")


@pytest.mark.parametrize("needs", NEEDS)
def test_cpu_multi_bwd_matches_reference(needs):
    args = _multi_args(dtype=torch.float16, adapter_dtype=torch.float32)
    x, w, b, a, bb, scales, ids, rk = args
    _, xa = reference.multi_lora_linear_fwd(*args)
    dy = torch.randn(x.shape[0], w.shape[0]).half()
    got = C.multi_lora_linear_bwd(dy, x, w, a, bb, scales, ids, rk, xa, *needs)
    ref = reference.multi_lora_linear_bwd(dy, x, w, a, bb, scales, ids, rk, xa, *needs)
    for g, r, need, name in zip(got, ref, needs, ("dx", "dA", "dB")):
        if need:
            _close(g, r, name)
        else:
            assert g.numel() == 0 and g.dtype == r.dtype, name


def test_opcheck_multi():
    x, w, b, a, bb, scales, ids, rk = _multi_args(ranks=False, M=9, K=12, N=10, R=4)
    torch.library.opcheck(C.multi_lora_linear_fwd.default, (x, w, b, a, bb, scales, ids, rk))
    _, xa = C.multi_lora_linear_fwd(x, w, b, a, bb, scales, ids, rk)
    dy = torch.randn(9, 10)
    torch.library.opcheck(C.multi_lora_linear_bwd.default,
                          (dy, x, w, a, bb, scales, ids, rk, xa, True, True, True))


def test_multi_checks_name_the_argument():
    x, w, b, a, bb, scales, ids, rk = _multi_args()
    with pytest.raises(RuntimeError, match="adapter_ids must be int64"):
        C.multi_lora_linear_fwd(x, w, b, a, bb, scales, ids.int(), rk)
    with pytest.raises(RuntimeError, match="scales must be"):
        C.multi_lora_linear_fwd(x, w, b, a, bb, scales[:2], ids, rk)
    with pytest.raises(RuntimeError, match="ranks must be"):
        C.multi_lora_linear_fwd(x, w, b, a, bb, scales, ids, rk[:2])
    with pytest.raises(RuntimeError, match="lora_B must be"):
        C.multi_lora_linear_fwd(x, w, b, a, bb[:, :3], scales, ids, rk)
    with pytest.raises(RuntimeError, match="lora_A must be"):
        C.multi_lora_linear_fwd(x, w, b, a[0], bb, scales, ids, rk)


def _routing(ids, n_slots):
    """The routing plan's (order, keys) for ids: the stable argsort of key, key[t] = ids[t] if
    0 <= ids[t] < n_slots else -1 (rows without an adapter first), and the sorted keys."""
    key = torch.where((ids >= 0) & (ids < n_slots), ids, torch.full_like(ids, -1))
    keys, order = torch.sort(key, stable=True)
    return order, keys


@pytest.mark.parametrize("M", [5, 150], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_multi_routing_matches_unplanned(M, dtype):
    x, w, b, a, bb, scales, ids, rk = _multi_args(dtype=dtype, M=M, S=4)
    order, keys = _routing(ids, 4)
    y, xa = C.multi_lora_linear_fwd(x, w, b, a, bb, scales, ids, rk)
    y_p, xa_p = C.multi_lora_linear_fwd(x, w, b, a, bb, scales, ids, rk, order, keys)
    assert torch.equal(y, y_p) and torch.equal(xa, xa_p)
    dy = torch.randn(M, w.shape[0]).to(dtype)
    bargs = (dy, x, w, a, bb, scales, ids, rk, xa, True, True, True)
    for g, g_p, name in zip(C.multi_lora_linear_bwd(*bargs),
                            C.multi_lora_linear_bwd(*bargs, order, keys), ("dx", "dA", "dB")):
        assert torch.equal(g, g_p), name
    # The plan is what the op follows (trusted, not recomputed): one that routes every row to
    # no adapter gives the base layer and zero adapter gradients.
    none = torch.full_like(keys, -1)
    y_n, xa_n = C.multi_lora_linear_fwd(x, w, b, a, bb, scales, ids, rk, order, none)
    _close(y_n, reference.lora_linear_fwd(x, w, b, a[0], bb[0] * 0, 0.0, 0.0, 0)[0], "y")
    assert not xa_n.any()
    _, dA, dB = C.multi_lora_linear_bwd(*bargs, order, none)
    assert not dA.any() and not dB.any()


def test_multi_routing_checks_name_the_argument():
    x, w, b, a, bb, scales, ids, rk = _multi_args(M=23)
    order, keys = _routing(ids, 3)
    fwd = (x, w, b, a, bb, scales, ids, rk)
    _, xa = C.multi_lora_linear_fwd(*fwd)
    bwd = (torch.randn(23, w.shape[0]), x, w, a, bb, scales, ids, rk, xa, True, True, True)
    for op, args in ((C.multi_lora_linear_fwd, fwd), (C.multi_lora_linear_bwd, bwd)):
        with pytest.raises(RuntimeError, match=r"order must be int64 \[M=23\], got Long \[22\]"):
            op(*args, order[:22], keys)
        with pytest.raises(RuntimeError, match=r"keys must be int64 \[M=23\], got Int"):
            op(*args, order, keys.int())
        with pytest.raises(RuntimeError, match="order and keys must be given together"):
            op(*args, order, None)
        with pytest.raises(RuntimeError, match="keys must be contiguous"):
            op(*args, order, torch.stack([keys, keys], 1)[:, 0])


GEMM_ERR = r"gemm must be 0 \(auto\), 1 \(mma\), 2 \(wgmma\) or 3 \(wgmma256\), got "


def test_cpu_gemm_is_checked_and_ignored():
    x, w, b, a, bb = _args()
    y, xa = C.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.1, 3)
    dy = torch.randn_like(y)
    g = C.lora_linear_bwd(dy, x, w, a, bb, xa, 0.5, 0.1, 3, True, True, True)
    margs = _multi_args()
    my, mxa = C.multi_lora_linear_fwd(*margs)
    mx, mw, _, ma, mbb, msc, mids, mrk = margs
    mdy = torch.randn_like(my)
    mb = (mdy, mx, mw, ma, mbb, msc, mids, mrk, mxa, True, True, True)
    mg = C.multi_lora_linear_bwd(*mb)
    for gemm in (1, 2, 3):  # the CPU kernels have no GEMM variants: same results
        assert torch.equal(C.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.1, 3, gemm=gemm)[0], y)
        assert all(map(torch.equal, C.lora_linear_bwd(dy, x, w, a, bb, xa, 0.5, 0.1, 3, True, True,
                                                      True, gemm=gemm), g))
        assert torch.equal(C.multi_lora_linear_fwd(*margs, gemm=gemm)[0], my)
        assert all(map(torch.equal, C.multi_lora_linear_bwd(*mb, gemm=gemm), mg))
        assert torch.equal(_ext.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.1, 3, gemm=gemm)[0], y)
    for bad in (4, -1):
        with pytest.raises(RuntimeError, match=GEMM_ERR + str(bad)):
            C.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.1, 3, gemm=bad)
        with pytest.raises(RuntimeError, match=GEMM_ERR + str(bad)):
            C.lora_linear_bwd(dy, x, w, a, bb, xa, 0.5, 0.1, 3, True, True, True, gemm=bad)
        with pytest.raises(RuntimeError, match=GEMM_ERR + str(bad)):
            _ext.multi_lora_linear_fwd(*margs, gemm=bad)
        with pytest.raises(RuntimeError, match=GEMM_ERR + str(bad)):
            _ext.multi_lora_linear_bwd(*mb, gemm=bad)


@pytest.mark.skipif(_ext.has_cuda_kernels(), reason="a build with CUDA kernels answers it")
def test_gemm_choice_without_cuda_kernels():
    with pytest.raises(RuntimeError, match="has no CUDA kernels"):
        C.gemm_choice(0, 0)
    with pytest.raises(RuntimeError, match=GEMM_ERR + "7"):
        C.gemm_choice(7, 0)


def test_opcheck_gemm_and_routing():
    x, w, b, a, bb = _args()
    torch.library.opcheck(C.lora_linear_fwd.default, (x, w, b, a, bb, 0.5, 0.0, 7, 1))
    x, w, b, a, bb, scales, ids, rk = _multi_args(ranks=False, M=9, K=12, N=10, R=4)
    order, keys = _routing(ids, 3)
    torch.library.opcheck(C.multi_lora_linear_fwd.default,
                          (x, w, b, a, bb, scales, ids, rk, order, keys, 1))
    _, xa = C.multi_lora_linear_fwd(x, w, b, a, bb, scales, ids, rk)
    torch.library.opcheck(C.multi_lora_linear_bwd.default,
                          (torch.randn(9, 10), x, w, a, bb, scales, ids, rk, xa, True, True, True,
                           order, keys, 1))


def test_multi_lora_linear_backend_cuda_on_cpu_tensors():
    import fused_lora

    x, w, b, a, bb, scales, ids, rk = _multi_args(ranks=False)
    ids = ids.clamp(-1, 2)  # the functional API validates ids by default
    grads = {}
    for backend in ("cuda", "torch"):
        xi, ai, bi = (t.detach().clone().requires_grad_(True) for t in (x, a, bb))
        y = fused_lora.multi_lora_linear(xi, w, b, ai, bi, scales, ids, backend=backend)
        y.square().sum().backward()
        grads[backend] = (y, xi.grad, ai.grad, bi.grad)
    for g, r, name in zip(grads["cuda"], grads["torch"], ("y", "dx", "dA", "dB")):
        torch.testing.assert_close(g, r, msg=name)


# --------------------------------------------------------------------------------------------
# Binding: opcheck, schemas, registration, checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_opcheck_fwd(bias, dropout):
    x, w, b, a, bb = _args(bias=bias)
    torch.library.opcheck(C.lora_linear_fwd.default, (x, w, b, a, bb, 0.5, dropout, 7))


@pytest.mark.parametrize("needs", [(True, True, True), (False, True, False)])
def test_opcheck_bwd(needs):
    x, w, b, a, bb = _args()
    _, xa = C.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.2, 3)
    dy = torch.randn(x.shape[0], w.shape[0])
    torch.library.opcheck(C.lora_linear_bwd.default, (dy, x, w, a, bb, xa, 0.5, 0.2, 3, *needs))


def _schema_args(schema):
    return [(a.name, str(a.type)) for a in schema.arguments]


def _py_ops_with_cpp_twin():
    names = ["lora_linear_fwd", "lora_linear_bwd", "multi_lora_linear_fwd", "multi_lora_linear_bwd"]
    return [n for n in names if hasattr(torch.ops.fused_lora, n) or hasattr(C, n)]


# The C++ ops' trailing arguments (csrc/lora.h) that a Python op may lack: the precomputed
# routing of the mixed-adapter ops and the GEMM variant, last, in this order, with defaults.
CPP_ONLY = {"lora_linear_fwd": [("gemm", "int")], "lora_linear_bwd": [("gemm", "int")],
            "multi_lora_linear_fwd": [("order", "Optional[Tensor]"), ("keys", "Optional[Tensor]"),
                                      ("gemm", "int")]}
CPP_ONLY["multi_lora_linear_bwd"] = CPP_ONLY["multi_lora_linear_fwd"]


@pytest.mark.parametrize("op", _py_ops_with_cpp_twin())
def test_schemas_match_python_ops(op):
    """One schema per op: the C++ op is the Python custom op minus `impl` (the registry entry),
    with an int seed; the mixed-adapter ops take the routing plan's parts (ids before ranks,
    order and keys at the end) where the Python op takes the packed plan; plus the C++-only
    trailing arguments (CPP_ONLY)."""
    import fused_lora  # noqa: F401  (defines torch.ops.fused_lora.*)

    assert hasattr(torch.ops.fused_lora, op), f"Python op fused_lora::{op} missing"
    assert hasattr(C, op), f"C++ op fused_lora_C::{op} missing"
    py = getattr(torch.ops.fused_lora, op).default._schema
    cpp = getattr(C, op).default._schema
    expected = []
    for name, typ in _schema_args(py):
        if name in ("impl", "plan"):
            continue
        if name == "ranks":  # the C++ op takes the plan's ids ahead of the ranks
            expected.append(("adapter_ids", "Tensor"))
        expected.append((name, "int" if name == "seed" else typ))
    expected += CPP_ONLY[op]
    assert _schema_args(cpp) == expected, f"{cpp} vs {py}"
    for a in cpp.arguments:  # the C++-only ones default to "unplanned, auto": callers may omit
        if (a.name, str(a.type)) in CPP_ONLY[op]:
            assert a.has_default_value(), f"{op}: {a.name} has no default"
    assert [str(r.type) for r in cpp.returns] == [str(r.type) for r in py.returns]
    assert not cpp.is_mutable and not py.is_mutable


def test_cuda_kernels_registered_iff_built_with_cuda():
    built_cuda = bool(_ext.build_info().get("cuda"))
    assert bool(C.has_cuda()) == _ext.has_cuda_kernels()
    if _ext.build_info():  # an editable/in-place build records what it built
        assert bool(C.has_cuda()) == built_cuda
    for op in ("lora_linear_fwd", "lora_linear_bwd", "multi_lora_linear_fwd", "multi_lora_linear_bwd"):
        dump = torch._C._dispatch_dump(f"fused_lora_C::{op}")
        assert "CPU:" in dump, dump
        assert ("CUDA:" in dump) == bool(C.has_cuda()), dump
    assert _ext.has_op("lora_linear") and _ext.has_op("multi_lora_linear")
    assert not _ext.has_op("no_such_op")


def _bad(**over):
    x, w, b, a, bb = _args()
    args = dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb, scale=0.5, dropout_p=0.0, seed=0)
    args.update(over)
    return args


@pytest.mark.parametrize("over,pattern", [
    (dict(x=torch.randn(13)), "x must be 2-D"),
    (dict(weight=torch.randn(18, 21)), "weight must be"),
    (dict(lora_A=torch.randn(4, 21)), "lora_A must be"),
    (dict(lora_B=torch.randn(18, 5)), "lora_B must be"),
    (dict(bias=torch.randn(17)), "bias must be"),
    (dict(weight=torch.randn(18, 20, dtype=torch.float64)), "weight dtype"),
    (dict(bias=torch.randn(18, dtype=torch.float16)), "bias dtype"),
    (dict(lora_A=torch.randn(4, 20, dtype=torch.float16)), "lora_B dtype"),
    (dict(lora_A=torch.randn(4, 20, dtype=torch.float64),
          lora_B=torch.randn(18, 4, dtype=torch.float64)), "lora_A dtype"),
    (dict(dropout_p=1.0), "dropout_p"),
    (dict(lora_A=torch.randn(0, 20), lora_B=torch.randn(18, 0)), "lora_A must have rank"),
    (dict(x=torch.randn(13, 20).to(torch.int32)), "x must be fp16"),
])
def test_fwd_checks_name_the_argument(over, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        C.lora_linear_fwd(**_bad(**over))


def test_bwd_checks_name_the_argument():
    x, w, b, a, bb = _args()
    _, xa = C.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 0)
    dy = torch.randn(13, 18)
    flags = (True, True, True)
    with pytest.raises(RuntimeError, match="dy must be"):
        C.lora_linear_bwd(dy[:, :5], x, w, a, bb, xa, 0.5, 0.0, 0, *flags)
    with pytest.raises(RuntimeError, match="dy dtype"):
        C.lora_linear_bwd(dy.half(), x, w, a, bb, xa, 0.5, 0.0, 0, *flags)
    with pytest.raises(RuntimeError, match="xa must be"):
        C.lora_linear_bwd(dy, x, w, a, bb, xa[:, :2], 0.5, 0.0, 0, *flags)
    with pytest.raises(RuntimeError, match="xa must be"):
        C.lora_linear_bwd(dy, x, w, a, bb, xa.half(), 0.5, 0.0, 0, *flags)


# --------------------------------------------------------------------------------------------
# End to end through the package
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_linear_backend_cuda_on_cpu_tensors(dropout):
    import fused_lora

    x, w, b, a, bb = _args(M=10, K=24, N=16, R=4)
    x = x.reshape(2, 5, 24)
    grads = {}
    for backend in ("cuda", "torch"):
        xi, ai, bi = (t.detach().clone().requires_grad_(True) for t in (x, a, bb))
        torch.manual_seed(5)  # same dropout seed drawn for both backends
        y = fused_lora.lora_linear(xi, w, b, ai, bi, 0.5, dropout_p=dropout, backend=backend)
        y.square().sum().backward()
        grads[backend] = (y, xi.grad, ai.grad, bi.grad)
    for g, r, name in zip(grads["cuda"], grads["torch"], ("y", "dx", "dA", "dB")):
        torch.testing.assert_close(g, r, msg=name)


def _run_py(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_package_works_without_extension():
    code = (
        "import torch, fused_lora\n"
        "from fused_lora import backends, _ext\n"
        "assert _ext.ext_error() and not _ext.has_op('lora_linear')\n"
        "r = backends.report()['cuda']['cpu']\n"
        "assert 'FUSED_LORA_DISABLE_EXT' in r, r\n"
        "x = torch.randn(3, 8); w = torch.randn(5, 8)\n"
        "y = fused_lora.lora_linear(x, w, None, torch.randn(2, 8), torch.randn(5, 2), 1.0)\n"
        "assert y.shape == (3, 5)\n"
        "try:\n"
        "    fused_lora.lora_linear(x, w, None, torch.randn(2, 8), torch.randn(5, 2), 1.0, backend='cuda')\n"
        "    raise SystemExit('backend=cuda should be refused')\n"
        "except ValueError as e:\n"
        "    assert 'FUSED_LORA_DISABLE_EXT' in str(e), e\n"
    )
    res = _run_py(code, FUSED_LORA_DISABLE_EXT="1")
    assert res.returncode == 0, res.stderr


def test_info_cli_reports_the_extension():
    res = subprocess.run([sys.executable, "-m", "fused_lora", "info", "--json"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    import json

    data = json.loads(res.stdout)
    assert data["extension"] == "loaded"
    for op in ("lora_linear", "multi_lora_linear"):
        assert data["backends"][op]["cuda"]["cpu"] == "ok", data["backends"][op]
        assert data["backends"][op]["torch"]["cpu"] == "ok"
    text = subprocess.run([sys.executable, "-m", "fused_lora", "info"], capture_output=True, text=True,
                          timeout=120)
    assert text.returncode == 0 and "multi_lora_linear" in text.stdout, text.stderr


# --------------------------------------------------------------------------------------------
# GPU: the CUDA kernels
# --------------------------------------------------------------------------------------------

# Tile edges of the CUDA kernels: M <= 8 (decode GEMV, 16-byte and scalar loads), M, N across
# 128 (TC) and 64 (SIMT); K odd (scalar loads) and multiple of 8 (16-byte cp.async); R = 1, 16,
# 17 (one and two rank chunks).
GPU_SHAPES = [(1, 8, 8, 1), (8, 264, 136, 16), (5, 67, 33, 3), (37, 67, 33, 17),
              (130, 264, 200, 16), (257, 136, 129, 8)]
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _check_2x(out, ref64, ref_pt, name, factor=2.0):
    """Error against the fp64 reference within 2x that of the reference run in out's dtype
    (fp32 accumulation), plus an absolute floor scaled by the output's magnitude."""
    assert out.shape == ref64.shape, name
    assert not torch.isnan(out).any(), f"{name}: NaN"
    err, pt_err = max_err(out, ref64), max_err(ref_pt, ref64)
    atol = ATOL[out.dtype] * max(1.0, ref64.abs().max().item())
    assert err <= factor * pt_err + atol, f"{name}: err {err:.3e} vs torch {pt_err:.3e} + {atol:.1e}"


def _gpu_case(shape, dtype, adapter_dtype=None, bias=True, dropout=0.0, needs=(True, True, True),
              gemm=0):
    M, K, N, R = shape
    x, w, b, a, bb = _args("cuda", dtype, adapter_dtype, M, K, N, R, bias)
    s = 0.75
    y, xa = C.lora_linear_fwd(x, w, b, a, bb, s, dropout, SEED, gemm)
    d64 = [t.double() if t is not None else None for t in (x, w, b, a, bb)]
    y64, xa64 = reference.lora_linear_fwd(*d64, s, dropout, SEED)
    y_pt, xa_pt = reference.lora_linear_fwd(x, w, b, a, bb, s, dropout, SEED)
    _check_2x(y, y64, y_pt, "y")
    _check_2x(xa, xa64, xa_pt, "xa")
    dy = torch.randn(M, N, device="cuda").to(dtype)
    got = C.lora_linear_bwd(dy, x, w, a, bb, xa, s, dropout, SEED, *needs, gemm)
    ref64 = reference.lora_linear_bwd(dy.double(), *d64[:2], *d64[3:], xa64, s, dropout, SEED, *needs)
    ref_pt = reference.lora_linear_bwd(dy, x, w, a, bb, xa_pt, s, dropout, SEED, *needs)
    for g, r64, rpt, need, name in zip(got, ref64, ref_pt, needs, ("dx", "dA", "dB")):
        if need:
            assert g.dtype == rpt.dtype, name
            _check_2x(g, r64, rpt, name)
        else:
            assert g.numel() == 0, name


def _shape_id(shape):
    return "x".join(map(str, shape))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gpu_fwd_bwd_vs_reference(shape, dtype, bias, dropout):
    _gpu_case(shape, dtype, bias=bias, dropout=dropout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("needs", NEEDS)
def test_gpu_fp32_adapters_and_needs(dtype, needs):
    _gpu_case((70, 96, 72, 16), dtype, adapter_dtype=torch.float32, dropout=0.2, needs=needs)


@pytest.mark.gpu
def test_gpu_strided_inputs():
    x, w, b, a, bb = _args("cuda", torch.float16, None, 40, 64, 48, 8)
    xt = torch.randn(64, 40, device="cuda").half().t()  # stride (1, 40): made contiguous
    wt = w.t().contiguous().t()  # column-major weight
    x_pad = torch.randn(40, 80, device="cuda").half()[:, :64]  # row stride 80: 16-byte loads
    x_odd = torch.randn(40, 67, device="cuda").half()[:, :64]  # row stride 67: scalar loads
    for xi, wi in ((xt, w), (x, wt), (x_pad, w), (x_odd, w), (x_odd[:5], w)):
        y, xa = C.lora_linear_fwd(xi, wi, b, a, bb, 0.5, 0.0, 0)
        y_ref, xa_ref = reference.lora_linear_fwd(xi, wi, b, a, bb, 0.5, 0.0, 0)
        torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(xa, xa_ref, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_dropout_mask_matches_cpu(dtype):
    M, K, p = 77, 45, 0.35
    x = torch.ones(M, K, device="cuda", dtype=dtype)
    eye = torch.eye(K, device="cuda", dtype=dtype)
    zw = torch.zeros(3, K, device="cuda", dtype=dtype)
    _, xa = C.lora_linear_fwd(x, zw, None, eye, torch.zeros(3, K, device="cuda", dtype=dtype), 1.0,
                              p, SEED)
    keep = reference.dropout_keep_mask(SEED, M, K, p, device="cuda")
    assert torch.equal(xa != 0, keep)
    # Backward regenerates the same mask: with B = 1 and dy = 1, ds = 3 everywhere, so
    # dA = ds^T drop(x) holds the column sums of the kept, rescaled x.
    dy = torch.ones(M, 3, device="cuda", dtype=dtype)
    bb = torch.ones(3, K, device="cuda", dtype=dtype)
    _, dA, _ = C.lora_linear_bwd(dy, x, zw, eye, bb, xa, 1.0, p, SEED, False, True, False)
    want = (keep.to(torch.float32) / (1 - p)).sum(0) * 3  # dA[r, k] = 3 sum_m keep[m, k] / (1-p)
    torch.testing.assert_close(dA.float(), want.expand(K, K), atol=0.0, rtol=1e-2)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay(gemm=0):
    x, w, b, a, bb = _args("cuda", torch.bfloat16, torch.float32, 96, 128, 80, 16)
    dy = torch.randn(96, 80, device="cuda").bfloat16()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up off the capture
        C.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.1, 11, gemm)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y, xa = C.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.1, 11, gemm)
        dx, dA, dB = C.lora_linear_bwd(dy, x, w, a, bb, xa, 0.5, 0.1, 11, True, True, True, gemm)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        dy.copy_(torch.randn_like(dy))
        g.replay()
        torch.cuda.synchronize()
        y_e, xa_e = C.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.1, 11, gemm)
        got_e = C.lora_linear_bwd(dy, x, w, a, bb, xa_e, 0.5, 0.1, 11, True, True, True, gemm)
        assert torch.equal(y, y_e) and torch.equal(xa, xa_e)
        for gg, ee in zip((dx, dA, dB), got_e):
            assert torch.equal(gg, ee)  # deterministic kernels: bitwise equal


@pytest.mark.gpu
def test_gpu_deterministic():
    x, w, b, a, bb = _args("cuda", torch.float16, None, 300, 256, 192, 16)
    y, xa = C.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.1, 1)
    dy = torch.randn_like(y)
    r1 = C.lora_linear_bwd(dy, x, w, a, bb, xa, 0.5, 0.1, 1, True, True, True)
    r2 = C.lora_linear_bwd(dy, x, w, a, bb, xa, 0.5, 0.1, 1, True, True, True)
    for t1, t2 in zip(r1, r2):
        assert torch.equal(t1, t2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_end_to_end_module():
    import fused_lora

    layer = fused_lora.FusedLoRALinear(72, 40, r=8, lora_dropout=0.1, backend="cuda",
                                       device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 7, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64, 96, 16), (7, 67, 33, 17), (150, 136, 200, 8)],
                         ids=_shape_id)
@pytest.mark.parametrize("ranks", [True, False])
def test_gpu_multi_vs_reference(dtype, shape, ranks):
    M, K, N, R = shape
    # With ranks, dead columns hold NaN: a kernel reading them fails every output's check.
    _multi_check(_multi_args("cuda", dtype, None, M, K, N, 4, R, ranks=ranks), dtype)


def _multi_graph_replay(args, dy, new_ids, gemm=0, planned=False):
    """Capture fwd + bwd once; replays with new ids and x (read on the device) equal eager
    runs bit for bit. planned: the routing plan (order, keys) is computed inside the capture
    too, once, and shared by forward and backward, as the Python routing plan does."""
    x, w, b, a, bb, scales, ids, rk = args
    needs = (True, True, True)
    S = a.shape[0]
    plan = (lambda: _routing(ids, S)) if planned else (lambda: (None, None))
    C.multi_lora_linear_fwd(*args, *plan(), gemm)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        order, keys = plan()
        y, xa = C.multi_lora_linear_fwd(*args, order, keys, gemm)
        grads = C.multi_lora_linear_bwd(dy, x, w, a, bb, scales, ids, rk, xa, *needs, order, keys,
                                        gemm)
    for i in range(2):
        ids.copy_(new_ids(i))
        x.copy_(torch.randn_like(x))
        g.replay()
        y_e, xa_e = C.multi_lora_linear_fwd(*args, gemm=gemm)
        grads_e = C.multi_lora_linear_bwd(dy, x, w, a, bb, scales, ids, rk, xa_e, *needs,
                                          gemm=gemm)
        assert torch.equal(y, y_e) and torch.equal(xa, xa_e)
        for t, e in zip(grads, grads_e):
            assert torch.equal(t, e)


@pytest.mark.gpu
def test_gpu_multi_cuda_graph_replay():
    args = _multi_args("cuda", torch.bfloat16, torch.float32, 5, 64, 48, 3, 16)
    ids = args[6]
    _multi_graph_replay(args, torch.randn(5, 48, device="cuda").bfloat16(),
                        lambda i: ids.roll(1 + i))


def _multi_check(args, dtype, needs=(True, True, True), gemm=0):
    """Every output of the CUDA multi ops against fp64, within 2x of the same-dtype reference;
    the outputs with the precomputed routing (order, keys) equal those without, bit for bit."""
    x, w, b, a, bb, scales, ids, rk = args
    M, N = x.shape[0], w.shape[0]
    order, keys = _routing(ids, a.shape[0])
    y, xa = C.multi_lora_linear_fwd(*args, gemm=gemm)
    y_p, xa_p = C.multi_lora_linear_fwd(*args, order, keys, gemm)
    assert torch.equal(y, y_p) and torch.equal(xa, xa_p)
    d64 = [t.double() if t is not None and t.is_floating_point() else t for t in args]
    y64, xa64 = reference.multi_lora_linear_fwd(*d64)
    y_pt, xa_pt = reference.multi_lora_linear_fwd(*args)
    _check_2x(y, y64, y_pt, "y")
    _check_2x(xa, xa64, xa_pt, "xa")
    dy = torch.randn(M, N, device=x.device).to(dtype)
    got = C.multi_lora_linear_bwd(dy, x, w, a, bb, scales, ids, rk, xa, *needs, gemm=gemm)
    got_p = C.multi_lora_linear_bwd(dy, x, w, a, bb, scales, ids, rk, xa, *needs, order, keys, gemm)
    for t, tp in zip(got, got_p):
        assert torch.equal(t, tp)
    ref64 = reference.multi_lora_linear_bwd(dy.double(), *d64[:5], *d64[5:], xa64, *needs)
    ref_pt = reference.multi_lora_linear_bwd(dy, x, w, a, bb, scales, ids, rk, xa_pt, *needs)
    for g, r64, rpt, name in zip(got, ref64, ref_pt, ("dx", "dA", "dB")):
        _check_2x(g, r64, rpt, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M, S", [(40, 12), (150, 40), (300, 3), (129, 1)])
def test_gpu_multi_many_slots_per_tile(dtype, M, S):
    """A 128-row GEMM tile serves up to 4 slots by r-deep passes and gathers the rest per
    element; M >= 65 sorts rows by slot first (row_map). (40, 12): unsorted tile, > 4 slots;
    (150, 40): sorted, still > 4 slots per tile; (300, 3) and (129, 1): one or two per tile."""
    args = list(_multi_args("cuda", dtype, None, M, 72, 136, S, 16, ranks=False))
    args[6] = torch.randint(-1, S + 2, (M,), device="cuda")  # every slot, -1, out of range
    _multi_check(tuple(args), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("planned", [False, True], ids=["op-sorts", "plan"])
def test_gpu_multi_prefill_cuda_graph_replay(planned):
    """The prefill path's on-device sort (or the plan's) is captured too: new ids replay
    correctly."""
    _multi_prefill_graph_replay(0, planned)


def _multi_prefill_graph_replay(gemm, planned):
    M, S = 150, 6
    args = _multi_args("cuda", torch.bfloat16, None, M, 64, 48, S, 16)
    args[6].copy_(torch.randint(-1, S, (M,), device="cuda"))
    _multi_graph_replay(args, torch.randn(M, 48, device="cuda").bfloat16(),
                        lambda i: torch.randint(-1, S, (M,), device="cuda"), gemm, planned)


# --- both tensor-core GEMMs (the ops' gemm argument): mma.sync everywhere, wgmma on sm_90a ---

# (M, K, N, R): BK = 64 edges (K = 64, 700 = 11 stages: every wgmma stage slot reused while its
# MMAs are in flight), K odd (scalar loads into the swizzled tiles), split-K (M = 20 and 64),
# ragged tiles, and one training-sized case (2048 x 4096 x 4096).
GEMM_SHAPES = [(9, 64, 128, 16), (20, 1000, 40, 16), (64, 4096, 4096, 16), (129, 67, 129, 1),
               (257, 700, 256, 16), (300, 136, 700, 33), (2048, 4096, 4096, 16)]
GEMMS = {"mma": _ext.GEMM_MMA, "wgmma": _ext.GEMM_WGMMA, "wgmma256": _ext.GEMM_WGMMA256}


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", list(GEMMS))
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_both_gemms(gemm, shape, dtype):
    if gemm.startswith("wgmma") and not _ext.wgmma_available():
        pytest.skip("wgmma needs an sm_90a build on a compute capability 9.0 GPU")
    assert _ext.gemm_choice(GEMMS[gemm]) == GEMMS[gemm]
    _gpu_case(shape, dtype, bias=shape[0] % 2 == 1, dropout=0.2, gemm=GEMMS[gemm])
    args = list(_multi_args("cuda", dtype, None, shape[0], shape[1], shape[2], 5, shape[3],
                            ranks=False))
    _multi_check(tuple(args), dtype, gemm=GEMMS[gemm])


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["wgmma", "wgmma256"])
def test_gpu_wgmma_graph_replay_and_agreement(gemm):
    if not _ext.wgmma_available():
        pytest.skip("wgmma needs an sm_90a build on a compute capability 9.0 GPU")
    test_gpu_cuda_graph_replay(GEMMS[gemm])
    _multi_prefill_graph_replay(GEMMS[gemm], planned=True)
    x, w, b, a, bb = _args("cuda", torch.bfloat16, None, 1024, 2048, 1536, 16)
    y_wg, _ = C.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 1, GEMMS[gemm])
    y_mma, _ = C.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 1, _ext.GEMM_MMA)
    torch.testing.assert_close(y_wg.float(), y_mma.float(), atol=3e-2, rtol=1.6e-2)


@pytest.mark.gpu
def test_gpu_gemm_choice_is_checked():
    x, w, b, a, bb = _args("cuda", torch.float16, None, 129, 64, 128, 4)
    for bad in (4, -1):
        with pytest.raises(RuntimeError, match=GEMM_ERR + str(bad)):
            C.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 1, bad)
    dev = torch.cuda.current_device()
    auto = _ext.gemm_choice(_ext.GEMM_AUTO, dev)
    assert auto == (_ext.GEMM_WGMMA if _ext.wgmma_available() else _ext.GEMM_MMA)
    assert _ext.gemm_choice(_ext.GEMM_MMA, dev) == _ext.GEMM_MMA
    if not _ext.wgmma_available():  # asked for and cannot run: an error naming it, every size
        for g, name in ((2, "wgmma"), (3, "wgmma256")):
            for m in (129, 3, 0):  # tensor-core GEMM, GEMV, no launch at all
                with pytest.raises(RuntimeError, match=rf"gemm={g} \({name}\): the wgmma GEMM "
                                                       "needs an sm_90a build"):
                    C.lora_linear_fwd(x[:m], w, b, a, bb, 0.5, 0.0, 1, g)
            with pytest.raises(RuntimeError, match=rf"gemm={g} \({name}\)"):
                _ext.gemm_choice(g, dev)
