// CUDA kernels of the mixture-of-experts ops fused_lora_C::moe_lora_linear_fwd / _bwd (sm_80+).
//
// Math (W = weight [E, N, K], b = bias [E, N], A = lora_A [S, E, R, K], B = lora_B
// [S, E, N, R] (one adapter per expert: S = 1, read as a bank of one), s = scale * ss[a] (ss =
// slot_scales, 1 when None), drop() the LoRA branch's dropout on x, drop'() its mask on a
// gradient of x; row m of the op's M = T * topk rows reads x[m // topk] =: x(m), routed to
// virtual expert g = adapter a on expert e (lora.h, MoeGroups), a < 0: the base alone):
//
//   forward   xa[m] = drop(x(m)) A[a, e]^T                  moe_shrink_kernel      (fp32 [M, R])
//             y[m]  = x(m) W[e]^T + b[e] + s xa[m] B[a, e]^T the shared grouped GEMM (gemm.cu),
//                                                            the expand as its initial accumulator
//   backward  ds[m] = s dy[m] B[a, e]                        moe_shrink_kernel (B read rank-inner)
//             dx[m] = dy[m] W[e] + drop'(ds[m] A[a, e])      grouped GEMM (W read as [E, K, N])
//             dx[t] = sum_{j < topk} dx[t topk + j]          moe_topk_sum_kernel (topk > 1: the
//                                                            GEMM's rows in fp32, summed in order)
//             dA[a, e] = sum_{m of g} ds[m]^T drop(x(m))     moe_reduce_kernel + finalize
//             dB[a, e] = s sum_{m of g} dy[m]^T xa[m]
// Rows of a base-only id (a < 0) get no LoRA term at all (not a zero one: y is the base bit for
// bit, whatever the bank holds) and xa = ds = 0; nothing of theirs reaches dA / dB.
//
// Rows are grouped by virtual expert through the routing (order, keys: the stable sort of the
// ids with rows of no expert first; the batch's RoutingPlan computes it once per MoE layer, else
// it is sorted here on the device). moe_tiles_kernel cuts the sorted rows into a tile table
// (each tile the rows of one virtual expert, grouped_gemm_rows() per tile, the rows of no expert
// as tiles of group -1), on the device from the keys: no host sync, CUDA-graph safe. The grouped GEMM and the
// shrink walk that table (idle tiles exit at once); the weight gradients walk the sorted rows in
// fixed chunks. Every sum has a fixed order: no float atomics, bitwise reproducible.
//
// Names here carry a moe_ prefix: the emulator build (tools/simt_emu) compiles every .cu file
// of csrc/ into one translation unit, so they must not collide with the other files' helpers.
// Helpers both this file and multi_lora_cuda.cu use (the sorted-row reductions' steps, the
// routing sort, load_run8, vec_ok) live in cuda_common.cuh.
#include "cuda_common.cuh"

namespace fused_lora {
namespace {

// ---- tile table --------------------------------------------------------------------------------
// tiles [3, T] (int32): tile t covers sorted positions [row0, row1) of group g (InitArgs::tiles):
// group -1 (the rows of no expert, keys < 0) and every expert 0..E-1 in order, each cut into
// cdiv(rows, bm) tiles of bm rows; the rest of the T = cdiv(M, bm) + min(E + 1, M) slots idle
// (row0 = row1 = 0). One block: group j of a 256-group chunk is thread j's (two binary searches
// in keys), a block scan of the tile counts gives every group's first tile.
constexpr int kMoeTileThreads = 256;

__global__ void __launch_bounds__(kMoeTileThreads) moe_tiles_kernel(
    const int64_t* __restrict__ keys, int M, int64_t E, int bm, int T, int* __restrict__ tiles) {
  __shared__ int64_t scan[kMoeTileThreads];
  __shared__ int64_t base_s;
  const int tid = threadIdx.x;
  if (tid == 0) base_s = 0;
  __syncthreads();
  for (int64_t g0 = -1; g0 < E; g0 += kMoeTileThreads) {  // block-uniform trip count
    const int64_t g = g0 + tid;
    int64_t s = 0, e = 0, n = 0;
    if (g < E) {
      s = sorted_lower_bound(keys, M, g);
      e = sorted_lower_bound(keys, M, g + 1);
      n = e > s ? (e - s + bm - 1) / bm : 0;
    }
    scan[tid] = n;
    __syncthreads();
    for (int off = 1; off < kMoeTileThreads; off <<= 1) {  // inclusive scan (Hillis-Steele)
      const int64_t v = tid >= off ? scan[tid - off] : 0;
      __syncthreads();
      scan[tid] += v;
      __syncthreads();
    }
    const int64_t first = base_s + scan[tid] - n;
    for (int64_t i = 0; i < n && first + i < T; ++i) {  // bounded by T even for unsorted keys
      const int64_t t = first + i;
      tiles[t] = static_cast<int>(s + i * bm);
      tiles[T + t] = static_cast<int>(min(e, s + (i + 1) * bm));
      tiles[2 * T + t] = static_cast<int>(g);
    }
    __syncthreads();  // every thread has read base_s
    if (tid == kMoeTileThreads - 1) base_s += scan[tid];
    __syncthreads();
  }
  for (int64_t t = min(base_s, static_cast<int64_t>(T)) + tid; t < T; t += kMoeTileThreads) {
    tiles[t] = 0;
    tiles[T + t] = 0;
    tiles[2 * T + t] = -1;
  }
}

// ---- grouped shrink: out[m, r] = alpha * gs(a) * sum_k drop(P)[m, k] * A(a, e, r, k) (fp32) --
// Group g = adapter a on expert e (MoeGroups); A(a, e, r, k) at a*sa_a + e*sa_g + r*sa_r +
// k*sa_k: lora_A in the forward (xa, alpha = 1/(1-p), dropout, gs = 1), lora_B read as
// (a, e, r, k = n) in the backward (ds = s dY B[a, e], alpha = scale, gs = a_scale[a], the
// slot scales). P's row of op row m is m / p_topk (x read in place for top-k rows), the dropout
// mask keyed by m (the reference's mask of the op's [M, K] input). Block (t*sub + q, c, z): rows
// [32q, 32q + 32) of tile t of the table (sub = rows per tile / 32), ranks [16c, 16c+16), k in
// [z k_split, (z+1) k_split); rows of group -1 and of base-only ids (a < 0) get 0. As
// lora_linear_cuda.cu's shrink_kernel: P and A staged 64 k at a time, each thread owns 2
// outputs. Split-K (part != nullptr): fp32 partials part[z, m, r] (times gs; every one written:
// every row is in one tile) summed in z order by moe_finalize_kernel; at decode sizes the grid
// is otherwise a few blocks each walking all of K.
constexpr int kMoeShrinkRows = 32;

// __launch_bounds__(256, 2): with (256) alone ptxas holds it at 40 registers on sm_80 and spills
// 8 bytes; (256, 2) allows 128: it took 70 on sm_80 and sm_90a, 72 on sm_90a with the banks'
// (a, e) indexing and the top-k row map (sm_80 not re-measured), no spills.
__global__ void __launch_bounds__(256, 2) moe_shrink_kernel(
    const void* __restrict__ P, int p_dt, int64_t sp_m, int64_t sp_k, int p_topk,
    const void* __restrict__ A, int a_dt, int64_t sa_a, int64_t sa_g, int64_t sa_r, int64_t sa_k,
    int a_rank_inner, MoeGroups groups, const float* __restrict__ a_scale,
    const int* __restrict__ tiles, int T, int sub, const int64_t* __restrict__ order,
    float* __restrict__ out, int64_t so_m, float* __restrict__ part, int M, int K, int R,
    float alpha, Dropout drop, int k_split) {
  __shared__ float Ps[kMoeShrinkRows][64 + 1];
  __shared__ float As[16][64 + 1];
  __shared__ int64_t rows[kMoeShrinkRows];    // op rows (output, dropout)
  __shared__ int64_t rows_p[kMoeShrinkRows];  // their rows of P
  const int tid = threadIdx.x;
  const int t = static_cast<int>(blockIdx.x) / sub, q = static_cast<int>(blockIdx.x) % sub;
  const int64_t p0 = static_cast<int64_t>(tiles[t]) + q * kMoeShrinkRows;
  const int64_t p1 = min(static_cast<int64_t>(tiles[T + t]), p0 + kMoeShrinkRows);
  if (p0 >= p1) return;  // idle (sub-)tile: block-uniform, before any barrier
  const int64_t g = tiles[2 * T + t];
  const int64_t a = g >= 0 ? groups.adapter(g) : -1;  // < 0: no LoRA term (0)
  const int nr = static_cast<int>(p1 - p0);
  const int r0 = blockIdx.y * 16;
  if (tid < kMoeShrinkRows) {
    const int64_t m = tid < nr ? order[p0 + tid] : 0;
    rows[tid] = m;
    rows_p[tid] = p_topk > 1 ? m / p_topk : m;
  }
  __syncthreads();
  const int mm = tid >> 3, rr = (tid & 7) * 2;
  float acc0 = 0.f, acc1 = 0.f;
  const int64_t kb = static_cast<int64_t>(blockIdx.z) * k_split;
  const int64_t ke = min(static_cast<int64_t>(K), kb + k_split);
  if (a >= 0) {  // block-uniform
    const int64_t a_g = a * sa_a + groups.expert(g) * sa_g;
    for (int64_t k0 = kb; k0 < ke; k0 += 64) {
      for (int i = tid; i < kMoeShrinkRows * 64; i += 256) {
        const int pm = i >> 6, kk = i & 63;
        const int64_t k = k0 + kk;
        float v = 0.f;
        if (pm < nr && k < ke) {
          v = ldf(P, rows_p[pm] * sp_m + k * sp_k, p_dt);
          if (drop.on && !keep(rows[pm] * K + k, drop.k1, drop.k2, drop.thresh)) v = 0.f;
        }
        Ps[pm][kk] = v;
      }
      for (int i = tid; i < 16 * 64; i += 256) {
        // Consecutive threads along A's unit stride: k for lora_A, the rank for lora_B.
        const int ar = a_rank_inner ? (i & 15) : (i >> 6);
        const int kk = a_rank_inner ? (i >> 4) : (i & 63);
        const int r = r0 + ar;
        const int64_t k = k0 + kk;
        As[ar][kk] = (r < R && k < ke) ? ldf(A, a_g + r * sa_r + k * sa_k, a_dt) : 0.f;
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
  }
  if (mm < nr) {
    const int64_t m = rows[mm];
    const float gs = a >= 0 && a_scale != nullptr ? a_scale[a] : 1.f;
    const float sc = part != nullptr ? gs : alpha * gs;  // split: the finalize applies alpha
    float* dst = part != nullptr ? part + (static_cast<int64_t>(blockIdx.z) * M + m) * R
                                 : out + m * so_m;
    if (r0 + rr < R) dst[r0 + rr] = acc0 * sc;
    if (r0 + rr + 1 < R) dst[r0 + rr + 1] = acc1 * sc;
  }
}

// out[m, r] = alpha * sum_z part[z, m, r], z in order (deterministic).
__global__ void __launch_bounds__(256) moe_finalize_kernel(
    const float* __restrict__ part, int splits, int64_t M, int R, float* __restrict__ out,
    int64_t so_m, float alpha) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * R) return;
  const int64_t m = idx / R;
  const int r = static_cast<int>(idx % R);
  float s = 0.f;
  for (int z = 0; z < splits; ++z) s += part[static_cast<int64_t>(z) * M * R + idx];
  out[m * so_m + r] = s * alpha;
}

// ---- per adapter x expert weight gradients over the sorted rows --------------------------------
// out[a, e, r, j] (strides so_*) = alpha * gs(a) * sum_{rows m of group g} L[m, r] drop(Z)(m, j)
// over the groups g with a LoRA term (g >= groups.first_lora(): a = adapter, e = expert),
// exactly 0 for those without rows. dA: L = ds, Z = x read at row m / z_topk (dropout keyed by
// the op row m), alpha = 1/(1-p), gs = 1 (ds carries the scales); dB: L = xa, Z = dy, alpha =
// scale, gs = g_scale[a] (the slot scales). The scheme of multi_lora_cuda.cu's per-slot
// reductions: the sorted positions [v0, M) of groups with a LoRA term are cut into fixed chunks
// of CH rows (from shapes only: no host sync), grid (chunks, J/64, R/16); program (c, jb, rb)
// walks the group segments inside chunk c (ends by binary search in keys). A segment inside one
// chunk is that group's whole sum and is written straight to out; a group spanning chunks
// c1 < c2 leaves one fp32 partial per chunk, at 2c when it is the chunk's first segment, else
// 2c+1, which moe_reduce_finalize_kernel sums in chunk order (deterministic, no float atomics),
// also writing the zeros of absent groups. The steps shared with those (cuda_common.cuh):
// sorted_reduce_step stages 32 rows x 64 columns of Z at a time, one 8-column run per thread
// (16-byte loads when Z's rows allow), sorted_partials_sum adds the partials.

// __launch_bounds__(256, 2): as sorted_slot_reduce_kernel's (no register cap at 80).
__global__ void __launch_bounds__(256, 2) moe_reduce_kernel(
    const float* __restrict__ L, int64_t sl_m, int64_t sl_r, const void* __restrict__ Z, int z_dt,
    int64_t sz_m, int64_t sz_j, int vec_z, int z_topk, Dropout drop,
    const int64_t* __restrict__ keys, const int64_t* __restrict__ order, MoeGroups groups,
    const float* __restrict__ g_scale, void* __restrict__ out, int out_dt, int64_t so_a,
    int64_t so_e, int64_t so_r, int64_t so_j, float* __restrict__ part, int M, int J, int R,
    int CH, float alpha) {
  __shared__ SortedReduceSmem sm;
  const int tid = threadIdx.x;
  const int64_t c = blockIdx.x;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * 64;
  const int r0 = blockIdx.z * 16;
  const int rr = tid >> 4;
  // First sorted position of a group with a LoRA term (base-only ids and rows of no expert
  // sort before it).
  const int64_t v0 = sorted_lower_bound(keys, M, groups.first_lora());
  const int64_t p0 = v0 + c * CH;
  if (p0 >= M) return;
  const int64_t pend = min(static_cast<int64_t>(M), p0 + CH);
  for (int64_t pos = p0; pos < pend;) {  // one group segment per trip (block-uniform)
    const int64_t ex = keys[pos];
    const int64_t seg_end = sorted_lower_bound(keys, M, ex + 1);
    const int64_t seg_begin = pos == p0 ? sorted_lower_bound(keys, M, ex) : pos;
    const int64_t e = min(seg_end, pend);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t mc = pos; mc < e; mc += 32) {
      const int nr = static_cast<int>(min(static_cast<int64_t>(32), e - mc));
      sorted_reduce_step(acc, sm, order, mc, nr, L, sl_m, sl_r, r0, R, Z, z_dt, sz_m, sz_j,
                         vec_z != 0, z_topk, drop, j0, J);
    }
    const int r = r0 + rr;
    if (r < R) {
      const int64_t c1 = (seg_begin - v0) / CH, c2 = (seg_end - 1 - v0) / CH;
      const int64_t a = groups.adapter(ex);
      const float sc = alpha * (g_scale != nullptr ? g_scale[a] : 1.f);
      sorted_reduce_store(acc, c1 == c2, out, out_dt,
                          a * so_a + groups.expert(ex) * so_e + r * so_r, so_j, sc, part,
                          2 * c + (pos == p0 ? 0 : 1), R, J, r, j0);
    }
    pos = e;
  }
}

// Grid (R*J / 1024, groups with a LoRA term: S * E): every element of out no moe_reduce_kernel
// program wrote: 0 for groups without rows, the chunk-ordered sum of the partials for groups
// spanning chunks. rank_fast: element order r-fastest (out's r stride is 1: dB), else
// j-fastest (dA): coalesced stores.
__global__ void __launch_bounds__(256) moe_reduce_finalize_kernel(
    const float* __restrict__ part, const int64_t* __restrict__ keys, MoeGroups groups,
    const float* __restrict__ g_scale, void* __restrict__ out, int out_dt, int64_t so_a,
    int64_t so_e, int64_t so_r, int64_t so_j, int M, int J, int R, int CH, int rank_fast,
    float alpha) {
  __shared__ int64_t seg[3];
  const int64_t ex = groups.first_lora() + blockIdx.y;
  const int64_t ad = groups.adapter(ex);
  const int64_t o_g = ad * so_a + groups.expert(ex) * so_e;
  if (threadIdx.x == 0) {
    seg[0] = sorted_lower_bound(keys, M, groups.first_lora());
    seg[1] = sorted_lower_bound(keys, M, ex);
    seg[2] = sorted_lower_bound(keys, M, ex + 1);
  }
  __syncthreads();
  const int64_t v0 = seg[0], a = seg[1], b = seg[2];
  const bool present = a < b;
  const int64_t c1 = present ? (a - v0) / CH : 0, c2 = present ? (b - 1 - v0) / CH : 0;
  const int64_t n_el = static_cast<int64_t>(R) * J;
  for (int i = 0; i < 4; ++i) {
    const int64_t el = (static_cast<int64_t>(blockIdx.x) * 4 + i) * 256 + threadIdx.x;
    if (el >= n_el) break;
    const int r = static_cast<int>(rank_fast ? el % R : el / J);
    const int64_t j = rank_fast ? el / R : el % J;
    const int64_t o = o_g + r * so_r + j * so_j;
    if (!present) {
      stf(out, o, out_dt, 0.f);
    } else if (c1 < c2) {
      const float sc = alpha * (g_scale != nullptr ? g_scale[ad] : 1.f);
      stf(out, o, out_dt, sorted_partials_sum(part, a, v0, CH, c1, c2, R, J, r, j) * sc);
    }  // else: written by the chunk's program
  }
}

// ---- top-k dx: dx[t, k] = sum_{j < topk} dxm[t * topk + j, k] ----------------------------------
// dxm: the grouped GEMM's fp32 rows [M, K] (contiguous); j summed in order in fp32 (the
// reference's per-token sum, no atomics: bitwise reproducible), rounded once to dx's dtype.
// One thread an element: a memory-bound pass over topk + 1 rows of K.
__global__ void __launch_bounds__(256) moe_topk_sum_kernel(
    const float* __restrict__ dxm, int topk, int64_t T, int64_t K, void* __restrict__ dx,
    int64_t ldd, int dt) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= T * K) return;
  const int64_t t = idx / K, k = idx % K;
  const float* src = dxm + t * topk * K + k;
  float s = 0.f;
  for (int j = 0; j < topk; ++j) s += src[static_cast<int64_t>(j) * K];
  stf(dx, t * ldd + k, dt, s);
}

// ---- host side ---------------------------------------------------------------------------------

// The routing of one call: rows sorted by virtual expert (order, keys) and the tile table for
// the grouped GEMM's rows per tile (bm).
struct MoeRouting {
  at::Tensor order, keys, tiles;
  int T = 0, bm = 0;
  const int64_t* order_p() const { return order.data_ptr<int64_t>(); }
  const int64_t* keys_p() const { return keys.data_ptr<int64_t>(); }
  const int* tiles_p() const { return tiles.data_ptr<int>(); }
};

// order / keys: the caller's precomputed routing (lora.h), used as given; else the stable sort
// of the M ids over n_virtual (out-of-range ones as -1) on the device, no host sync.
MoeRouting moe_routing(const at::Tensor& x, const MoeDims& md, const at::Tensor& expert_ids,
                       const std::optional<at::Tensor>& order,
                       const std::optional<at::Tensor>& keys, bool need_tiles,
                       fl_stream_t stream) {
  MoeRouting mr;
  const int64_t M = md.M, G = md.n_virtual;
  if (check_routing(M, x.device(), order, keys)) {
    mr.order = *order;  // contiguous (checked)
    mr.keys = *keys;
  } else {
    sort_routing(expert_ids.contiguous(), G, mr.order, mr.keys);
  }
  if (!need_tiles) return mr;
  mr.bm = static_cast<int>(grouped_gemm_rows(x.scalar_type()));
  const int64_t T = (M + mr.bm - 1) / mr.bm + std::min(G + 1, M);
  TORCH_CHECK(T < (int64_t(1) << 31) / 4, "x: too many rows for the MoE tile table");
  mr.T = static_cast<int>(T);
  mr.tiles = at::empty({3 * T}, x.options().dtype(at::kInt));
  FL_LAUNCH(moe_tiles_kernel, 1, kMoeTileThreads, 0, stream, mr.keys_p(), static_cast<int>(M),
            G, mr.bm, mr.T, mr.tiles.data_ptr<int>());
  return mr;
}

// lora_A / lora_B (or dA / dB) as a bank [S, E, ...]: itself with banks, a view of one adapter
// (S = 1) without, so every kernel indexes (adapter, expert) alike.
at::Tensor moe_bank(const at::Tensor& t) { return t.dim() == 4 ? t : t.unsqueeze(0); }

// A bank read as A(a, e, r, k): its strides, in that order, for the shrink and the init.
struct MoeBankStrides {
  int64_t a, e, r, k;
};

// out [M, R] fp32 = the grouped shrink of P [M / p_topk, K] against A(a, e, r, k) (strides sa),
// times gs(a) = a_scale[a] (nullptr: 1) and alpha.
void launch_moe_shrink(const at::Tensor& P, int64_t p_topk, const at::Tensor& A,
                       const MoeBankStrides& sa, const float* a_scale, const MoeRouting& mr,
                       const MoeDims& md, at::Tensor& out, float alpha, const Dropout& drop,
                       fl_stream_t stream) {
  const int64_t M = out.size(0), K = P.size(1), R = out.size(1), G = md.n_virtual;
  const int sub = mr.bm / kMoeShrinkRows;
  const int64_t bx = static_cast<int64_t>(mr.T) * sub;
  TORCH_CHECK(bx < (int64_t(1) << 31) && (R + 15) / 16 <= 65535,
              "x / lora rank too large for the MoE shrink");
  // Split K until ~2 blocks per SM (each split >= 2 chunks of 64 k). Live blocks: one per
  // 32 sorted rows plus a partial one per group present (at most min(G + 1, M)).
  const int64_t live = ((M + kMoeShrinkRows - 1) / kMoeShrinkRows + std::min(G + 1, M)) *
                       ((R + 15) / 16);
  int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>((2 * fl_sm_count() + live - 1) / live, K / 128));
  const int64_t k_split = ((K + splits - 1) / splits + 63) / 64 * 64;
  splits = std::max<int64_t>(1, (K + k_split - 1) / k_split);
  TORCH_CHECK(splits <= 65535 && k_split < (int64_t(1) << 31),
              "x: in_features too large for the MoE shrink");
  at::Tensor part = splits > 1 ? fl_empty({splits, M, R}, out.options()) : at::Tensor();
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>((R + 15) / 16),
                  static_cast<unsigned>(splits));
  FL_LAUNCH(moe_shrink_kernel, grid, 256, 0, stream,
      P.data_ptr(), dt_code(P.scalar_type()), P.stride(0), P.stride(1),
      static_cast<int>(p_topk), A.data_ptr(), dt_code(A.scalar_type()), sa.a, sa.e, sa.r, sa.k,
      (sa.r == 1 && sa.k != 1) ? 1 : 0, md.groups(), a_scale, mr.tiles_p(), mr.T, sub,
      mr.order_p(), out.data_ptr<float>(), out.stride(0),
      splits > 1 ? part.data_ptr<float>() : nullptr, static_cast<int>(M), static_cast<int>(K),
      static_cast<int>(R), alpha, drop, static_cast<int>(k_split));
  if (splits > 1)
    FL_LAUNCH(moe_finalize_kernel, cdiv(M * R, 256), 256, 0, stream, part.data_ptr<float>(),
              static_cast<int>(splits), M, static_cast<int>(R), out.data_ptr<float>(),
              out.stride(0), alpha);
}


// out (a bank [S, E, ...]; so: its strides as (a, e, r, j)) = alpha gs(a) sum_{rows of each
// group with a LoRA term} L[m, r] drop(Z)(m / z_topk, j); gs(a) = g_scale[a] (nullptr: 1).
void launch_moe_reduce(const at::Tensor& L, const at::Tensor& Z, int64_t z_topk,
                       const Dropout& drop, const MoeRouting& mr, const MoeDims& md,
                       const float* g_scale, at::Tensor& out, const MoeBankStrides& so,
                       float alpha, fl_stream_t stream) {
  const int64_t M = L.size(0), J = Z.size(1), R = L.size(1);
  const int64_t n_lora = md.n_virtual - md.groups().first_lora();  // S * E
  TORCH_CHECK(n_lora <= 65535, "lora_A: adapters x experts (S * E = ", n_lora, ") must be "
              "<= 65535 for the CUDA backward");
  TORCH_CHECK((J + 63) / 64 <= 65535 && (R + 15) / 16 <= 65535,
              "in/out features must be < 2^22 and r < 2^20 for the CUDA backward");
  TORCH_CHECK(R * J < (int64_t(1) << 40), "lora rank x features too large");
  const auto [chunks, CH] = sorted_reduce_chunks(M, J, R);
  at::Tensor part;  // [2 * chunks, R, J]: only groups spanning chunks use it
  if (chunks > 1) part = fl_empty({2 * chunks, R, J}, L.options().dtype(at::kFloat));
  float* part_p = chunks > 1 ? part.data_ptr<float>() : nullptr;
  const dim3 grid(static_cast<unsigned>(chunks), cdiv(J, 64), cdiv(R, 16));
  FL_LAUNCH(moe_reduce_kernel, grid, 256, 0, stream,
      L.data_ptr<float>(), L.stride(0), L.stride(1), Z.data_ptr(), dt_code(Z.scalar_type()),
      Z.stride(0), Z.stride(1), vec_ok(Z, {Z.stride(0)}, Z.stride(1), Z.element_size() == 4 ? 4 : 8) ? 1 : 0,
      static_cast<int>(z_topk), drop, mr.keys_p(), mr.order_p(), md.groups(), g_scale,
      out.data_ptr(), dt_code(out.scalar_type()), so.a, so.e, so.r, so.k, part_p,
      static_cast<int>(M), static_cast<int>(J), static_cast<int>(R), static_cast<int>(CH),
      alpha);
  const dim3 fgrid(cdiv(R * J, 1024), static_cast<unsigned>(n_lora));
  FL_LAUNCH(moe_reduce_finalize_kernel, fgrid, 256, 0, stream,
      part_p, mr.keys_p(), md.groups(), g_scale, out.data_ptr(), dt_code(out.scalar_type()),
      so.a, so.e, so.r, so.k, static_cast<int>(M), static_cast<int>(J), static_cast<int>(R),
      static_cast<int>(CH), so.r == 1 ? 1 : 0, alpha);
}

// The CUDA-only checks of a MoE call (the shared ones are check_moe's).
void check_moe_cuda(const at::Tensor& x, const at::Tensor& lora_A, const MoeDims& md) {
  check_cuda_inputs(x, lora_A);
  TORCH_CHECK(md.M < (int64_t(1) << 31), "x: the op's M = T * topk rows (", md.T, " x ",
              md.topk, ") must be < 2^31");
  TORCH_CHECK(md.R < (int64_t(1) << 31) && md.N < (int64_t(1) << 31), "lora_A / weight: r and "
              "out_features must be < 2^31");
  TORCH_CHECK(md.n_virtual < (int64_t(1) << 31), "lora_A: (S + 1) * E expert ids must be "
              "< 2^31");
}

std::tuple<at::Tensor, at::Tensor> moe_lora_linear_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
    int64_t seed, const at::Tensor& expert_ids, const std::optional<at::Tensor>& order,
    const std::optional<at::Tensor>& keys, int64_t gemm,
    const std::optional<at::Tensor>& slot_scales, int64_t topk) {
  const MoeDims md = check_moe(x, weight, bias, lora_A, lora_B, expert_ids, dropout_p,
                               slot_scales, topk);
  check_moe_cuda(x, lora_A, md);
  FL_DEVICE_GUARD(x);
  const int64_t gemm_v = resolve_gemm(gemm);  // before any launch: every size fails alike
  const fl_stream_t stream = FL_STREAM();
  const int64_t M = md.M, K = md.K, N = md.N, R = md.R;
  auto y = fl_empty({M, N}, x.options());
  auto xa = fl_empty({M, R}, x.options().dtype(at::kFloat));
  const auto mr = moe_routing(x, md, expert_ids, order, keys, /*need_tiles=*/M > 0, stream);
  if (M == 0) return {y, xa};
  if (K == 0) {  // empty sums: xa = 0, y = b[e] on rows of an expert, 0 on the others
    xa.zero_();
    if (!bias.has_value() || N == 0) {
      y.zero_();
    } else {
      const auto ids = expert_ids.contiguous();
      const auto valid = ids.ge(0).logical_and(ids.lt(md.n_virtual));
      const auto e = at::where(valid, ids.remainder(md.E), at::zeros({}, ids.options()));
      const auto rows = bias->index_select(0, e);
      y.copy_(at::where(valid.unsqueeze(1), rows, at::zeros({}, rows.options())));
    }
    return {y, xa};
  }
  const Dropout drop = make_dropout(dropout_p, seed);
  const auto ss = slot_scales.has_value() ? slot_scales->contiguous() : at::Tensor();
  const float* ss_p = ss.defined() ? ss.data_ptr<float>() : nullptr;
  const auto A = moe_bank(lora_A), B = moe_bank(lora_B);
  // xa = drop(x(m)) A[a, e]^T (no LoRA scale: the reference's xa is unscaled).
  launch_moe_shrink(x, topk, A, {A.stride(0), A.stride(1), A.stride(2), A.stride(3)}, nullptr,
                    mr, md, xa, drop.scale, drop, stream);
  if (N == 0) return {y, xa};
  InitArgs ia{};
  ia.L = xa.data_ptr<float>();
  ia.sl_m = xa.stride(0);
  ia.sl_r = xa.stride(1);
  ia.Rt = B.data_ptr();  // (a, e, n, r)
  ia.srt_a = B.stride(0);
  ia.srt_s = B.stride(1);
  ia.srt_n = B.stride(2);
  ia.srt_r = B.stride(3);
  ia.rt_dt = dt_code(B.scalar_type());
  ia.R = static_cast<int>(R);
  ia.alpha = static_cast<float>(scale);
  ia.row_scale = ss_p;  // grouped: indexed by the adapter
  ia.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  ia.s_bias = bias.has_value() ? bias->stride(1) : 0;
  ia.sbias_g = bias.has_value() ? bias->stride(0) : 0;
  ia.bias_dt = dt_code(x.scalar_type());
  ia.row_map = mr.order_p();
  ia.tiles = mr.tiles_p();
  ia.n_tiles = mr.T;
  ia.groups = md.groups();
  ia.p_topk = static_cast<int>(topk);  // x [T, K] read in place for the M rows
  // y[m, n] = init + sum_k x(m)[k] W[e, n, k]: Q = weight as [E, N, K] (any strides).
  launch_grouped_gemm(x, weight, y, ia, gemm_v, stream);
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_lora_linear_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scale, double dropout_p, int64_t seed,
    const at::Tensor& expert_ids, bool needs_dx, bool needs_dA, bool needs_dB,
    const std::optional<at::Tensor>& order, const std::optional<at::Tensor>& keys, int64_t gemm,
    const std::optional<at::Tensor>& slot_scales, int64_t topk) {
  const MoeDims md = check_moe(x, weight, std::nullopt, lora_A, lora_B, expert_ids, dropout_p,
                               slot_scales, topk);
  check_moe_bwd(dy, x, xa, md);
  check_moe_cuda(x, lora_A, md);
  FL_DEVICE_GUARD(x);
  const int64_t gemm_v = resolve_gemm(gemm);
  const fl_stream_t stream = FL_STREAM();
  const int64_t M = md.M, K = md.K, N = md.N, R = md.R;
  auto dx = needs_dx ? fl_empty({md.T, K}, x.options()) : fl_empty({0}, x.options());
  auto dA = needs_dA ? fl_empty(lora_A.sizes(), lora_A.options())
                     : fl_empty({0}, lora_A.options());
  auto dB = needs_dB ? fl_empty(lora_B.sizes(), lora_B.options())
                     : fl_empty({0}, lora_B.options());
  if (M == 0 || K == 0 || N == 0) {  // every gradient is an empty sum
    check_routing(M, x.device(), order, keys);
    dx.zero_();
    dA.zero_();
    dB.zero_();
    return {dx, dA, dB};
  }
  const bool need_ds = needs_dx || needs_dA;
  const auto mr = moe_routing(x, md, expert_ids, order, keys, /*need_tiles=*/need_ds, stream);
  const Dropout drop = make_dropout(dropout_p, seed);
  const auto ss = slot_scales.has_value() ? slot_scales->contiguous() : at::Tensor();
  const float* ss_p = ss.defined() ? ss.data_ptr<float>() : nullptr;
  const auto A = moe_bank(lora_A), B = moe_bank(lora_B);
  at::Tensor ds;
  if (need_ds) {
    ds = fl_empty({M, R}, x.options().dtype(at::kFloat));
    // ds[m, r] = scale ss[a] sum_n dy[m, n] B[a, e, n, r]: B read as (a, e, r, k = n).
    launch_moe_shrink(dy, 1, B, {B.stride(0), B.stride(1), B.stride(3), B.stride(2)}, ss_p, mr,
                      md, ds, static_cast<float>(scale), Dropout{}, stream);
  }
  if (needs_dx) {
    InitArgs ia{};
    ia.L = ds.data_ptr<float>();
    ia.sl_m = ds.stride(0);
    ia.sl_r = ds.stride(1);
    ia.Rt = A.data_ptr();  // (a, e, k, r) of A^T
    ia.srt_a = A.stride(0);
    ia.srt_s = A.stride(1);
    ia.srt_n = A.stride(3);
    ia.srt_r = A.stride(2);
    ia.rt_dt = dt_code(A.scalar_type());
    ia.R = static_cast<int>(R);
    ia.alpha = drop.scale;  // ds carries scale * slot_scales[a]: no row_scale here
    ia.drop = drop;  // keep(m * K + k): dx's mask is the op rows' x mask
    ia.row_map = mr.order_p();
    ia.tiles = mr.tiles_p();
    ia.n_tiles = mr.T;
    ia.groups = md.groups();
    ia.p_topk = 1;  // P = dy [M, N]
    // dx[m, k] = init + sum_n dy[m, n] W[e, n, k]: Q = weight as [E, K, N] (a strided view).
    // Top-k: the M rows in fp32, then each token's topk rows summed in order (no atomics).
    if (topk == 1) {
      launch_grouped_gemm(dy, weight.transpose(1, 2), dx, ia, gemm_v, stream);
    } else {
      TORCH_CHECK(md.T * K / 256 < (int64_t(1) << 31), "x: T x in_features too large for "
                  "the top-k dx sum");
      auto dxm = fl_empty({M, K}, x.options().dtype(at::kFloat));
      launch_grouped_gemm(dy, weight.transpose(1, 2), dxm, ia, gemm_v, stream);
      FL_LAUNCH(moe_topk_sum_kernel, cdiv(md.T * K, 256), 256, 0, stream,
                dxm.data_ptr<float>(), static_cast<int>(topk), md.T, K, dx.data_ptr(),
                dx.stride(0), dt_code(dx.scalar_type()));
    }
  }
  if (needs_dA) {  // dA[a, e, r, k] = 1/(1-p) sum ds[m, r] keep(m, k) x(m)[k]
    auto dA4 = moe_bank(dA);
    launch_moe_reduce(ds, x, topk, drop, mr, md, nullptr, dA4,
                      {dA4.stride(0), dA4.stride(1), dA4.stride(2), dA4.stride(3)}, drop.scale,
                      stream);
  }
  if (needs_dB) {  // dB[a, e, n, r] = scale ss[a] sum xa[m, r] dy[m, n]
    auto dB4 = moe_bank(dB);
    launch_moe_reduce(xa, dy, 1, Dropout{}, mr, md, ss_p, dB4,
                      {dB4.stride(0), dB4.stride(1), dB4.stride(3), dB4.stride(2)},
                      static_cast<float>(scale), stream);
  }
  return {dx, dA, dB};
}

}  // namespace
}  // namespace fused_lora

FL_TORCH_LIBRARY_IMPL(m) {
  m.impl("moe_lora_linear_fwd", &fused_lora::moe_lora_linear_fwd_cuda);
  m.impl("moe_lora_linear_bwd", &fused_lora::moe_lora_linear_bwd_cuda);
}
