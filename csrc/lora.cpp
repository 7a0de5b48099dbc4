// fused_lora._C: the fused_lora_C op library (schemas + CPU kernels). CUDA kernels are in
// lora_cuda.cu, compiled only with -DFUSED_LORA_WITH_CUDA (setup.py decides).
//
// The CPU kernels follow fused_lora/reference.py op for op (fp32 accumulation, fp64 for fp64
// inputs, the same dropout hash), so CPU CI tests the binding, the TORCH_CHECKs and the numerics
// of everything except the CUDA kernels themselves.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <vector>

#include "lora.h"

namespace fused_lora {
namespace {

// Keep-mask [M, K] of an [M, K] row-major input (the reference's dropout_keep_mask).
at::Tensor keep_mask_cpu(int64_t M, int64_t K, const Dropout& d) {
  auto mask = at::empty({M, K}, at::TensorOptions().dtype(at::kBool));
  bool* out = mask.data_ptr<bool>();
  // 1<<14 elements per task: the hash is ~10 integer ops, so smaller grains cost more in
  // scheduling than they save.
  at::parallel_for(0, M * K, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = keep(i, d.k1, d.k2, d.thresh);
  });
  return mask;
}

// drop(t) in the accumulation dtype: t * keep / (1 - p). The factor goes in as a double Scalar,
// as the reference's Python float does (ATen rounds it to fp32 for fp32 tensors, keeps it for
// fp64 ones).
at::Tensor dropped(const at::Tensor& t, double dropout_p, const Dropout& d) {
  if (!d.on) return t;
  auto keep_m = keep_mask_cpu(t.size(0), t.size(1), d);
  return at::where(keep_m, t * (1.0 / (1.0 - dropout_p)), at::zeros({}, t.options()));
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
    int64_t seed, int64_t gemm) {
  check_fwd(x, weight, bias, lora_A, lora_B, dropout_p);
  check_gemm(gemm);  // a CUDA-kernel choice: checked here too, so a bad value fails everywhere
  const auto acc = acc_type(x.scalar_type());
  const auto d = make_dropout(dropout_p, seed);
  auto xf = x.to(acc);
  auto xa = at::mm(dropped(xf, dropout_p, d), lora_A.to(acc).t());
  auto y = at::mm(xf, weight.to(acc).t());
  if (bias.has_value()) y = y + bias->to(acc);
  y = y + scale * at::mm(xa, lora_B.to(acc).t());
  return {y.to(x.scalar_type()), xa.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scale, double dropout_p, int64_t seed,
    bool needs_dx, bool needs_dA, bool needs_dB, int64_t gemm) {
  check_bwd(dy, x, weight, lora_A, lora_B, xa, dropout_p);
  check_gemm(gemm);
  const auto acc = acc_type(x.scalar_type());
  const auto d = make_dropout(dropout_p, seed);
  auto dyf = dy.to(acc);
  at::Tensor ds;
  if (needs_dx || needs_dA) ds = scale * at::mm(dyf, lora_B.to(acc));
  at::Tensor dx = at::empty({0}, x.options());
  if (needs_dx) {
    auto dxl = dropped(at::mm(ds, lora_A.to(acc)), dropout_p, d);
    dx = (at::mm(dyf, weight.to(acc)) + dxl).to(x.scalar_type());
  }
  at::Tensor dA = at::empty({0}, lora_A.options());
  if (needs_dA) dA = at::mm(ds.t(), dropped(x.to(acc), dropout_p, d)).to(lora_A.scalar_type());
  at::Tensor dB = at::empty({0}, lora_B.options());
  if (needs_dB) dB = (scale * at::mm(dyf.t(), xa.to(acc))).to(lora_B.scalar_type());
  return {dx, dA, dB};
}

// ---- mixed adapters (fused_lora.reference.multi_lora_linear_fwd / _bwd) ------------------------

// Rows of each slot present in the batch, in row order; ids outside [0, n_slots) act as -1.
// With the precomputed routing (order, keys: the stable sort of the ids), the segments of keys
// give the same groups in the same row order; slots outside [0, n_slots) are skipped there too
// (cheap on the CPU, and a bad plan must not index past lora_A).
std::map<int64_t, std::vector<int64_t>> group_rows(const at::Tensor& adapter_ids, int64_t S,
                                                   const std::optional<at::Tensor>& order,
                                                   const std::optional<at::Tensor>& keys) {
  std::map<int64_t, std::vector<int64_t>> groups;
  if (order.has_value()) {
    const int64_t* o = order->data_ptr<int64_t>();
    const int64_t* k = keys->data_ptr<int64_t>();
    const int64_t M = order->numel();
    for (int64_t i = 0; i < M; ++i)
      if (k[i] >= 0 && k[i] < S && o[i] >= 0 && o[i] < M) groups[k[i]].push_back(o[i]);
    return groups;
  }
  const auto ids = adapter_ids.contiguous();
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t m = 0; m < ids.numel(); ++m)
    if (p[m] >= 0 && p[m] < S) groups[p[m]].push_back(m);
  return groups;
}

// Live columns of a slot: min(max(ranks[slot], 0), r_max); columns past it are never read.
int64_t slot_rank(const std::optional<at::Tensor>& ranks, int64_t slot, int64_t R) {
  if (!ranks.has_value()) return R;
  return std::min(std::max(ranks->contiguous().data_ptr<int64_t>()[slot], int64_t(0)), R);
}

at::Tensor rows_tensor(const std::vector<int64_t>& rows) {
  return at::tensor(at::ArrayRef<int64_t>(rows), at::TensorOptions().dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor> multi_lora_linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scales,
    const at::Tensor& adapter_ids, const std::optional<at::Tensor>& ranks,
    const std::optional<at::Tensor>& order, const std::optional<at::Tensor>& keys,
    int64_t gemm) {
  check_multi(x, weight, bias, lora_A, lora_B, scales, adapter_ids, ranks);
  check_routing(x, order, keys);
  check_gemm(gemm);
  const auto acc = acc_type(x.scalar_type());
  const int64_t M = x.size(0), S = lora_A.size(0), R = lora_A.size(1);
  auto y = at::mm(x.to(acc), weight.to(acc).t());
  if (bias.has_value()) y = y + bias->to(acc);
  auto xa = at::zeros({M, R}, x.options().dtype(acc));
  for (const auto& [slot, rows_v] : group_rows(adapter_ids, S, order, keys)) {
    const int64_t r = slot_rank(ranks, slot, R);
    if (r == 0) continue;
    const auto rows = rows_tensor(rows_v);
    const auto a = lora_A.select(0, slot).narrow(0, 0, r).to(acc);  // [r, K]
    const auto b = lora_B.select(0, slot).narrow(1, 0, r).to(acc);  // [N, r]
    const auto sc = scales.select(0, slot).to(acc);
    const auto xs = at::mm(x.index_select(0, rows).to(acc), a.t());
    xa.narrow(1, 0, r).index_copy_(0, rows, xs);
    y.index_add_(0, rows, sc * at::mm(xs, b.t()));
  }
  return {y.to(x.scalar_type()), xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_lora_linear_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scales, const at::Tensor& adapter_ids,
    const std::optional<at::Tensor>& ranks, const at::Tensor& xa, bool needs_dx, bool needs_dA,
    bool needs_dB, const std::optional<at::Tensor>& order, const std::optional<at::Tensor>& keys,
    int64_t gemm) {
  check_multi(x, weight, std::nullopt, lora_A, lora_B, scales, adapter_ids, ranks);
  check_multi_bwd(dy, x, weight, lora_A, xa);
  check_routing(x, order, keys);
  check_gemm(gemm);
  const auto acc = acc_type(x.scalar_type());
  const int64_t S = lora_A.size(0), R = lora_A.size(1);
  const auto dyf = dy.to(acc);
  at::Tensor dxf, dA, dB;
  if (needs_dx) dxf = at::mm(dyf, weight.to(acc));
  if (needs_dA) dA = at::zeros(lora_A.sizes(), lora_A.options().dtype(acc));
  if (needs_dB) dB = at::zeros(lora_B.sizes(), lora_B.options().dtype(acc));
  for (const auto& [slot, rows_v] : group_rows(adapter_ids, S, order, keys)) {
    const int64_t r = slot_rank(ranks, slot, R);
    if (r == 0) continue;
    const auto rows = rows_tensor(rows_v);
    const auto sc = scales.select(0, slot).to(acc);
    const auto g = dyf.index_select(0, rows);
    const auto ds = sc * at::mm(g, lora_B.select(0, slot).narrow(1, 0, r).to(acc));  // [m, r]
    if (needs_dx)
      dxf.index_add_(0, rows, at::mm(ds, lora_A.select(0, slot).narrow(0, 0, r).to(acc)));
    if (needs_dA)
      dA.select(0, slot).narrow(0, 0, r).copy_(at::mm(ds.t(), x.index_select(0, rows).to(acc)));
    if (needs_dB)
      dB.select(0, slot).narrow(1, 0, r).copy_(
          sc * at::mm(g.t(), xa.index_select(0, rows).narrow(1, 0, r).to(acc)));
  }
  return {needs_dx ? dxf.to(x.scalar_type()) : at::empty({0}, x.options()),
          needs_dA ? dA.to(lora_A.scalar_type()) : at::empty({0}, lora_A.options()),
          needs_dB ? dB.to(lora_B.scalar_type()) : at::empty({0}, lora_B.options())};
}

// ---- mixture of experts (fused_lora.reference.moe_lora_linear_fwd / _bwd) -----------------------
// A loop over the experts present (group_rows: ids outside [0, E) belong to none), in the
// reference's order of operations; rows of no expert keep their zeros.

std::tuple<at::Tensor, at::Tensor> moe_lora_linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
    int64_t seed, const at::Tensor& expert_ids, const std::optional<at::Tensor>& order,
    const std::optional<at::Tensor>& keys, int64_t gemm) {
  check_moe(x, weight, bias, lora_A, lora_B, expert_ids, dropout_p);
  check_routing(x, order, keys);
  check_gemm(gemm);
  const auto acc = acc_type(x.scalar_type());
  const int64_t M = x.size(0), E = weight.size(0), N = weight.size(1), R = lora_A.size(1);
  const auto d = make_dropout(dropout_p, seed);
  const auto xf = x.to(acc);
  const auto xd = dropped(xf, dropout_p, d);
  auto y = at::zeros({M, N}, x.options().dtype(acc));
  auto xa = at::zeros({M, R}, x.options().dtype(acc));
  for (const auto& [e, rows_v] : group_rows(expert_ids, E, order, keys)) {
    const auto rows = rows_tensor(rows_v);
    auto ye = at::mm(xf.index_select(0, rows), weight.select(0, e).to(acc).t());
    if (bias.has_value()) ye = ye + bias->select(0, e).to(acc);
    const auto xs = at::mm(xd.index_select(0, rows), lora_A.select(0, e).to(acc).t());
    xa.index_copy_(0, rows, xs);
    y.index_copy_(0, rows, ye + scale * at::mm(xs, lora_B.select(0, e).to(acc).t()));
  }
  return {y.to(x.scalar_type()), xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_lora_linear_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scale, double dropout_p, int64_t seed,
    const at::Tensor& expert_ids, bool needs_dx, bool needs_dA, bool needs_dB,
    const std::optional<at::Tensor>& order, const std::optional<at::Tensor>& keys,
    int64_t gemm) {
  check_moe(x, weight, std::nullopt, lora_A, lora_B, expert_ids, dropout_p);
  check_moe_bwd(dy, x, weight, lora_A, xa);
  check_routing(x, order, keys);
  check_gemm(gemm);
  const auto acc = acc_type(x.scalar_type());
  const int64_t E = weight.size(0);
  const auto d = make_dropout(dropout_p, seed);
  const auto dyf = dy.to(acc);
  at::Tensor dxf, dA, dB, keep_m, xd;
  if (needs_dx) dxf = at::zeros(x.sizes(), x.options().dtype(acc));
  if (needs_dA) dA = at::zeros(lora_A.sizes(), lora_A.options().dtype(acc));
  if (needs_dB) dB = at::zeros(lora_B.sizes(), lora_B.options().dtype(acc));
  if (needs_dx && d.on) keep_m = keep_mask_cpu(x.size(0), x.size(1), d);
  if (needs_dA) xd = dropped(x.to(acc), dropout_p, d);
  for (const auto& [e, rows_v] : group_rows(expert_ids, E, order, keys)) {
    const auto rows = rows_tensor(rows_v);
    const auto g = dyf.index_select(0, rows);
    at::Tensor ds;
    if (needs_dx || needs_dA) ds = scale * at::mm(g, lora_B.select(0, e).to(acc));  // [m, r]
    if (needs_dx) {
      auto dxl = at::mm(ds, lora_A.select(0, e).to(acc));
      if (d.on)
        dxl = at::where(keep_m.index_select(0, rows), dxl * (1.0 / (1.0 - dropout_p)),
                        at::zeros({}, dxl.options()));
      dxf.index_copy_(0, rows, at::mm(g, weight.select(0, e).to(acc)) + dxl);
    }
    if (needs_dA) dA.select(0, e).copy_(at::mm(ds.t(), xd.index_select(0, rows)));
    if (needs_dB)
      dB.select(0, e).copy_(scale * at::mm(g.t(), xa.index_select(0, rows).to(acc)));
  }
  return {needs_dx ? dxf.to(x.scalar_type()) : at::empty({0}, x.options()),
          needs_dA ? dA.to(lora_A.scalar_type()) : at::empty({0}, lora_A.options()),
          needs_dB ? dB.to(lora_B.scalar_type()) : at::empty({0}, lora_B.options())};
}

bool has_cuda() {
#ifdef FUSED_LORA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

#ifndef FUSED_LORA_WITH_CUDA
int64_t gemm_choice_nocuda(int64_t requested, int64_t device) {
  check_gemm(requested);
  TORCH_CHECK(false, "gemm_choice: this build of fused_lora._C has no CUDA kernels "
              "(FUSED_LORA_SKIP_CUDA_BUILD or no toolkit), so no GEMM runs on device ", device);
  return kGemmMma;  // not reached
}
#endif

}  // namespace
}  // namespace fused_lora

TORCH_LIBRARY(fused_lora_C, m) {
  m.def(fused_lora::kFwdSchema);
  m.def(fused_lora::kBwdSchema);
  m.def(fused_lora::kMultiFwdSchema);
  m.def(fused_lora::kMultiBwdSchema);
  m.def(fused_lora::kMoeFwdSchema);
  m.def(fused_lora::kMoeBwdSchema);
  // True when this build has the CUDA kernels (FUSED_LORA_WITH_CUDA); no device needed.
  m.def("has_cuda() -> bool", &fused_lora::has_cuda);
  // What `int gemm=requested` runs on CUDA device `device` (python -m fused_lora info asks it
  // for 0, so the C++ rule is stated once, in gemm.cu). No tensors: a catch-all kernel.
#ifdef FUSED_LORA_WITH_CUDA
  m.def(fused_lora::kGemmChoiceSchema, &fused_lora::gemm_choice);
#else
  m.def(fused_lora::kGemmChoiceSchema, &fused_lora::gemm_choice_nocuda);
#endif
}

TORCH_LIBRARY_IMPL(fused_lora_C, CPU, m) {
  m.impl("lora_linear_fwd", &fused_lora::lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd", &fused_lora::lora_linear_bwd_cpu);
  m.impl("multi_lora_linear_fwd", &fused_lora::multi_lora_linear_fwd_cpu);
  m.impl("multi_lora_linear_bwd", &fused_lora::multi_lora_linear_bwd_cpu);
  m.impl("moe_lora_linear_fwd", &fused_lora::moe_lora_linear_fwd_cpu);
  m.impl("moe_lora_linear_bwd", &fused_lora::moe_lora_linear_bwd_cpu);
}

// `from fused_lora import _C` loads this library, which runs the registrations above. The module
// itself is empty: the ops live in torch.ops.fused_lora_C, so no pybind11 and one .so for every
// Python >= 3.9 (py_limited_api).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                          nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
