"""The `backend` fixture of the per-op tests (tests/ops/test_<op>.py): one implementation of an op.

==================  ==========================================================================
backend             what runs
==================  ==========================================================================
torch               fused_lora.reference (registry entry "torch"), CPU tensors
triton              the Triton kernels: CUDA tensors on a GPU, else CPU tensors under
                    TRITON_INTERPRET=1 (set by tests/conftest.py; no bf16 there)
triton_decode,      (multi_lora_linear) that Triton path at any batch size; decode and prefill
triton_prefill,     with split-K 2 where the split is left to the kernel, so the partial-sum
triton_hybrid       reduction runs on CPU too
cuda_cpu            the C++ extension's CPU kernels (entry "cuda" on CPU tensors); skipped with
                    the registry's reason when the extension is not built
sim, sim_rev,       the CUDA kernels of csrc/ on CPU under the SIMT emulator (tools/simt_emu,
sim_wgmma, ...      torch.ops.fused_lora_sim): raw ops only; _rev: every block's threads first
                    run in reverse order; _wgmma / _wgmma256: the Hopper GEMM (gemm=2 / 3)
cuda, cuda_mma,     the CUDA kernels on CUDA tensors (marked gpu); _mma / _wgmma / _wgmma256:
cuda_wgmma, ...     the entries "cuda:mma" ... (the C++ ops' gemm argument)
==================  ==========================================================================

A test takes `backend` and runs on its module's DEFAULT_BACKENDS, or on the backends a
``@pytest.mark.backends("torch", "cuda_cpu")`` mark names. Where the backends run different
sweeps (the emulator and the interpreter are slow, a GPU takes large shapes), the mark gives
each backend its cases: ``@pytest.mark.backends(args="shape,dtype", sim=[...], cuda=[...])``
parametrizes ("backend", "shape", "dtype") with those cases, the backend first in the id.

Every Backend has the raw ops in the C++ ops' convention (int seed, adapter ids; the emulator
and the extension take the same arguments), `impl` (the registry entry for backend= / the
custom ops' impl; None for the emulator) and `check` (its outputs against fused_lora.reference,
with the tolerance this backend is held to).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch
from _utils import HAS_CUDA, INTERPRET, TRITON_DEVICE, check_op_vs_reference, close


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    kind: str  # "torch" | "triton" | "cuda" | "sim"
    impl: Optional[str]  # registry entry; None: the emulator (raw ops only)
    device: str
    gemm: int = 0  # the C++ ops' gemm argument: 0 auto, 1 mma.sync, 2 wgmma, 3 wgmma256
    schedule: int = 0  # emulator: 1 runs every block's threads in reverse order first

    def __repr__(self) -> str:
        return self.name

    @property
    def is_cpp(self) -> bool:
        """The C++ ops' code (the extension's CPU kernels, the CUDA kernels, the emulator)."""
        return self.kind in ("cuda", "sim")

    @property
    def ops(self):
        """The C++-convention op namespace: torch.ops.fused_lora_C or torch.ops.fused_lora_sim."""
        if self.kind == "sim":
            from simt_emu import build_sim

            return build_sim()
        if self.kind == "cuda":
            import fused_lora  # noqa: F401  (loads the extension)

            return torch.ops.fused_lora_C
        raise AttributeError(f"backend {self.name} has no C++ ops")

    def with_gemm(self, gemm: int) -> Backend:
        return dataclasses.replace(self, gemm=gemm)

    def unavailable(self, op: str) -> str:
        """Why this backend cannot run `op` here ('' if it can)."""
        from fused_lora import backends

        if self.kind == "sim":
            from simt_emu import sim_unavailable_reason

            why = sim_unavailable_reason()
            return f"SIMT emulator unavailable: {why}" if why else ""
        if self.device == "cuda" and not HAS_CUDA:
            return "needs a CUDA device"
        return backends.unavailable_reason(op, self.impl, torch.device(self.device))

    def take(self, op: str, dtype: torch.dtype) -> None:
        """Skip unless this backend takes `dtype` activations for `op` here."""
        from fused_lora import backends

        if self.kind == "sim":
            return
        why = backends.unavailable_reason(op, self.impl, torch.device(self.device), dtype)
        if why:
            pytest.skip(why)

    # -- raw ops, the C++ ops' convention -----------------------------------------------------

    def fwd(self, x, w, b, a, bb, scale, p, seed):
        return self.ops.lora_linear_fwd(x, w, b, a, bb, scale, p, seed, gemm=self.gemm)

    def bwd(self, dy, x, w, a, bb, xa, scale, p, seed, needs_dx, needs_dA, needs_dB):
        return self.ops.lora_linear_bwd(dy, x, w, a, bb, xa, scale, p, seed, needs_dx, needs_dA,
                                        needs_dB, gemm=self.gemm)

    def multi_fwd(self, x, w, b, a, bb, scales, ids, ranks, order=None, keys=None):
        return self.ops.multi_lora_linear_fwd(x, w, b, a, bb, scales, ids, ranks, order, keys,
                                              gemm=self.gemm)

    def multi_bwd(self, dy, x, w, a, bb, scales, ids, ranks, xa, needs_dx, needs_dA, needs_dB,
                  order=None, keys=None):
        return self.ops.multi_lora_linear_bwd(dy, x, w, a, bb, scales, ids, ranks, xa, needs_dx,
                                              needs_dA, needs_dB, order, keys, gemm=self.gemm)

    def wgmma_count(self) -> int:
        """Emulator: wgmma operations performed so far."""
        return self.ops.sim_stats()[6]

    # -- tolerance ------------------------------------------------------------------------------

    def check(self, got, ref_fn, args, names) -> None:
        """Each output of a raw op call against ref_fn(*args) (fused_lora.reference):

        * cuda_cpu: within a fixed tolerance of the reference run in the same dtype (the C++ CPU
          kernels do the reference's arithmetic: fp32 accumulation, one rounding);
        * the emulator: the 2x rule against fp64 (tests/_utils.check_op_vs_reference);
        * CUDA tensors: the 2x rule with the absolute floor scaled by the output's magnitude.
        A gradient not asked for must be empty, in the reference's dtype."""
        if self.kind == "cuda" and self.device == "cpu":
            for g, r, name in zip(got, ref_fn(*args), names):
                if r.numel() == 0:
                    assert g.numel() == 0 and g.dtype == r.dtype, name
                else:
                    close(g, r, name)
        else:
            check_op_vs_reference(got, ref_fn, args, names, scaled_atol=self.device == "cuda")


def _table() -> dict[str, Backend]:
    t = [Backend("torch", "torch", "torch", "cpu"),
         Backend("triton", "triton", "triton", TRITON_DEVICE),
         Backend("cuda_cpu", "cuda", "cuda", "cpu"),
         Backend("cuda", "cuda", "cuda", "cuda")]
    t += [Backend(f"triton_{p}", "triton", f"triton:{p}", TRITON_DEVICE)
          for p in ("decode", "prefill", "hybrid")]
    t += [Backend(f"cuda_{g}", "cuda", f"cuda:{g}", "cuda", gemm=i)
          for i, g in ((1, "mma"), (2, "wgmma"), (3, "wgmma256"))]
    for suffix, gemm in (("", 0), ("_wgmma", 2), ("_wgmma256", 3)):
        t += [Backend(f"sim{suffix}", "sim", None, "cpu", gemm=gemm),
              Backend(f"sim{suffix}_rev", "sim", None, "cpu", gemm=gemm, schedule=1)]
    return {b.name: b for b in t}


BACKENDS = _table()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "backends(*names, args=None, **cases): the backends a tests/ops test runs on "
                   "(tests/ops/conftest.py)")


def _marks(be: Backend) -> list:
    if be.kind in ("cuda",) and be.device == "cuda":
        return [pytest.mark.gpu]
    if be.kind == "triton" and INTERPRET:
        return [pytest.mark.interpreter]
    return []


def _id(name: str, v: object) -> str:
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, tuple) and v and all(isinstance(e, bool) for e in v):
        return name + "".join("1" if e else "0" for e in v)
    if isinstance(v, tuple) and all(isinstance(e, int) for e in v):
        return "x".join(map(str, v))
    if isinstance(v, str):
        return v
    if v is None:
        return f"no{name}"
    return f"{name}{v}"


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    mark = metafunc.definition.get_closest_marker("backends")
    if mark is None or not mark.kwargs:
        names = mark.args if mark is not None else metafunc.module.DEFAULT_BACKENDS
        params = [pytest.param(n, id=n, marks=_marks(BACKENDS[n])) for n in names]
        metafunc.parametrize("backend", params, indirect=True)
        return
    cases = dict(mark.kwargs)
    argnames = [a.strip() for a in cases.pop("args").split(",")]
    params = []
    for n, rows in cases.items():
        for row in rows:
            row = row if isinstance(row, tuple) and len(argnames) > 1 else (row,)
            assert len(row) == len(argnames), (metafunc.function.__name__, n, row)
            ids = "-".join([n] + [_id(a, v) for a, v in zip(argnames, row)])
            params.append(pytest.param(n, *row, id=ids, marks=_marks(BACKENDS[n])))
    metafunc.parametrize(["backend"] + argnames, params, indirect=["backend"])


@pytest.fixture
def backend(request, monkeypatch):
    be = BACKENDS[request.param]
    why = be.unavailable(request.module.OP)
    if why:
        pytest.skip(why)
    if be.name in ("triton_decode", "triton_prefill"):
        # split-K 2 on the decode path (the split is 1 on CPU otherwise): the partial-sum
        # reduction runs under the interpreter too.
        from fused_lora.kernels import multi_lora as ML

        split = ML._split_k
        monkeypatch.setattr(ML, "_split_k", lambda M, K, dev, sk: split(M, K, dev, 2 if sk is None else sk))
    flush = _flushes_denormals()
    if be.kind == "sim":
        # The emulator's fp32 arithmetic on subnormals is several times slower: flush them (as
        # the process did anyway once inductor-compiled fast-math code was loaded, before the
        # tests ran in tests/ops; the references run under the same mode).
        torch.set_flush_denormal(True)
    if be.schedule:
        be.ops.set_schedule(be.schedule)
    try:
        yield be
    finally:
        if be.schedule:
            be.ops.set_schedule(0)
        torch.set_flush_denormal(flush)


def _flushes_denormals() -> bool:
    """Whether this thread flushes subnormal floats to zero (torch has no getter)."""
    return (torch.tensor([1e-39]) * 1.0).item() == 0.0

