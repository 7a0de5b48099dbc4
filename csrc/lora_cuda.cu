// CUDA kernels of the fused_lora_C ops (sm_80+). Same math as kernels/lora_linear.py:
//
//   forward   xa = drop(x) A^T                        shrink_kernel      (SIMT, fp32 out)
//             y  = x W0^T + b + s * xa B^T            gemm_tc_kernel     (wmma fp16/bf16),
//                                                      gemm_simt_kernel   (fp32),
//                                                      gemv_kernel        (M <= 8, any dtype)
//   backward  ds = s * dy B                           shrink_kernel
//             dx = dy W0 + drop'(ds A)                gemm_tc / gemm_simt (LoRA term is the
//                                                      GEMM's initial accumulator)
//             dA = ds^T drop(x) ; dB = s * dy^T xa    reduce_m_kernel + finalize_kernel
//                                                      (split-M partials summed in a fixed
//                                                      order: deterministic, no atomics)
//   mixed adapters (multi_lora_linear_*): the same GEMM / GEMV kernels with the LoRA term
//             gathered per row (InitArgs::ids), gather_shrink_kernel for xa and ds, and
//             slot_reduce_kernel for the per-slot dA / dB stacks.
//
// Why this shape: the LoRA terms are r-deep (r = 16 against K = 4096), so they are bandwidth
// work next to the GEMM; they ride on it as its initial accumulator (computed in fp32 from xa /
// ds staged in shared memory), so y and dx are written once and never re-read. The SIMT kernels
// load operands through a runtime dtype switch (warp-uniform) instead of templates, so the whole
// file has 4 tensor-core instantiations ({half, bf16} x {W0 as [N,K], W0 as [K,N]}) and one
// instance of everything else: small and quick to build (CI has 2 cores).
// c10/cuda headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which a
// minimal toolkit (nvcc + cudart, as on CI) lacks, and are more headers to compile.
// c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream forwards to.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include "lora.h"

namespace fused_lora {
namespace {

using namespace nvcuda;

// Runtime dtype codes for the SIMT loaders.
enum : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

int dt_code(at::ScalarType t) {
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
  int64_t n_slots;
  const int64_t* ranks;
  const float* row_scale;
  int64_t srt_s;
};

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

// ---- cp.async (sm_80+) ------------------------------------------------------------------------
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- Tensor-core GEMM: C[M, N] = init + P[M, K] Q^T ---------------------------------------------
// P row-major (unit inner stride). Q_NK: Q is [N, K] (k contiguous, the forward's W0); else Q
// is [K, N] (n contiguous, W0 itself in dx = dy W0). 128x128x32 block tile, 8 warps of 64x32
// (4x2 wmma 16x16x16 fragments), two-stage cp.async double buffer. Tile edges: rows/cols past
// M, N, K are zero-filled on load and masked on store; a 16-byte chunk that is misaligned or
// crosses K goes through scalar loads.
constexpr int BM = 128, BN = 128, BK = 32, PAD = 8;
constexpr int LDA = BK + PAD;        // 40 halves = 80 B rows: 16 rows hit distinct bank groups
constexpr int LDB_NN = BN + PAD;     // 136 halves
constexpr int LDI = 17;              // fp32 staging rows for the init: odd stride, no conflicts
constexpr int SMEM_BYTES = 40960;    // 2 x (128x40 + 128x40) halves; init staging needs 25.6 KB

template <typename T, bool Q_NK>
__global__ void __launch_bounds__(256) gemm_tc_kernel(
    const T* __restrict__ P, int64_t ldp, int vec_p, const T* __restrict__ Q, int64_t ldq,
    int vec_q, T* __restrict__ C, int64_t ldc, int vec_c, int M, int N, int K, InitArgs ia) {
  __shared__ __align__(128) unsigned char smem[SMEM_BYTES];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wm = warp >> 2, wn = warp & 3;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  // A lane's 8 elements of a 16x16 fp32 fragment staged row-major: row lr, cols lc..lc+7.
  const int lr = lane >> 1, lc = (lane & 1) * 8;

  // ---- prologue: the LoRA term (+ bias) in fp32, 16 ranks at a time -----------------------
  float init[4][2][8];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 8; ++e) init[i][j][e] = 0.f;
  {
    float* Ls = reinterpret_cast<float*>(smem);               // [BM][LDI]
    float* Rs = reinterpret_cast<float*>(smem) + BM * LDI;    // [BN][LDI]
    // Single adapter: stage L and Rt through shared memory (mixed adapters gather below).
    for (int r0 = 0; ia.ids == nullptr && r0 < ia.R; r0 += 16) {
      for (int i = tid; i < BM * 16; i += 256) {
        const int mm = i >> 4, rr = i & 15;
        const int64_t m = m0 + mm;
        const int r = r0 + rr;
        Ls[mm * LDI + rr] = (m < M && r < ia.R) ? ia.L[m * ia.sl_m + r * ia.sl_r] : 0.f;
      }
      for (int i = tid; i < BN * 16; i += 256) {
        const int nn = i >> 4, rr = i & 15;
        const int64_t n = n0 + nn;
        const int r = r0 + rr;
        Rs[nn * LDI + rr] =
            (n < N && r < ia.R) ? ldf(ia.Rt, n * ia.srt_n + r * ia.srt_r, ia.rt_dt) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float lv[16];
        const float* lrow = Ls + (wm * 64 + i * 16 + lr) * LDI;
#pragma unroll
        for (int rr = 0; rr < 16; ++rr) lv[rr] = lrow[rr];
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const float* rrow = Rs + (wn * 32 + j * 16 + lc + e) * LDI;
            float acc = init[i][j][e];
#pragma unroll
            for (int rr = 0; rr < 16; ++rr) acc = fmaf(lv[rr], rrow[rr], acc);
            init[i][j][e] = acc;
          }
      }
      __syncthreads();
    }
  }
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
  {
    float* scratch = reinterpret_cast<float*>(smem) + warp * 256;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t m = m0 + wm * 64 + i * 16 + lr;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int64_t n = n0 + wn * 32 + j * 16 + lc + e;
          float v = init[i][j][e];
          if (ia.ids != nullptr && m < M && n < N) v = gather_sum(ia, m, n);
          v *= ia.alpha;
          if (ia.drop.on && m < M && n < N &&
              !keep(m * N + n, ia.drop.k1, ia.drop.k2, ia.drop.thresh))
            v = 0.f;
          if (ia.bias != nullptr && n < N) v += ldf(ia.bias, n * ia.s_bias, ia.bias_dt);
          scratch[lr * 16 + lc + e] = v;
        }
        __syncwarp();
        wmma::load_matrix_sync(acc[i][j], scratch, 16, wmma::mem_row_major);
        __syncwarp();
      }
  }
  __syncthreads();

  // ---- main loop ---------------------------------------------------------------------------
  T* As = reinterpret_cast<T*>(smem);                           // [2][BM][LDA]
  T* Bs = reinterpret_cast<T*>(smem) + 2 * BM * LDA;            // [2][BN][LDA] or [2][BK][LDB_NN]
  constexpr int B_STAGE = Q_NK ? BN * LDA : BK * LDB_NN;
  const T zero = from_f<T>(0.f);

  auto load_stage = [&](int stage, int64_t k0) {
    T* as = As + stage * BM * LDA;
    T* bs = Bs + stage * B_STAGE;
    // 128 x 32 halves = 512 16-byte chunks per operand, 2 per thread.
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      const int c = tid + it * 256;
      const int row = c >> 2, col = (c & 3) * 8;
      const int64_t gm = m0 + row, gk = k0 + col;
      T* dst = as + row * LDA + col;
      if (gm < M && vec_p && gk + 8 <= K) {
        cp_async16(dst, P + gm * ldp + gk);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = (gm < M && gk + e < K) ? P[gm * ldp + gk + e] : zero;
      }
    }
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      const int c = tid + it * 256;
      if constexpr (Q_NK) {
        const int row = c >> 2, col = (c & 3) * 8;
        const int64_t gn = n0 + row, gk = k0 + col;
        T* dst = bs + row * LDA + col;
        if (gn < N && vec_q && gk + 8 <= K) {
          cp_async16(dst, Q + gn * ldq + gk);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e)
            dst[e] = (gn < N && gk + e < K) ? Q[gn * ldq + gk + e] : zero;
        }
      } else {
        const int row = c >> 4, col = (c & 15) * 8;
        const int64_t gk = k0 + row, gn = n0 + col;
        T* dst = bs + row * LDB_NN + col;
        if (gk < K && vec_q && gn + 8 <= N) {
          cp_async16(dst, Q + gk * ldq + gn);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e)
            dst[e] = (gk < K && gn + e < N) ? Q[gk * ldq + gn + e] : zero;
        }
      }
    }
  };

  using BLayout = typename std::conditional<Q_NK, wmma::col_major, wmma::row_major>::type;
  const int nk = (K + BK - 1) / BK;
  load_stage(0, 0);
  cp_async_commit();
  for (int kt = 0; kt < nk; ++kt) {
    if (kt + 1 < nk) load_stage((kt + 1) & 1, static_cast<int64_t>(kt + 1) * BK);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* as = As + (kt & 1) * BM * LDA;
    const T* bs = Bs + (kt & 1) * B_STAGE;
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b[2];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        wmma::load_matrix_sync(a[i], as + (wm * 64 + i * 16) * LDA + ks, LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if constexpr (Q_NK)
          wmma::load_matrix_sync(b[j], bs + (wn * 32 + j * 16) * LDA + ks, LDA);
        else
          wmma::load_matrix_sync(b[j], bs + ks * LDB_NN + wn * 32 + j * 16, LDB_NN);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  // ---- epilogue: y written once, 16-byte stores where aligned and in bounds ---------------
  float* scratch = reinterpret_cast<float*>(smem) + warp * 256;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t m = m0 + wm * 64 + i * 16 + lr;
      const int64_t n = n0 + wn * 32 + j * 16 + lc;
      if (m < M) {
        const float* src = scratch + lr * 16 + lc;
        if (vec_c && n + 8 <= N) {
          alignas(16) T v[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) v[e] = from_f<T>(src[e]);
          *reinterpret_cast<uint4*>(C + m * ldc + n) = *reinterpret_cast<const uint4*>(v);
        } else {
          for (int e = 0; e < 8; ++e)
            if (n + e < N) C[m * ldc + n + e] = from_f<T>(src[e]);
        }
      }
      __syncwarp();
    }
}

// ---- fp32 GEMM (SIMT, IEEE fp32 like the Triton path's "ieee"): C = init + P Q^T --------------
// Arbitrary strides; Q element (n, k) at n*sq_n + k*sq_k. 64x64x16 tile, 4x4 outputs per
// thread at stride 16 (conflict-free shared reads).
__global__ void __launch_bounds__(256) gemm_simt_kernel(
    const float* __restrict__ P, int64_t sp_m, int64_t sp_k, const float* __restrict__ Q,
    int64_t sq_n, int64_t sq_k, float* __restrict__ C, int64_t ldc, int M, int N, int K,
    InitArgs ia) {
  __shared__ float Ps[16][64 + 1];
  __shared__ float Qs[16][64 + 1];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * 64;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * 64;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    for (int i = tid; i < 64 * 16; i += 256) {
      const int kk = i & 15, rr = i >> 4;
      const int64_t k = k0 + kk, m = m0 + rr, n = n0 + rr;
      Ps[kk][rr] = (m < M && k < K) ? P[m * sp_m + k * sp_k] : 0.f;
      Qs[kk][rr] = (n < N && k < K) ? Q[n * sq_n + k * sq_k] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = Ps[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Qs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n >= N) continue;
      float l = 0.f;
      if (ia.ids != nullptr) {
        l = gather_sum(ia, m, n);
      } else {
        for (int r = 0; r < ia.R; ++r)
          l = fmaf(ia.L[m * ia.sl_m + r * ia.sl_r],
                   ldf(ia.Rt, n * ia.srt_n + r * ia.srt_r, ia.rt_dt), l);
      }
      l *= ia.alpha;
      if (ia.drop.on && !keep(m * N + n, ia.drop.k1, ia.drop.k2, ia.drop.thresh)) l = 0.f;
      if (ia.bias != nullptr) l += ldf(ia.bias, n * ia.s_bias, ia.bias_dt);
      C[m * ldc + n] = l + acc[i][j];
    }
  }
}

// ---- decode-sized forward (M <= 8): C[m, n] = init + sum_k P[m, k] W[n, k] ----------------------
// At M <= 8 the 128x128 tile kernel would launch N/128 blocks (32 for N = 4096) on 132 SMs and
// stream W through a fraction of them; this is bound by reading W once, so one warp per output
// column n streams W's row n with 16-byte loads (8 halves per lane) when aligned, with the few
// rows of x served from L1. Sums are warp-reduced in fp32; init as in the GEMMs.
constexpr int GEMV_MAX_M = 8;

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

__global__ void __launch_bounds__(256) gemv_kernel(
    const void* __restrict__ P, int64_t sp_m, const void* __restrict__ W, int64_t sw_n, int dt,
    int vec, void* __restrict__ C, int64_t ldc, int M, int N, int K, InitArgs ia) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * 8 + warp;
  if (n >= N) return;
  float acc[GEMV_MAX_M];
#pragma unroll
  for (int m = 0; m < GEMV_MAX_M; ++m) acc[m] = 0.f;
  const int64_t K8 = (K / 8) * 8;  // P and W have unit inner stride here
  for (int64_t k = static_cast<int64_t>(lane) * 8; k < K8; k += 256) {
    float w[8];
    load8(W, n * sw_n + k, dt, vec, w);
#pragma unroll
    for (int m = 0; m < GEMV_MAX_M; ++m) {
      if (m < M) {
        float xv[8];
        load8(P, m * sp_m + k, dt, vec, xv);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[m] = fmaf(xv[e], w[e], acc[m]);
      }
    }
  }
  for (int64_t k = K8 + lane; k < K; k += 32) {  // the K % 8 tail
    const float w = ldf(W, n * sw_n + k, dt);
#pragma unroll
    for (int m = 0; m < GEMV_MAX_M; ++m)
      if (m < M) acc[m] = fmaf(ldf(P, m * sp_m + k, dt), w, acc[m]);
  }
#pragma unroll
  for (int m = 0; m < GEMV_MAX_M; ++m) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
  }
  if (lane < M) {  // lane m writes row m (static indexing into acc: no local memory)
    float v = 0.f;
#pragma unroll
    for (int m = 0; m < GEMV_MAX_M; ++m)
      if (m == lane) v = acc[m];
    const int64_t m = lane;
    float l = 0.f;
    if (ia.ids != nullptr) {
      l = gather_sum(ia, m, n);
    } else {
      for (int r = 0; r < ia.R; ++r)
        l = fmaf(ia.L[m * ia.sl_m + r * ia.sl_r], ldf(ia.Rt, n * ia.srt_n + r * ia.srt_r, ia.rt_dt),
                 l);
    }
    l *= ia.alpha;
    if (ia.drop.on && !keep(m * N + n, ia.drop.k1, ia.drop.k2, ia.drop.thresh)) l = 0.f;
    if (ia.bias != nullptr) l += ldf(ia.bias, n * ia.s_bias, ia.bias_dt);
    stf(C, m * ldc + n, dt, v + l);
  }
}

// ---- shrink: out[m, r] = alpha * sum_k drop(P)[m, k] * A(r, k)   (fp32 out) -------------------
// A(r, k) at r*sa_r + k*sa_k: lora_A for xa, lora_B read transposed for ds. 32 rows x 16 ranks
// per block, K in chunks of 64; each thread owns 2 outputs.
__global__ void __launch_bounds__(256) shrink_kernel(
    const void* __restrict__ P, int p_dt, int64_t sp_m, int64_t sp_k, const void* __restrict__ A,
    int a_dt, int64_t sa_r, int64_t sa_k, float* __restrict__ out, int64_t so_m, int M, int K,
    int R, float alpha, Dropout drop) {
  __shared__ float Ps[32][64 + 1];
  __shared__ float As[16][64 + 1];
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * 32;
  const int r0 = blockIdx.y * 16;
  const int mm = tid >> 3, rr = (tid & 7) * 2;
  float acc0 = 0.f, acc1 = 0.f;
  for (int64_t k0 = 0; k0 < K; k0 += 64) {
    for (int i = tid; i < 32 * 64; i += 256) {
      const int pm = i >> 6, kk = i & 63;
      const int64_t m = m0 + pm, k = k0 + kk;
      float v = 0.f;
      if (m < M && k < K) {
        v = ldf(P, m * sp_m + k * sp_k, p_dt);
        if (drop.on && !keep(m * K + k, drop.k1, drop.k2, drop.thresh)) v = 0.f;
      }
      Ps[pm][kk] = v;
    }
    for (int i = tid; i < 16 * 64; i += 256) {
      const int ar = i >> 6, kk = i & 63;
      const int r = r0 + ar;
      const int64_t k = k0 + kk;
      As[ar][kk] = (r < R && k < K) ? ldf(A, r * sa_r + k * sa_k, a_dt) : 0.f;
    }
    __syncthreads();
#pragma unroll 16
    for (int kk = 0; kk < 64; ++kk) {
      const float p = Ps[mm][kk];
      acc0 = fmaf(p, As[rr][kk], acc0);
      acc1 = fmaf(p, As[rr + 1][kk], acc1);
    }
    __syncthreads();
  }
  const int64_t m = m0 + mm;
  if (m < M) {
    if (r0 + rr < R) out[m * so_m + r0 + rr] = acc0 * alpha;
    if (r0 + rr + 1 < R) out[m * so_m + r0 + rr + 1] = acc1 * alpha;
  }
}

// ---- reductions over M: part[s, r, j] = sum_{m in split s} L[m, r] * drop(Z)[m, j] ------------
// dA: L = ds, Z = x (dropout); dB: L = xa, Z = dy. Block: 64 columns x 16 ranks, M in chunks of
// 32 rows within its split; finalize_kernel sums the splits in a fixed order (deterministic).
__global__ void __launch_bounds__(256) reduce_m_kernel(
    const float* __restrict__ L, int64_t sl_m, int64_t sl_r, const void* __restrict__ Z, int z_dt,
    int64_t sz_m, int64_t sz_j, float* __restrict__ part, int M, int J, int R, int rows_per_split,
    Dropout drop) {
  __shared__ float Zs[32][64];
  __shared__ float Ls[32][16 + 1];
  const int tid = threadIdx.x;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * 64;
  const int r0 = blockIdx.y * 16;
  const int64_t mb = static_cast<int64_t>(blockIdx.z) * rows_per_split;
  const int64_t me = min(static_cast<int64_t>(M), mb + rows_per_split);
  const int rr = tid >> 4, jj = tid & 15;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t mc = mb; mc < me; mc += 32) {
    for (int i = tid; i < 32 * 64; i += 256) {
      const int zm = i >> 6, zj = i & 63;
      const int64_t m = mc + zm, j = j0 + zj;
      float v = 0.f;
      if (m < me && j < J) {
        v = ldf(Z, m * sz_m + j * sz_j, z_dt);
        if (drop.on && !keep(m * J + j, drop.k1, drop.k2, drop.thresh)) v = 0.f;
      }
      Zs[zm][zj] = v;
    }
    for (int i = tid; i < 32 * 16; i += 256) {
      const int lm = i >> 4, lr = i & 15;
      const int64_t m = mc + lm;
      const int r = r0 + lr;
      Ls[lm][lr] = (m < me && r < R) ? L[m * sl_m + r * sl_r] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < 32; ++k) {
      const float l = Ls[k][rr];
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[q] = fmaf(l, Zs[k][jj + 16 * q], acc[q]);
    }
    __syncthreads();
  }
  const int r = r0 + rr;
  if (r < R) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t j = j0 + jj + 16 * q;
      if (j < J) part[(static_cast<int64_t>(blockIdx.z) * R + r) * J + j] = acc[q];
    }
  }
}

// out[r*so_r + j*so_j] = alpha * sum_s part[s, r, j], s in order.
__global__ void finalize_kernel(const float* __restrict__ part, int splits, int R, int64_t J,
                                void* __restrict__ out, int out_dt, int64_t so_r, int64_t so_j,
                                float alpha) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(R) * J) return;
  const int64_t r = idx / J, j = idx % J;
  float s = 0.f;
  for (int k = 0; k < splits; ++k) s += part[static_cast<int64_t>(k) * R * J + idx];
  stf(out, r * so_r + j * so_j, out_dt, s * alpha);
}

// ---- mixed adapters: per-row gathered shrink -----------------------------------------------------
// out[m, r] = row_scale[id] * sum_k P[m, k] A(id, r, k) for r < rank(id), id = ids[m] in range;
// 0 otherwise (dead ranks and out-of-range ids are never read). One block per row, one warp per
// rank (strided by 8), lanes over k: decode-sized M is bound by reading A, which this reads once
// per row (coalesced when A's k stride is 1).
__global__ void __launch_bounds__(256) gather_shrink_kernel(
    const void* __restrict__ P, int p_dt, int64_t sp_m, int64_t sp_k, const void* __restrict__ A,
    int a_dt, int64_t sa_s, int64_t sa_r, int64_t sa_k, const int64_t* __restrict__ ids,
    int64_t n_slots, const int64_t* __restrict__ ranks, const float* __restrict__ row_scale,
    float* __restrict__ out, int64_t so_m, int K, int R) {
  const int64_t m = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t id = ids[m];
  const bool valid = id >= 0 && id < n_slots;
  const int re = valid ? live_ranks(ranks, id, R) : 0;
  const float sc = (valid && row_scale != nullptr) ? row_scale[id] : 1.f;
  for (int r = warp; r < R; r += 8) {
    float acc = 0.f;
    if (r < re) {
      for (int k = lane; k < K; k += 32)
        acc = fmaf(ldf(P, m * sp_m + k * sp_k, p_dt), ldf(A, id * sa_s + r * sa_r + k * sa_k, a_dt),
                   acc);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    }
    if (lane == 0) out[m * so_m + r] = acc * sc;
  }
}

// ---- mixed adapters: per-slot reductions over M --------------------------------------------------
// out[slot, (r, j)] = alpha * row_scale[slot] * sum_{m: ids[m] = slot} L[m, r] Z[m, j] for
// r < rank(slot), exactly 0 past it and for slots absent from the batch. Grid (J/64, R/16, S):
// every block scans all M ids (deterministic, no atomics); rows of other slots are skipped
// before any load.
__global__ void __launch_bounds__(256) slot_reduce_kernel(
    const float* __restrict__ L, int64_t sl_m, int64_t sl_r, const void* __restrict__ Z, int z_dt,
    int64_t sz_m, int64_t sz_j, const int64_t* __restrict__ ids,
    const int64_t* __restrict__ ranks, const float* __restrict__ row_scale, void* __restrict__ out,
    int out_dt, int64_t so_s, int64_t so_r, int64_t so_j, int M, int J, int R, float alpha) {
  __shared__ float Zs[32][64];
  __shared__ float Ls[32][16 + 1];
  __shared__ int64_t rows[32];
  __shared__ int n_rows;
  const int tid = threadIdx.x;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * 64;
  const int r0 = blockIdx.y * 16;
  const int64_t slot = blockIdx.z;
  const int re = live_ranks(ranks, slot, R);
  const int rr = tid >> 4, jj = tid & 15;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (r0 < re) {
    for (int64_t mc = 0; mc < M; mc += 32) {
      // Compact this chunk's rows of `slot` (ballot in warp 0, order kept: deterministic sums).
      if (tid < 32) {
        const int64_t m = mc + tid;
        const bool mine = m < M && ids[m] == slot;
        const unsigned mask = __ballot_sync(0xffffffffu, mine);
        if (mine) rows[__popc(mask & ((1u << tid) - 1u))] = m;
        if (tid == 0) n_rows = __popc(mask);
      }
      __syncthreads();
      const int nr = n_rows;
      if (nr > 0) {
        for (int i = tid; i < 32 * 64; i += 256) {
          const int zm = i >> 6, zj = i & 63;
          const int64_t j = j0 + zj;
          Zs[zm][zj] = (zm < nr && j < J) ? ldf(Z, rows[zm] * sz_m + j * sz_j, z_dt) : 0.f;
        }
        for (int i = tid; i < 32 * 16; i += 256) {
          const int lm = i >> 4, lr = i & 15;
          const int r = r0 + lr;
          Ls[lm][lr] = (lm < nr && r < re) ? L[rows[lm] * sl_m + r * sl_r] : 0.f;
        }
        __syncthreads();
        for (int k = 0; k < nr; ++k) {
          const float l = Ls[k][rr];
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[q] = fmaf(l, Zs[k][jj + 16 * q], acc[q]);
        }
      }
      __syncthreads();
    }
  }
  const int r = r0 + rr;
  if (r < R) {
    const float sc = alpha * (row_scale != nullptr ? row_scale[slot] : 1.f);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t j = j0 + jj + 16 * q;
      if (j < J) stf(out, slot * so_s + r * so_r + j * so_j, out_dt, r < re ? acc[q] * sc : 0.f);
    }
  }
}

// ---- host side ---------------------------------------------------------------------------------

// SMs of the current device: a host attribute query (no sync, legal during graph capture),
// cached per device.
int sm_count() {
  static int cache[64] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && cache[dev] > 0) return cache[dev];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  n = n > 0 ? n : 1;
  if (dev < 64) cache[dev] = n;
  return n;
}

int cdiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

at::Tensor unit_inner(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

void launch_shrink(const at::Tensor& P, const at::Tensor& A, int64_t sa_r, int64_t sa_k,
                   at::Tensor& out, float alpha, const Dropout& drop, cudaStream_t stream) {
  const int64_t M = P.size(0), K = P.size(1), R = out.size(1);
  dim3 grid(cdiv(M, 32), cdiv(R, 16));
  shrink_kernel<<<grid, 256, 0, stream>>>(
      P.data_ptr(), dt_code(P.scalar_type()), P.stride(0), P.stride(1), A.data_ptr(),
      dt_code(A.scalar_type()), sa_r, sa_k, out.data_ptr<float>(), out.stride(0),
      static_cast<int>(M), static_cast<int>(K), static_cast<int>(R), alpha, drop);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// C[M, N] = init + P[M, K] Q^T, Q given as (n, k) strides; tensor cores for fp16/bf16.
void launch_gemm(const at::Tensor& P, const at::Tensor& Q, bool q_nk, at::Tensor& C,
                 const InitArgs& ia, cudaStream_t stream) {
  const int64_t M = P.size(0), K = P.size(1), N = C.size(1);
  if (q_nk && M <= GEMV_MAX_M) {
    const at::Tensor Pc = unit_inner(P), Qc = unit_inner(Q);
    const int dt = dt_code(P.scalar_type());
    const int vec = dt != kF32 && Pc.stride(0) % 8 == 0 && Qc.stride(0) % 8 == 0 &&
                    aligned16(Pc) && aligned16(Qc);
    gemv_kernel<<<cdiv(N, 8), 256, 0, stream>>>(
        Pc.data_ptr(), Pc.stride(0), Qc.data_ptr(), Qc.stride(0), dt, vec, C.data_ptr(),
        C.stride(0), static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), ia);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (P.scalar_type() == at::kFloat) {
    const int64_t sq_n = q_nk ? Q.stride(0) : Q.stride(1);
    const int64_t sq_k = q_nk ? Q.stride(1) : Q.stride(0);
    dim3 grid(cdiv(M, 64), cdiv(N, 64));
    TORCH_CHECK(grid.y <= 65535, "out_features too large for the fp32 kernel");
    gemm_simt_kernel<<<grid, 256, 0, stream>>>(
        P.data_ptr<float>(), P.stride(0), P.stride(1), Q.data_ptr<float>(), sq_n, sq_k,
        C.data_ptr<float>(), C.stride(0), static_cast<int>(M), static_cast<int>(N),
        static_cast<int>(K), ia);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const at::Tensor Pc = unit_inner(P), Qc = unit_inner(Q);
  const int vec_p = Pc.stride(0) % 8 == 0 && aligned16(Pc);
  const int vec_q = Qc.stride(0) % 8 == 0 && aligned16(Qc);
  const int vec_c = C.stride(0) % 8 == 0 && aligned16(C);
  dim3 grid(cdiv(M, BM), cdiv(N, BN));
  TORCH_CHECK(grid.y <= 65535, "out_features too large for the tensor-core kernel");
#define FL_LAUNCH_TC(T)                                                                           \
  do {                                                                                            \
    auto kern = q_nk ? gemm_tc_kernel<T, true> : gemm_tc_kernel<T, false>;                        \
    kern<<<grid, 256, 0, stream>>>(                                                               \
        reinterpret_cast<const T*>(Pc.data_ptr()), Pc.stride(0), vec_p,                           \
        reinterpret_cast<const T*>(Qc.data_ptr()), Qc.stride(0), vec_q,                           \
        reinterpret_cast<T*>(C.data_ptr()), C.stride(0), vec_c, static_cast<int>(M),              \
        static_cast<int>(N), static_cast<int>(K), ia);                                            \
  } while (0)
  if (P.scalar_type() == at::kHalf)
    FL_LAUNCH_TC(__half);
  else
    FL_LAUNCH_TC(__nv_bfloat16);
#undef FL_LAUNCH_TC
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out = alpha * L^T drop(Z) (reduced over M), written through (so_r, so_j) in out's dtype.
void launch_reduce_m(const at::Tensor& L, const at::Tensor& Z, at::Tensor& out, int64_t so_r,
                     int64_t so_j, float alpha, const Dropout& drop, cudaStream_t stream) {
  const int64_t M = Z.size(0), J = Z.size(1), R = L.size(1);
  const int tiles = cdiv(J, 64) * cdiv(R, 16);
  // Enough blocks for ~2 waves (a block holds ~10 KB smem, several fit per SM), but at least
  // 256 rows per split so each block amortizes its setup; splits are summed in order.
  const int sms = sm_count();
  int splits = std::max(1, std::min(cdiv(2 * sms, tiles), cdiv(M, 256)));
  splits = std::min(splits, 65535);
  const int rows = cdiv(cdiv(M, splits), 32) * 32;
  splits = cdiv(M, rows);
  auto part = at::empty({splits, R, J}, Z.options().dtype(at::kFloat));
  dim3 grid(cdiv(J, 64), cdiv(R, 16), splits);
  reduce_m_kernel<<<grid, 256, 0, stream>>>(
      L.data_ptr<float>(), L.stride(0), L.stride(1), Z.data_ptr(), dt_code(Z.scalar_type()),
      Z.stride(0), Z.stride(1), part.data_ptr<float>(), static_cast<int>(M), static_cast<int>(J),
      static_cast<int>(R), rows, drop);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total = R * J;
  finalize_kernel<<<cdiv(total, 256), 256, 0, stream>>>(
      part.data_ptr<float>(), splits, static_cast<int>(R), J, out.data_ptr(),
      dt_code(out.scalar_type()), so_r, so_j, alpha);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_cuda_inputs(const at::Tensor& x, const at::Tensor& lora_A) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  TORCH_CHECK(x.scalar_type() != at::kDouble,
              "x: fp64 is supported by the CPU kernels and backend='torch' only");
  dt_code(x.scalar_type());
  dt_code(lora_A.scalar_type());
  TORCH_CHECK(x.size(0) < (int64_t(1) << 31) && x.size(1) < (int64_t(1) << 31),
              "x dims must be < 2^31");
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
    int64_t seed) {
  check_fwd(x, weight, bias, lora_A, lora_B, dropout_p);
  check_cuda_inputs(x, lora_A);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(0);
  auto y = at::empty({M, N}, x.options());
  auto xa = at::empty({M, R}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, xa};
  if (K == 0) {
    xa.zero_();
    if (bias.has_value()) y.copy_(bias->expand({M, N})); else y.zero_();
    return {y, xa};
  }
  const Dropout drop = make_dropout(dropout_p, seed);
  launch_shrink(x, lora_A, lora_A.stride(0), lora_A.stride(1), xa, drop.scale, drop, stream);
  if (N == 0) return {y, xa};
  InitArgs ia{};
  ia.L = xa.data_ptr<float>();
  ia.sl_m = xa.stride(0);
  ia.sl_r = xa.stride(1);
  ia.Rt = lora_B.data_ptr();
  ia.srt_n = lora_B.stride(0);
  ia.srt_r = lora_B.stride(1);
  ia.rt_dt = dt_code(lora_B.scalar_type());
  ia.R = static_cast<int>(R);
  ia.alpha = static_cast<float>(scale);
  ia.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  ia.s_bias = bias.has_value() ? bias->stride(0) : 0;
  ia.bias_dt = dt_code(x.scalar_type());
  launch_gemm(x, weight, /*q_nk=*/true, y, ia, stream);
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scale, double dropout_p, int64_t seed,
    bool needs_dx, bool needs_dA, bool needs_dB) {
  check_bwd(dy, x, weight, lora_A, lora_B, xa, dropout_p);
  check_cuda_inputs(x, lora_A);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(0);
  auto dx = needs_dx ? at::empty({M, K}, x.options()) : at::empty({0}, x.options());
  auto dA = needs_dA ? at::empty({R, K}, lora_A.options()) : at::empty({0}, lora_A.options());
  auto dB = needs_dB ? at::empty({N, R}, lora_B.options()) : at::empty({0}, lora_B.options());
  if (M == 0 || K == 0 || N == 0) {  // every gradient is an empty sum
    dx.zero_();
    dA.zero_();
    dB.zero_();
    return {dx, dA, dB};
  }
  const Dropout drop = make_dropout(dropout_p, seed);
  at::Tensor ds;
  if (needs_dx || needs_dA) {
    ds = at::empty({M, R}, x.options().dtype(at::kFloat));
    // ds = s * dy B: B read as B^T (r, n) -> strides (B.stride(1), B.stride(0)).
    launch_shrink(dy, lora_B, lora_B.stride(1), lora_B.stride(0), ds, static_cast<float>(scale),
                  Dropout{}, stream);
  }
  if (needs_dx) {
    InitArgs ia{};
    ia.L = ds.data_ptr<float>();
    ia.sl_m = ds.stride(0);
    ia.sl_r = ds.stride(1);
    ia.Rt = lora_A.data_ptr();  // (k, r) of A^T
    ia.srt_n = lora_A.stride(1);
    ia.srt_r = lora_A.stride(0);
    ia.rt_dt = dt_code(lora_A.scalar_type());
    ia.R = static_cast<int>(R);
    ia.alpha = drop.scale;
    ia.bias = nullptr;
    ia.drop = drop;
    // dx[m, k] = sum_n dy[m, n] W0[n, k]: Q = W0 as [K_red=N, N_out=K] (n contiguous rows).
    launch_gemm(dy, weight, /*q_nk=*/false, dx, ia, stream);
  }
  if (needs_dA)
    launch_reduce_m(ds, x, dA, dA.stride(0), dA.stride(1), drop.scale, drop, stream);
  if (needs_dB)
    launch_reduce_m(xa, dy, dB, dB.stride(1), dB.stride(0), static_cast<float>(scale), Dropout{},
                    stream);
  return {dx, dA, dB};
}

// ---- mixed adapters -------------------------------------------------------------------------

struct MultiInputs {
  at::Tensor ids, ranks, scales;  // contiguous; ranks undefined when None
};

MultiInputs multi_inputs(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& scales,
                         const at::Tensor& adapter_ids, const std::optional<at::Tensor>& ranks) {
  check_cuda_inputs(x, lora_A);
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "scales must be float32 on CUDA, got ",
              scales.scalar_type());
  TORCH_CHECK(lora_A.size(1) < (int64_t(1) << 31), "lora_A: r_max must be < 2^31");
  return {adapter_ids.contiguous(), ranks.has_value() ? ranks->contiguous() : at::Tensor(),
          scales.contiguous()};
}

const int64_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<int64_t>() : nullptr;
}

void launch_gather_shrink(const at::Tensor& P, const at::Tensor& A, int64_t sa_s, int64_t sa_r,
                          int64_t sa_k, const MultiInputs& mi, const float* row_scale,
                          at::Tensor& out, cudaStream_t stream) {
  const int64_t M = P.size(0);
  TORCH_CHECK(M <= 2147483647, "x: M must be < 2^31");
  gather_shrink_kernel<<<static_cast<unsigned>(M), 256, 0, stream>>>(
      P.data_ptr(), dt_code(P.scalar_type()), P.stride(0), P.stride(1), A.data_ptr(),
      dt_code(A.scalar_type()), sa_s, sa_r, sa_k, mi.ids.data_ptr<int64_t>(), A.size(0),
      ptr_or_null(mi.ranks), row_scale, out.data_ptr<float>(), out.stride(0),
      static_cast<int>(P.size(1)), static_cast<int>(out.size(1)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_slot_reduce(const at::Tensor& L, const at::Tensor& Z, const MultiInputs& mi,
                        const float* row_scale, at::Tensor& out, int64_t so_s, int64_t so_r,
                        int64_t so_j, cudaStream_t stream) {
  const int64_t M = Z.size(0), J = Z.size(1), R = L.size(1), S = out.size(0);
  TORCH_CHECK(S <= 65535, "lora_A: n_slots must be <= 65535 for the CUDA backward");
  dim3 grid(cdiv(J, 64), cdiv(R, 16), static_cast<unsigned>(S));
  slot_reduce_kernel<<<grid, 256, 0, stream>>>(
      L.data_ptr<float>(), L.stride(0), L.stride(1), Z.data_ptr(), dt_code(Z.scalar_type()),
      Z.stride(0), Z.stride(1), mi.ids.data_ptr<int64_t>(), ptr_or_null(mi.ranks), row_scale,
      out.data_ptr(), dt_code(out.scalar_type()), so_s, so_r, so_j, static_cast<int>(M),
      static_cast<int>(J), static_cast<int>(R), 1.f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> multi_lora_linear_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scales,
    const at::Tensor& adapter_ids, const std::optional<at::Tensor>& ranks) {
  check_multi(x, weight, bias, lora_A, lora_B, scales, adapter_ids, ranks);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto mi = multi_inputs(x, lora_A, scales, adapter_ids, ranks);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(1);
  auto y = at::empty({M, N}, x.options());
  auto xa = at::empty({M, R}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, xa};
  if (K == 0) {
    xa.zero_();
    if (bias.has_value()) y.copy_(bias->expand({M, N})); else y.zero_();
    return {y, xa};
  }
  // xa = x A[id]^T (no scale: the reference's xa is unscaled).
  launch_gather_shrink(x, lora_A, lora_A.stride(0), lora_A.stride(1), lora_A.stride(2), mi,
                       nullptr, xa, stream);
  if (N == 0) return {y, xa};
  InitArgs ia{};
  ia.L = xa.data_ptr<float>();
  ia.sl_m = xa.stride(0);
  ia.sl_r = xa.stride(1);
  ia.Rt = lora_B.data_ptr();  // (slot, n, r)
  ia.srt_s = lora_B.stride(0);
  ia.srt_n = lora_B.stride(1);
  ia.srt_r = lora_B.stride(2);
  ia.rt_dt = dt_code(lora_B.scalar_type());
  ia.R = static_cast<int>(R);
  ia.alpha = 1.f;
  ia.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  ia.s_bias = bias.has_value() ? bias->stride(0) : 0;
  ia.bias_dt = dt_code(x.scalar_type());
  ia.ids = mi.ids.data_ptr<int64_t>();
  ia.n_slots = lora_A.size(0);
  ia.ranks = ptr_or_null(mi.ranks);
  ia.row_scale = mi.scales.data_ptr<float>();
  launch_gemm(x, weight, /*q_nk=*/true, y, ia, stream);
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_lora_linear_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scales, const at::Tensor& adapter_ids,
    const std::optional<at::Tensor>& ranks, const at::Tensor& xa, bool needs_dx, bool needs_dA,
    bool needs_dB) {
  check_multi(x, weight, std::nullopt, lora_A, lora_B, scales, adapter_ids, ranks);
  check_multi_bwd(dy, x, weight, lora_A, xa);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto mi = multi_inputs(x, lora_A, scales, adapter_ids, ranks);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(1);
  auto dx = needs_dx ? at::empty({M, K}, x.options()) : at::empty({0}, x.options());
  auto dA = needs_dA ? at::empty(lora_A.sizes(), lora_A.options()) : at::empty({0}, lora_A.options());
  auto dB = needs_dB ? at::empty(lora_B.sizes(), lora_B.options()) : at::empty({0}, lora_B.options());
  if (M == 0 || K == 0 || N == 0) {  // every gradient is an empty sum
    dx.zero_();
    dA.zero_();
    dB.zero_();
    return {dx, dA, dB};
  }
  const bool any_slot = lora_A.size(0) > 0;  // with none, dA / dB are [0, ...] and dx = dy W0
  at::Tensor ds;
  if (needs_dx || needs_dA) {
    ds = at::empty({M, R}, x.options().dtype(at::kFloat));
    // ds[m, r] = scales[id] sum_n dy[m, n] B[id, n, r]: B read as (slot, r, k=n).
    launch_gather_shrink(dy, lora_B, lora_B.stride(0), lora_B.stride(2), lora_B.stride(1), mi,
                         mi.scales.data_ptr<float>(), ds, stream);
  }
  if (needs_dx) {
    InitArgs ia{};
    ia.L = ds.data_ptr<float>();
    ia.sl_m = ds.stride(0);
    ia.sl_r = ds.stride(1);
    ia.Rt = lora_A.data_ptr();  // (slot, k, r) of A^T
    ia.srt_s = lora_A.stride(0);
    ia.srt_n = lora_A.stride(2);
    ia.srt_r = lora_A.stride(1);
    ia.rt_dt = dt_code(lora_A.scalar_type());
    ia.R = static_cast<int>(R);
    ia.alpha = 1.f;
    ia.ids = mi.ids.data_ptr<int64_t>();
    ia.n_slots = lora_A.size(0);
    ia.ranks = ptr_or_null(mi.ranks);
    ia.row_scale = nullptr;  // ds already carries the scale
    launch_gemm(dy, weight, /*q_nk=*/false, dx, ia, stream);
  }
  if (needs_dA && any_slot)
    launch_slot_reduce(ds, x, mi, nullptr, dA, dA.stride(0), dA.stride(1), dA.stride(2), stream);
  if (needs_dB && any_slot)
    launch_slot_reduce(xa, dy, mi, mi.scales.data_ptr<float>(), dB, dB.stride(0), dB.stride(2),
                       dB.stride(1), stream);
  return {dx, dA, dB};
}

}  // namespace
}  // namespace fused_lora

TORCH_LIBRARY_IMPL(fused_lora_C, CUDA, m) {
  m.impl("lora_linear_fwd", &fused_lora::lora_linear_fwd_cuda);
  m.impl("lora_linear_bwd", &fused_lora::lora_linear_bwd_cuda);
  m.impl("multi_lora_linear_fwd", &fused_lora::multi_lora_linear_fwd_cuda);
  m.impl("multi_lora_linear_bwd", &fused_lora::multi_lora_linear_bwd_cuda);
}
