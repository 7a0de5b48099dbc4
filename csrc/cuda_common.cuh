// Shared by the CUDA kernel files (gemm.cu, lora_linear_cuda.cu, multi_lora_cuda.cu,
// moe_lora_cuda.cu): runtime
// dtype loaders, the GEMMs' initial-accumulator arguments (InitArgs), the mixed-adapter gather,
// host helpers and the GEMM launcher's declaration.
#pragma once

#include <limits>

#include "cuda_compat.cuh"
#include "lora.h"

namespace fused_lora {

// Runtime dtype codes for the SIMT loaders.
enum : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline int dt_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "fused_lora CUDA kernels take fp16, bf16 or fp32, got ", t);
  }
  return kF32;
}

__device__ __forceinline__ float ldf(const void* p, int64_t i, int dt) {
  if (dt == kF32) return static_cast<const float*>(p)[i];
  if (dt == kF16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ __forceinline__ void stf(void* p, int64_t i, int dt, float v) {
  if (dt == kF32) static_cast<float*>(p)[i] = v;
  else if (dt == kF16) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Initial accumulator of the GEMMs:
//   init(m, n) = alpha * keep(m, n) * sum_r L[m, r] * Rt[n, r] + bias[n]
// forward: L = xa, Rt = B, alpha = s, bias;  dx: L = ds, Rt = A^T, alpha = 1/(1-p), keep mask.
struct InitArgs {
  const float* L;
  int64_t sl_m, sl_r;
  const void* Rt;
  int64_t srt_n, srt_r;
  int rt_dt;
  int R;
  float alpha;
  const void* bias;  // nullptr: none
  int64_t s_bias;
  int bias_dt;
  Dropout drop;  // keep(m * N + n) of the [M, N] output
  // Mixed adapters (ids != nullptr): Rt is a stack [S, ...] gathered per row at slot ids[m]
  // (rows with ids outside [0, S) get no LoRA term), ranks past min(ranks[slot], R) are never
  // read (they may hold NaN), and the sum is multiplied by row_scale[slot] when given.
  const int64_t* ids;
  // Prefill (tensor-core GEMM only; other paths ignore it, their result is the same): logical
  // GEMM row i is physical row row_map[i] of P, C, L and ids, a permutation that sorts the rows
  // by slot, so a 128-row tile holds one or two slots and its LoRA term costs one or two
  // r-deep passes instead of a gather per element. nullptr: identity.
  const int64_t* row_map;
  int64_t n_slots;
  const int64_t* ranks;
  const float* row_scale;
  int64_t srt_s;
  // Grouped GEMM (MoE; launch_grouped_gemm only, nullptr elsewhere): the logical rows (sorted
  // positions; physical row row_map[i]) are cut into tiles of one group each. Tile t covers
  // logical rows [tiles[t], tiles[n_tiles + t]) of group g = tiles[2 n_tiles + t]; g = -1: rows
  // of no group, whose outputs are written as exact zeros; an empty range: an idle tile. Group g
  // is a virtual expert (lora.h, MoeGroups `groups`): Q and bias are stacks indexed by its base
  // expert e (strides sq_g, sbias_g), Rt a bank indexed by its adapter a and e (strides srt_a,
  // srt_s; Rt without ids), row_scale (when given) indexed by a; a < 0 (a bank's base-only ids):
  // no LoRA term. P's row of physical row pm is pm / p_topk (x [T, K] read for the op's
  // M = T * topk rows; p_topk <= 1: pm itself); C, L, the bias and the dropout mask take pm.
  const int* tiles;
  int n_tiles;
  int64_t sq_g;
  int64_t sbias_g;
  MoeGroups groups;
  int64_t srt_a;
  int p_topk;
};

// What a grouped-GEMM tile of group g reads (InitArgs: the grouped GEMM's fields); the default
// is the ungrouped GEMM's (expert 0, its one LoRA term).
struct TileGroup {
  int64_t expert = 0;      // Q / bias index
  int64_t rt_off = 0;      // offset of the group's Rt in the bank
  float lora_scale = 1.f;  // row_scale[adapter] or 1
  bool lora = true;        // false: the base alone (init = bias)
};

__device__ __forceinline__ TileGroup tile_group(const InitArgs& ia, int64_t g) {
  TileGroup tg;
  tg.expert = ia.groups.expert(g);
  const int64_t a = ia.groups.adapter(g);
  tg.lora = a >= 0;
  if (tg.lora) {
    tg.rt_off = a * ia.srt_a + tg.expert * ia.srt_s;
    tg.lora_scale = ia.row_scale != nullptr ? ia.row_scale[a] : 1.f;
  }
  return tg;
}

// P's row for physical row pm of a grouped GEMM (InitArgs::p_topk).
__device__ __forceinline__ int64_t grouped_p_row(const InitArgs& ia, int64_t pm) {
  return ia.p_topk > 1 ? pm / ia.p_topk : pm;
}

// Live ranks of slot `id` (ids already range-checked).
__device__ __forceinline__ int live_ranks(const int64_t* ranks, int64_t id, int R) {
  if (ranks == nullptr) return R;
  const int64_t r = ranks[id];
  return r < 0 ? 0 : (r > R ? R : static_cast<int>(r));
}

// Mixed-adapter LoRA sum of output element (m, n), in range: gathered straight from global
// (L1/L2-resident: the [S, N, R] stack is small next to W0).
__device__ __forceinline__ float gather_sum(const InitArgs& ia, int64_t m, int64_t n) {
  const int64_t id = ia.ids[m];
  if (id < 0 || id >= ia.n_slots) return 0.f;
  const int re = live_ranks(ia.ranks, id, ia.R);
  float acc = 0.f;
  for (int r = 0; r < re; ++r)
    acc = fmaf(ia.L[m * ia.sl_m + r * ia.sl_r],
               ldf(ia.Rt, id * ia.srt_s + n * ia.srt_n + r * ia.srt_r, ia.rt_dt), acc);
  return ia.row_scale != nullptr ? acc * ia.row_scale[id] : acc;
}

__device__ __forceinline__ void load8(const void* p, int64_t i, int dt, bool vec, float* v) {
  if (vec && dt != kF32) {
    const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const char*>(p) + i * 2);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (dt == kF16) {
        const __half2 h = *reinterpret_cast<const __half2*>(&w[q]);
        v[2 * q] = __low2float(h);
        v[2 * q + 1] = __high2float(h);
      } else {
        const __nv_bfloat162 h = *reinterpret_cast<const __nv_bfloat162*>(&w[q]);
        v[2 * q] = __low2float(h);
        v[2 * q + 1] = __high2float(h);
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = ldf(p, i + e, dt);
  }
}

// ---- host side ---------------------------------------------------------------------------------

inline int cdiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

inline at::Tensor unit_inner(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// A forward over K = 0 input features: xa = 0 and y = bias (or 0), empty sums, no kernel.
inline std::tuple<at::Tensor, at::Tensor> empty_k_fwd(at::Tensor& y, at::Tensor& xa,
                                                      const std::optional<at::Tensor>& bias) {
  xa.zero_();
  if (bias.has_value()) y.copy_(bias->expand(y.sizes())); else y.zero_();
  return {y, xa};
}

// Every output and scratch buffer of the CUDA ops. In the emulator build it comes NaN-filled, so
// an element no kernel writes fails the tests (as the tests' NaN-poisoned torch.empty does for
// Python allocations); on the GPU it is at::empty.
inline at::Tensor fl_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  auto t = at::empty(sizes, opts);
#ifdef FUSED_LORA_SIM
  if (t.is_floating_point()) t.fill_(std::numeric_limits<float>::quiet_NaN());
#endif
  return t;
}

inline void check_cuda_inputs(const at::Tensor& x, const at::Tensor& lora_A) {
  TORCH_CHECK(fl_is_device_tensor(x), "x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.scalar_type() != at::kDouble,
              "x: fp64 is supported by the CPU kernels and backend='torch' only");
  dt_code(x.scalar_type());
  dt_code(lora_A.scalar_type());
  TORCH_CHECK(x.size(0) < (int64_t(1) << 31) && x.size(1) < (int64_t(1) << 31),
              "x dims must be < 2^31");
}

// C[M, N] = init + P[M, K] Q^T (gemm.cu). q_nk: Q is [N, K]; else Q is [K, N]. Tensor cores for
// fp16/bf16 (the GEMM `gemm` names: kGemmMma, kGemmWgmma or kGemmWgmma256, from resolve_gemm),
// SIMT fp32 otherwise, a GEMV for M <= 8 with Q as [N, K].
void launch_gemm(const at::Tensor& P, const at::Tensor& Q, bool q_nk, at::Tensor& C,
                 const InitArgs& ia, int64_t gemm, fl_stream_t stream);

// Grouped GEMM (gemm.cu; the MoE ops): for every tile t of ia.tiles (see InitArgs) of group g
// >= 0 (base expert e) and each logical row i of it, with pm = row_map[i],
// C[pm, j] = init + sum_k P[pm / p_topk, k] Q[e, j, k] (init as launch_gemm's, with the Rt /
// bias / scale of group g: tile_group); rows of group -1 get C = 0. P [M / p_topk, K];
// Q [E, N, K] any strides (its [N, K] face is read k-contiguous or n-contiguous in place, else
// copied); C [M, N] in P's dtype, or fp32 and contiguous for fp16/bf16 P (the unrounded sums: a
// top-k dx summed per token afterwards). The caller builds ia.tiles with grouped_gemm_rows(P's
// dtype) rows per tile and sets ia.row_map and ia.groups; ia.sq_g is set here. No split-K and
// no GEMV: tensor cores for fp16/bf16 (gemm resolved as for launch_gemm), SIMT fp32 otherwise.
void launch_grouped_gemm(const at::Tensor& P, const at::Tensor& Q, at::Tensor& C,
                         const InitArgs& ia, int64_t gemm, fl_stream_t stream);
int64_t grouped_gemm_rows(at::ScalarType t);

// The ops' `int gemm` argument (lora.h) resolved for the current device, once per op call before
// any launch: auto -> wgmma where fl_has_wgmma() (the emulator: mma), else mma; an error naming
// the variant where wgmma / wgmma256 is asked for and cannot run. A cached attribute query, no
// getenv, legal under graph capture.
int64_t resolve_gemm(int64_t gemm);

}  // namespace fused_lora
