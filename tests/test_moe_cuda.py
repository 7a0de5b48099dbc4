"""The C++/CUDA twin of the MoE LoRA op (issue 12): torch.ops.fused_lora_C.moe_lora_linear_fwd /
_bwd (csrc/lora.cpp's CPU kernels, csrc/moe_lora_cuda.cu's CUDA kernels on the shared grouped GEMM
of csrc/gemm.cu) and the "cuda" entry of the moe_lora_linear registry.

On CPU (CI): the C++ CPU kernels against fused_lora.reference and an fp64 per-row loop at odd
shapes (experts with no rows, with one row, one expert with every row, rows of no expert), forward
and backward with dropout, every needs_* combination, a transposed weight view, fp32 adapters,
degenerate sizes, the routing plan's order / keys, the functional API with backend="cuda",
opcheck, the TORCH_CHECK messages, and the schemas against the Python custom ops'. Adapter banks
(lora_A [S, E, r, in], virtual expert ids over (S + 1) * E: base-only ids, adapter x expert pairs
without rows, out-of-range ids; slot_scales None or given) and top-k rows (x [T, in] for
M = T * topk rows, dx summed per token) likewise. On a GPU (-m gpu): the CUDA kernels against the
reference (every GEMM variant that runs there), banks and top-k, bitwise reproducibility, base
rows bit for bit, and CUDA-graph replay. The CUDA kernels' CPU coverage is the SIMT emulator's
(tests/test_cuda_sim_moe.py).

Tolerance: the 2x rule of tests/_utils.py (max error against the fp64 reference at most 2x the
reference's own in the inputs' dtype, + a small atol).
"""

from __future__ import annotations

import pytest
import torch
from _utils import HAS_CUDA, check_op_vs_reference

import fused_lora
from fused_lora import _ext, reference
from fused_lora.moe import moe_routing_plan

if _ext.ext_error() is not None:
    pytest.skip(f"C++ extension unavailable: {_ext.ext_error()}", allow_module_level=True)
if not _ext.has_op("moe_lora_linear"):
    pytest.skip("the C++ extension was built without the MoE ops (rebuild it)", allow_module_level=True)

C = torch.ops.fused_lora_C
SEED = (12345 << 31) | 678  # both 31-bit hash keys nonzero
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16


def _ids(pattern: str, M: int, E: int, seed: int = 7) -> torch.Tensor:
    """'mixed': expert 2 has no row, expert 0 exactly one, rows of no expert (-1 and out of range
    both ways), the rest random; 'all': every row on expert E - 1; 'none': every row -1."""
    if pattern == "all":
        return torch.full((M,), E - 1, dtype=torch.int64)
    if pattern == "none":
        return torch.full((M,), -1, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([-1, E, -5] + [e for e in range(1, E) if e != 2], dtype=torch.int64)
    ids = pool[torch.randint(0, len(pool), (M,), generator=g)]
    ids[M // 2] = 0
    return ids


def _args(dtype, M, K, N, R, E, bias=True, adapter_dtype=None, transposed=False, device="cpu"):
    ad = adapter_dtype or dtype
    x = torch.randn(M, K).to(dtype)
    if transposed:  # an [E, K, N] tensor read as [E, N, K] in place
        w = (torch.randn(E, K, N) / max(K, 1) ** 0.5).to(dtype).transpose(1, 2)
    else:
        w = (torch.randn(E, N, K) / max(K, 1) ** 0.5).to(dtype)
    b = torch.randn(E, N).to(dtype) if bias else None
    A = (torch.randn(E, R, K) / max(K, 1) ** 0.5).to(ad)
    B = torch.randn(E, N, R).to(ad)
    return tuple(t.to(device) if t is not None else None for t in (x, w, b, A, B))


def _loop64(x, w, b, A, B, s, ids, p, seed, dy):
    """Ground truth, independent of the reference's grouping: a per-row fp64 loop through
    autograd. Returns y and (dx, dA, dB); rows of no expert give y = 0 and no gradient."""
    E = w.shape[0]
    xd, Ad, Bd = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    keep = reference.dropout_keep_mask(seed, x.shape[0], x.shape[1], p) if p > 0 else None
    rows = []
    for m in range(x.shape[0]):
        e = int(ids[m])
        if not 0 <= e < E:
            rows.append(torch.zeros(w.shape[1], dtype=F64))
            continue
        xm = xd[m]
        xl = torch.where(keep[m], xm / (1 - p), torch.zeros((), dtype=F64)) if keep is not None else xm
        y = xm @ w[e].double().t() + s * ((xl @ Ad[e].t()) @ Bd[e].t())
        if b is not None:
            y = y + b[e].double()
        rows.append(y)
    y = torch.stack(rows)
    y.backward(dy.double())
    return y.detach(), (xd.grad, Ad.grad, Bd.grad)


def _no_expert(ids, E):
    return (ids < 0) | (ids >= E)


def _shape_id(s):
    return "M{}-K{}-N{}-R{}-E{}".format(*s)


# (M, K, N, R, E): odd sizes everywhere; M = 1 (one row, one expert); R = 17 crosses a 16-rank
# chunk.
SHAPES = [(1, 7, 5, 3, 3), (13, 20, 18, 4, 4), (37, 67, 33, 17, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=[_shape_id(s) for s in SHAPES])
@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64], ids=str)
@pytest.mark.parametrize("pattern", ["mixed", "all", "none"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_cpu_matches_reference(shape, dtype, pattern, dropout):
    M, K, N, R, E = shape
    x, w, b, A, B = _args(dtype, M, K, N, R, E, bias=pattern != "all")
    ids = _ids(pattern, M, E)
    fargs = (x, w, b, A, B, 0.7, dropout, SEED, ids)
    y, xa = C.moe_lora_linear_fwd(*fargs)
    check_op_vs_reference((y, xa), reference.moe_lora_linear_fwd, fargs, ("y", "xa"))
    dy = torch.randn(M, N).to(dtype)
    _, xa_ref = reference.moe_lora_linear_fwd(*fargs)
    bargs = (dy, x, w, A, B, xa_ref, 0.7, dropout, SEED, ids, True, True, True)
    got = C.moe_lora_linear_bwd(*bargs)
    check_op_vs_reference(got, reference.moe_lora_linear_bwd, bargs, ("dx", "dA", "dB"))
    # Exact: rows of no expert give y = 0, xa = 0, dx = 0; experts without rows get zero grads.
    none = _no_expert(ids, E)
    assert (y[none] == 0).all() and (xa[none] == 0).all() and (got[0][none] == 0).all()
    present = torch.zeros(E, dtype=torch.bool)
    present[ids[~none]] = True
    assert (got[1][~present] == 0).all() and (got[2][~present] == 0).all()


@pytest.mark.parametrize("pattern", ["mixed", "all"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_cpu_fp64_matches_per_row_loop(pattern, dropout):
    M, K, N, R, E = 29, 23, 19, 5, 6
    x, w, b, A, B = _args(F64, M, K, N, R, E)
    ids = _ids(pattern, M, E)
    dy = torch.randn(M, N, dtype=F64)
    y, xa = C.moe_lora_linear_fwd(x, w, b, A, B, 0.6, dropout, SEED, ids)
    got = C.moe_lora_linear_bwd(dy, x, w, A, B, xa, 0.6, dropout, SEED, ids, True, True, True)
    y64, grads64 = _loop64(x, w, b, A, B, 0.6, ids, dropout, SEED, dy)
    torch.testing.assert_close(y, y64, atol=1e-12, rtol=1e-12)
    for g, r, name in zip(got, grads64, ("dx", "dA", "dB")):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12, msg=name)


NEEDS = [(True, False, False), (False, True, False), (False, False, True), (False, True, True),
         (True, True, False), (False, False, False)]


@pytest.mark.parametrize("needs", NEEDS)
def test_cpu_bwd_needs(needs):
    M, K, N, R, E = 21, 30, 17, 6, 4
    x, w, _, A, B = _args(F32, M, K, N, R, E)
    ids = _ids("mixed", M, E)
    _, xa = reference.moe_lora_linear_fwd(x, w, None, A, B, 0.5, 0.2, SEED, ids)
    dy = torch.randn(M, N)
    bargs = (dy, x, w, A, B, xa, 0.5, 0.2, SEED, ids, *needs)
    check_op_vs_reference(C.moe_lora_linear_bwd(*bargs), reference.moe_lora_linear_bwd, bargs,
                          ("dx", "dA", "dB"))


def test_cpu_transposed_weight_and_fp32_adapters():
    M, K, N, R, E = 19, 24, 20, 4, 3
    x, w, b, A, B = _args(F16, M, K, N, R, E, adapter_dtype=F32, transposed=True)
    assert w.stride(1) == 1  # a transposed view, not a copy
    ids = _ids("mixed", M, E)
    fargs = (x, w, b, A, B, 0.5, 0.1, 9, ids)
    y, xa = C.moe_lora_linear_fwd(*fargs)
    check_op_vs_reference((y, xa), reference.moe_lora_linear_fwd, fargs, ("y", "xa"))
    y2, _ = C.moe_lora_linear_fwd(x, w.contiguous(), b, A, B, 0.5, 0.1, 9, ids)
    torch.testing.assert_close(y, y2)
    dy = torch.randn(M, N).to(F16)
    bargs = (dy, x, w, A, B, xa, 0.5, 0.1, 9, ids, True, True, True)
    got = C.moe_lora_linear_bwd(*bargs)
    check_op_vs_reference(got, reference.moe_lora_linear_bwd, bargs, ("dx", "dA", "dB"))
    assert got[1].dtype == F32 and got[2].dtype == F32


@pytest.mark.parametrize("M,K,N", [(0, 5, 4), (3, 0, 4), (3, 5, 0)])
def test_cpu_degenerate_sizes(M, K, N):
    x, w, b, A, B = _args(F32, M, K, N, 2, 3)
    ids = torch.tensor([0, -1, 2][:M], dtype=torch.int64)
    y, xa = C.moe_lora_linear_fwd(x, w, b, A, B, 0.5, 0.0, 0, ids)
    y_ref, xa_ref = reference.moe_lora_linear_fwd(x, w, b, A, B, 0.5, 0.0, 0, ids)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(xa, xa_ref)
    dy = torch.randn(M, N)
    got = C.moe_lora_linear_bwd(dy, x, w, A, B, xa, 0.5, 0.0, 0, ids, True, True, True)
    ref = reference.moe_lora_linear_bwd(dy, x, w, A, B, xa_ref, 0.5, 0.0, 0, ids, True, True, True)
    for g, r, name in zip(got, ref, ("dx", "dA", "dB")):
        torch.testing.assert_close(g, r, msg=name)


def test_cpu_routing_plan_order_keys():
    # The plan's (order, keys) give the same result bit for bit; they are followed, not
    # recomputed: keys routing every row to no expert leave nothing to sum.
    M, K, N, R, E = 40, 16, 12, 4, 5
    x, w, b, A, B = _args(F32, M, K, N, R, E)
    ids = _ids("mixed", M, E)
    v = moe_routing_plan(ids, E, validate=False).view()
    fwd = (x, w, b, A, B, 0.5, 0.0, 0, v.ids)
    y, xa = C.moe_lora_linear_fwd(*fwd)
    y_p, xa_p = C.moe_lora_linear_fwd(*fwd, v.order, v.keys)
    assert torch.equal(y, y_p) and torch.equal(xa, xa_p)
    dy = torch.randn(M, N)
    bwd = (dy, x, w, A, B, xa, 0.5, 0.0, 0, v.ids, True, True, True)
    for g, gp in zip(C.moe_lora_linear_bwd(*bwd), C.moe_lora_linear_bwd(*bwd, v.order, v.keys)):
        assert torch.equal(g, gp)
    _, dA0, dB0 = C.moe_lora_linear_bwd(*bwd, v.order, torch.full_like(v.keys, -1))
    assert not dA0.any() and not dB0.any()


def test_functional_backend_cuda_on_cpu():
    # fused_lora.moe_lora_linear with backend="cuda" (the C++ CPU kernels here): forward and
    # gradients equal backend="torch"'s.
    M, K, N, R, E = 33, 24, 20, 4, 5
    x, w, _, A, B = _args(F32, M, K, N, R, E)
    ids = _ids("mixed", M, E)
    ids = torch.where((ids >= 0) & (ids < E), ids, -1)  # the functional API validates ids
    plan = moe_routing_plan(ids, E)
    outs = {}
    for backend in ("torch", "cuda"):
        xs, As, Bs = (t.clone().requires_grad_(True) for t in (x, A, B))
        y = fused_lora.moe_lora_linear(xs, w, As, Bs, 0.5, plan, backend=backend)
        y.backward(torch.ones_like(y))
        outs[backend] = (y, xs.grad, As.grad, Bs.grad)
    for a, r, name in zip(outs["cuda"], outs["torch"], ("y", "dx", "dA", "dB")):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5, msg=name)
    assert "cuda" in fused_lora.backends.names("moe_lora_linear")


def _bad(**over):
    x, w, b, A, B = _args(F32, 5, 6, 4, 2, 3)
    args = dict(x=x, weight=w, bias=b, lora_A=A, lora_B=B, scale=0.5, dropout_p=0.0, seed=0,
                expert_ids=torch.tensor([0, 1, 2, -1, 1]))
    args.update(over)
    return args


@pytest.mark.parametrize("over,pattern", [
    (dict(x=torch.randn(5)), "x must be 2-D"),
    (dict(weight=torch.randn(4, 6)), "weight must be 3-D"),
    (dict(weight=torch.randn(0, 4, 6)), "at least one expert"),
    (dict(weight=torch.randn(3, 4, 7)), r"weight must be \[E, out_features, in_features=6\]"),
    (dict(lora_A=torch.randn(2, 2, 6)), r"lora_A must be \[E=3, r, in_features=6\]"),
    (dict(lora_A=torch.randn(3, 0, 6), lora_B=torch.randn(3, 4, 0)), "rank r >= 1"),
    (dict(lora_B=torch.randn(3, 4, 3)), r"lora_B must be \[E=3, out_features=4, r=2\]"),
    (dict(bias=torch.randn(4)), r"bias must be \[E=3, out_features=4\]"),
    (dict(bias=torch.randn(3, 4, dtype=F16)), "bias dtype"),
    (dict(weight=torch.randn(3, 4, 6, dtype=F64)), "weight dtype"),
    (dict(lora_A=torch.randn(3, 2, 6, dtype=F16)), "lora_B dtype"),
    (dict(lora_A=torch.randn(3, 2, 6, dtype=F64), lora_B=torch.randn(3, 4, 2, dtype=F64)),
     "lora_A dtype"),
    (dict(expert_ids=torch.tensor([0, 1, 2, 0], dtype=torch.int64)), r"expert_ids must be int64 \[M=5\]"),
    (dict(expert_ids=torch.tensor([0, 1, 2, 0, 1], dtype=torch.int32)), "expert_ids must be int64"),
    (dict(dropout_p=1.0), "dropout_p must be in"),
    (dict(x=torch.randn(5, 6).to(torch.int32)), "x must be fp16"),
])
def test_cpu_bad_inputs_name_the_argument(over, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        C.moe_lora_linear_fwd(**_bad(**over))


def test_cpu_bad_bwd_inputs_and_routing():
    a = _bad()
    x, w, A, B, ids = a["x"], a["weight"], a["lora_A"], a["lora_B"], a["expert_ids"]
    _, xa = C.moe_lora_linear_fwd(**a)
    dy = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match=r"dy must be \[M=5, out_features=4\]"):
        C.moe_lora_linear_bwd(dy[:, :3], x, w, A, B, xa, 0.5, 0.0, 0, ids, True, True, True)
    with pytest.raises(RuntimeError, match=r"xa must be \[M=5, r=2\]"):
        C.moe_lora_linear_bwd(dy, x, w, A, B, xa[:, :1], 0.5, 0.0, 0, ids, True, True, True)
    with pytest.raises(RuntimeError, match="xa must be Float"):
        C.moe_lora_linear_bwd(dy, x, w, A, B, xa.double(), 0.5, 0.0, 0, ids, True, True, True)
    order = torch.arange(5)
    with pytest.raises(RuntimeError, match="order and keys must be given together"):
        C.moe_lora_linear_fwd(**a, order=order)
    with pytest.raises(RuntimeError, match=r"keys must be int64 \[M=5\], got Long \[4\]"):
        C.moe_lora_linear_fwd(**a, order=order, keys=ids[:4])
    with pytest.raises(RuntimeError, match="gemm must be 0"):
        C.moe_lora_linear_fwd(**a, gemm=7)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_opcheck_fwd(dropout):
    a = _bad()
    torch.library.opcheck(C.moe_lora_linear_fwd.default, tuple(a.values()) + (None, None, 0))
    torch.library.opcheck(C.moe_lora_linear_fwd.default,
                          (a["x"], a["weight"], None, a["lora_A"], a["lora_B"], 0.5, dropout, 7,
                           a["expert_ids"]))


@pytest.mark.parametrize("needs", [(True, True, True), (False, True, False), (True, False, True)])
def test_opcheck_bwd(needs):
    a = _bad()
    _, xa = C.moe_lora_linear_fwd(**{**a, "dropout_p": 0.2, "seed": 3})
    dy = torch.randn(5, 4)
    torch.library.opcheck(C.moe_lora_linear_bwd.default,
                          (dy, a["x"], a["weight"], a["lora_A"], a["lora_B"], xa, 0.5, 0.2, 3,
                           a["expert_ids"], *needs))


def _schema_args(schema):
    return [(a.name, str(a.type)) for a in schema.arguments]


@pytest.mark.parametrize("op", ["moe_lora_linear_fwd", "moe_lora_linear_bwd"])
def test_schemas_match_python_ops(op):
    """The C++ op is the Python custom op minus `impl`, with an int seed and the plan's ids
    (expert_ids) where the Python op takes the packed plan, plus the C++-only routing and GEMM
    arguments (with defaults), as for the mixed-adapter ops; the Python op's trailing
    slot_scales / topk come last (appended after the C++-only ones, with the Python op's
    defaults: calls of the schema without them, order / keys / gemm by position, still work)."""
    py = getattr(torch.ops.fused_lora, op).default._schema
    cpp = getattr(C, op).default._schema
    expected, trailing = [], []
    for name, typ in _schema_args(py):
        if name == "impl":
            continue
        if name in ("slot_scales", "topk"):
            trailing.append((name, "int" if typ == "SymInt" else typ))
            continue
        if name == "plan":
            expected.append(("expert_ids", "Tensor"))
            continue
        expected.append((name, "int" if name == "seed" else typ))
    assert trailing == [("slot_scales", "Optional[Tensor]"), ("topk", "int")]
    cpp_only = [("order", "Optional[Tensor]"), ("keys", "Optional[Tensor]"), ("gemm", "int")]
    assert _schema_args(cpp) == expected + cpp_only + trailing, f"{cpp} vs {py}"
    py_defaults = {a.name: a.default_value for a in py.arguments if a.name in ("slot_scales", "topk")}
    for a in cpp.arguments:
        if (a.name, str(a.type)) in cpp_only + trailing:
            assert a.has_default_value(), a.name
        if a.name in py_defaults:
            assert a.default_value == py_defaults[a.name], a.name
    assert [str(r.type) for r in cpp.returns] == [str(r.type) for r in py.returns]
    assert not cpp.is_mutable and not py.is_mutable


def test_cuda_kernels_registered_iff_built_with_cuda():
    for op in ("moe_lora_linear_fwd", "moe_lora_linear_bwd"):
        dump = torch._C._dispatch_dump(f"fused_lora_C::{op}")
        assert "CPU:" in dump, dump
        assert ("CUDA:" in dump) == bool(C.has_cuda()), dump


# --------------------------------------------------------------------------------------------
# GPU: the CUDA kernels (skipped without a CUDA device)
# --------------------------------------------------------------------------------------------


def _gemms():
    if not HAS_CUDA or not _ext.has_cuda_kernels():
        return [0]
    return [0, 1] + ([2, 3] if _ext.wgmma_available() else [])


# decode (M <= 8), one tile per expert, several tiles per expert (M = 300 over E = 3), K odd /
# not a multiple of 8 (scalar loads), K = 1030 (split-K shrink), R = 17.
GPU_SHAPES = [(1, 64, 48, 8, 4), (7, 1030, 136, 16, 8), (300, 72, 200, 17, 3), (129, 37, 33, 4, 6),
              (520, 256, 384, 16, 16)]


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", _gemms())
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[_shape_id(s) for s in GPU_SHAPES])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["W", "Wt"])
def test_gpu_matches_reference(gemm, shape, dtype, transposed):
    if not _ext.has_cuda_kernels():
        pytest.skip("the extension was built without CUDA kernels")
    M, K, N, R, E = shape
    x, w, b, A, B = _args(dtype, M, K, N, R, E, transposed=transposed, device="cuda")
    ids = _ids("mixed", M, E).cuda()
    v = moe_routing_plan(ids, E, validate=False).view()
    for plan in (False, True):
        extra = (v.order, v.keys, gemm) if plan else (None, None, gemm)
        fargs = (x, w, b, A, B, 0.7, 0.2, SEED, ids)
        y, xa = C.moe_lora_linear_fwd(*fargs, *extra)
        check_op_vs_reference((y.cpu(), xa.cpu()), reference.moe_lora_linear_fwd,
                              tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in fargs),
                              ("y", "xa"), scaled_atol=True)
        dy = torch.randn(M, N, device="cuda").to(dtype)
        bargs = (dy, x, w, A, B, xa, 0.7, 0.2, SEED, ids, True, True, True)
        got = C.moe_lora_linear_bwd(*bargs, *extra)
        check_op_vs_reference(tuple(g.cpu() for g in got), reference.moe_lora_linear_bwd,
                              tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in bargs),
                              ("dx", "dA", "dB"), scaled_atol=True)
        none = _no_expert(ids, E)
        assert (y[none] == 0).all() and (got[0][none] == 0).all()
        again = C.moe_lora_linear_bwd(*bargs, *extra)  # deterministic: no float atomics
        assert all(torch.equal(g, h) for g, h in zip(got, again))


@pytest.mark.gpu
@pytest.mark.parametrize("needs", NEEDS)
def test_gpu_bwd_needs(needs):
    if not _ext.has_cuda_kernels():
        pytest.skip("the extension was built without CUDA kernels")
    M, K, N, R, E = 90, 72, 40, 8, 5
    x, w, _, A, B = _args(BF16, M, K, N, R, E, device="cuda")
    ids = _ids("mixed", M, E).cuda()
    _, xa = C.moe_lora_linear_fwd(x, w, None, A, B, 0.5, 0.1, SEED, ids)
    dy = torch.randn(M, N, device="cuda").to(BF16)
    bargs = (dy, x, w, A, B, xa, 0.5, 0.1, SEED, ids, *needs)
    got = C.moe_lora_linear_bwd(*bargs)
    check_op_vs_reference(tuple(g.cpu() for g in got), reference.moe_lora_linear_bwd,
                          tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in bargs),
                          ("dx", "dA", "dB"), scaled_atol=True)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_follows_the_plan():
    # Captured once with the plan's buffers; update_() reroutes and the replay follows (no host
    # sync or sort inside the op when the plan is given).
    if not _ext.has_cuda_kernels():
        pytest.skip("the extension was built without CUDA kernels")
    M, K, N, R, E = 64, 128, 96, 8, 4
    x, w, b, A, B = _args(F16, M, K, N, R, E, device="cuda")
    plan = moe_routing_plan(_ids("mixed", M, E).cuda().clamp(min=-1, max=E - 1), E)
    v = plan.view()
    fwd = lambda: C.moe_lora_linear_fwd(x, w, b, A, B, 0.5, 0.0, 0, v.ids, v.order, v.keys)  # noqa: E731
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fwd()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y, _ = fwd()
    new_ids = torch.randint(-1, E, (M,), device="cuda")
    plan.update_(new_ids)
    g.replay()
    y_ref, _ = reference.moe_lora_linear_fwd(x.cpu(), w.cpu(), b.cpu(), A.cpu(), B.cpu(), 0.5, 0.0, 0,
                                             new_ids.cpu())
    torch.testing.assert_close(y.cpu(), y_ref, atol=2e-2, rtol=2e-3)


@pytest.mark.gpu
def test_gpu_functional_backend_cuda():
    if not _ext.has_cuda_kernels():
        pytest.skip("the extension was built without CUDA kernels")
    M, K, N, R, E = 77, 64, 48, 8, 6
    x, w, _, A, B = _args(BF16, M, K, N, R, E, device="cuda")
    ids = torch.randint(-1, E, (M,), device="cuda")
    outs = {}
    for backend in ("torch", "cuda"):
        xs, As, Bs = (t.clone().requires_grad_(True) for t in (x, A, B))
        y = fused_lora.moe_lora_linear(xs, w, As, Bs, 0.5, ids, backend=backend)
        y.float().square().sum().backward()
        outs[backend] = (y, xs.grad, As.grad, Bs.grad)
    for a, r, name in zip(outs["cuda"], outs["torch"], ("y", "dx", "dA", "dB")):
        torch.testing.assert_close(a.float(), r.float(), atol=0.1, rtol=2e-2, msg=name)


def test_cuda_backend_topk_and_banks():
    # top-k > 1 and adapter banks through backend "cuda" (C++ CPU ops here: x read per op row as
    # x[m // topk], dx summed per token in the op): equal the reference backend.
    import fused_lora

    torch.manual_seed(0)
    T, K, N, E, R, k, S = 7, 24, 20, 4, 4, 2, 3
    x = torch.randn(T, K, dtype=torch.float32)
    w = torch.randn(E, N, K, dtype=torch.float32) / K**0.5
    A = torch.randn(E, R, K, dtype=torch.float32) / K**0.5
    B = torch.randn(E, N, R, dtype=torch.float32)
    ids = torch.randint(0, E, (T, k))
    banks_A = torch.randn(S, E, R, K) / K**0.5
    banks_B = torch.randn(S, E, N, R)
    adapters = torch.tensor([0, -1, 2, 2, 0, -1, 0])
    scales = torch.tensor([0.5, 3.0, 1.5])
    for lA, lB, sc, extra in ((A, B, 0.5, {}), (banks_A, banks_B, scales, {"adapter_ids": adapters})):
        outs = []
        for be in ("cuda", "torch"):
            xg = x.clone().requires_grad_()
            Ag, Bg = lA.clone().requires_grad_(), lB.clone().requires_grad_()
            y = fused_lora.moe_lora_linear(xg, w, Ag, Bg, sc, ids, backend=be, **extra)
            y.backward(torch.ones_like(y))
            outs.append((y.detach(), xg.grad, Ag.grad, Bg.grad))
        for got, want, name in zip(*outs, ("y", "dx", "dA", "dB")):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
        # slot 1 has no token: exact-zero gradients
        if lA.dim() == 4:
            assert not outs[0][2][1].any() and not outs[0][3][1].any()


# --------------------------------------------------------------------------------------------
# Adapter banks and top-k rows: the C++ CPU kernels
# --------------------------------------------------------------------------------------------


def _bank_args(dtype, T, K, N, R, E, S, bias=True, adapter_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ad = adapter_dtype or dtype
    x = torch.randn(T, K, generator=g).to(dtype)
    w = (torch.randn(E, N, K, generator=g) / max(K, 1) ** 0.5).to(dtype)
    b = torch.randn(E, N, generator=g).to(dtype) if bias else None
    A = (torch.randn(S, E, R, K, generator=g) / max(K, 1) ** 0.5).to(ad)
    B = torch.randn(S, E, N, R, generator=g).to(ad)
    return x, w, b, A, B


def _bank_ids(M, E, S, seed=5):
    """Virtual expert ids [M] over (S + 1) * E: adapter 0 never on expert E - 1 and adapter 1
    never on expert 0 (adapter x expert pairs without rows), base-only ids (< E), rows of no
    expert (-1, (S + 1) * E, -7); row 0 on adapter 0 x expert 0, the last on a base-only id."""
    g = torch.Generator().manual_seed(seed)
    nv = (S + 1) * E
    pool = [v for v in range(nv) if v not in (2 * E - 1, 2 * E)] + [-1, nv, -7]
    ids = torch.tensor(pool, dtype=torch.int64)[torch.randint(0, len(pool), (M,), generator=g)]
    ids[0] = E
    ids[-1] = 1
    return ids


def _present(ids, E, S):
    """[S, E] bool: adapter x expert pairs with rows."""
    p = torch.zeros(S, E, dtype=torch.bool)
    v = ids[(ids >= E) & (ids < (S + 1) * E)]
    p[v // E - 1, v % E] = True
    return p


def _bank_loop64(x, w, b, A, B, s, ss, ids, p, seed, dy, topk):
    """Ground truth independent of the reference's grouping: a per-row fp64 loop through
    autograd over the virtual ids (row m reads x[m // topk]). Returns y and (dx, dA, dB)."""
    E, S = w.shape[0], A.shape[0]
    M, K = ids.numel(), x.shape[1]
    xd, Ad, Bd = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    keep = reference.dropout_keep_mask(seed, M, K, p) if p > 0 else None
    rows = []
    for m in range(M):
        v = int(ids[m])
        if not 0 <= v < (S + 1) * E:
            rows.append(torch.zeros(w.shape[1], dtype=F64))
            continue
        e, a = v % E, v // E - 1
        xm = xd[m // topk]
        y = xm @ w[e].double().t()
        if b is not None:
            y = y + b[e].double()
        if a >= 0:
            xl = torch.where(keep[m], xm / (1 - p), torch.zeros((), dtype=F64)) if keep is not None else xm
            sa = s * (float(ss[a]) if ss is not None else 1.0)
            y = y + sa * ((xl @ Ad[a, e].t()) @ Bd[a, e].t())
        rows.append(y)
    y = torch.stack(rows)
    y.backward(dy.double())
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (xd, Ad, Bd)]
    return y.detach(), grads


def _bank_call_args(x, w, b, A, B, s, p, seed, ids, ss, topk):
    """(C++ op positional args, reference args) of one forward."""
    return (x, w, b, A, B, s, p, seed, ids), (x, w, b, A, B, s, p, seed, ids, ss, topk)


# (T, K, N, R, E, S): T = 1 (one token, top-k rows of it), odd sizes, R = 17 (a second 16-rank
# chunk).
BANK_SHAPES = [(1, 7, 5, 3, 3, 2), (6, 20, 18, 4, 4, 3), (13, 33, 17, 17, 3, 2)]


@pytest.mark.parametrize("shape", BANK_SHAPES, ids=lambda s: "T{}-K{}-N{}-R{}-E{}-S{}".format(*s))
@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64], ids=str)
@pytest.mark.parametrize("topk", [1, 2, 3])
@pytest.mark.parametrize("slot_scales", [False, True], ids=["ss-none", "ss"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_cpu_banks_topk_match_reference(shape, dtype, topk, slot_scales, dropout):
    T, K, N, R, E, S = shape
    x, w, b, A, B = _bank_args(dtype, T, K, N, R, E, S)
    M = T * topk
    ids = _bank_ids(M, E, S)
    ss = torch.tensor([0.5, 2.0, -1.25][:S]) if slot_scales else None
    kw = dict(slot_scales=ss, topk=topk)
    cargs, fargs = _bank_call_args(x, w, b, A, B, 0.7, dropout, SEED, ids, ss, topk)
    y, xa = C.moe_lora_linear_fwd(*cargs, **kw)
    assert y.shape == (M, N) and xa.shape == (M, R)
    check_op_vs_reference((y, xa), reference.moe_lora_linear_fwd, fargs, ("y", "xa"))
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(3)).to(dtype)
    _, xa_ref = reference.moe_lora_linear_fwd(*fargs)
    bargs = (dy, x, w, A, B, xa_ref, 0.7, dropout, SEED, ids, True, True, True)
    got = C.moe_lora_linear_bwd(*bargs, **kw)
    check_op_vs_reference(got, reference.moe_lora_linear_bwd, bargs + (ss, topk), ("dx", "dA", "dB"))
    dx, dA, dB = got
    assert dx.shape == x.shape and dA.shape == A.shape and dB.shape == B.shape
    # Exact: rows of no expert give y = xa = 0; base-only rows xa = 0; a token all of whose rows
    # are of no expert gets dx = 0; pairs without rows get dA = dB = 0.
    nv = (S + 1) * E
    none = (ids < 0) | (ids >= nv)
    base = (ids >= 0) & (ids < E)
    assert (y[none] == 0).all() and (xa[none | base] == 0).all()
    assert (dx[none.view(T, topk).all(1)] == 0).all()
    absent = ~_present(ids, E, S)
    assert (dA[absent] == 0).all() and (dB[absent] == 0).all()


@pytest.mark.parametrize("topk", [1, 3])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_cpu_banks_fp64_match_per_row_loop(topk, dropout):
    T, K, N, R, E, S = 11, 23, 19, 5, 4, 3
    x, w, b, A, B = _bank_args(F64, T, K, N, R, E, S)
    ids = _bank_ids(T * topk, E, S)
    ss = torch.tensor([0.5, -2.0, 1.5])
    dy = torch.randn(T * topk, N, dtype=F64)
    kw = dict(slot_scales=ss, topk=topk)
    y, xa = C.moe_lora_linear_fwd(x, w, b, A, B, 0.6, dropout, SEED, ids, **kw)
    got = C.moe_lora_linear_bwd(dy, x, w, A, B, xa, 0.6, dropout, SEED, ids, True, True, True, **kw)
    y64, grads64 = _bank_loop64(x, w, b, A, B, 0.6, ss, ids, dropout, SEED, dy, topk)
    torch.testing.assert_close(y, y64, atol=1e-12, rtol=1e-12)
    for g, r, name in zip(got, grads64, ("dx", "dA", "dB")):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.parametrize("needs", NEEDS)
@pytest.mark.parametrize("topk", [1, 2])
def test_cpu_banks_bwd_needs(needs, topk):
    T, K, N, R, E, S = 9, 30, 17, 6, 4, 2
    x, w, _, A, B = _bank_args(F32, T, K, N, R, E, S, adapter_dtype=F32)
    ids = _bank_ids(T * topk, E, S)
    ss = torch.tensor([1.5, 0.25])
    _, xa = reference.moe_lora_linear_fwd(x, w, None, A, B, 0.5, 0.2, SEED, ids, ss, topk)
    dy = torch.randn(T * topk, N)
    bargs = (dy, x, w, A, B, xa, 0.5, 0.2, SEED, ids, *needs)
    check_op_vs_reference(C.moe_lora_linear_bwd(*bargs, slot_scales=ss, topk=topk),
                          reference.moe_lora_linear_bwd, bargs + (ss, topk), ("dx", "dA", "dB"))


def test_cpu_bank_base_rows_bit_exact_and_unused_slots_unread():
    # Base-only ids are the base MoE bit for bit: the same rows with every adapter removed give
    # the same y, and a NaN-filled adapter that no row uses (slot 1) changes nothing.
    T, K, N, R, E, S, k = 10, 24, 16, 4, 3, 3, 2
    x, w, b, A, B = _bank_args(F32, T, K, N, R, E, S)
    ids = _bank_ids(T * k, E, S)
    ids = torch.where((ids >= 2 * E) & (ids < 3 * E), ids - E, ids)  # no row on slot 1
    A[1], B[1] = float("nan"), float("nan")
    ss = torch.tensor([0.5, float("nan"), 2.0])
    y, _ = C.moe_lora_linear_fwd(x, w, b, A, B, 0.5, 0.0, 0, ids, slot_scales=ss, topk=k)
    base_ids = torch.where((ids >= 0) & (ids < (S + 1) * E), ids % E, ids)
    y0, xa0 = C.moe_lora_linear_fwd(x, w, b, A, B, 0.5, 0.0, 0, base_ids, slot_scales=ss, topk=k)
    rows = (ids >= 0) & (ids < E)
    assert rows.any() and (ids >= E).any()
    assert torch.equal(y[rows], y0[rows]) and not torch.isnan(y).any()
    assert not xa0.any()
    dy = torch.randn(T * k, N)
    _, dA, dB = C.moe_lora_linear_bwd(dy, x, w, A, B, torch.zeros_like(xa0), 0.5, 0.0, 0, ids, False,
                                      True, True, slot_scales=ss, topk=k)
    assert not dA[1].isnan().any() and not dA[1].any() and not dB[1].any()


def test_cpu_bank_routing_plan_order_keys():
    # A plan built with adapter_ids (virtual experts) gives the op's own sort's bits.
    T, K, N, R, E, S, k = 12, 16, 12, 4, 3, 2, 2
    x, w, b, A, B = _bank_args(F32, T, K, N, R, E, S)
    experts = torch.randint(-1, E, (T, k), generator=torch.Generator().manual_seed(2))
    adapters = torch.tensor([0, -1, 1, 1, 0, -1, 0, 1, 1, 0, -1, 0])
    v = moe_routing_plan(experts, E, adapter_ids=adapters, n_slots=S).view()
    assert v.ids.numel() == T * k
    ss = torch.tensor([0.5, 2.0])
    kw = dict(slot_scales=ss, topk=k)
    fwd = (x, w, b, A, B, 0.5, 0.1, 3, v.ids)
    y, xa = C.moe_lora_linear_fwd(*fwd, **kw)
    y_p, xa_p = C.moe_lora_linear_fwd(*fwd, v.order, v.keys, **kw)
    assert torch.equal(y, y_p) and torch.equal(xa, xa_p)
    dy = torch.randn(T * k, N)
    bwd = (dy, x, w, A, B, xa, 0.5, 0.1, 3, v.ids, True, True, True)
    for g, gp in zip(C.moe_lora_linear_bwd(*bwd, **kw), C.moe_lora_linear_bwd(*bwd, v.order, v.keys, **kw)):
        assert torch.equal(g, gp)


@pytest.mark.parametrize("topk", [1, 2])
def test_functional_banks_backend_cuda_on_cpu(topk):
    # fused_lora.moe_lora_linear with adapter banks, adapter_ids and backend="cuda" (the C++ CPU
    # kernels here): forward and gradients (x, the banks, not the per-adapter scales) equal
    # backend="torch"'s; unused slots and pairs without rows get exact zeros.
    T, K, N, R, E, S = 15, 24, 20, 4, 4, 3
    x, w, b, A, B = _bank_args(F32, T, K, N, R, E, S)
    g = torch.Generator().manual_seed(4)
    experts = torch.randint(-1, E, (T, topk) if topk > 1 else (T,), generator=g)
    adapters = torch.tensor([0, 2, -1, 0, 2, 2, -1, 0, 0, 2, -1, 2, 0, 0, -1])  # slot 1 unused
    scales = torch.tensor([0.5, 7.0, 1.25])
    outs = {}
    for backend in ("torch", "cuda"):
        xs, As, Bs = (t.clone().requires_grad_(True) for t in (x, A, B))
        torch.manual_seed(9)  # the same dropout seed for both
        y = fused_lora.moe_lora_linear(xs, w, As, Bs, scales, experts, bias=b, adapter_ids=adapters,
                                       dropout_p=0.1, backend=backend)
        y.square().sum().backward()
        outs[backend] = (y, xs.grad, As.grad, Bs.grad)
    for a, r, name in zip(outs["cuda"], outs["torch"], ("y", "dx", "dA", "dB")):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5, msg=name)
    _, _, dA, dB = outs["cuda"]
    assert not dA[1].any() and not dB[1].any()


def _bad_bank(**over):
    x, w, b, A, B = _bank_args(F32, 5, 6, 4, 2, 3, 2)
    args = dict(x=x, weight=w, bias=b, lora_A=A, lora_B=B, scale=0.5, dropout_p=0.0, seed=0,
                expert_ids=torch.tensor([0, 3, 8, -1, 4, 5, 6, 7, 1, 2]), slot_scales=torch.ones(2),
                topk=2)
    args.update(over)
    return args


@pytest.mark.parametrize("over,pattern", [
    (dict(lora_A=torch.randn(2, 4, 2, 6)), r"lora_A must be \[S, E=3, r, in_features=6\]"),
    (dict(lora_A=torch.randn(0, 3, 2, 6), lora_B=torch.randn(0, 3, 4, 2)), r"lora_A must be \[S, E=3"),
    (dict(lora_A=torch.randn(2, 3, 2, 7)), r"lora_A must be \[S, E=3, r, in_features=6\]"),
    (dict(lora_B=torch.randn(3, 3, 4, 2)), r"lora_B must be \[S=2, E=3, out_features=4, r=2\]"),
    (dict(lora_B=torch.randn(3, 4, 2)), r"lora_B must be \[S=2, E=3, out_features=4, r=2\]"),
    (dict(lora_A=torch.randn(2, 3, 6), lora_B=torch.randn(3, 4, 2)), r"lora_A must be \[E=3, r"),
    (dict(lora_A=torch.randn(3, 2, 6), lora_B=torch.randn(3, 4, 2)), "slot_scales .* needs adapter banks"),
    (dict(slot_scales=torch.ones(3)), r"slot_scales must be float32 \[S=2\], got Float \[3\]"),
    (dict(slot_scales=torch.ones(2, dtype=F64)), r"slot_scales must be float32 \[S=2\], got Double"),
    (dict(topk=0), "topk must be >= 1"),
    (dict(topk=3), r"expert_ids must be int64 \[M=15\] \(T=5 x topk=3\)"),
    (dict(expert_ids=torch.zeros(5, dtype=torch.int64)), r"expert_ids must be int64 \[M=10\]"),
])
def test_cpu_bank_bad_inputs_name_the_argument(over, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        C.moe_lora_linear_fwd(**_bad_bank(**over))


def test_cpu_bank_bad_bwd_inputs_and_routing():
    a = _bad_bank()
    x, w, A, B, ids = a["x"], a["weight"], a["lora_A"], a["lora_B"], a["expert_ids"]
    kw = dict(slot_scales=a["slot_scales"], topk=2)
    _, xa = C.moe_lora_linear_fwd(**a)
    assert xa.shape == (10, 2)
    dy = torch.randn(10, 4)
    with pytest.raises(RuntimeError, match=r"dy must be \[M=10, out_features=4\], got \[5, 4\]"):
        C.moe_lora_linear_bwd(dy[:5], x, w, A, B, xa, 0.5, 0.0, 0, ids, True, True, True, **kw)
    with pytest.raises(RuntimeError, match=r"xa must be \[M=10, r=2\]"):
        C.moe_lora_linear_bwd(dy, x, w, A, B, xa[:5], 0.5, 0.0, 0, ids, True, True, True, **kw)
    with pytest.raises(RuntimeError, match=r"order must be int64 \[M=10\], got Long \[5\]"):
        C.moe_lora_linear_fwd(**a, order=torch.arange(5), keys=torch.arange(5))


@pytest.mark.parametrize("topk", [1, 2])
def test_opcheck_banks_topk(topk):
    a = _bad_bank(topk=topk, expert_ids=_bad_bank()["expert_ids"][: 5 * topk])
    torch.library.opcheck(C.moe_lora_linear_fwd.default,
                          (a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], 0.5, 0.2, 7,
                           a["expert_ids"], None, None, 0, a["slot_scales"], topk))
    _, xa = C.moe_lora_linear_fwd(**a)
    dy = torch.randn(5 * topk, 4)
    torch.library.opcheck(C.moe_lora_linear_bwd.default,
                          (dy, a["x"], a["weight"], a["lora_A"], a["lora_B"], xa, 0.5, 0.2, 7,
                           a["expert_ids"], True, True, True, None, None, 0, a["slot_scales"], topk))


# --------------------------------------------------------------------------------------------
# GPU: adapter banks and top-k rows on the CUDA kernels (skipped without a CUDA device)
# --------------------------------------------------------------------------------------------

# (T, K, N, R, E, S, topk): decode (M <= 8), a split-K shrink (K = 1030), several GEMM tiles per
# virtual expert (M = 2 x 200 over few ids), K not a multiple of 8, S * E = 48 finalize blocks.
GPU_BANK_SHAPES = [(3, 64, 48, 8, 4, 2, 2), (4, 1030, 136, 16, 8, 3, 1), (200, 72, 200, 17, 2, 2, 2),
                   (43, 37, 33, 4, 6, 3, 3), (260, 256, 384, 16, 16, 3, 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", _gemms())
@pytest.mark.parametrize("shape", GPU_BANK_SHAPES, ids=lambda s: "T{}-K{}-N{}-R{}-E{}-S{}-k{}".format(*s))
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("slot_scales", [False, True], ids=["ss-none", "ss"])
def test_gpu_banks_topk_match_reference(gemm, shape, dtype, slot_scales):
    if not _ext.has_cuda_kernels():
        pytest.skip("the extension was built without CUDA kernels")
    T, K, N, R, E, S, topk = shape
    M = T * topk
    x, w, b, A, B = (t.cuda() for t in _bank_args(dtype, T, K, N, R, E, S))
    ids = _bank_ids(M, E, S).cuda()
    ss = torch.tensor([0.5, 2.0, -1.25][:S]).cuda() if slot_scales else None
    kw = dict(slot_scales=ss, topk=topk)
    v = moe_routing_plan(ids, (S + 1) * E, validate=False).view()
    cpu = lambda ts: tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in ts)  # noqa: E731
    for plan in (False, True):
        extra = (v.order, v.keys, gemm) if plan else (None, None, gemm)
        fargs = (x, w, b, A, B, 0.7, 0.2, SEED, ids)
        y, xa = C.moe_lora_linear_fwd(*fargs, *extra, **kw)
        check_op_vs_reference((y.cpu(), xa.cpu()), reference.moe_lora_linear_fwd, cpu(fargs + (ss, topk)),
                              ("y", "xa"), scaled_atol=True)
        dy = torch.randn(M, N, device="cuda").to(dtype)
        bargs = (dy, x, w, A, B, xa, 0.7, 0.2, SEED, ids, True, True, True)
        got = C.moe_lora_linear_bwd(*bargs, *extra, **kw)
        check_op_vs_reference(tuple(g.cpu() for g in got), reference.moe_lora_linear_bwd,
                              cpu(bargs + (ss, topk)), ("dx", "dA", "dB"), scaled_atol=True)
        nv = (S + 1) * E
        none = (ids < 0) | (ids >= nv)
        base = (ids >= 0) & (ids < E)
        assert (y[none] == 0).all() and (xa[none | base] == 0).all()
        assert (got[0][none.view(T, topk).all(1)] == 0).all()
        absent = ~_present(ids.cpu(), E, S).cuda()
        assert (got[1][absent] == 0).all() and (got[2][absent] == 0).all()
        again = C.moe_lora_linear_bwd(*bargs, *extra, **kw)  # deterministic: no float atomics
        assert all(torch.equal(g, h) for g, h in zip(got, again))


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", _gemms())
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_gpu_bank_base_rows_bit_exact(gemm, dtype):
    # Base-only ids give the base MoE bit for bit (no LoRA term, not a zero one): the same rows
    # with every adapter removed, and a NaN-filled bank entry no row uses changes nothing.
    if not _ext.has_cuda_kernels():
        pytest.skip("the extension was built without CUDA kernels")
    T, K, N, R, E, S, k = 150, 96, 80, 8, 3, 3, 2
    x, w, b, A, B = (t.cuda() for t in _bank_args(dtype, T, K, N, R, E, S))
    ids = _bank_ids(T * k, E, S)
    ids = torch.where((ids >= 2 * E) & (ids < 3 * E), ids - E, ids).cuda()  # no row on slot 1
    A[1], B[1] = float("nan"), float("nan")
    ss = torch.tensor([0.5, float("nan"), 2.0]).cuda()
    y, _ = C.moe_lora_linear_fwd(x, w, b, A, B, 0.5, 0.0, 0, ids, None, None, gemm, ss, k)
    base_ids = torch.where((ids >= 0) & (ids < (S + 1) * E), ids % E, ids)
    y0, xa0 = C.moe_lora_linear_fwd(x, w, b, A, B, 0.5, 0.0, 0, base_ids, None, None, gemm, ss, k)
    rows = (ids >= 0) & (ids < E)
    assert torch.equal(y[rows], y0[rows]) and not torch.isnan(y).any() and not xa0.any()
    dy = torch.randn(T * k, N, device="cuda").to(dtype)
    dx, dA, dB = C.moe_lora_linear_bwd(dy, x, w, A, B, torch.zeros_like(xa0), 0.5, 0.0, 0, base_ids, True,
                                       True, True, None, None, gemm, ss, k)
    assert not dA.any() and not dB.any() and not dx.isnan().any()


@pytest.mark.gpu
def test_gpu_functional_banks_topk_backend_cuda():
    if not _ext.has_cuda_kernels():
        pytest.skip("the extension was built without CUDA kernels")
    T, K, N, R, E, S, k = 77, 64, 48, 8, 6, 3, 2
    x, w, b, A, B = (t.cuda() for t in _bank_args(BF16, T, K, N, R, E, S))
    experts = torch.randint(-1, E, (T, k), device="cuda")
    adapters = torch.randint(-1, S, (T,), device="cuda")
    scales = torch.tensor([0.5, 2.0, 1.0], device="cuda")
    outs = {}
    for backend in ("torch", "cuda"):
        xs, As, Bs = (t.clone().requires_grad_(True) for t in (x, A, B))
        y = fused_lora.moe_lora_linear(xs, w, As, Bs, scales, experts, bias=b, adapter_ids=adapters,
                                       backend=backend)
        y.float().square().sum().backward()
        outs[backend] = (y, xs.grad, As.grad, Bs.grad)
    for a, r, name in zip(outs["cuda"], outs["torch"], ("y", "dx", "dA", "dB")):
        torch.testing.assert_close(a.float(), r.float(), atol=0.1, rtol=2e-2, msg=name)


@pytest.mark.gpu
def test_gpu_bank_bad_inputs():
    if not _ext.has_cuda_kernels():
        pytest.skip("the extension was built without CUDA kernels")
    a = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _bad_bank().items()}
    with pytest.raises(RuntimeError, match="slot_scales is on cpu but x is on cuda"):
        C.moe_lora_linear_fwd(**{**a, "slot_scales": torch.ones(2)})
    with pytest.raises(RuntimeError, match=r"slot_scales must be float32 \[S=2\], got Half"):
        C.moe_lora_linear_fwd(**{**a, "slot_scales": a["slot_scales"].half()})
    _, xa = C.moe_lora_linear_fwd(**a)
    with pytest.raises(RuntimeError, match=r"dy must be \[M=10, out_features=4\]"):
        C.moe_lora_linear_bwd(torch.randn(5, 4, device="cuda"), a["x"], a["weight"], a["lora_A"], a["lora_B"],
                              xa, 0.5, 0.0, 0, a["expert_ids"], True, True, True,
                              slot_scales=a["slot_scales"], topk=2)
