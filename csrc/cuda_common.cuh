// Shared by the CUDA kernel files (gemm.cu, lora_linear_cuda.cu, multi_lora_cuda.cu,
// moe_lora_cuda.cu): runtime dtype loaders, the GEMMs' initial-accumulator arguments (InitArgs,
// TileGroup of the grouped GEMM), the mixed-adapter gather, the steps of the reductions over
// rows sorted by group (mixed adapters' and MoE's weight gradients), host helpers (the routing
// sort among them) and the GEMM launchers' declarations.
#pragma once

#include <algorithm>
#include <initializer_list>
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

// v[e] = p[i + e*stride] for e < n, 0 past n. vec (stride 1, i and p 16-byte aligned, n == 8):
// one 16-byte load for fp16/bf16, two for fp32.
__device__ __forceinline__ void load_run8(const void* p, int64_t i, int64_t stride, int dt,
                                          bool vec, int n, float* v) {
  if (vec && n == 8) {
    if (dt == kF32) {
      const float4 a = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
      const float4 b = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i + 4);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
      v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      load8(p, i, dt, true, v);
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = e < n ? ldf(p, i + e * stride, dt) : 0.f;
  }
}

// ---- reductions over rows sorted by group ---------------------------------------------------------
// The per-group weight gradients of the mixed-adapter ops (multi_lora_cuda.cu, group = slot) and
// the MoE ops (moe_lora_cuda.cu, group = virtual expert) walk a routing's rows sorted by group
// (keys sorted, order the rows) in fixed chunks of CH rows; these are their shared steps.

// The first position p with keys[p] >= v (keys sorted).
__device__ __forceinline__ int64_t sorted_lower_bound(const int64_t* keys, int64_t n, int64_t v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (keys[mid] < v) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Shared memory of sorted_reduce_step: Z 32 rows x 64 columns, L 32 rows x 16 ranks (odd pitch:
// conflict-free column reads), the rows.
struct SortedReduceSmem {
  float Zs[32][64];
  float Ls[32][16 + 1];
  int64_t rows[32];
};

// One step over the next nr <= 32 sorted rows (positions mc..mc+nr): stages Z's 64 columns from
// j0 (one 8-column run per thread, 16-byte loads when vec_z; row m of the op reads Z row
// m / z_topk, dropped by keep(m * J + j) when drop.on) and L's 16 ranks from r0 (ranks >= re
// read as 0), then thread (rr, jj) = (tid / 16, tid % 16) adds sum_k L[k, r0 + rr] Z[k, jj + 16q]
// to acc[q], k in row order (a fixed sum order). All 256 threads (barriers); block-uniform nr.
__device__ __forceinline__ void sorted_reduce_step(
    float (&acc)[4], SortedReduceSmem& sm, const int64_t* __restrict__ order, int64_t mc, int nr,
    const float* __restrict__ L, int64_t sl_m, int64_t sl_r, int r0, int re,
    const void* __restrict__ Z, int z_dt, int64_t sz_m, int64_t sz_j, bool vec_z, int z_topk,
    const Dropout& drop, int64_t j0, int J) {
  const int tid = threadIdx.x, rr = tid >> 4, jj = tid & 15;
  if (tid < nr) sm.rows[tid] = order[mc + tid];
  __syncthreads();
  {  // 32 rows x 64 columns: one 8-column run per thread
    const int zm = tid >> 3, zj = (tid & 7) * 8;
    const int64_t j = j0 + zj;
    const int n = zm < nr ? static_cast<int>(max(static_cast<int64_t>(0),
                                                 min(static_cast<int64_t>(8), J - j)))
                          : 0;
    const int64_t m = zm < nr ? sm.rows[zm] : 0;
    const int64_t zrow = z_topk > 1 ? m / z_topk : m;
    float v[8];
    load_run8(Z, zrow * sz_m + j * sz_j, sz_j, z_dt, vec_z, n, v);
    if (drop.on) {
#pragma unroll
      for (int q = 0; q < 8; ++q)
        if (q < n && !keep(m * J + j + q, drop.k1, drop.k2, drop.thresh)) v[q] = 0.f;
    }
#pragma unroll
    for (int q = 0; q < 8; ++q) sm.Zs[zm][zj + q] = v[q];
  }
  for (int i = tid; i < 32 * 16; i += 256) {
    const int lm = i >> 4, lr = i & 15;
    const int r = r0 + lr;
    sm.Ls[lm][lr] = (lm < nr && r < re) ? L[sm.rows[lm] * sl_m + r * sl_r] : 0.f;
  }
  __syncthreads();
  for (int k = 0; k < nr; ++k) {
    const float l = sm.Ls[k][rr];
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[q] = fmaf(l, sm.Zs[k][jj + 16 * q], acc[q]);
  }
  __syncthreads();
}

// A segment's sums after its steps (thread (tid / 16, tid % 16), rank r, columns j0 + tid % 16
// + 16q): the group's whole sum when `whole` (its rows lie in one chunk), stored to out at
// o + j * so_j (o: the group's and rank's offset) times sc; else the chunk's fp32 partial idx of
// [2 * chunks, R, J], which the finalize sums (sorted_partials_sum).
__device__ __forceinline__ void sorted_reduce_store(const float (&acc)[4], bool whole,
                                                    void* __restrict__ out, int out_dt, int64_t o,
                                                    int64_t so_j, float sc,
                                                    float* __restrict__ part, int64_t idx, int R,
                                                    int J, int r, int64_t j0) {
  const int jj = threadIdx.x & 15;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t j = j0 + jj + 16 * q;
    if (j >= J) continue;
    if (whole) stf(out, o + j * so_j, out_dt, acc[q] * sc);
    else part[(idx * R + r) * J + j] = acc[q];
  }
}

// The finalize's sum for a group whose sorted rows [a, b) span chunks c1 < c2 of the valid
// positions from v0: its partials ([2 * chunks, R, J]: at 2c where the group opens chunk c, else
// 2c + 1) in chunk order (deterministic).
__device__ __forceinline__ float sorted_partials_sum(const float* __restrict__ part, int64_t a,
                                                     int64_t v0, int64_t CH, int64_t c1,
                                                     int64_t c2, int R, int J, int r,
                                                     int64_t j) {
  const int64_t first = 2 * c1 + (a == v0 + c1 * CH ? 0 : 1);
  float v = part[(first * R + r) * J + j];
  for (int64_t cc = c1 + 1; cc <= c2; ++cc) v += part[(2 * cc * R + r) * J + j];
  return v;
}

// ---- host side ---------------------------------------------------------------------------------

inline int cdiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

inline at::Tensor unit_inner(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// 16-byte loads of 8-element runs along the unit stride: the base and every run start (a
// multiple of 8 elements along it plus the other strides) must be 16-byte aligned.
inline bool vec_ok(const at::Tensor& t, std::initializer_list<int64_t> strides,
                   int64_t unit_stride, int64_t elems_per_16b) {
  if (t.scalar_type() == at::kDouble || unit_stride != 1 || !aligned16(t)) return false;
  for (const int64_t s : strides)
    if (s % elems_per_16b != 0) return false;
  return true;
}

// The routing of ids over n groups (lora.h's order / keys) on the device, no host sync
// (CUDA-graph safe): keys = the ids with those outside [0, n) as -1, stably sorted; order = the
// rows in that order.
inline void sort_routing(const at::Tensor& ids, int64_t n, at::Tensor& order, at::Tensor& keys) {
  const auto valid = ids.ge(0).logical_and(ids.lt(n));
  const auto keyed = at::where(valid, ids, at::full({}, -1, ids.options()));
  auto sorted = at::sort(keyed, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  keys = std::get<0>(sorted).contiguous();
  order = std::get<1>(sorted).contiguous();
}

// Chunks of the sorted reductions over M rows for (J/64, R/16) column x rank blocks: ~4 programs
// per SM, each chunk >= 32 rows (one staged step), as few as that allows (fewer partials).
struct SortedChunks {
  int64_t chunks = 1, CH = 32;
};

inline SortedChunks sorted_reduce_chunks(int64_t M, int64_t J, int64_t R) {
  const int64_t nb = ((J + 63) / 64) * ((R + 15) / 16);
  const int64_t target = 4 * static_cast<int64_t>(fl_sm_count());
  SortedChunks c;
  c.chunks = std::max<int64_t>(1, std::min<int64_t>((target + nb - 1) / nb, (M + 31) / 32));
  c.CH = ((M + c.chunks - 1) / c.chunks + 31) / 32 * 32;
  c.chunks = (M + c.CH - 1) / c.CH;
  TORCH_CHECK(c.CH <= 2147483647 && c.chunks <= 2147483647, "x: M must be < 2^31");
  return c;
}


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
