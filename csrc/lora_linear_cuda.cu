// CUDA kernels of the single-adapter ops fused_lora_C::lora_linear_fwd / _bwd (sm_80+).
#include "cuda_common.cuh"

namespace fused_lora {
namespace {

// ---- shrink: out[m, r] = alpha * sum_k drop(P)[m, k] * A(r, k)   (fp32 out) -------------------
// A(r, k) at r*sa_r + k*sa_k (lora_A). 32 rows x 16 ranks per block, K in chunks of 64; each
// thread owns 2 outputs. Split-K (part != nullptr): block z covers k in [z k_split, (z+1)
// k_split) and writes fp32 partials part[z, m, r] for finalize_kernel: at decode sizes the
// grid is otherwise one block (M <= 32, R <= 16) reading all of A (128 KB at K = 4096, r = 16)
// through one SM, ~2 us next to a ~10 us GEMV.
__global__ void __launch_bounds__(256) shrink_kernel(
    const void* __restrict__ P, int p_dt, int64_t sp_m, int64_t sp_k, const void* __restrict__ A,
    int a_dt, int64_t sa_r, int64_t sa_k, float* __restrict__ out, int64_t so_m, int M, int K,
    int R, float alpha, Dropout drop, float* __restrict__ part, int k_split) {
  __shared__ float Ps[32][64 + 1];
  __shared__ float As[16][64 + 1];
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * 32;
  const int r0 = blockIdx.y * 16;
  const int mm = tid >> 3, rr = (tid & 7) * 2;
  float acc0 = 0.f, acc1 = 0.f;
  const int64_t kb = static_cast<int64_t>(blockIdx.z) * k_split;
  const int64_t ke = min(static_cast<int64_t>(K), kb + k_split);
  for (int64_t k0 = kb; k0 < ke; k0 += 64) {
    for (int i = tid; i < 32 * 64; i += 256) {
      const int pm = i >> 6, kk = i & 63;
      const int64_t m = m0 + pm, k = k0 + kk;
      float v = 0.f;
      if (m < M && k < ke) {
        v = ldf(P, m * sp_m + k * sp_k, p_dt);
        if (drop.on && !keep(m * K + k, drop.k1, drop.k2, drop.thresh)) v = 0.f;
      }
      Ps[pm][kk] = v;
    }
    for (int i = tid; i < 16 * 64; i += 256) {
      const int ar = i >> 6, kk = i & 63;
      const int r = r0 + ar;
      const int64_t k = k0 + kk;
      As[ar][kk] = (r < R && k < ke) ? ldf(A, r * sa_r + k * sa_k, a_dt) : 0.f;
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
    float* dst = part != nullptr ? part + (blockIdx.z * static_cast<int64_t>(M) + m) * R
                                 : out + m * so_m;
    if (r0 + rr < R) dst[r0 + rr] = acc0 * alpha;
    if (r0 + rr + 1 < R) dst[r0 + rr + 1] = acc1 * alpha;
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

// ---- backward: ds and dB partials from one pass over dY ---------------------------------------
// Block (cc, rc, q) owns the dY region rows [rc*rows_per_chunk, +rows_per_chunk) x cols
// [cc*cols_per_chunk, +cols_per_chunk) and ranks [16q, 16q+16), reads that region once and writes
//   ds_part[cc, m, r] = sum_{n in its cols} dY[m, n] B[n, r]    (when ds_part != nullptr)
//   db_part[rc, n, r] = sum_{m in its rows} dY[m, n] xa[m, r]   (when db_part != nullptr)
// finalize_kernel then sums the chunks in index order (x s): deterministic, no float atomics.
// Partial traffic is 8 R (M a + N b) bytes for a col chunks and b row chunks (write + read); a is
// fixed by the engine's chunk width (N / 512 or N / 256), b fills one wave of blocks: at
// M = 8192, N = 4096 that is a = 8, b = 16, where M a = N b (the minimum for 128 blocks).
constexpr int kRankChunk = 16;  // ranks per block; R > 16 adds grid.z (dY read ceil(R/16) times)

// SIMT engine (fp32 dY, and fp16/bf16 dY that is not 16-byte-vectorizable). 32-row x 64-col dY
// tiles in smem as fp32; each thread keeps 2 ds sums (row, 2 ranks) across a row's col tiles
// in registers, and 4 dB sums (col, 4 ranks) per tile that it adds into its own slots of DBs (the
// block's [256 cols][16 ranks] dB, 16 KB, persistent over the row loop).
constexpr int kSimtRows = 32, kSimtCols = 64, kSimtChunkCols = 256;

__global__ void __launch_bounds__(256) bwd_ds_db_simt_kernel(
    const void* __restrict__ dy, int dy_dt, int64_t sdy_m, int64_t sdy_n,
    const void* __restrict__ Bw, int b_dt, int64_t sb_n, int64_t sb_r,
    const float* __restrict__ xa, int64_t sxa_m, int64_t sxa_r, float* __restrict__ ds_part,
    float* __restrict__ db_part, int M, int N, int R, int rows_per_chunk) {
  __shared__ float Ys[kSimtRows][kSimtCols + 1];  // +1: the ds loop reads 4 rows per warp
  __shared__ float Xs[kSimtRows][kRankChunk];
  __shared__ float Bs[kSimtChunkCols][kRankChunk];
  __shared__ float DBs[kSimtChunkCols][kRankChunk];
  const int tid = threadIdx.x;
  const int64_t n_lo = static_cast<int64_t>(blockIdx.x) * kSimtChunkCols;
  const int64_t n_hi = min(static_cast<int64_t>(N), n_lo + kSimtChunkCols);
  const int64_t m_lo = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t m_hi = min(static_cast<int64_t>(M), m_lo + rows_per_chunk);
  const int r0 = blockIdx.z * kRankChunk;
  const bool do_ds = ds_part != nullptr, do_db = db_part != nullptr;
  const int mm = tid >> 3, rs = (tid & 7) * 2;   // ds: row, 2 ranks
  const int jj = tid & 63, rq = (tid >> 6) * 4;  // dB: col, 4 ranks
  for (int i = tid; i < kSimtChunkCols * kRankChunk; i += 256) {
    const int c = i / kRankChunk, rr = i % kRankChunk;
    const int64_t n = n_lo + c;
    const int r = r0 + rr;
    Bs[c][rr] = (do_ds && n < n_hi && r < R) ? ldf(Bw, n * sb_n + r * sb_r, b_dt) : 0.f;
  }
  for (int cb = 0; cb < kSimtChunkCols; cb += kSimtCols)
#pragma unroll
    for (int q = 0; q < 4; ++q) DBs[cb + jj][rq + q] = 0.f;  // this thread's own slots
  for (int64_t mb = m_lo; mb < m_hi; mb += kSimtRows) {
    __syncthreads();  // Bs written; the previous row tile's readers of Xs are done
    for (int i = tid; i < kSimtRows * kRankChunk; i += 256) {
      const int a = i / kRankChunk, rr = i % kRankChunk;
      const int64_t m = mb + a;
      const int r = r0 + rr;
      Xs[a][rr] = (do_db && m < m_hi && r < R) ? xa[m * sxa_m + r * sxa_r] : 0.f;
    }
    float ds0 = 0.f, ds1 = 0.f;
    for (int64_t nb = n_lo; nb < n_hi; nb += kSimtCols) {
      const int cb = static_cast<int>(nb - n_lo);
      __syncthreads();  // readers of the previous Ys are done
      for (int i = tid; i < kSimtRows * kSimtCols; i += 256) {
        const int a = i >> 6, c = i & 63;
        const int64_t m = mb + a, n = nb + c;
        Ys[a][c] = (m < m_hi && n < n_hi) ? ldf(dy, m * sdy_m + n * sdy_n, dy_dt) : 0.f;
      }
      __syncthreads();
      if (do_ds) {
#pragma unroll 16
        for (int c = 0; c < kSimtCols; ++c) {
          const float y = Ys[mm][c];
          ds0 = fmaf(y, Bs[cb + c][rs], ds0);
          ds1 = fmaf(y, Bs[cb + c][rs + 1], ds1);
        }
      }
      if (do_db) {
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 8
        for (int a = 0; a < kSimtRows; ++a) {
          const float y = Ys[a][jj];
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[q] = fmaf(y, Xs[a][rq + q], acc[q]);
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) DBs[cb + jj][rq + q] += acc[q];
      }
    }
    const int64_t m = mb + mm;
    if (do_ds && m < m_hi) {
      float* o = ds_part + (static_cast<int64_t>(blockIdx.x) * M + m) * R;
      if (r0 + rs < R) o[r0 + rs] = ds0;
      if (r0 + rs + 1 < R) o[r0 + rs + 1] = ds1;
    }
  }
  if (do_db) {
    for (int cb = 0; cb < kSimtChunkCols; cb += kSimtCols) {
      const int64_t n = n_lo + cb + jj;
      if (n >= n_hi) break;
      float* o = db_part + (static_cast<int64_t>(blockIdx.y) * N + n) * R;
#pragma unroll
      for (int q = 0; q < 4; ++q)
        if (r0 + rq + q < R) o[r0 + rq + q] = DBs[cb + jj][rq + q];
    }
  }
}

// Tensor-core engine (fp16/bf16 dY, rows 16-byte aligned, N % 8 == 0). 8 warps; warp w owns the
// block's cols [64w, 64w+64) of a 512-col chunk. dY streams through smem in 32-row x 512-col
// steps (cp.async, 2 stages of 33 KB). Per step and warp, two m16n8k16 GEMMs on the same tile:
//   ds (32 rows x 16 ranks, k = its 64 cols): A = dY via ldmatrix, B = lora_B fragments held in
//     registers for the whole block; the 8 warps' partials are summed in smem in warp order.
//   dB (64 cols x 16 ranks, k = 32 rows): A = dY^T via ldmatrix.trans, B = xa fragments; the
//     accumulators stay in registers for the whole row chunk.
// xa is fp32 (and lora_B may be), so each is split into a sum of T terms (split3) and every term
// is multiplied: dY is exact in T, so the products match fp32 SIMT (~2^-24 relative) instead of
// rounding xa to T (2^-9 bf16 / 2^-12 fp16, 10-100x the fp32 reference's error on dA / dB). Up to
// 6 MMAs per 16x8x16 step instead of 2 still keeps the kernel memory-bound: 6 M N R FMAs at
// M = 8192, N = 4096, R = 16 is 3.2 GFMA, ~7 us at ~500 dense TFMA/s, vs ~20 us to read dY's 64 MB
// (SIMT fp32 would need 1.07 GFMA at 33 TFMA/s peak = 32 us, i.e. be compute-bound). fp16's range is 2^+-15,
// so for fp16 each rank column of B (over the block's cols) and of xa (over its rows) is scaled
// by a power of two that brings its max to [2^13, 2^14) before the split, and the sums are
// scaled back exactly: no overflow, no loss of lo to subnormals.
constexpr int kTcRows = 32, kTcCols = 512, kTcStages = 2;
constexpr int kTcLd = kTcCols + 8;  // +16 B per smem row: an ldmatrix's 8 rows hit 8 bank groups
constexpr int kTcSmem = kTcStages * kTcRows * kTcLd * 2;  // 66,560 B dynamic

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo_k, T hi_k) {  // lower k index in the low half
  uint16_t a, b;
  memcpy(&a, &lo_k, 2);
  memcpy(&b, &hi_k, 2);
  return static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
}

// v = t[0] + t[1] + t[2] (+ error): t[i] = T(v - t[0] - ... - t[i-1]); each difference is exact
// in fp32. Three bf16 terms carry 24 significand bits, two fp16 terms 22.
template <typename T>
__device__ __forceinline__ void split3(float v0, float v1, uint32_t (&t)[3]) {
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    const T h0 = from_f<T>(v0), h1 = from_f<T>(v1);
    t[i] = pack2(h0, h1);
    v0 -= to_f(h0);
    v1 -= to_f(h1);
  }
}

// 2^k with max * 2^k in [2^13, 2^14); 1 for 0 / inf / NaN; k clamped so 2^+-k stays normal.
__device__ __forceinline__ int pow2_shift(float mx) {
  if (!(mx > 0.f) || !(mx < 3.0e38f)) return 0;
  int e = 0;
  frexpf(mx, &e);  // mx = f 2^e, f in [0.5, 1)
  return min(100, max(-100, 14 - e));
}

template <typename T>
__global__ void __launch_bounds__(256) bwd_ds_db_kernel(
    const T* __restrict__ dy, int64_t sdy_m, const void* __restrict__ Bw, int b_dt, int64_t sb_n,
    int64_t sb_r, const float* __restrict__ xa, int64_t sxa_m, int64_t sxa_r,
    float* __restrict__ ds_part, float* __restrict__ db_part, int M, int N, int R,
    int rows_per_chunk, bool db_f32) {
  FL_DYNAMIC_SMEM(smem);
  T* Ys = reinterpret_cast<T*>(smem);
  __shared__ float red[8][kTcRows][kRankChunk];  // per-warp ds partials, 16 KB
  __shared__ float amax[2][16][kRankChunk];
  __shared__ float scl[4][kRankChunk];  // B scale, 1/B scale, xa scale, 1/xa scale
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t n_lo = static_cast<int64_t>(blockIdx.x) * kTcCols;
  const int64_t m_lo = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t m_hi = min(static_cast<int64_t>(M), m_lo + rows_per_chunk);
  const int r0 = blockIdx.z * kRankChunk;
  const bool do_ds = ds_part != nullptr, do_db = db_part != nullptr;
  const int64_t cw = n_lo + 64 * w;  // this warp's first col
  constexpr bool kF16 = std::is_same<T, __half>::value;
  // Terms of the splits that are multiplied: fp32 results (ds always, dB with fp32 adapters)
  // need ~fp32 products. lora_B in bf16 with bf16 dY is exact in one term. fp16: two terms
  // (22 bits; the third would be ~2^-22 of the first). bf16: three terms for fp32 operands (24
  // bits; two give 16, i.e. 8e-6 relative, ~10x fp32's error on dA at K = 19), two for xa when
  // dB is bf16 (its own rounding is 2^-9).
  const int b_terms = kF16 ? 2 : (b_dt == kBF16 ? 1 : 3);
  const int x_terms = kF16 ? 2 : (db_f32 ? 3 : 2);

  if (tid < kRankChunk) {
    scl[0][tid] = scl[1][tid] = scl[2][tid] = scl[3][tid] = 1.f;
  }
  if (kF16) {  // per-rank max |B| over the block's cols and |xa| over its rows
    const int rr = tid & 15, gi = tid >> 4, r = r0 + rr;
    float mb = 0.f, mx = 0.f;
    if (r < R) {
      if (do_ds)
        for (int64_t n = n_lo + gi; n < min(static_cast<int64_t>(N), n_lo + kTcCols); n += 16)
          mb = fmaxf(mb, fabsf(ldf(Bw, n * sb_n + r * sb_r, b_dt)));
      if (do_db)
        for (int64_t m = m_lo + gi; m < m_hi; m += 16) mx = fmaxf(mx, fabsf(xa[m * sxa_m + r * sxa_r]));
    }
    amax[0][gi][rr] = mb;
    amax[1][gi][rr] = mx;
    __syncthreads();
    if (tid < 2 * kRankChunk) {
      const int which = tid >> 4, c = tid & 15;
      float v = 0.f;
      for (int i = 0; i < 16; ++i) v = fmaxf(v, amax[which][i][c]);
      const int k = pow2_shift(v);
      scl[2 * which][c] = ldexpf(1.f, k);
      scl[2 * which + 1][c] = ldexpf(1.f, -k);
    }
  }
  __syncthreads();

  // lora_B fragments (k = col, n = rank) of this warp's 64 cols: b[ks][nt][h] holds cols
  // cw + 16 ks + 8 h + 2 t4 + {0, 1}, rank r0 + 8 nt + g.
  uint32_t bt[4][2][2][3];
#pragma unroll
  for (int ks = 0; ks < 4; ++ks)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t n = cw + 16 * ks + 8 * h + 2 * t4;
        const int r = r0 + 8 * nt + g;
        float v0 = 0.f, v1 = 0.f;
        if (do_ds && r < R) {
          const float s = scl[0][8 * nt + g];
          if (n < N) v0 = ldf(Bw, n * sb_n + r * sb_r, b_dt) * s;
          if (n + 1 < N) v1 = ldf(Bw, (n + 1) * sb_n + r * sb_r, b_dt) * s;
        }
        split3<T>(v0, v1, bt[ks][nt][h]);
      }
  float dbacc[4][2][4];
#pragma unroll
  for (int ct = 0; ct < 4; ++ct)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dbacc[ct][nt][e] = 0.f;

  const int steps = static_cast<int>((m_hi - m_lo + kTcRows - 1) / kTcRows);
  // dY step -> stage: 32 rows x 64 16-byte chunks, 8 per thread; rows past the chunk and cols
  // past N are zero-filled (N % 8 == 0, so a chunk is all in or all out).
  auto load_step = [&](int step) {
    if (step < steps) {
      const int64_t mb = m_lo + static_cast<int64_t>(step) * kTcRows;
      T* st = Ys + (step % kTcStages) * (kTcRows * kTcLd);
      for (int i = tid; i < kTcRows * (kTcCols / 8); i += 256) {
        const int a = i >> 6, ch = i & 63;
        const int64_t m = mb + a, n = n_lo + ch * 8;
        const bool ok = m < m_hi && n < N;
        cp_async16(st + a * kTcLd + ch * 8, ok ? dy + m * sdy_m + n : dy, ok);
      }
    }
    cp_async_commit();  // empty groups keep the wait count uniform
  };
#pragma unroll
  for (int s = 0; s < kTcStages - 1; ++s) load_step(s);

  for (int step = 0; step < steps; ++step) {
    const int64_t mb = m_lo + static_cast<int64_t>(step) * kTcRows;
    // xa fragments (k = row, n = rank): x[ks][nt][h] holds rows mb + 16 ks + 8 h + 2 t4 + {0,1}.
    uint32_t xt[2][2][2][3];
#pragma unroll
    for (int ks = 0; ks < 2; ++ks)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t m = mb + 16 * ks + 8 * h + 2 * t4;
          const int r = r0 + 8 * nt + g;
          float v0 = 0.f, v1 = 0.f;
          if (do_db && r < R) {
            const float s = scl[2][8 * nt + g];
            if (m < m_hi) v0 = xa[m * sxa_m + r * sxa_r] * s;
            if (m + 1 < m_hi) v1 = xa[(m + 1) * sxa_m + r * sxa_r] * s;
          }
          split3<T>(v0, v1, xt[ks][nt][h]);
        }
    cp_async_wait<kTcStages - 2>();
    __syncthreads();  // this step's stage has landed for all; the previous step's readers are done
    load_step(step + kTcStages - 1);
    const T* st = Ys + (step % kTcStages) * (kTcRows * kTcLd);
    if (do_ds) {
      float dsacc[2][2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) dsacc[mt][nt][e] = 0.f;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
          uint32_t a[4];
          ldmatrix_x4(a, st + (16 * mt + (lane & 15)) * kTcLd + 64 * w + 16 * ks + (lane >> 4) * 8);
#pragma unroll
          for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int i = 0; i < 3; ++i)
              if (i < b_terms) {
                const uint32_t b[2] = {bt[ks][nt][0][i], bt[ks][nt][1][i]};
                mma_16816<T>(dsacc[mt][nt], a, b);
              }
        }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            red[w][16 * mt + 8 * h + g][8 * nt + 2 * t4] = dsacc[mt][nt][2 * h];
            red[w][16 * mt + 8 * h + g][8 * nt + 2 * t4 + 1] = dsacc[mt][nt][2 * h + 1];
          }
    }
    if (do_db) {
#pragma unroll
      for (int ct = 0; ct < 4; ++ct)
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
          uint32_t a[4];
          ldmatrix_x4_trans(a, st + (16 * ks + (lane & 7) + ((lane >> 4) << 3)) * kTcLd + 64 * w +
                                   16 * ct + ((lane >> 3) & 1) * 8);
#pragma unroll
          for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int i = 0; i < 3; ++i)
              if (i < x_terms) {
                const uint32_t b[2] = {xt[ks][nt][0][i], xt[ks][nt][1][i]};
                mma_16816<T>(dbacc[ct][nt], a, b);
              }
        }
    }
    if (do_ds) {
      __syncthreads();  // all warps' partials in red
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int o = tid + 256 * e, row = o >> 4, rk = o & 15;
        float s = 0.f;
#pragma unroll
        for (int v = 0; v < 8; ++v) s += red[v][row][rk];  // warp order: deterministic
        const int64_t m = mb + row;
        if (m < m_hi && r0 + rk < R)
          ds_part[(static_cast<int64_t>(blockIdx.x) * M + m) * R + r0 + rk] = s * scl[1][rk];
      }
    }
  }
  cp_async_wait<0>();
  if (do_db) {
#pragma unroll
    for (int ct = 0; ct < 4; ++ct)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t n = cw + 16 * ct + 8 * h + g;
          if (n >= N) continue;
          float* o = db_part + (static_cast<int64_t>(blockIdx.y) * N + n) * R;
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int rk = 8 * nt + 2 * t4 + e;
            if (r0 + rk < R) o[r0 + rk] = dbacc[ct][nt][2 * h + e] * scl[3][rk];
          }
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

void launch_shrink(const at::Tensor& P, const at::Tensor& A, int64_t sa_r, int64_t sa_k,
                   at::Tensor& out, float alpha, const Dropout& drop, fl_stream_t stream) {
  const int64_t M = P.size(0), K = P.size(1), R = out.size(1);
  dim3 grid(cdiv(M, 32), cdiv(R, 16));
  // Split K until the grid has ~2 blocks per SM (each split >= 2 chunks of 64 k).
  const int blocks = static_cast<int>(grid.x * grid.y);
  int splits = std::max(1, std::min(cdiv(2 * fl_sm_count(), blocks), static_cast<int>(K / 128)));
  const int k_split = cdiv(cdiv(K, splits), 64) * 64;
  splits = cdiv(K, k_split);
  TORCH_CHECK(splits <= 65535, "x: in_features too large for the shrink kernel");
  grid.z = splits;
  at::Tensor part = splits > 1 ? fl_empty({splits, M, R}, out.options()) : at::Tensor();
  float* part_p = splits > 1 ? part.data_ptr<float>() : nullptr;
  FL_LAUNCH(shrink_kernel, grid, 256, 0, stream,
      P.data_ptr(), dt_code(P.scalar_type()), P.stride(0), P.stride(1), A.data_ptr(),
      dt_code(A.scalar_type()), sa_r, sa_k, out.data_ptr<float>(), out.stride(0),
      static_cast<int>(M), static_cast<int>(K), static_cast<int>(R), alpha, drop, part_p,
      k_split);
  if (splits > 1)  // out[m, r] = sum_z part[z, m, r], z in order
    FL_LAUNCH(finalize_kernel, cdiv(M * R, 256), 256, 0, stream, part_p, splits,
              static_cast<int>(M), R, out.data_ptr(), kF32, out.stride(0), out.stride(1), 1.f);
}

// C[M, N] = init + P[M, K] Q^T, Q given as (n, k) strides; tensor cores for fp16/bf16.
void launch_reduce_m(const at::Tensor& L, const at::Tensor& Z, at::Tensor& out, int64_t so_r,
                     int64_t so_j, float alpha, const Dropout& drop, fl_stream_t stream) {
  const int64_t M = Z.size(0), J = Z.size(1), R = L.size(1);
  const int tiles = cdiv(J, 64) * cdiv(R, 16);
  // Enough blocks for ~2 waves (a block holds ~10 KB smem, several fit per SM), but at least
  // 256 rows per split so each block amortizes its setup; splits are summed in order.
  const int sms = fl_sm_count();
  int splits = std::max(1, std::min(cdiv(2 * sms, tiles), cdiv(M, 256)));
  splits = std::min(splits, 65535);
  const int rows = cdiv(cdiv(M, splits), 32) * 32;
  splits = cdiv(M, rows);
  auto part = fl_empty({splits, R, J}, Z.options().dtype(at::kFloat));
  dim3 grid(cdiv(J, 64), cdiv(R, 16), splits);
  FL_LAUNCH(reduce_m_kernel, grid, 256, 0, stream,
      L.data_ptr<float>(), L.stride(0), L.stride(1), Z.data_ptr(), dt_code(Z.scalar_type()),
      Z.stride(0), Z.stride(1), part.data_ptr<float>(), static_cast<int>(M), static_cast<int>(J),
      static_cast<int>(R), rows, drop);
  const int64_t total = R * J;
  FL_LAUNCH(finalize_kernel, cdiv(total, 256), 256, 0, stream,
      part.data_ptr<float>(), splits, static_cast<int>(R), J, out.data_ptr(),
      dt_code(out.scalar_type()), so_r, so_j, alpha);
}

// ds = s dY B ([M, R] fp32; when ds) and dB = s dY^T xa (when dB) from one pass over dY
// (ceil(R/16) passes for R > 16): bwd_ds_db_(simt_)kernel, then finalize_kernel per output.
void launch_bwd_ds_db(const at::Tensor& dy, const at::Tensor& lora_B, const at::Tensor& xa,
                      at::Tensor* ds, at::Tensor* dB, float scale, fl_stream_t stream) {
  const int64_t M = dy.size(0), N = dy.size(1), R = lora_B.size(1);
  const int dt = dt_code(dy.scalar_type());
  const bool tc = dt != kF32 && dy.stride(1) == 1 && dy.stride(0) % 8 == 0 && N % 8 == 0 &&
                  aligned16(dy);
  const int chunk_cols = tc ? kTcCols : kSimtChunkCols;
  const int step_rows = tc ? kTcRows : kSimtRows;
  const int a = cdiv(N, chunk_cols), z = cdiv(R, kRankChunk);
  // Row chunks: fill one wave (TC: 1 block per SM, 83 KB smem and a 2-stage pipeline of 33 KB
  // keep ~25 B/clk/SM in flight; SIMT: 2 per SM, 42 KB), not more, because partial traffic grows
  // with the chunk counts: at M = 8192, N = 4096, R = 16 (bf16), a = 8, b = 16 gives 4 MB of ds
  // and 4 MB of dB partials (written once, read once by finalize, L2-resident) vs 64 MB of dY.
  const int target = (tc ? 1 : 2) * fl_sm_count();
  int b = std::max(1, target / (a * z));
  b = std::min(b, cdiv(M, step_rows));
  const int rows = cdiv(cdiv(M, b), step_rows) * step_rows;
  b = cdiv(M, rows);
  TORCH_CHECK(z <= 65535, "lora rank too large for the CUDA backward: r = ", R);
  const auto fopt = dy.options().dtype(at::kFloat);
  at::Tensor ds_part = ds ? fl_empty({a, M, R}, fopt) : at::Tensor();
  at::Tensor db_part = dB ? fl_empty({b, N, R}, fopt) : at::Tensor();
  float* dsp = ds ? ds_part.data_ptr<float>() : nullptr;
  float* dbp = dB ? db_part.data_ptr<float>() : nullptr;
  const dim3 grid(a, b, z);
  if (tc) {
    auto launch = [&](auto tag) {
      using T = decltype(tag);
      auto kern = bwd_ds_db_kernel<T>;
      FL_SET_SMEM(kern, kTcSmem);
      FL_LAUNCH(kern, grid, 256, kTcSmem, stream, reinterpret_cast<const T*>(dy.data_ptr()),
                dy.stride(0), lora_B.data_ptr(), dt_code(lora_B.scalar_type()), lora_B.stride(0),
                lora_B.stride(1), xa.data_ptr<float>(), xa.stride(0), xa.stride(1), dsp, dbp,
                static_cast<int>(M), static_cast<int>(N), static_cast<int>(R), rows,
                dB != nullptr && dB->scalar_type() == at::kFloat);
    };
    if (dt == kF16) launch(__half{}); else launch(__nv_bfloat16{});
  } else {
    FL_LAUNCH(bwd_ds_db_simt_kernel, grid, 256, 0, stream, dy.data_ptr(), dt, dy.stride(0),
              dy.stride(1), lora_B.data_ptr(), dt_code(lora_B.scalar_type()), lora_B.stride(0),
              lora_B.stride(1), xa.data_ptr<float>(), xa.stride(0), xa.stride(1), dsp, dbp,
              static_cast<int>(M), static_cast<int>(N), static_cast<int>(R), rows);
  }
  if (ds) {
    const int64_t total = M * R;
    FL_LAUNCH(finalize_kernel, cdiv(total, 256), 256, 0, stream, dsp, a, static_cast<int>(M), R,
              ds->data_ptr(), kF32, ds->stride(0), ds->stride(1), scale);
  }
  if (dB) {
    const int64_t total = N * R;
    FL_LAUNCH(finalize_kernel, cdiv(total, 256), 256, 0, stream, dbp, b, static_cast<int>(N), R,
              dB->data_ptr(), dt_code(dB->scalar_type()), dB->stride(0), dB->stride(1), scale);
  }
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
    int64_t seed, int64_t gemm) {
  check_fwd(x, weight, bias, lora_A, lora_B, dropout_p);
  check_cuda_inputs(x, lora_A);
  FL_DEVICE_GUARD(x);
  const int64_t gemm_v = resolve_gemm(gemm);  // before any launch: every size fails alike
  const fl_stream_t stream = FL_STREAM();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(0);
  auto y = fl_empty({M, N}, x.options());
  auto xa = fl_empty({M, R}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, xa};
  if (K == 0) return empty_k_fwd(y, xa, bias);
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
  launch_gemm(x, weight, /*q_nk=*/true, y, ia, gemm_v, stream);
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scale, double dropout_p, int64_t seed,
    bool needs_dx, bool needs_dA, bool needs_dB, int64_t gemm) {
  check_bwd(dy, x, weight, lora_A, lora_B, xa, dropout_p);
  check_cuda_inputs(x, lora_A);
  FL_DEVICE_GUARD(x);
  const int64_t gemm_v = resolve_gemm(gemm);
  const fl_stream_t stream = FL_STREAM();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(0);
  auto dx = needs_dx ? fl_empty({M, K}, x.options()) : fl_empty({0}, x.options());
  auto dA = needs_dA ? fl_empty({R, K}, lora_A.options()) : fl_empty({0}, lora_A.options());
  auto dB = needs_dB ? fl_empty({N, R}, lora_B.options()) : fl_empty({0}, lora_B.options());
  if (M == 0 || K == 0 || N == 0) {  // every gradient is an empty sum
    dx.zero_();
    dA.zero_();
    dB.zero_();
    return {dx, dA, dB};
  }
  const Dropout drop = make_dropout(dropout_p, seed);
  // One pass over dY gives ds (for dx and dA) and dB; only what is needed is computed.
  at::Tensor ds;
  if (needs_dx || needs_dA) ds = fl_empty({M, R}, x.options().dtype(at::kFloat));
  if (needs_dx || needs_dA || needs_dB)
    launch_bwd_ds_db(dy, lora_B, xa, (needs_dx || needs_dA) ? &ds : nullptr,
                     needs_dB ? &dB : nullptr, static_cast<float>(scale), stream);
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
    launch_gemm(dy, weight, /*q_nk=*/false, dx, ia, gemm_v, stream);
  }
  if (needs_dA)
    launch_reduce_m(ds, x, dA, dA.stride(0), dA.stride(1), drop.scale, drop, stream);
  return {dx, dA, dB};
}

}  // namespace
}  // namespace fused_lora

FL_TORCH_LIBRARY_IMPL(m) {
  m.impl("lora_linear_fwd", &fused_lora::lora_linear_fwd_cuda);
  m.impl("lora_linear_bwd", &fused_lora::lora_linear_bwd_cuda);
}
