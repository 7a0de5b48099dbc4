"""The C++/CUDA extension fused_lora._C (csrc/): its binding, torch.ops.fused_lora_C.

The ops' correctness on every backend, the extension's CPU kernels (cuda_cpu) and CUDA kernels
(cuda*, -m gpu) included, is in tests/ops/test_<op>.py. Here: the TORCH_CHECK messages, the gemm
argument (checked, ignored by the CPU kernels), opcheck of the C++-only trailing arguments,
that the CUDA kernels are registered when the build has them, that the C++ schemas match the
Python custom ops', the package without the extension, `python -m fused_lora info`, and on a GPU
(-m gpu) the module end to end and the GEMM choice. tests/run_sanitizer.sh runs the GPU tests
of this file and of tests/ops under compute-sanitizer.

Skipped as a whole when the extension is not built (FUSED_LORA_SKIP_EXT=1) or not loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _utils import HAS_CUDA, lora_inputs, multi_inputs

from fused_lora import _ext

if _ext.ext_error() is not None:
    pytest.skip(f"C++ extension unavailable: {_ext.ext_error()}", allow_module_level=True)

C = torch.ops.fused_lora_C


def _args(device="cpu", dtype=torch.float32, M=13, K=20, N=18, R=4, bias=True):
    return lora_inputs(M, K, N, R, dtype, device=device, bias=bias)


def _multi_args(M=23, K=37, N=29, S=3, R=17, ranks=True):
    """Every kind of id (-1, each slot, out of range both ways), ranks below r_max with NaN past
    them (when ranks)."""
    return multi_inputs(M, K, N, S, R, ranks="mixed" if ranks else None)


# --------------------------------------------------------------------------------------------
# Checks and arguments of the C++ ops
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Binding: schemas, registration, the single-adapter checks
# --------------------------------------------------------------------------------------------


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


# --- both tensor-core GEMMs (the ops' gemm argument): mma.sync everywhere, wgmma on sm_90a ---


@pytest.mark.gpu
def test_gpu_gemm_choice_is_checked():
    x, w, b, a, bb = _args("cuda", torch.float16, 129, 64, 128, 4)
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
