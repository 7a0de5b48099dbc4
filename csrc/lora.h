// Shared by the CPU (lora.cpp) and CUDA (gemm.cu, lora_linear_cuda.cu, multi_lora_cuda.cu)
// implementations of the fused_lora_C ops: the op schemas, the dropout hash, and the argument
// checks (TORCH_CHECK messages name the argument). The contract of every op is
// fused_lora/reference.py.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#ifdef __CUDACC__
#define FL_HD __host__ __device__ __forceinline__
#else
#define FL_HD inline
#endif

namespace fused_lora {

// Op schemas: the Python custom ops fused_lora::* (fused_lora/ops.py) have the same arguments
// plus a trailing `str backend`, with `Tensor? seed` where these take `int seed`, and without the
// C++-only trailing arguments they do not have (order, keys, gemm);
// tests/test_cuda_ext.py::test_schemas_match_python_ops enforces it.
//
// `int gemm` (every op, last): which tensor-core GEMM the CUDA kernels run for fp16/bf16 with
// M > 8 (the GEMV takes M <= 8, the SIMT kernel fp32, whatever gemm says): 0 = auto (wgmma
// 128x128 where fl_has_wgmma(), i.e. an sm_90a build on a compute capability 9.0 device, else
// mma.sync; mma.sync in the emulator), 1 = mma.sync, 2 = wgmma 128x128 tiles, 3 = wgmma 128x256
// tiles. 2 and 3 are an error where wgmma cannot run. An op argument, not an environment
// variable: read per launch, the variable cost a getenv on every call and could not differ
// between two calls in one process (bench, tests) without racing. The CPU kernels check the
// range and ignore it.
//
// `Tensor? order, Tensor? keys` (mixed adapters): the routing of adapter_ids, precomputed once
// per batch and shared by every layer (fused_lora/routing.py's plan): with key[t] = ids[t] if
// 0 <= ids[t] < n_slots else -1, order = the stable argsort of key (int64 [M]: rows without an
// adapter first) and keys = key[order] (int64 [M]). Both or neither; when given, the kernels use
// them instead of sorting (one at::sort per call, i.e. per layer and direction, saved). They
// are TRUSTED for speed: only their dtype, shape, device and contiguity are checked (no host
// sync), so they must be consistent with adapter_ids and n_slots; an inconsistent order gives
// wrong results (or out-of-bounds reads of row indices outside [0, M)), not an error.
constexpr const char* kFwdSchema =
    "lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
    "float scale, float dropout_p, int seed, int gemm=0) -> (Tensor, Tensor)";
constexpr const char* kBwdSchema =
    "lora_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor xa, "
    "float scale, float dropout_p, int seed, bool needs_dx, bool needs_dA, bool needs_dB, "
    "int gemm=0) -> (Tensor, Tensor, Tensor)";

constexpr const char* kMultiFwdSchema =
    "multi_lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
    "Tensor scales, Tensor adapter_ids, Tensor? ranks, Tensor? order=None, Tensor? keys=None, "
    "int gemm=0) -> (Tensor, Tensor)";
constexpr const char* kMultiBwdSchema =
    "multi_lora_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
    "Tensor scales, Tensor adapter_ids, Tensor? ranks, Tensor xa, bool needs_dx, bool needs_dA, "
    "bool needs_dB, Tensor? order=None, Tensor? keys=None, int gemm=0) -> (Tensor, Tensor, Tensor)";

// What gemm_choice(requested, device) answers: the GEMM a launch with `gemm=requested` on that
// device runs (1, 2 or 3; never 0), or the launch's error. Registered by lora.cpp.
constexpr const char* kGemmChoiceSchema = "gemm_choice(int requested, int device) -> int";

// gemm.cu (the CUDA build and the emulator): the op behind kGemmChoiceSchema.
int64_t gemm_choice(int64_t requested, int64_t device);

// The values of `int gemm`.
enum : int64_t { kGemmAuto = 0, kGemmMma = 1, kGemmWgmma = 2, kGemmWgmma256 = 3 };

inline const char* gemm_name(int64_t gemm) {
  switch (gemm) {
    case kGemmAuto: return "auto";
    case kGemmMma: return "mma";
    case kGemmWgmma: return "wgmma";
    case kGemmWgmma256: return "wgmma256";
    default: return "?";
  }
}

inline void check_gemm(int64_t gemm) {
  TORCH_CHECK(gemm >= kGemmAuto && gemm <= kGemmWgmma256,
              "gemm must be 0 (auto), 1 (mma), 2 (wgmma) or 3 (wgmma256), got ", gemm);
}

// ---- Dropout: fused_lora.reference.dropout_hash, bit for bit ---------------------------------
// lowbias32 twice; keys are the two 31-bit halves of the 62-bit seed; element (m, k) of an
// [M, K] input has index m*K + k and is kept iff (hash >> 8) >= round(p * 2^24).
struct Dropout {
  uint32_t k1 = 0, k2 = 0, thresh = 0;
  bool on = false;
  float scale = 1.f;  // 1 / (1 - p), as fp32 (the reference multiplies an fp32 tensor by it)
};

inline Dropout make_dropout(double p, int64_t seed) {
  Dropout d;
  d.on = p > 0.0;
  if (d.on) {
    d.k1 = static_cast<uint32_t>(seed & 0x7FFFFFFF);
    d.k2 = static_cast<uint32_t>((seed >> 31) & 0x7FFFFFFF);
    // Python's round() is round-half-even, as is nearbyint in the default rounding mode.
    d.thresh = static_cast<uint32_t>(std::nearbyint(p * 16777216.0));
    d.scale = static_cast<float>(1.0 / (1.0 - p));
  }
  return d;
}

FL_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

FL_HD bool keep(int64_t index, uint32_t k1, uint32_t k2, uint32_t thresh) {
  const uint32_t lo = static_cast<uint32_t>(index);
  const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(index) >> 32);
  uint32_t h = hash32(lo ^ k1);
  h = hash32(h ^ (k2 + hi * 0x9E3779B9u));
  return (h >> 8) >= thresh;
}

// ---- Argument checks -------------------------------------------------------------------------

inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline void check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                         const at::Tensor& lora_B, double dropout_p) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [M, in_features], got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [out_features, in_features], got ",
              weight.dim(), "-D");
  TORCH_CHECK(lora_A.dim() == 2, "lora_A must be 2-D [r, in_features], got ", lora_A.dim(), "-D");
  TORCH_CHECK(lora_B.dim() == 2, "lora_B must be 2-D [out_features, r], got ", lora_B.dim(), "-D");
  TORCH_CHECK(is_kernel_float(x.scalar_type()), "x must be fp16, bf16, fp32 or fp64, got ",
              x.scalar_type());
  const int64_t K = x.size(1), N = weight.size(0), R = lora_A.size(0);
  TORCH_CHECK(weight.size(1) == K, "weight must be [out_features, in_features=", K, "], got ",
              weight.sizes());
  TORCH_CHECK(R >= 1, "lora_A must have rank r >= 1, got ", lora_A.sizes());
  TORCH_CHECK(lora_A.size(1) == K, "lora_A must be [r, in_features=", K, "], got ",
              lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == N && lora_B.size(1) == R, "lora_B must be [out_features=", N,
              ", r=", R, "], got ", lora_B.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype (", weight.scalar_type(),
              ") must match x dtype (", x.scalar_type(), ")");
  TORCH_CHECK(lora_B.scalar_type() == lora_A.scalar_type(), "lora_B dtype (",
              lora_B.scalar_type(), ") must match lora_A dtype (", lora_A.scalar_type(), ")");
  TORCH_CHECK(lora_A.scalar_type() == x.scalar_type() || lora_A.scalar_type() == at::kFloat,
              "lora_A dtype (", lora_A.scalar_type(), ") must be x's dtype (", x.scalar_type(),
              ") or float32");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ",
              dropout_p);
  const auto dev = x.device();
  TORCH_CHECK(weight.device() == dev, "weight is on ", weight.device(), " but x is on ", dev);
  TORCH_CHECK(lora_A.device() == dev, "lora_A is on ", lora_A.device(), " but x is on ", dev);
  TORCH_CHECK(lora_B.device() == dev, "lora_B is on ", lora_B.device(), " but x is on ", dev);
}

inline void check_fwd(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                      const at::Tensor& lora_B, double dropout_p) {
  check_common(x, weight, lora_A, lora_B, dropout_p);
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0), "bias must be [out_features=",
                weight.size(0), "], got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "bias dtype (", b.scalar_type(),
                ") must match x dtype (", x.scalar_type(), ")");
    TORCH_CHECK(b.device() == x.device(), "bias is on ", b.device(), " but x is on ", x.device());
  }
}

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
                      double dropout_p) {
  check_common(x, weight, lora_A, lora_B, dropout_p);
  const int64_t M = x.size(0), N = weight.size(0), R = lora_A.size(0);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == M && dy.size(1) == N, "dy must be [M=", M,
              ", out_features=", N, "], got ", dy.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "dy dtype (", dy.scalar_type(),
              ") must match x dtype (", x.scalar_type(), ")");
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == M && xa.size(1) == R, "xa must be [M=", M, ", r=", R,
              "], got ", xa.sizes());
  TORCH_CHECK(xa.scalar_type() == acc_type(x.scalar_type()), "xa must be ",
              acc_type(x.scalar_type()), " (the forward's accumulation dtype), got ",
              xa.scalar_type());
  TORCH_CHECK(dy.device() == x.device(), "dy is on ", dy.device(), " but x is on ", x.device());
  TORCH_CHECK(xa.device() == x.device(), "xa is on ", xa.device(), " but x is on ", x.device());
}

// Mixed adapters: x [M, K], weight [N, K], lora_A [S, R, K], lora_B [S, N, R], scales [S],
// adapter_ids int64 [M], ranks int64 [S] or None.
inline void check_multi(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                        const at::Tensor& lora_B, const at::Tensor& scales,
                        const at::Tensor& adapter_ids, const std::optional<at::Tensor>& ranks) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [M, in_features], got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [out_features, in_features], got ",
              weight.dim(), "-D");
  TORCH_CHECK(is_kernel_float(x.scalar_type()), "x must be fp16, bf16, fp32 or fp64, got ",
              x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "weight must be [out_features, in_features=", K, "], got ",
              weight.sizes());
  TORCH_CHECK(lora_A.dim() == 3 && lora_A.size(2) == K, "lora_A must be [n_slots, r_max, ",
              "in_features=", K, "], got ", lora_A.sizes());
  const int64_t S = lora_A.size(0), R = lora_A.size(1);
  TORCH_CHECK(lora_B.dim() == 3 && lora_B.size(0) == S && lora_B.size(1) == N &&
                  lora_B.size(2) == R,
              "lora_B must be [n_slots=", S, ", out_features=", N, ", r_max=", R, "], got ",
              lora_B.sizes());
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == S && scales.is_floating_point(),
              "scales must be a floating [n_slots=", S, "] tensor, got ", scales.scalar_type(),
              " ", scales.sizes());
  TORCH_CHECK(adapter_ids.dim() == 1 && adapter_ids.size(0) == M &&
                  adapter_ids.scalar_type() == at::kLong,
              "adapter_ids must be int64 [M=", M, "], got ", adapter_ids.scalar_type(), " ",
              adapter_ids.sizes());
  if (ranks.has_value())
    TORCH_CHECK(ranks->dim() == 1 && ranks->size(0) == S && ranks->scalar_type() == at::kLong,
                "ranks must be int64 [n_slots=", S, "] or None, got ", ranks->scalar_type(), " ",
                ranks->sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype (", weight.scalar_type(),
              ") must match x dtype (", x.scalar_type(), ")");
  TORCH_CHECK(lora_B.scalar_type() == lora_A.scalar_type(), "lora_B dtype (",
              lora_B.scalar_type(), ") must match lora_A dtype (", lora_A.scalar_type(), ")");
  TORCH_CHECK(lora_A.scalar_type() == x.scalar_type() || lora_A.scalar_type() == at::kFloat,
              "lora_A dtype (", lora_A.scalar_type(), ") must be x's dtype (", x.scalar_type(),
              ") or float32");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be [out_features=", N,
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias dtype (", bias->scalar_type(),
                ") must match x dtype (", x.scalar_type(), ")");
  }
  const auto dev = x.device();
  TORCH_CHECK(weight.device() == dev, "weight is on ", weight.device(), " but x is on ", dev);
  TORCH_CHECK(lora_A.device() == dev, "lora_A is on ", lora_A.device(), " but x is on ", dev);
  TORCH_CHECK(lora_B.device() == dev, "lora_B is on ", lora_B.device(), " but x is on ", dev);
  TORCH_CHECK(scales.device() == dev, "scales is on ", scales.device(), " but x is on ", dev);
  TORCH_CHECK(adapter_ids.device() == dev, "adapter_ids is on ", adapter_ids.device(),
              " but x is on ", dev);
  if (ranks.has_value())
    TORCH_CHECK(ranks->device() == dev, "ranks is on ", ranks->device(), " but x is on ", dev);
  if (bias.has_value())
    TORCH_CHECK(bias->device() == dev, "bias is on ", bias->device(), " but x is on ", dev);
}

// The precomputed routing (see the schemas above): both or neither, int64 [M], contiguous, on
// x's device. Shape checks only: their values are trusted (no host sync).
inline bool check_routing(int64_t M, const at::Device& device,
                          const std::optional<at::Tensor>& order,
                          const std::optional<at::Tensor>& keys) {
  TORCH_CHECK(order.has_value() == keys.has_value(),
              "order and keys must be given together (the routing plan's two tensors) or both "
              "be None; got order=", order.has_value() ? "Tensor" : "None",
              ", keys=", keys.has_value() ? "Tensor" : "None");
  if (!order.has_value()) return false;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{*order, "order"},
                                std::pair<const at::Tensor&, const char*>{*keys, "keys"}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == M && t.scalar_type() == at::kLong, name,
                " must be int64 [M=", M, "], got ", t.scalar_type(), " ", t.sizes());
    TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but x is on ", device);
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
  }
  return true;
}

// The routing of x's M = x.size(0) rows (the single- and mixed-adapter ops).
inline bool check_routing(const at::Tensor& x, const std::optional<at::Tensor>& order,
                          const std::optional<at::Tensor>& keys) {
  return check_routing(x.size(0), x.device(), order, keys);
}

inline void check_multi_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& lora_A, const at::Tensor& xa) {
  const int64_t M = x.size(0), N = weight.size(0), R = lora_A.size(1);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == M && dy.size(1) == N, "dy must be [M=", M,
              ", out_features=", N, "], got ", dy.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "dy dtype (", dy.scalar_type(),
              ") must match x dtype (", x.scalar_type(), ")");
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == M && xa.size(1) == R, "xa must be [M=", M,
              ", r_max=", R, "], got ", xa.sizes());
  TORCH_CHECK(xa.scalar_type() == acc_type(x.scalar_type()), "xa must be ",
              acc_type(x.scalar_type()), " (the forward's accumulation dtype), got ",
              xa.scalar_type());
  TORCH_CHECK(dy.device() == x.device(), "dy is on ", dy.device(), " but x is on ", x.device());
  TORCH_CHECK(xa.device() == x.device(), "xa is on ", xa.device(), " but x is on ", x.device());
}


// ---- mixture of experts (fused_lora.reference.moe_lora_linear_fwd / _bwd) ---------------------
// y[m] = x[m // topk] W[e]^T + b[e] + scale * ss[a] (drop(x)[m] A[a, e]^T) B[a, e]^T for the
// op's M = T * topk rows, on x [T, K] (row m reads x[m // topk] in place: a token's top-k rows
// are never copied), weight [E, N, K] (any strides: a transposed view of an [E, K, N] tensor is
// read in place), bias [E, N], and either one adapter per expert (lora_A [E, R, K], lora_B
// [E, N, R]) or adapter banks (lora_A [S, E, R, K], lora_B [S, E, N, R], slot_scales None or
// float32 [S] = ss). `Tensor expert_ids` (int64 [M]) is the routing plan's ids (the Python ops'
// `plan` unpacked), virtual experts (MoeGroups below): one adapter per expert, id e in [0, E)
// is expert e with its adapter; banks, id (a + 1) * E + e is adapter a on expert e and ids in
// [0, E) are expert e alone (the base, bit for bit: no LoRA term at all). A row whose id is
// outside [0, n_virtual) belongs to no expert: its y / xa rows are exact zeros and it adds
// nothing to dx / dA / dB. xa / dy are [M, R] / [M, N]; dx [T, K] sums each token's topk rows in
// fp32, in row order. Dropout keys on the op's row: element (m, k) of an [M, K] input.
// `order`, `keys`: the routing of expert_ids over n_virtual ids, exactly as for the
// mixed-adapter ops above (trusted).
// `Tensor? slot_scales=None, int topk=1` come last, after the C++-only arguments (the Python op
// has them before `impl`): appended, so calls written against the schema without them (order,
// keys and gemm passed by position) still work.
constexpr const char* kMoeFwdSchema =
    "moe_lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
    "float scale, float dropout_p, int seed, Tensor expert_ids, Tensor? order=None, "
    "Tensor? keys=None, int gemm=0, Tensor? slot_scales=None, int topk=1) -> (Tensor, Tensor)";
constexpr const char* kMoeBwdSchema =
    "moe_lora_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
    "Tensor xa, float scale, float dropout_p, int seed, Tensor expert_ids, bool needs_dx, "
    "bool needs_dA, bool needs_dB, Tensor? order=None, Tensor? keys=None, int gemm=0, "
    "Tensor? slot_scales=None, int topk=1) -> (Tensor, Tensor, Tensor)";

// The virtual experts of a call: group (id) g in [0, n_virtual) runs base expert g % E with
// adapter g / E - lora_off, lora_off = 1 with adapter banks (ids [0, E): adapter -1, the base
// alone) and 0 with one adapter per expert (adapter 0: lora_A [E, ...] is a bank of one).
struct MoeGroups {
  int64_t E = 1;
  int64_t lora_off = 0;
  FL_HD int64_t expert(int64_t g) const { return g % E; }
  FL_HD int64_t adapter(int64_t g) const { return g / E - lora_off; }
  FL_HD int64_t first_lora() const { return lora_off * E; }  // the first id with a LoRA term
};

// The sizes of a MoE call, from check_moe.
struct MoeDims {
  int64_t T = 0, topk = 1, M = 0, K = 0, E = 0, N = 0, R = 0;
  int64_t S = 1;       // adapters per expert (the bank's S; 1 without banks)
  bool banks = false;  // lora_A [S, E, R, K]
  int64_t n_virtual = 0;
  MoeGroups groups() const { return MoeGroups{E, banks ? 1 : 0}; }
};

inline MoeDims check_moe(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                         const at::Tensor& lora_B, const at::Tensor& expert_ids, double dropout_p,
                         const std::optional<at::Tensor>& slot_scales, int64_t topk) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [T, in_features], got ", x.dim(), "-D");
  TORCH_CHECK(is_kernel_float(x.scalar_type()), "x must be fp16, bf16, fp32 or fp64, got ",
              x.scalar_type());
  TORCH_CHECK(weight.dim() == 3, "weight must be 3-D [E, out_features, in_features], got ",
              weight.dim(), "-D");
  TORCH_CHECK(topk >= 1, "topk must be >= 1 (rows of the op per row of x), got ", topk);
  MoeDims d;
  d.T = x.size(0);
  d.topk = topk;
  d.K = x.size(1);
  d.E = weight.size(0);
  d.N = weight.size(1);
  TORCH_CHECK(d.T <= (int64_t(1) << 62) / topk, "x: T * topk overflows int64 (T=", d.T,
              ", topk=", topk, ")");
  d.M = d.T * topk;
  const int64_t M = d.M, K = d.K, E = d.E, N = d.N;
  TORCH_CHECK(E >= 1, "weight must hold at least one expert [E, out, in], got ", weight.sizes());
  TORCH_CHECK(weight.size(2) == K, "weight must be [E, out_features, in_features=", K, "], got ",
              weight.sizes());
  d.banks = lora_A.dim() == 4;
  if (d.banks) {
    TORCH_CHECK(lora_A.size(0) >= 1 && lora_A.size(1) == E && lora_A.size(3) == K,
                "lora_A must be [S, E=", E, ", r, in_features=", K, "] (a bank of S >= 1 "
                "adapters), got ", lora_A.sizes());
    d.S = lora_A.size(0);
    d.R = lora_A.size(2);
    TORCH_CHECK(lora_B.dim() == 4 && lora_B.size(0) == d.S && lora_B.size(1) == E &&
                    lora_B.size(2) == N && lora_B.size(3) == d.R,
                "lora_B must be [S=", d.S, ", E=", E, ", out_features=", N, ", r=", d.R,
                "], got ", lora_B.sizes());
    TORCH_CHECK(d.S + 1 <= std::numeric_limits<int64_t>::max() / E, "lora_A: (S + 1) * E "
                "overflows int64");
    d.n_virtual = (d.S + 1) * E;
  } else {
    TORCH_CHECK(lora_A.dim() == 3 && lora_A.size(0) == E && lora_A.size(2) == K,
                "lora_A must be [E=", E, ", r, in_features=", K, "] or a bank [S, E=", E,
                ", r, in_features=", K, "], got ", lora_A.sizes());
    d.R = lora_A.size(1);
    TORCH_CHECK(lora_B.dim() == 3 && lora_B.size(0) == E && lora_B.size(1) == N &&
                    lora_B.size(2) == d.R,
                "lora_B must be [E=", E, ", out_features=", N, ", r=", d.R, "], got ",
                lora_B.sizes());
    d.n_virtual = E;
  }
  TORCH_CHECK(d.R >= 1, "lora_A must have rank r >= 1, got ", lora_A.sizes());
  TORCH_CHECK(expert_ids.dim() == 1 && expert_ids.size(0) == M &&
                  expert_ids.scalar_type() == at::kLong,
              "expert_ids must be int64 [M=", M, "] (T=", d.T, " x topk=", topk, "), got ",
              expert_ids.scalar_type(), " ", expert_ids.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype (", weight.scalar_type(),
              ") must match x dtype (", x.scalar_type(), ")");
  TORCH_CHECK(lora_B.scalar_type() == lora_A.scalar_type(), "lora_B dtype (",
              lora_B.scalar_type(), ") must match lora_A dtype (", lora_A.scalar_type(), ")");
  TORCH_CHECK(lora_A.scalar_type() == x.scalar_type() || lora_A.scalar_type() == at::kFloat,
              "lora_A dtype (", lora_A.scalar_type(), ") must be x's dtype (", x.scalar_type(),
              ") or float32");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ",
              dropout_p);
  if (slot_scales.has_value()) {
    TORCH_CHECK(d.banks, "slot_scales (one scale per adapter) needs adapter banks lora_A "
                "[S, E, r, in], got lora_A ", lora_A.sizes());
    TORCH_CHECK(slot_scales->dim() == 1 && slot_scales->size(0) == d.S &&
                    slot_scales->scalar_type() == at::kFloat,
                "slot_scales must be float32 [S=", d.S, "], got ", slot_scales->scalar_type(),
                " ", slot_scales->sizes());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == N,
                "bias must be [E=", E, ", out_features=", N, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias dtype (", bias->scalar_type(),
                ") must match x dtype (", x.scalar_type(), ")");
  }
  const auto dev = x.device();
  TORCH_CHECK(weight.device() == dev, "weight is on ", weight.device(), " but x is on ", dev);
  TORCH_CHECK(lora_A.device() == dev, "lora_A is on ", lora_A.device(), " but x is on ", dev);
  TORCH_CHECK(lora_B.device() == dev, "lora_B is on ", lora_B.device(), " but x is on ", dev);
  TORCH_CHECK(expert_ids.device() == dev, "expert_ids is on ", expert_ids.device(),
              " but x is on ", dev);
  if (bias.has_value())
    TORCH_CHECK(bias->device() == dev, "bias is on ", bias->device(), " but x is on ", dev);
  if (slot_scales.has_value())
    TORCH_CHECK(slot_scales->device() == dev, "slot_scales is on ", slot_scales->device(),
                " but x is on ", dev);
  return d;
}

inline void check_moe_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& xa,
                          const MoeDims& d) {
  const int64_t M = d.M, N = d.N, R = d.R;
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == M && dy.size(1) == N, "dy must be [M=", M,
              ", out_features=", N, "], got ", dy.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "dy dtype (", dy.scalar_type(),
              ") must match x dtype (", x.scalar_type(), ")");
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == M && xa.size(1) == R, "xa must be [M=", M, ", r=", R,
              "], got ", xa.sizes());
  TORCH_CHECK(xa.scalar_type() == acc_type(x.scalar_type()), "xa must be ",
              acc_type(x.scalar_type()), " (the forward's accumulation dtype), got ",
              xa.scalar_type());
  TORCH_CHECK(dy.device() == x.device(), "dy is on ", dy.device(), " but x is on ", x.device());
  TORCH_CHECK(xa.device() == x.device(), "xa is on ", xa.device(), " but x is on ", x.device());
}

}  // namespace fused_lora
