// GEMM kernels shared by the single- and mixed-adapter ops: C = init + P Q^T, where init (the
// LoRA term, dropout mask, bias) is computed in fp32 in the prologue and becomes the initial
// accumulator, so C is written once.
// The MoE ops run the same kernels grouped (GROUPED, launch_grouped_gemm): every row tile holds
// the rows of one expert and reads that expert's Q, LoRA factor and bias.
#include "cuda_common.cuh"

#ifndef FUSED_LORA_SIM
#include <c10/cuda/CUDAFunctions.h>  // device_count (gemm_choice)
#endif

namespace fused_lora {
namespace {

constexpr int BM = 128, BN = 128, BK = 32, PAD = 8, STAGES = 4;
constexpr int LDA = BK + PAD;       // 40 halves = 80 B rows: ldmatrix's 8 row reads hit 8
                                    // distinct 16-byte bank groups (offsets 80*i mod 128)
constexpr int LDB_NN = BN + PAD;    // 136 halves = 272 B rows: likewise (272*i mod 128)
constexpr int LDI = 17;             // fp32 init staging rows: odd stride, conflict-free
constexpr int MAX_SLOT_PASSES = 4;
constexpr int kMaxSplits = 16;       // split-K: partial traffic grows with the count
constexpr int GROUP_M = 8;           // row tiles per column sweep (L2 reuse, see tile_coords)
constexpr int A_STAGE = BM * LDA;   // halves
template <bool Q_NK> constexpr int b_stage() { return Q_NK ? BN * LDA : BK * LDB_NN; }
// Init staging after the operand stages: L and Rt 16 ranks at a time, per-row physical row,
// slot, done flag.
template <int TN> constexpr int kInitSmem = (BM + TN) * LDI * 4 + BM * 16 + 16;  // TN: tile width
template <bool Q_NK> constexpr int tc_smem_bytes() {
  return STAGES * (A_STAGE + b_stage<Q_NK>()) * 2 + kInitSmem<BN>;
}

// Two adjacent outputs as one 4-byte store (the pointer is 4-byte aligned).
__device__ __forceinline__ void store2(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void store2(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// One 8-element (16-byte) operand chunk into shared memory: src is its first element in global
// memory (used only when `in`), `left` the elements of the row's extent from there. vec: one
// cp.async, zero-filled without a read when !in (vec implies the extent and pitch are multiples
// of 8 and the base 16-byte aligned, so a chunk is wholly in or out and even the unread source
// `base` is aligned, as cp.async requires); else scalar loads, zero past the extent.
template <typename T>
__device__ __forceinline__ void load_chunk(T* dst, const T* src, bool in, int64_t left, int vec,
                                           const T* base) {
  if (vec) {
    cp_async16(dst, in ? src : base, in);
  } else {
    const T zero = from_f<T>(0.f);
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[e] = in && e < left ? src[e] : zero;
  }
}

// Grouped tile order (as the Triton kernels' _grouped_pid): blocks launch x-fastest, and walking
// GROUP_M row tiles per sweep over the column tiles keeps a wave's operands in L2. At M = 8192,
// N = K = 4096 (bf16) a wave of 132 blocks then touches 8 x-tiles (8 MB) and ~17 W0 tiles
// (17 MB), under the 50 MB L2; in plain row order it touches all 64 x-tiles (64 MB) for every 2
// column tiles, re-reading x from DRAM 16 times (~1 GB, ~300 us of HBM time).
__device__ __forceinline__ void tile_coords(int& tile_m, int& tile_n) {
  const int num_m = static_cast<int>(gridDim.x), num_n = static_cast<int>(gridDim.y);
  const int pid = static_cast<int>(blockIdx.y) * num_m + static_cast<int>(blockIdx.x);
  const int per_group = GROUP_M * num_n;
  const int first_m = (pid / per_group) * GROUP_M;
  const int size_m = min(num_m - first_m, GROUP_M);
  tile_m = first_m + (pid % per_group) % size_m;
  tile_n = (pid % per_group) / size_m;
}

// Which tile elements a thread's accumulators hold. Both tensor-core layouts give each thread
// rows g and g + 8 of 16-row groups and column pairs (2t, 2t + 1) of 8-column groups (g = lane/4,
// t = lane%4; PTX ISA mma.m16n8k16 C and wgmma m64nNk16 D layouts), so one description serves
// both: RI row slots x CJ column pairs x 2, element (ri, cj, e) at tile (row(ri), col(cj) + e).
//   mma.sync (8 warps, 2 x 4 of 64x32): acc[i][j][h*2+e], row slot ri = 2i + h.
struct MmaFrag {
  static constexpr int RI = 8, CJ = 4;
  float (&acc)[4][4][4];
  int wm, wn, g, t4;
  __device__ __forceinline__ int row(int ri) const { return wm * 64 + (ri >> 1) * 16 + g + (ri & 1) * 8; }
  __device__ __forceinline__ int col(int cj) const { return wn * 32 + cj * 8 + t4 * 2; }
  __device__ __forceinline__ float& at(int ri, int cj, int e) const {
    return acc[ri >> 1][cj][(ri & 1) * 2 + e];
  }
};
//   wgmma (2 warpgroups of 64 x TN, warp w of a warpgroup owns its rows 16w..16w+15):
//   d[4j + 2h + e], row slot ri = h.
template <int TN>
struct WgFrag {
  static constexpr int RI = 2, CJ = TN / 8;
  float (&acc)[TN / 2];
  int wg, w4, g, t4;
  __device__ __forceinline__ int row(int ri) const { return wg * 64 + w4 * 16 + g + ri * 8; }
  __device__ __forceinline__ int col(int cj) const { return cj * 8 + t4 * 2; }
  __device__ __forceinline__ float& at(int ri, int cj, int e) const { return acc[cj * 4 + ri * 2 + e]; }
};

// Shared memory of the init (kInitSmem<TN> bytes at `base`, after the operand stages).
template <int TN>
struct InitSmem {
  static constexpr int kTN = TN;
  float* Ls;        // [BM][LDI]
  float* Rs;        // [TN][LDI]
  int64_t* row_pm;  // [BM] physical row (row_map)
  int* row_slot;    // [BM] slot of each row, -1: none
  int* row_done;    // [BM] LoRA term already added
  int* cur_slot;
  __device__ __forceinline__ explicit InitSmem(unsigned char* base)
      : Ls(reinterpret_cast<float*>(base)),
        Rs(Ls + BM * LDI),
        row_pm(reinterpret_cast<int64_t*>(Rs + TN * LDI)),
        row_slot(reinterpret_cast<int*>(row_pm + BM)),
        row_done(row_slot + BM),
        cur_slot(row_done + BM) {}
};

// The init (the LoRA term, dropout mask, bias) in fp32, straight into the accumulator fragments,
// while the first stages load: each thread sums L[m, r] Rt[n, r] for its elements over ranks
// staged 16 at a time in shared memory. Mixed adapters: the tile's rows are served one slot at a
// time (up to MAX_SLOT_PASSES slots, each an r-deep pass over only its own rows); rows of further
// slots fall back to a per-element gather. With rows sorted by slot (row_map), a tile holds one
// or two slots. Called by all 256 threads (it has barriers); row_pm must be written before.
// tg: the tile's group (grouped GEMM: Rt, scale and bias of that group, or no LoRA term at
// all), else the default (expert 0, its one LoRA term).
template <class Frag, class Smem>
__device__ __forceinline__ void tile_init(const Frag& fr, const InitArgs& ia, const Smem& sm,
                                          int64_t m0, int64_t n0, int M, int N,
                                          const TileGroup& tg = TileGroup{}) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int ri = 0; ri < Frag::RI; ++ri)
#pragma unroll
    for (int cj = 0; cj < Frag::CJ; ++cj) fr.at(ri, cj, 0) = fr.at(ri, cj, 1) = 0.f;
  __syncthreads();  // row_pm
  if (blockIdx.z != 0) return;  // split-K: split 0 alone carries the init (block-uniform)

  // One r-deep pass: acc += sum_r Ls[row, r] * Rs[col, r] over ranks [0, re), 16 at a time,
  // Ls / Rs filled by the two loaders (row / col within the tile, rank) -> fp32.
  auto rank_pass = [&](int re, auto&& load_l, auto&& load_r) {
    for (int r0 = 0; r0 < re; r0 += 16) {
      for (int i = tid; i < BM * 16; i += 256) {
        const int mm = i >> 4, rr = i & 15;
        sm.Ls[mm * LDI + rr] = r0 + rr < re ? load_l(mm, r0 + rr) : 0.f;
      }
      for (int i = tid; i < Smem::kTN * 16; i += 256) {
        const int nn = i >> 4, rr = i & 15;
        sm.Rs[nn * LDI + rr] = r0 + rr < re ? load_r(nn, r0 + rr) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int ri = 0; ri < Frag::RI; ++ri) {
        float lv[16];
        const float* lrow = sm.Ls + fr.row(ri) * LDI;
#pragma unroll
        for (int rr = 0; rr < 16; ++rr) lv[rr] = lrow[rr];
#pragma unroll
        for (int cj = 0; cj < Frag::CJ; ++cj)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float* rrow = sm.Rs + (fr.col(cj) + e) * LDI;
            float a = fr.at(ri, cj, e);
#pragma unroll
            for (int rr = 0; rr < 16; ++rr) a = fmaf(lv[rr], rrow[rr], a);
            fr.at(ri, cj, e) = a;
          }
      }
      __syncthreads();
    }
  };
  auto load_rt = [&](int64_t slot_off, int nn, int r) -> float {
    const int64_t n = n0 + nn;
    return n < N ? ldf(ia.Rt, slot_off + n * ia.srt_n + r * ia.srt_r, ia.rt_dt) : 0.f;
  };

  if (ia.ids == nullptr) {
    if (tg.lora)  // block-uniform; a bank's base-only tile has no term (init = bias exactly)
      rank_pass(
          ia.R,
          [&](int mm, int r) -> float {
            const int64_t m = m0 + mm;
            return m < M ? ia.L[sm.row_pm[mm] * ia.sl_m + r * ia.sl_r] : 0.f;
          },
          [&](int nn, int r) -> float { return load_rt(tg.rt_off, nn, r); });
  } else {
    if (tid < BM) {
      const int64_t m = m0 + tid;
      int64_t id = m < M ? ia.ids[sm.row_pm[tid]] : -1;
      if (id < 0 || id >= ia.n_slots || live_ranks(ia.ranks, id, ia.R) == 0) id = -1;
      sm.row_slot[tid] = static_cast<int>(id);
      sm.row_done[tid] = id < 0;
    }
    __syncthreads();
    for (int pass = 0; pass < MAX_SLOT_PASSES; ++pass) {
      if (tid == 0) {  // the slot of the first row still to serve (deterministic order)
        int cur = -1;
        for (int mm = 0; mm < BM && cur < 0; ++mm)
          if (!sm.row_done[mm]) cur = sm.row_slot[mm];
        *sm.cur_slot = cur;
      }
      __syncthreads();
      const int cur = *sm.cur_slot;
      if (cur < 0) break;  // uniform: every thread read the same value
      const float sc = ia.row_scale != nullptr ? ia.row_scale[cur] : 1.f;
      rank_pass(
          live_ranks(ia.ranks, cur, ia.R),
          [&](int mm, int r) -> float {
            return sm.row_slot[mm] == cur ? sc * ia.L[sm.row_pm[mm] * ia.sl_m + r * ia.sl_r]
                                          : 0.f;
          },
          [&](int nn, int r) -> float { return load_rt(cur * ia.srt_s, nn, r); });
      if (tid < BM && sm.row_slot[tid] == cur) sm.row_done[tid] = 1;
      __syncthreads();
    }
  }
  // alpha (times the group's scale: scale * slot_scales[a] as one fp32 factor, as the
  // reference's), dropout, the gather fallback for rows of slots past MAX_SLOT_PASSES, bias.
  const float alpha = ia.ids == nullptr ? ia.alpha * tg.lora_scale : ia.alpha;
#pragma unroll
  for (int ri = 0; ri < Frag::RI; ++ri) {
    const int mm = fr.row(ri);
    const int64_t m = m0 + mm;
    if (m >= M) continue;
    const int64_t pm = sm.row_pm[mm];
    const bool gather = ia.ids != nullptr && !sm.row_done[mm];
#pragma unroll
    for (int cj = 0; cj < Frag::CJ; ++cj)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t n = n0 + fr.col(cj) + e;
        if (n >= N) continue;
        float v = fr.at(ri, cj, e);
        if (gather) v += gather_sum(ia, pm, n);
        v *= alpha;
        if (ia.drop.on && !keep(pm * N + n, ia.drop.k1, ia.drop.k2, ia.drop.thresh)) v = 0.f;
        if (ia.bias != nullptr)
          v += ldf(ia.bias, tg.expert * ia.sbias_g + n * ia.s_bias, ia.bias_dt);
        fr.at(ri, cj, e) = v;
      }
  }
}

// Epilogue: C written once; a thread's two adjacent columns go out as one 4-byte store.
// Split-K (part != nullptr): fp32 partials [splits, M, N] at the physical rows instead.
template <class Frag, typename T>
__device__ __forceinline__ void tile_store(const Frag& fr, T* __restrict__ C, int64_t ldc,
                                           int vec_c, float* __restrict__ part,
                                           const int64_t* row_pm, int64_t m0, int64_t n0, int M,
                                           int N) {
  float* part_z = part != nullptr ? part + static_cast<int64_t>(blockIdx.z) * M * N : nullptr;
#pragma unroll
  for (int ri = 0; ri < Frag::RI; ++ri) {
    const int mm = fr.row(ri);
    if (m0 + mm >= M) continue;
    T* crow = C + row_pm[mm] * ldc;
    float* prow = part_z != nullptr ? part_z + row_pm[mm] * N : nullptr;
#pragma unroll
    for (int cj = 0; cj < Frag::CJ; ++cj) {
      const int64_t n = n0 + fr.col(cj);
      const float v0 = fr.at(ri, cj, 0), v1 = fr.at(ri, cj, 1);
      if (prow != nullptr) {
        if (n < N) prow[n] = v0;
        if (n + 1 < N) prow[n + 1] = v1;
      } else if (vec_c && n + 1 < N) {
        store2(crow + n, v0, v1);
      } else {
        if (n < N) crow[n] = from_f<T>(v0);
        if (n + 1 < N) crow[n + 1] = from_f<T>(v1);
      }
    }
  }
}

// Grouped GEMM (InitArgs::tiles): this block's tile as logical rows [m0, m_end) of the group
// tg describes (tile_group). False for an idle tile. A tile of group -1 (rows of no group) is
// written here as zeros (to the fp32 rows of `part` [M, N] when given, else to C) and also
// answers false. Block-uniform; called before any barrier.
template <typename T>
__device__ __forceinline__ bool grouped_tile(const InitArgs& ia, int tile, T* __restrict__ C,
                                             int64_t ldc, float* __restrict__ part, int64_t n0,
                                             int tn, int N, int64_t& m0, int& m_end,
                                             TileGroup& tg) {
  m0 = ia.tiles[tile];
  m_end = ia.tiles[ia.n_tiles + tile];
  const int64_t grp = ia.tiles[2 * ia.n_tiles + tile];
  if (m0 >= m_end) return false;
  if (grp < 0) {
    const int64_t cells = (m_end - m0) * tn;
    for (int64_t i = threadIdx.x; i < cells; i += blockDim.x) {
      const int64_t n = n0 + i % tn;
      if (n >= N) continue;
      const int64_t pm = ia.row_map[m0 + i / tn];
      if (part != nullptr) {
        part[pm * N + n] = 0.f;
      } else {
        T& c = C[pm * ldc + n];
        if constexpr (std::is_same_v<T, float>) c = 0.f; else c = from_f<T>(0.f);
      }
    }
    return false;
  }
  tg = tile_group(ia, grp);
  return true;
}

// ---- Tensor-core GEMM, mma.sync (sm_80+): C[M, N] = init + P[M, K] Q^T ---------------------------
// P row-major (unit inner stride). Q_NK: Q is [N, K] (k contiguous: the forward's W0); else Q is
// [K, N] (n contiguous: W0 itself in dx = dy W0). 128x128x32 block tile, 8 warps of 64x32, each
// a 4x4 grid of mma.sync m16n8k16 (fp32 accumulators), operands from shared memory through
// ldmatrix (.trans for Q as [K, N]), a STAGES-deep cp.async pipeline: while a stage is in the
// tensor cores the next STAGES-1 are in flight. One stage is 128x128x32 MACs, ~0.14 us on an
// H100 SM at its dense bf16 peak (989 TFLOPS / 132 SMs), against ~0.6-0.8 us of DRAM latency:
// 3 stages in flight cover it. 241-244 registers, no spills (ptxas, sm_90a): one 8-warp block
// per SM; __launch_bounds__(256, 2) would cap it at 128 registers and spill 3 KB: not used.
// Smem: 80 KB of stages + 18 KB of init staging (tc_smem_bytes).
//
// Tile edges: with 16-byte loads possible (extent and pitch multiples of 8, aligned base),
// chunks past M, N or K are zero-filled by cp.async without touching memory; otherwise every
// chunk goes through scalar loads (a K % 8 != 0 or misaligned operand); stores are masked.
// GROUPED (launch_grouped_gemm): the block's rows are its tile of InitArgs::tiles (x-index =
// tile) and Q, Rt, bias those of the tile's group (TileGroup: the base expert's Q and bias, the
// adapter x expert bank entry's Rt), P's rows m / p_topk; never split. ptxas (sm_90a): 247-249
// registers (240 before the banks / top-k row map), no spills; wgmma grouped: 190-191 (TN=128,
// was 172-176) and 211 / 255 (TN=256, was 255), no spills.
template <typename T, bool Q_NK, bool GROUPED = false>
__global__ void __launch_bounds__(256) gemm_tc_kernel(
    const T* __restrict__ P, int64_t ldp, int vec_p, const T* __restrict__ Q, int64_t ldq,
    int vec_q, T* __restrict__ C, int64_t ldc, int vec_c, int M, int N, int K, InitArgs ia,
    float* __restrict__ part, int k_split) {
  FL_DYNAMIC_SMEM(smem);
  T* As = reinterpret_cast<T*>(smem);                        // [STAGES][BM][LDA]
  T* Bs = As + STAGES * A_STAGE;                             // [STAGES][BN][LDA] or [BK][LDB_NN]
  const InitSmem<BN> sm(reinterpret_cast<unsigned char*>(Bs + STAGES * b_stage<Q_NK>()));

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  int tile_m, tile_n;
  tile_coords(tile_m, tile_n);
  int64_t m0 = static_cast<int64_t>(tile_m) * BM;
  const int64_t n0 = static_cast<int64_t>(tile_n) * BN;
  int m_end = M;     // logical rows of this tile: [m0, m_end)
  TileGroup tg;
  if constexpr (GROUPED) {
    if (!grouped_tile(ia, tile_m, C, ldc, part, n0, BN, N, m0, m_end, tg)) return;
    Q += tg.expert * ia.sq_g;
  }
  auto phys = [&](int64_t m) -> int64_t { return ia.row_map != nullptr ? ia.row_map[m] : m; };
  auto p_row = [&](int64_t m) -> int64_t {  // P's row (grouped: x[m // topk])
    if constexpr (GROUPED) return grouped_p_row(ia, phys(m)); else return phys(m);
  };
  if (tid < BM) sm.row_pm[tid] = m0 + tid < m_end ? phys(m0 + tid) : 0;  // read after init's sync

  // ---- operand stages ------------------------------------------------------------------------
  // P: 128 rows x 32 k = 512 16-byte chunks, 2 per thread, rows tid/4 and tid/4 + 64: their
  // (physical) row pointers are fixed for the whole K loop.
  const T* prow[2];
  bool prow_ok[2];
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int64_t gm = m0 + (tid >> 2) + it * 64;
    prow_ok[it] = gm < m_end;
    prow[it] = prow_ok[it] ? P + p_row(gm) * ldp : P;
  }
  auto load_stage = [&](int stage, int64_t k0) {
    T* as = As + stage * A_STAGE;
    T* bs = Bs + stage * b_stage<Q_NK>();
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      const int row = (tid >> 2) + it * 64, col = (tid & 3) * 8;
      const int64_t gk = k0 + col;
      const bool in = prow_ok[it] && gk < K;
      load_chunk(as + row * LDA + col, in ? prow[it] + gk : P, in, K - gk, vec_p, P);
    }
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      const int c = tid + it * 256;
      if constexpr (Q_NK) {
        const int row = c >> 2, col = (c & 3) * 8;
        const int64_t gn = n0 + row, gk = k0 + col;
        const bool in = gn < N && gk < K;
        load_chunk(bs + row * LDA + col, in ? Q + gn * ldq + gk : Q, in, K - gk, vec_q, Q);
      } else {
        const int row = c >> 4, col = (c & 15) * 8;
        const int64_t gk = k0 + row, gn = n0 + col;
        const bool in = gk < K && gn < N;
        load_chunk(bs + row * LDB_NN + col, in ? Q + gk * ldq + gn : Q, in, N - gn, vec_q, Q);
      }
    }
  };

  // Split-K (part != nullptr): block z sums k in [z * k_split, (z + 1) * k_split), k_split a
  // multiple of BK, so its tiles never reach into the next split's range; split 0 alone
  // carries the init.
  const int64_t kb = static_cast<int64_t>(blockIdx.z) * k_split;
  const int nk = static_cast<int>((min(static_cast<int64_t>(K), kb + k_split) - kb + BK - 1) / BK);
  // Prologue: STAGES-1 stages in flight (one commit group each, empty past K) before the init.
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_stage(s, kb + static_cast<int64_t>(s) * BK);
    cp_async_commit();
  }

  float acc[4][4][4];
  const MmaFrag fr{acc, warp >> 2, warp & 3, lane >> 2, lane & 3};  // warp tile (wm*64, wn*32)
  tile_init(fr, ia, sm, m0, n0, m_end, N, tg);

  // ---- main loop -----------------------------------------------------------------------------
  // ldmatrix addresses: lane l gives row l%8 of 8x8 matrix l/8. A (16x16 at (r, k)): matrices
  // (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a0..a3.
  // Q_NK (B stored [n][k]): (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
  // = {b0, b1} of n-tile 2jj, {b0, b1} of n-tile 2jj+1. [K][N] with .trans: (k 0-7, n 0-7),
  // (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15), the same registers.
  const int lq = lane >> 3, lr = lane & 7;
  const int a_off = (fr.wm * 64 + lr + (lq & 1) * 8) * LDA + (lq >> 1) * 8;
  const int b_off = Q_NK ? (fr.wn * 32 + lr + (lq >> 1) * 8) * LDA + (lq & 1) * 8
                         : (lr + (lq & 1) * 8) * LDB_NN + fr.wn * 32 + (lq >> 1) * 8;
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<STAGES - 2>();  // stage kt has landed (for this thread) ...
    __syncthreads();              // ... for every thread; stage kt-1 is free for reuse
    if (kt + STAGES - 1 < nk)
      load_stage((kt + STAGES - 1) % STAGES, kb + static_cast<int64_t>(kt + STAGES - 1) * BK);
    cp_async_commit();
    const T* as = As + (kt % STAGES) * A_STAGE;
    const T* bs = Bs + (kt % STAGES) * b_stage<Q_NK>();
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) ldmatrix_x4(a[i], as + a_off + i * 16 * LDA + ks);
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        uint32_t r[4];
        if constexpr (Q_NK)
          ldmatrix_x4(r, bs + b_off + jj * 16 * LDA + ks);
        else
          ldmatrix_x4_trans(r, bs + b_off + ks * LDB_NN + jj * 16);
        b[2 * jj][0] = r[0];
        b[2 * jj][1] = r[1];
        b[2 * jj + 1][0] = r[2];
        b[2 * jj + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_16816<T>(acc[i][j], a[i], b[j]);
    }
  }
  cp_async_wait<0>();
  tile_store(fr, C, ldc, vec_c, part, sm.row_pm, m0, n0, m_end, N);
}

// ---- Tensor-core GEMM, wgmma (sm_90a): the same contract as gemm_tc_kernel -----------------------
// On an H100/H200 the warpgroup MMA (wgmma), which the Triton kernels' GEMMs use there, is the
// instruction that reaches the dense bf16 peak (989 TFLOPS); mma.sync falls short of it (by how
// much on this kernel, bench linear's fused_cuda_mma row will show). Here 2 warpgroups each own 64 rows x 128
// columns of the 128x128 tile and issue wgmma.m64n128k16 straight from shared memory (no
// ldmatrix, no operand registers; 64 fp32 accumulators a thread, 172-178 registers, no spills:
// ptxas sm_90a). BK = 64: one 128-byte row of 16-bit k per tile row, so every operand tile is a
// stack of 128-byte-swizzle atoms (8 rows x 128 B = 1 KB, 16-byte chunk c of row r stored at
// chunk c ^ (r % 8): conflict-free for the tensor core and for the 16-byte cp.async stores, PTX
// ISA "Shared Memory Matrix Layout"):
//   P and (Q_NK) Q tiles [128 rows][64 k]: K-major, row r at 128 r bytes, stride byte offset
//   (between 8-row atoms) 1 KB; a k16 step moves the start address by 32 bytes.
//   Q as [K, N] (dx): [64 k][128 n] N-major (trans-b), two 64-column halves 8 KB apart (the
//   leading byte offset), each 64 k-rows of 128 B (stride byte offset 1 KB between 8-row
//   groups); a k16 step moves the start address by 2 KB.
// Pipeline (TN = 128; TN = 256 below): loads run LOOK = STAGES - 2 stages ahead of the MMAs and one MMA group stays in
// flight behind them (wgmma_wait<1>), so issuing a stage's MMAs does not wait for the previous
// stage's to finish: at iteration kt the load goes to the slot of stage kt - 2, whose MMAs every warpgroup
// retired (wait<1> at kt - 1) before the barrier. A stage is 128x128x64 MACs, ~0.28 us at the
// SM's share of peak, so LOOK = 3 stages cover ~0.8 us of DRAM latency. Smem: 5 stages x 32 KB +
// 18 KB init + 1 KB to align the atoms (the dynamic base is only 16-byte aligned) = 180 KB;
// TN = 256: 4 stages x 48 KB + 26 KB init + 1 KB = 221 KB, 222-238 registers, no spills.
// The init, tile order, split-K, row_map and edges are those of gemm_tc_kernel.
// Tile width (an estimate, not measured): 128x128 tiles move (M/128)(N/128) K (128+128) x 2
// bytes from L2 to the SMs, 4.3 GB at M = 8192, N = K = 4096, ~0.6 ms at ~7 TB/s of L2
// bandwidth against 0.28 ms of MMAs at peak; 128x256 tiles (TN = 256: m64n256 per warpgroup,
// CUTLASS's and our Triton kernels' first Hopper config) move 3.2 GB, but park the finished tile
// in shared memory for the init and keep 2 stages in flight, not 3. Which wins is for a GPU run
// to show (bench linear times both: fused_cuda, fused_cuda_wgmma256); until then TN = 128 is the
// default. (An init in the accumulators themselves, with wgmma_wait<1>, makes ptxas serialise
// the MMAs, C7515; with wait<0> it does not, but then no MMA group overlaps the next stage's.)
constexpr int WG_BK = 64;
constexpr int WG_TILE_A = BM * WG_BK;  // halves of the P tile a stage (16 KB)
// Stage slots: TN = 128: 5 of 32 KB, 3 loading ahead; TN = 256: 4 of 48 KB, 2 ahead (the same
// ~100 KB in flight).
template <int TN> constexpr int wg_stages() { return TN == 256 ? 4 : 5; }
template <int TN> constexpr int wg_smem_bytes() {
  return wg_stages<TN>() * (WG_TILE_A + TN * WG_BK) * 2 + kInitSmem<TN> + 1024;
}

// Element offset of 16-byte chunk `c` (8 halves) of row `r` in a K-major swizzled tile.
__device__ __forceinline__ int swz_k(int r, int c) { return r * 64 + ((c ^ (r & 7)) << 3); }
// Element offset of chunk `c` (8 along n) of k-row `k` in an N-major [64 k][TN n] tile: 64-column
// atoms columns 8 KB apart.
__device__ __forceinline__ int swz_n(int k, int c) {
  return (c >> 3) * (WG_BK * 64) + k * 64 + (((c & 7) ^ (k & 7)) << 3);
}

template <typename T, int TRANS_B, int TN>
__device__ __forceinline__ void wgmma_tile(float (&d)[TN / 2], uint64_t da, uint64_t db) {
  if constexpr (TN == 256)
    wgmma_m64n256k16<T, TRANS_B>(d, da, db);
  else
    wgmma_m64n128k16<T, TRANS_B>(d, da, db);
}

// TN: the tile width, 128 (wgmma m64n128k16) or 256 (m64n256k16; gemm=3, wgmma256).
// GROUPED: as gemm_tc_kernel's.
template <typename T, bool Q_NK, int TN, bool GROUPED = false>
__global__ void __launch_bounds__(256, 1) gemm_wgmma_kernel(
    const T* __restrict__ P, int64_t ldp, int vec_p, const T* __restrict__ Q, int64_t ldq,
    int vec_q, T* __restrict__ C, int64_t ldc, int vec_c, int M, int N, int K, InitArgs ia,
    float* __restrict__ part, int k_split) {
#if FL_HAS_WGMMA
  constexpr int NS = wg_stages<TN>(), LOOK = NS - 2, TILE_B = TN * WG_BK, NA = TN / 2;
  FL_DYNAMIC_SMEM(smem_raw);
  // Swizzle atoms need 1024-byte aligned shared-window addresses (descriptor base offset 0).
  unsigned char* smem = smem_raw + ((1024 - smem_u32(smem_raw) % 1024) % 1024);
  T* As = reinterpret_cast<T*>(smem);                    // [NS][128][64] swizzled
  T* Bs = As + NS * WG_TILE_A;                           // [NS] TN n x 64 k either way
  const InitSmem<TN> sm(reinterpret_cast<unsigned char*>(Bs + NS * TILE_B));

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  int tile_m, tile_n;
  tile_coords(tile_m, tile_n);
  int64_t m0 = static_cast<int64_t>(tile_m) * BM;
  const int64_t n0 = static_cast<int64_t>(tile_n) * TN;
  int m_end = M;  // logical rows of this tile: [m0, m_end)
  TileGroup tg;
  if constexpr (GROUPED) {
    if (!grouped_tile(ia, tile_m, C, ldc, part, n0, TN, N, m0, m_end, tg)) return;
    Q += tg.expert * ia.sq_g;
  }
  auto phys = [&](int64_t m) -> int64_t { return ia.row_map != nullptr ? ia.row_map[m] : m; };
  auto p_row = [&](int64_t m) -> int64_t {  // P's row (grouped: x[m // topk])
    if constexpr (GROUPED) return grouped_p_row(ia, phys(m)); else return phys(m);
  };
  if (tid < BM) sm.row_pm[tid] = m0 + tid < m_end ? phys(m0 + tid) : 0;

  // P: 128 rows x 8 chunks = 1024 chunks, 4 per thread: chunk tid & 7 of rows tid/8 + 32 it.
  const int pc = tid & 7;
  const T* prow[4];
  bool prow_ok[4];
#pragma unroll
  for (int it = 0; it < 4; ++it) {
    const int64_t gm = m0 + (tid >> 3) + it * 32;
    prow_ok[it] = gm < m_end;
    prow[it] = prow_ok[it] ? P + p_row(gm) * ldp : P;
  }
  auto load_stage = [&](int stage, int64_t k0) {
    T* as = As + stage * WG_TILE_A;
    T* bs = Bs + stage * TILE_B;
#pragma unroll
    for (int it = 0; it < 4; ++it) {
      const int row = (tid >> 3) + it * 32;
      const int64_t gk = k0 + pc * 8;
      const bool in = prow_ok[it] && gk < K;
      load_chunk(as + swz_k(row, pc), in ? prow[it] + gk : P, in, K - gk, vec_p, P);
    }
    constexpr int CPR = TN / 8;  // chunks a k-row of the [64 k][TN n] tile
#pragma unroll
    for (int it = 0; it < TN / 32; ++it) {
      if constexpr (Q_NK) {  // [TN n][64 k], as P
        const int row = (tid >> 3) + it * 32;
        const int64_t gn = n0 + row, gk = k0 + pc * 8;
        const bool in = gn < N && gk < K;
        load_chunk(bs + swz_k(row, pc), in ? Q + gn * ldq + gk : Q, in, K - gk, vec_q, Q);
      } else {  // [64 k][TN n]: chunk tid % CPR of k-rows tid / CPR + (256 / CPR) it
        const int kr = tid / CPR + it * (256 / CPR), c = tid % CPR;
        const int64_t gk = k0 + kr, gn = n0 + c * 8;
        const bool in = gk < K && gn < N;
        load_chunk(bs + swz_n(kr, c), in ? Q + gk * ldq + gn : Q, in, N - gn, vec_q, Q);
      }
    }
  };

  const int64_t kb = static_cast<int64_t>(blockIdx.z) * k_split;
  const int nk =
      static_cast<int>((min(static_cast<int64_t>(K), kb + k_split) - kb + WG_BK - 1) / WG_BK);
#pragma unroll
  for (int s = 0; s < LOOK; ++s) {
    if (s < nk) load_stage(s, kb + static_cast<int64_t>(s) * WG_BK);
    cp_async_commit();
  }

  // The MMAs start from zeroed accumulators. With the init as their starting value (as
  // gemm_tc_kernel does), ptxas copies accumulator registers inside the pipelined loop and
  // serialises every wgmma (warning C7515). TN = 128: the init goes to registers of its own
  // first, overlapping the prologue loads, and is added after the last MMA (172-178 registers,
  // no spills). TN = 256: 128 accumulators leave no room for 128 more, so the finished GEMM tile
  // is parked in the (then free) stage buffers while the init is computed into the accumulators
  // (128 KB through shared memory, the init's loads no longer hidden behind the prologue's).
  const int wg = warp >> 2;
  float acc[NA];
  constexpr int NI = TN == 128 ? NA : 1;
  float ini[NI];
  const WgFrag<TN> fr{acc, wg, warp & 3, lane >> 2, lane & 3};
  if constexpr (TN == 128) {
    const WgFrag<TN> fi{ini, wg, warp & 3, lane >> 2, lane & 3};
    tile_init(fi, ia, sm, m0, n0, m_end, N, tg);
  }
#pragma unroll
  for (int i = 0; i < NA; ++i) acc[i] = 0.f;

  const uint32_t a_base = smem_u32(As) + wg * 64 * 128;  // this warpgroup's 64 rows: 8 atoms
  const uint32_t b_base = smem_u32(Bs);
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<LOOK - 1>();  // stage kt has landed (for this thread) ...
    fence_proxy_async();        // ... is visible to the tensor cores' (async) reads ...
    __syncthreads();            // ... for every thread; stage kt-2's MMAs are retired
    if (kt + LOOK < nk)
      load_stage((kt + LOOK) % NS, kb + static_cast<int64_t>(kt + LOOK) * WG_BK);
    cp_async_commit();
    const int s = kt % NS;
    const uint32_t a_st = a_base + s * WG_TILE_A * 2, b_st = b_base + s * TILE_B * 2;
    wgmma_fence_acc(acc);  // the accumulators stay in their registers across the async MMAs
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < WG_BK / 16; ++ks) {
      const uint64_t da = wgmma_desc_128b(a_st + ks * 32, 16, 1024);
      if constexpr (Q_NK)
        wgmma_tile<T, 0, TN>(acc, da, wgmma_desc_128b(b_st + ks * 32, 16, 1024));
      else
        wgmma_tile<T, 1, TN>(acc, da, wgmma_desc_128b(b_st + ks * 2048, WG_BK * 128, 1024));
    }
    wgmma_commit();
    wgmma_fence_acc(acc);
    wgmma_wait<1>();
  }
  wgmma_wait<0>();
  wgmma_fence_acc(acc);
  cp_async_wait<0>();
  if constexpr (TN == 128) {
#pragma unroll
    for (int i = 0; i < NA; ++i) acc[i] += ini[i];
  } else {
    float* park = reinterpret_cast<float*>(smem);  // [NA][256]: conflict-free, 128 KB
    static_assert(NA * 256 * 4 <= NS * (WG_TILE_A + TILE_B) * 2, "park fits the stages");
    __syncthreads();  // every warpgroup's MMAs have read their last stage
#pragma unroll
    for (int i = 0; i < NA; ++i) park[i * 256 + tid] = acc[i];
    tile_init(fr, ia, sm, m0, n0, m_end, N, tg);  // zeroes acc first; has barriers
#pragma unroll
    for (int i = 0; i < NA; ++i) acc[i] += park[i * 256 + tid];
  }
  tile_store(fr, C, ldc, vec_c, part, sm.row_pm, m0, n0, m_end, N);
#else
  __trap();  // launched only where fl_has_wgmma() (an sm_90a build on a 9.0 device)
#endif
}

// C[m, n] = sum_z part[z, m, n], z in order (deterministic), rounded once to T.
template <typename T>
__global__ void __launch_bounds__(256) splitk_finalize_kernel(
    const float* __restrict__ part, int splits, int64_t M, int64_t N, T* __restrict__ C,
    int64_t ldc) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * N) return;
  const int64_t m = idx / N, n = idx % N;
  float s = 0.f;
  for (int z = 0; z < splits; ++z) s += part[z * M * N + idx];
  C[m * ldc + n] = from_f<T>(s);
}

// ---- fp32 GEMM (SIMT, IEEE fp32 like the Triton path's "ieee"): C = init + P Q^T --------------
// Arbitrary strides; Q element (n, k) at n*sq_n + k*sq_k. 64x64x16 tile, 4x4 outputs per
// thread at stride 16 (conflict-free shared reads). GROUPED: as gemm_tc_kernel's (64-row tiles,
// x-index = tile; rows through row_map).
template <bool GROUPED>
__global__ void __launch_bounds__(256) gemm_simt_kernel(
    const float* __restrict__ P, int64_t sp_m, int64_t sp_k, const float* __restrict__ Q,
    int64_t sq_n, int64_t sq_k, float* __restrict__ C, int64_t ldc, int M, int N, int K,
    InitArgs ia) {
  __shared__ float Ps[16][64 + 1];
  __shared__ float Qs[16][64 + 1];
  __shared__ int64_t rows_pm[GROUPED ? 64 : 1];  // physical rows of the tile (GROUPED)
  __shared__ int64_t rows_p[GROUPED ? 64 : 1];   // their rows of P (x[m // topk])
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  int64_t m0 = static_cast<int64_t>(blockIdx.x) * 64;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * 64;
  int m_end = M;  // logical rows [m0, m_end); physical row pm(m)
  TileGroup tg;
  if constexpr (GROUPED) {
    if (!grouped_tile(ia, static_cast<int>(blockIdx.x), C, ldc, static_cast<float*>(nullptr),
                      n0, 64, N, m0, m_end, tg))
      return;
    Q += tg.expert * ia.sq_g;
    if (tid < 64) {
      const int64_t r = m0 + tid < m_end ? ia.row_map[m0 + tid] : 0;
      rows_pm[tid] = r;
      rows_p[tid] = grouped_p_row(ia, r);
    }
    __syncthreads();
  }
  auto pm = [&](int64_t m) -> int64_t {
    if constexpr (GROUPED) return rows_pm[m - m0]; else return m;
  };
  auto p_row = [&](int64_t m) -> int64_t {
    if constexpr (GROUPED) return rows_p[m - m0]; else return m;
  };
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    for (int i = tid; i < 64 * 16; i += 256) {
      const int kk = i & 15, rr = i >> 4;
      const int64_t k = k0 + kk, m = m0 + rr, n = n0 + rr;
      Ps[kk][rr] = (m < m_end && k < K) ? P[p_row(m) * sp_m + k * sp_k] : 0.f;
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
    const int64_t lm = m0 + ty + 16 * i;
    if (lm >= m_end) continue;
    const int64_t m = pm(lm);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n >= N) continue;
      float l = 0.f;
      if (ia.ids != nullptr) {
        l = gather_sum(ia, m, n) * ia.alpha;
      } else if (tg.lora) {  // a bank's base-only tile: no term (C = bias + P Q^T exactly)
        for (int r = 0; r < ia.R; ++r)
          l = fmaf(ia.L[m * ia.sl_m + r * ia.sl_r],
                   ldf(ia.Rt, tg.rt_off + n * ia.srt_n + r * ia.srt_r, ia.rt_dt), l);
        l *= ia.alpha * tg.lora_scale;
      }
      if (ia.drop.on && !keep(m * N + n, ia.drop.k1, ia.drop.k2, ia.drop.thresh)) l = 0.f;
      if (ia.bias != nullptr)
        l += ldf(ia.bias, tg.expert * ia.sbias_g + n * ia.s_bias, ia.bias_dt);
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
constexpr int GEMV_UNROLL = 4;  // 16-byte chunks of W in flight per lane

// __launch_bounds__(256, 4): 64 registers (no spills; 73 without the bound), so 4 blocks fit an SM
// and N = 4096 (512 blocks) runs in one wave on 132 SMs instead of 3 blocks a SM and a tail.
__global__ void __launch_bounds__(256, 4) gemv_kernel(
    const void* __restrict__ P, int64_t sp_m, const void* __restrict__ W, int64_t sw_n, int dt,
    int vec, void* __restrict__ C, int64_t ldc, int M, int N, int K, InitArgs ia) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * 8 + warp;
  if (n >= N) return;
  float acc[GEMV_MAX_M];
#pragma unroll
  for (int m = 0; m < GEMV_MAX_M; ++m) acc[m] = 0.f;
  const int64_t K8 = (K / 8) * 8;  // P and W have unit inner stride here
  // W's row is read GEMV_UNROLL chunks of 16 bytes a lane at a time, all issued before any is
  // used: bound by HBM, the GPU needs ~bandwidth x latency = 3.3 TB/s x ~0.8 us ~ 2.6 MB in
  // flight, ~20 KB per SM; one chunk a lane is 512 B a warp, ~16 KB for the ~31 warps an SM
  // holds at N = 4096 (512 blocks), four are ~64 KB.
  auto step = [&](int64_t k, const float (&w)[8]) {
#pragma unroll
    for (int m = 0; m < GEMV_MAX_M; ++m) {
      if (m < M) {
        float xv[8];
        load8(P, m * sp_m + k, dt, vec, xv);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[m] = fmaf(xv[e], w[e], acc[m]);
      }
    }
  };
  int64_t k = static_cast<int64_t>(lane) * 8;
  for (; k + (GEMV_UNROLL - 1) * 256 < K8; k += GEMV_UNROLL * 256) {
    float w[GEMV_UNROLL][8];
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; ++u) load8(W, n * sw_n + k + u * 256, dt, vec, w[u]);
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; ++u) step(k + u * 256, w[u]);
  }
  for (; k < K8; k += 256) {
    float w[8];
    load8(W, n * sw_n + k, dt, vec, w);
    step(k, w);
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

}  // namespace

int64_t resolve_gemm(int64_t gemm) {
  check_gemm(gemm);
  if (gemm == kGemmWgmma || gemm == kGemmWgmma256) {
    TORCH_CHECK(fl_has_wgmma(), "gemm=", gemm, " (", gemm_name(gemm), "): the wgmma GEMM needs "
                "an sm_90a build (FUSED_LORA_CUDA_ARCHS with 90a, the default) and a compute "
                "capability 9.0 GPU (H100/H200), which device ", fl_current_device(), " is not; "
                "gemm=0 (auto) or 1 (mma) run everywhere");
    return gemm;
  }
  if (gemm == kGemmMma) return kGemmMma;
#ifdef FUSED_LORA_SIM
  return kGemmMma;  // the emulator tests pick each GEMM explicitly
#else
  return fl_has_wgmma() ? kGemmWgmma : kGemmMma;
#endif
}

int64_t gemm_choice(int64_t requested, int64_t device) {
#ifdef FUSED_LORA_SIM
  TORCH_CHECK(device == 0, "gemm_choice: the emulator has one device, 0; got ", device);
  return resolve_gemm(requested);
#else
  TORCH_CHECK(device >= 0 && device < c10::cuda::device_count(), "gemm_choice: device must be a "
              "CUDA device index in [0, ", static_cast<int>(c10::cuda::device_count()), "), got ",
              device);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return resolve_gemm(requested);
#endif
}

void launch_gemm(const at::Tensor& P, const at::Tensor& Q, bool q_nk, at::Tensor& C,
                 const InitArgs& ia, int64_t gemm, fl_stream_t stream) {
  const int64_t M = P.size(0), K = P.size(1), N = C.size(1);
  if (q_nk && M <= GEMV_MAX_M) {
    const at::Tensor Pc = unit_inner(P), Qc = unit_inner(Q);
    const int dt = dt_code(P.scalar_type());
    const int vec = dt != kF32 && Pc.stride(0) % 8 == 0 && Qc.stride(0) % 8 == 0 &&
                    aligned16(Pc) && aligned16(Qc);
    FL_LAUNCH(gemv_kernel, cdiv(N, 8), 256, 0, stream,
        Pc.data_ptr(), Pc.stride(0), Qc.data_ptr(), Qc.stride(0), dt, vec, C.data_ptr(),
        C.stride(0), static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), ia);
    return;
  }
  if (P.scalar_type() == at::kFloat) {
    const int64_t sq_n = q_nk ? Q.stride(0) : Q.stride(1);
    const int64_t sq_k = q_nk ? Q.stride(1) : Q.stride(0);
    dim3 grid(cdiv(M, 64), cdiv(N, 64));
    TORCH_CHECK(grid.y <= 65535, "out_features too large for the fp32 kernel");
    FL_LAUNCH(gemm_simt_kernel<false>, grid, 256, 0, stream,
        P.data_ptr<float>(), P.stride(0), P.stride(1), Q.data_ptr<float>(), sq_n, sq_k,
        C.data_ptr<float>(), C.stride(0), static_cast<int>(M), static_cast<int>(N),
        static_cast<int>(K), ia);
    return;
  }
  const at::Tensor Pc = unit_inner(P), Qc = unit_inner(Q);
  // 16-byte chunks need the chunked extent and the row pitch in multiples of 8 elements and a
  // 16-byte aligned base; pair stores need an even pitch and 4-byte alignment.
  const int vec_p = K % 8 == 0 && Pc.stride(0) % 8 == 0 && aligned16(Pc);
  const int vec_q = (q_nk ? K : N) % 8 == 0 && Qc.stride(0) % 8 == 0 && aligned16(Qc);
  const int vec_c = C.stride(0) % 2 == 0 && reinterpret_cast<uintptr_t>(C.data_ptr()) % 4 == 0;
  TORCH_CHECK(gemm == kGemmMma || gemm == kGemmWgmma || gemm == kGemmWgmma256,
              "launch_gemm: gemm must be resolved (resolve_gemm), got ", gemm);
  const int64_t choice = gemm;
  const int bk = choice == kGemmMma ? BK : WG_BK;
  dim3 grid(cdiv(M, BM), cdiv(N, choice == kGemmWgmma256 ? 256 : BN));
  TORCH_CHECK(grid.y <= 65535, "out_features too large for the tensor-core kernel");
  // Split-K when the tiles do not fill the GPU: decode and small batches (M = 16, N = 4096 is
  // 32 tiles on 132 SMs, each streaming 1/32 of W0 through one SM, far from the HBM
  // bandwidth) get up to one block per SM (one 256-thread block fits an SM: ~240 registers, or
  // 180-221 KB of shared memory for wgmma), each split >= 4 k-tiles so the pipeline fills.
  // Partials cost splits x M x N x 4 bytes (5 MB at M = 64, N = 4096, 5 splits) against W0's
  // 32 MB, summed in order by splitk_finalize_kernel.
  const int tiles = static_cast<int>(grid.x * grid.y);
  int splits = std::min({cdiv(fl_sm_count(), tiles), std::max(1, static_cast<int>(K / (4 * bk))),
                         kMaxSplits});
  const int k_split = cdiv(cdiv(K, std::max(splits, 1)), bk) * bk;
  splits = cdiv(K, k_split);
  grid.z = splits;
  at::Tensor part = splits > 1 ? fl_empty({splits, M, N}, C.options().dtype(at::kFloat))
                               : at::Tensor();
  auto launch = [&](auto tag, auto q_nk_tag) {
    using T = decltype(tag);
    constexpr bool kQnk = decltype(q_nk_tag)::value;
    auto run = [&](auto kern, int smem) {
      FL_SET_SMEM(kern, smem);
      FL_LAUNCH(kern, grid, 256, smem, stream, reinterpret_cast<const T*>(Pc.data_ptr()),
                Pc.stride(0), vec_p, reinterpret_cast<const T*>(Qc.data_ptr()), Qc.stride(0),
                vec_q, reinterpret_cast<T*>(C.data_ptr()), C.stride(0), vec_c,
                static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), ia,
                splits > 1 ? part.data_ptr<float>() : nullptr, k_split);
    };
    if (choice == kGemmWgmma256)
      run(gemm_wgmma_kernel<T, kQnk, 256>, wg_smem_bytes<256>());
    else if (choice == kGemmWgmma)
      run(gemm_wgmma_kernel<T, kQnk, 128>, wg_smem_bytes<128>());
    else
      run(gemm_tc_kernel<T, kQnk>, tc_smem_bytes<kQnk>());
    if (splits > 1)
      FL_LAUNCH(splitk_finalize_kernel<T>, cdiv(M * N, 256), 256, 0, stream,
                part.data_ptr<float>(), splits, M, N, reinterpret_cast<T*>(C.data_ptr()),
                C.stride(0));
  };
  const bool half = P.scalar_type() == at::kHalf;
  if (half && q_nk) launch(__half{}, std::true_type{});
  else if (half) launch(__half{}, std::false_type{});
  else if (q_nk) launch(__nv_bfloat16{}, std::true_type{});
  else launch(__nv_bfloat16{}, std::false_type{});
}

int64_t grouped_gemm_rows(at::ScalarType t) { return t == at::kFloat ? 64 : BM; }

void launch_grouped_gemm(const at::Tensor& P, const at::Tensor& Q, at::Tensor& C,
                         const InitArgs& ia_in, int64_t gemm, fl_stream_t stream) {
  const int64_t M = C.size(0), K = P.size(1), N = C.size(1);  // P: M / p_topk rows
  TORCH_CHECK(Q.dim() == 3 && Q.size(1) == N && Q.size(2) == K,
              "launch_grouped_gemm: Q must be [G, N=", N, ", K=", K, "], got ", Q.sizes());
  TORCH_CHECK(ia_in.tiles != nullptr && ia_in.row_map != nullptr,
              "launch_grouped_gemm: the tile table and row_map must be set");
  if (ia_in.n_tiles == 0 || N == 0) return;
  InitArgs ia = ia_in;
  if (P.scalar_type() == at::kFloat) {
    ia.sq_g = Q.stride(0);
    const dim3 grid(static_cast<unsigned>(ia.n_tiles), cdiv(N, 64));
    TORCH_CHECK(grid.y <= 65535, "out_features too large for the fp32 kernel");
    FL_LAUNCH(gemm_simt_kernel<true>, grid, 256, 0, stream,
        P.data_ptr<float>(), P.stride(0), P.stride(1), Q.data_ptr<float>(), Q.stride(1),
        Q.stride(2), C.data_ptr<float>(), C.stride(0), static_cast<int>(M), static_cast<int>(N),
        static_cast<int>(K), ia);
    return;
  }
  TORCH_CHECK(gemm == kGemmMma || gemm == kGemmWgmma || gemm == kGemmWgmma256,
              "launch_grouped_gemm: gemm must be resolved (resolve_gemm), got ", gemm);
  // C in fp32 for fp16/bf16 P: the GEMM's fp32 tile goes out unrounded through the split-K
  // partial store (tile_store's `part`: rows of pitch N, hence contiguous C).
  const bool c32 = C.scalar_type() == at::kFloat;
  TORCH_CHECK(C.scalar_type() == P.scalar_type() || (c32 && C.is_contiguous()),
              "launch_grouped_gemm: C must be P's dtype or contiguous fp32, got ",
              C.scalar_type(), " ", C.sizes(), " strides ", C.strides());
  float* c_part = c32 ? C.data_ptr<float>() : nullptr;
  const at::Tensor Pc = unit_inner(P);
  // Q's [N, K] face read in place: k-contiguous rows (Q_NK, ldq = n stride) or n-contiguous
  // rows (Q as [K, N], ldq = k stride: a transposed weight), else a contiguous copy.
  at::Tensor Qc = Q;
  bool q_nk = true;
  if (Q.stride(2) == 1 || K <= 1) {
    q_nk = true;
  } else if (Q.stride(1) == 1 || N <= 1) {
    q_nk = false;
  } else {
    Qc = Q.contiguous();
  }
  const int64_t ldq = q_nk ? Qc.stride(1) : Qc.stride(2);
  ia.sq_g = Qc.stride(0);
  const int vec_p = K % 8 == 0 && Pc.stride(0) % 8 == 0 && aligned16(Pc);
  const int vec_q = (q_nk ? K : N) % 8 == 0 && ldq % 8 == 0 && ia.sq_g % 8 == 0 &&
                    aligned16(Qc);
  const int vec_c = C.stride(0) % 2 == 0 && reinterpret_cast<uintptr_t>(C.data_ptr()) % 4 == 0;
  const int tn = gemm == kGemmWgmma256 ? 256 : BN;
  const dim3 grid(static_cast<unsigned>(ia.n_tiles), cdiv(N, tn), 1);
  TORCH_CHECK(grid.y <= 65535, "out_features too large for the tensor-core kernel");
  auto launch = [&](auto tag, auto q_nk_tag) {
    using T = decltype(tag);
    constexpr bool kQnk = decltype(q_nk_tag)::value;
    auto run = [&](auto kern, int smem) {
      FL_SET_SMEM(kern, smem);
      FL_LAUNCH(kern, grid, 256, smem, stream, reinterpret_cast<const T*>(Pc.data_ptr()),
                Pc.stride(0), vec_p, reinterpret_cast<const T*>(Qc.data_ptr()), ldq, vec_q,
                reinterpret_cast<T*>(C.data_ptr()), C.stride(0), vec_c, static_cast<int>(M),
                static_cast<int>(N), static_cast<int>(K), ia, c_part, static_cast<int>(K));
    };
    if (gemm == kGemmWgmma256)
      run(gemm_wgmma_kernel<T, kQnk, 256, true>, wg_smem_bytes<256>());
    else if (gemm == kGemmWgmma)
      run(gemm_wgmma_kernel<T, kQnk, 128, true>, wg_smem_bytes<128>());
    else
      run(gemm_tc_kernel<T, kQnk, true>, tc_smem_bytes<kQnk>());
  };
  const bool half = P.scalar_type() == at::kHalf;
  if (half && q_nk) launch(__half{}, std::true_type{});
  else if (half) launch(__half{}, std::false_type{});
  else if (q_nk) launch(__nv_bfloat16{}, std::true_type{});
  else launch(__nv_bfloat16{}, std::false_type{});
}

}  // namespace fused_lora
