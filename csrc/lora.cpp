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
// Loops over the experts and virtual experts present (group_rows over the n_virtual ids; ids
// outside [0, n_virtual) belong to none), in the reference's order of operations: the base
// GEMM per expert over every row of that expert (whatever its adapter), then the LoRA term per
// adapter x expert; rows of no expert keep their zeros. x's rows are gathered per expert as
// x[m // topk] (no top-k copy of x); dropout keys on the op's row m.

// Rows of each base expert e (the ids g with g % E == e), ascending as the reference's
// nonzero(), so a row's base GEMM sees the same row set whatever the adapters.
std::map<int64_t, std::vector<int64_t>> moe_base_rows(
    const std::map<int64_t, std::vector<int64_t>>& groups, const MoeGroups& mg) {
  std::map<int64_t, std::vector<int64_t>> base;
  for (const auto& [g, rows] : groups) {
    auto& b = base[mg.expert(g)];
    b.insert(b.end(), rows.begin(), rows.end());
  }
  for (auto& [e, rows] : base) std::sort(rows.begin(), rows.end());
  return base;
}

// Op rows -> rows of x (m // topk).
at::Tensor moe_x_rows(const at::Tensor& rows, int64_t topk) {
  return topk > 1 ? at::div(rows, topk, "floor") : rows;
}

// The LoRA scale of adapter a: scale, times slot_scales[a] (in the accumulation dtype, as the
// reference's scale * slot_scales[a]) when given.
at::Tensor moe_lora_scale(double scale, const std::optional<at::Tensor>& slot_scales, int64_t a,
                          at::ScalarType acc) {
  if (!slot_scales.has_value()) return at::scalar_tensor(scale, at::TensorOptions().dtype(acc));
  return slot_scales->select(0, a).to(acc) * scale;
}

// lora_A / lora_B as a flat list of adapter x expert entries: [L, ...] with entry a * E + e
// (a reshape of a bank, the tensor itself without banks).
at::Tensor moe_flat(const at::Tensor& t) {
  return t.dim() == 4 ? t.reshape({-1, t.size(2), t.size(3)}) : t;
}

std::tuple<at::Tensor, at::Tensor> moe_lora_linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
    int64_t seed, const at::Tensor& expert_ids, const std::optional<at::Tensor>& order,
    const std::optional<at::Tensor>& keys, int64_t gemm,
    const std::optional<at::Tensor>& slot_scales, int64_t topk) {
  const MoeDims md = check_moe(x, weight, bias, lora_A, lora_B, expert_ids, dropout_p,
                               slot_scales, topk);
  check_routing(md.M, x.device(), order, keys);
  check_gemm(gemm);
  const auto acc = acc_type(x.scalar_type());
  const MoeGroups mg = md.groups();
  const auto d = make_dropout(dropout_p, seed);
  const auto xf = x.to(acc);
  auto y = at::zeros({md.M, md.N}, x.options().dtype(acc));
  auto xa = at::zeros({md.M, md.R}, x.options().dtype(acc));
  const auto groups = group_rows(expert_ids, md.n_virtual, order, keys);
  for (const auto& [e, rows_v] : moe_base_rows(groups, mg)) {
    const auto rows = rows_tensor(rows_v);
    auto ye = at::mm(xf.index_select(0, moe_x_rows(rows, topk)), weight.select(0, e).to(acc).t());
    if (bias.has_value()) ye = ye + bias->select(0, e).to(acc);
    y.index_copy_(0, rows, ye);
  }
  at::Tensor keep_m;
  const auto A = moe_flat(lora_A), B = moe_flat(lora_B);
  for (const auto& [g, rows_v] : groups) {
    if (g < mg.first_lora()) continue;  // a bank's base-only ids: no LoRA term
    const int64_t lv = g - mg.first_lora();  // adapter a * E + expert e
    const auto rows = rows_tensor(rows_v);
    auto xs = xf.index_select(0, moe_x_rows(rows, topk));
    if (d.on) {
      if (!keep_m.defined()) keep_m = keep_mask_cpu(md.M, md.K, d);
      xs = at::where(keep_m.index_select(0, rows), xs * (1.0 / (1.0 - dropout_p)),
                     at::zeros({}, xs.options()));
    }
    xs = at::mm(xs, A.select(0, lv).to(acc).t());
    xa.index_copy_(0, rows, xs);
    const auto s = moe_lora_scale(scale, slot_scales, mg.adapter(g), acc);
    y.index_copy_(0, rows, y.index_select(0, rows) + s * at::mm(xs, B.select(0, lv).to(acc).t()));
  }
  return {y.to(x.scalar_type()), xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_lora_linear_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scale, double dropout_p, int64_t seed,
    const at::Tensor& expert_ids, bool needs_dx, bool needs_dA, bool needs_dB,
    const std::optional<at::Tensor>& order, const std::optional<at::Tensor>& keys, int64_t gemm,
    const std::optional<at::Tensor>& slot_scales, int64_t topk) {
  const MoeDims md = check_moe(x, weight, std::nullopt, lora_A, lora_B, expert_ids, dropout_p,
                               slot_scales, topk);
  check_moe_bwd(dy, x, xa, md);
  check_routing(md.M, x.device(), order, keys);
  check_gemm(gemm);
  const auto acc = acc_type(x.scalar_type());
  const MoeGroups mg = md.groups();
  const auto d = make_dropout(dropout_p, seed);
  const auto dyf = dy.to(acc);
  const auto xf = x.to(acc);
  at::Tensor dxf, dA, dB, keep_m;
  if (needs_dx) dxf = at::zeros({md.M, md.K}, x.options().dtype(acc));  // the op's M rows
  if (needs_dA) dA = at::zeros(lora_A.sizes(), lora_A.options().dtype(acc));
  if (needs_dB) dB = at::zeros(lora_B.sizes(), lora_B.options().dtype(acc));
  if (d.on && (needs_dx || needs_dA)) keep_m = keep_mask_cpu(md.M, md.K, d);
  const auto groups = group_rows(expert_ids, md.n_virtual, order, keys);
  if (needs_dx) {
    for (const auto& [e, rows_v] : moe_base_rows(groups, mg)) {
      const auto rows = rows_tensor(rows_v);
      dxf.index_copy_(0, rows, at::mm(dyf.index_select(0, rows), weight.select(0, e).to(acc)));
    }
  }
  const auto A = moe_flat(lora_A), B = moe_flat(lora_B);
  const auto dAf = needs_dA ? moe_flat(dA) : at::Tensor();  // views (dA, dB are contiguous)
  const auto dBf = needs_dB ? moe_flat(dB) : at::Tensor();
  const double inv_keep = 1.0 / (1.0 - dropout_p);
  for (const auto& [g, rows_v] : groups) {
    if (g < mg.first_lora() || !(needs_dx || needs_dA || needs_dB)) continue;
    const int64_t lv = g - mg.first_lora();
    const auto rows = rows_tensor(rows_v);
    const auto s = moe_lora_scale(scale, slot_scales, mg.adapter(g), acc);
    const auto gr = dyf.index_select(0, rows);
    const auto ds = s * at::mm(gr, B.select(0, lv).to(acc));  // [m, r]
    if (needs_dx) {
      auto dxl = at::mm(ds, A.select(0, lv).to(acc));
      if (d.on)
        dxl = at::where(keep_m.index_select(0, rows), dxl * inv_keep, at::zeros({}, dxl.options()));
      dxf.index_copy_(0, rows, dxf.index_select(0, rows) + dxl);
    }
    if (needs_dA) {
      auto xd = xf.index_select(0, moe_x_rows(rows, topk));
      if (d.on)
        xd = at::where(keep_m.index_select(0, rows), xd * inv_keep, at::zeros({}, xd.options()));
      dAf.select(0, lv).copy_(at::mm(ds.t(), xd));
    }
    if (needs_dB)
      dBf.select(0, lv).copy_(s * at::mm(gr.t(), xa.index_select(0, rows).to(acc)));
  }
  at::Tensor dx = at::empty({0}, x.options());
  if (needs_dx) {  // each token's topk rows, summed in fp32 (fp64 for fp64 x) as the reference
    if (topk > 1) dxf = dxf.view({md.T, topk, md.K}).sum(1);
    dx = dxf.to(x.scalar_type());
  }
  return {dx, needs_dA ? dA.to(lora_A.scalar_type()) : at::empty({0}, lora_A.options()),
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
