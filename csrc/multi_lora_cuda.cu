// CUDA kernels of the mixed-adapter ops fused_lora_C::multi_lora_linear_fwd / _bwd (sm_80+).
#include "cuda_common.cuh"

namespace fused_lora {
namespace {

// ---- mixed adapters: split-K gathered shrink ----------------------------------------------------
// out[m, r] = row_scale[id] * sum_k P[m, k] A(id, r, k) for r < rank(id), id = ids[m] in range;
// 0 otherwise (dead ranks and out-of-range ids are never read). A(id, r, k) is at
// id*sa_s + r*sa_r + k*sa_k: lora_A (k inner) in the forward's xa = x A[id]^T, lora_B read
// transposed (rank inner) in the backward's ds = scales[id] dY B[id].
//
// Decode (M = 1..64) reads x once and A[id] (r x K) once per row, ~2 MB at M = 16, K = 4096,
// R = 16, bf16: far less than the ~3 MB an H100/H200 needs in flight to cover its DRAM latency
// (4.8 TB/s x ~0.6 us), so the kernel is latency-bound and wins by issuing every load at once.
// Grid (M, splits): block (m, split) reads k in [split*kc, (split+1)*kc), kc a multiple of
// 256, and each of its 128 threads has only 5 or 9 loads in flight per 256-k pass (x: 8 k, 16
// bytes; A: its warp's 4 ranks x the same 8 k, 4 x 16 or 8 x 8 bytes). One pass covers a
// 16-rank tile: warp w owns ranks r0 + 4w .. r0 + 4w + 3, lane l owns k0 + 8l .. k0 + 8l + 7.
// With splits > 1 the block writes
// fp32 partials [split, m, r] that shrink_finalize_kernel sums in split order (deterministic:
// no float atomics); with splits = 1 it writes out directly.
constexpr int kShrinkThreads = 128;  // 4 warps x 4 ranks = one 16-rank tile
constexpr int kShrinkRankTile = 16;
constexpr int kShrinkPass = 256;     // k per block pass: 32 lanes x 8 consecutive k
constexpr int kMinSplitK = 256;      // one pass: below it a split's fixed cost (reduction,
                                     // partial store, finalize read) outweighs its loads

// An fp16 (dt == kF16) or bf16 value from its bits (little-endian: element 0 is the low half).
__device__ __forceinline__ float bits16_to_float(unsigned short b, int dt) {
  return dt == kF16 ? __half2float(__ushort_as_half(b)) : __bfloat162float(__ushort_as_bfloat16(b));
}

// v[q] = p[i + q*stride] for q < n, 0 past n. vec (stride 1, i % 4 == 0, p 16-byte aligned,
// n == 4): one 8-byte load for fp16/bf16, one 16-byte load for fp32.
__device__ __forceinline__ void load_run4(const void* p, int64_t i, int64_t stride, int dt,
                                          bool vec, int n, float* v) {
  if (vec && n == 4) {
    if (dt == kF32) {
      const float4 a = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    } else {
      const uint2 u = *reinterpret_cast<const uint2*>(static_cast<const char*>(p) + i * 2);
      v[0] = bits16_to_float(static_cast<unsigned short>(u.x & 0xFFFFu), dt);
      v[1] = bits16_to_float(static_cast<unsigned short>(u.x >> 16), dt);
      v[2] = bits16_to_float(static_cast<unsigned short>(u.y & 0xFFFFu), dt);
      v[3] = bits16_to_float(static_cast<unsigned short>(u.y >> 16), dt);
    }
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] = q < n ? ldf(p, i + q * stride, dt) : 0.f;
  }
}

// RANK_INNER = false: A's k stride is the unit one (lora_A): each lane reads 8 consecutive k of
// each of its 4 rank rows (a warp: 512 contiguous bytes per rank in bf16). RANK_INNER = true:
// A's rank stride is the unit one (lora_B read as (slot, r, k=n)): each lane reads, for each of
// its 8 k, its warp's 4 consecutive ranks (8 bytes in bf16).
// __launch_bounds__(128, 4): with (128) alone ptxas caps RANK_INNER at 32 registers on sm_80 and
// spills 8 bytes; (128, 4) allows 128: 78 / 62 registers on sm_90, 66 / 48 on sm_80, no spills.
template <bool RANK_INNER>
__global__ void __launch_bounds__(kShrinkThreads, 4) split_k_gather_shrink_kernel(
    const void* __restrict__ P, int p_dt, int64_t sp_m, int64_t sp_k, int vec_p,
    const void* __restrict__ A, int a_dt, int64_t sa_s, int64_t sa_r, int64_t sa_k, int vec_a,
    const int64_t* __restrict__ ids, int64_t n_slots, const int64_t* __restrict__ ranks,
    const float* __restrict__ row_scale, float* __restrict__ out, int64_t so_m,
    float* __restrict__ part, int M, int K, int R, int kc) {
  const int64_t m = blockIdx.x;
  const int split = blockIdx.y;
  const bool direct = gridDim.y == 1;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t id = ids[m];
  const bool valid = id >= 0 && id < n_slots;
  const int re = valid ? live_ranks(ranks, id, R) : 0;
  if (direct) {  // ranks no tile below writes: dead ranks, every rank of a -1 row
    for (int r = re + tid; r < R; r += kShrinkThreads) out[m * so_m + r] = 0.f;
  }
  if (re == 0) return;  // split partials of such rows are never read (the finalize writes 0)
  const float sc = (direct && row_scale != nullptr) ? row_scale[id] : 1.f;
  const int k_begin = split * kc;
  const int k_end = min(K, k_begin + kc);
  for (int r0 = 0; r0 < re; r0 += kShrinkRankTile) {
    const int rb = r0 + 4 * warp;                  // this warp's first rank
    const int nq = max(0, min(4, re - rb));        // its live ranks (uniform per warp)
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    if (nq > 0) {
      // Two passes in flight; RANK_INNER unrolled twice spills 12 bytes (ptxas, sm_90).
#pragma unroll (RANK_INNER ? 1 : 2)
      for (int k = k_begin + 8 * lane; k < k_end; k += kShrinkPass) {
        const int n = min(8, k_end - k);
        float xv[8];
        load_run8(P, m * sp_m + k * sp_k, sp_k, p_dt, vec_p != 0, n, xv);
        if (!RANK_INNER) {
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            if (q < nq) {
              float av[8];
              load_run8(A, id * sa_s + (rb + q) * sa_r + k * sa_k, sa_k, a_dt, vec_a != 0, n, av);
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[q] = fmaf(xv[e], av[e], acc[q]);
            }
          }
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            if (e < n) {
              float av[4];
              load_run4(A, id * sa_s + rb * sa_r + (k + e) * sa_k, sa_r, a_dt, vec_a != 0, nq,
                        av);
#pragma unroll
              for (int q = 0; q < 4; ++q) acc[q] = fmaf(xv[e], av[q], acc[q]);
            }
          }
        }
      }
    }
    // Fixed butterfly over the lanes: the same sum order on every run.
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[q] += __shfl_xor_sync(0xffffffffu, acc[q], o);
    }
    if (lane == 0) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (q < nq) {
          if (direct) out[m * so_m + rb + q] = acc[q] * sc;
          else part[(static_cast<int64_t>(split) * M + m) * R + rb + q] = acc[q];
        }
      }
    }
  }
}

// out[m, r] = row_scale[id] * sum_{split} part[split, m, r] (split order) on live ranks of rows
// with an in-range id, exactly 0 elsewhere (partials there were never written).
__global__ void __launch_bounds__(256) shrink_finalize_kernel(
    const float* __restrict__ part, int splits, const int64_t* __restrict__ ids, int64_t n_slots,
    const int64_t* __restrict__ ranks, const float* __restrict__ row_scale,
    float* __restrict__ out, int64_t so_m, int M, int R) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (e >= static_cast<int64_t>(M) * R) return;
  const int64_t m = e / R;
  const int r = static_cast<int>(e % R);
  const int64_t id = ids[m];
  const bool valid = id >= 0 && id < n_slots;
  float v = 0.f;
  if (valid && r < live_ranks(ranks, id, R)) {
    for (int s = 0; s < splits; ++s) v += part[(static_cast<int64_t>(s) * M + m) * R + r];
    if (row_scale != nullptr) v *= row_scale[id];
  }
  out[m * so_m + r] = v;
}

// ---- mixed adapters: prefill shrink over rows sorted by slot ----------------------------------
// Same out as split_k_gather_shrink_kernel, for M >= kPrefillMinRows: one row per block would
// re-read A[id] (r x K, 128 KB in bf16 at K = 4096, R = 16) for every row, 1 GB of L2 traffic at
// M = 8192 (~150 us, half the base GEMM). Here a block takes 32 consecutive rows of the slot
// order (order = the sorted rows): lane l owns sorted row 32b + l, warp w owns k = 8w + 64i, and
// each lane loads A(id, r, k..k+7) of its own row's slot straight from global. Rows of one slot
// (the common case: a tile inside a segment) hit the same address in every lane, so a warp's
// load is one L1 broadcast and A is read once per tile instead of once per row; a tile with
// several slots degrades to a per-lane gather, never to a wrong result. No shared memory and no
// barrier in the K loop; the 8 warps' partial sums are added in warp order (deterministic).
// Grid (M/32, splits): a few tiles (M = 65..2000) would each walk all of K with one 17-load
// trip in flight per thread, so K is split as in the decode kernel (partials [split, m, r] and
// shrink_finalize_kernel) until the grid has ~2 blocks per SM, each split >= 512 k.
// __launch_bounds__(256, 1): with (256) alone ptxas aims at 4 blocks/SM, caps at 64 registers
// and spills 28 bytes (RANK_INNER); uncapped it takes 78 / 88, no spills (sm_90).
constexpr int kTileRows = 32;
constexpr int kTileMinSplitK = 512;

template <bool RANK_INNER>
__global__ void __launch_bounds__(256, 1) sorted_tile_shrink_kernel(
    const void* __restrict__ P, int p_dt, int64_t sp_m, int64_t sp_k, int vec_p,
    const void* __restrict__ A, int a_dt, int64_t sa_s, int64_t sa_r, int64_t sa_k, int vec_a,
    const int64_t* __restrict__ ids, int64_t n_slots, const int64_t* __restrict__ ranks,
    const float* __restrict__ row_scale, const int64_t* __restrict__ order,
    float* __restrict__ out, int64_t so_m, float* __restrict__ part, int M, int K, int R,
    int kc) {
  __shared__ float red[8][kTileRows][16 + 1];
  __shared__ int64_t row_m[kTileRows];
  __shared__ int row_re[kTileRows];
  __shared__ float row_sc[kTileRows];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * kTileRows + lane;
  const bool has = pos < M;
  const int64_t m = has ? order[pos] : 0;
  const int64_t id = has ? ids[m] : -1;
  const bool valid = id >= 0 && id < n_slots;
  const int re = valid ? live_ranks(ranks, id, R) : 0;
  if (warp == 0) {
    row_m[lane] = has ? m : -1;
    row_re[lane] = re;
    row_sc[lane] = (valid && row_scale != nullptr) ? row_scale[id] : 1.f;
  }
  const bool direct = gridDim.y == 1;
  const int split = blockIdx.y;
  const int k_begin = split * kc;
  const int k_end = min(K, k_begin + kc);
  if (has && direct) {  // dead ranks, every rank of a -1 row: spread over the 8 warps
    for (int r = re + warp; r < R; r += 8) out[m * so_m + r] = 0.f;
  }
  for (int r0 = 0; r0 < R; r0 += 16) {  // block-uniform bound: barriers below
    const int nr = max(0, min(16, re - r0));
    float acc[16];
#pragma unroll
    for (int q = 0; q < 16; ++q) acc[q] = 0.f;
    if (nr > 0) {
      for (int k = k_begin + 8 * warp; k < k_end; k += 64) {
        const int n = min(8, k_end - k);
        float xv[8];
        load_run8(P, m * sp_m + k * sp_k, sp_k, p_dt, vec_p != 0, n, xv);
        if (!RANK_INNER) {
#pragma unroll
          for (int q = 0; q < 16; ++q) {
            if (q < nr) {
              float av[8];
              load_run8(A, id * sa_s + (r0 + q) * sa_r + k * sa_k, sa_k, a_dt, vec_a != 0, n, av);
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[q] = fmaf(xv[e], av[e], acc[q]);
            }
          }
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            if (e < n) {
              const int64_t base = id * sa_s + (k + e) * sa_k + r0 * sa_r;
              float lo[8], hi[8];
              load_run8(A, base, sa_r, a_dt, vec_a != 0, min(nr, 8), lo);
              load_run8(A, base + 8 * sa_r, sa_r, a_dt, vec_a != 0, max(0, nr - 8), hi);
#pragma unroll
              for (int q = 0; q < 8; ++q) {
                acc[q] = fmaf(xv[e], lo[q], acc[q]);
                acc[q + 8] = fmaf(xv[e], hi[q], acc[q + 8]);
              }
            }
          }
        }
      }
    }
#pragma unroll
    for (int q = 0; q < 16; ++q) red[warp][lane][q] = acc[q];
    __syncthreads();
    for (int i = tid; i < kTileRows * 16; i += 256) {
      const int row = i >> 4, q = i & 15;
      const int r = r0 + q;
      if (row_m[row] >= 0 && r < row_re[row]) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < 8; ++w) v += red[w][row][q];
        if (direct) out[row_m[row] * so_m + r] = v * row_sc[row];
        else part[(static_cast<int64_t>(split) * M + row_m[row]) * R + r] = v;
      }
    }
    __syncthreads();
  }
}

// ---- mixed adapters: per-slot reductions over M, from rows sorted by slot ---------------------
// out[slot, (r, j)] = alpha * row_scale[slot] * sum_{m: ids[m] = slot} L[m, r] Z[m, j] for
// r < rank(slot), exactly 0 past it and for slots absent from the batch.
//
// keys = the ids sorted (stable; out-of-range ids as -1, first), order = the matching rows. The
// valid sorted positions [v0, M) are cut into fixed chunks of CH rows (CH from shapes only, no
// host sync: CUDA-graph safe), so one adapter with all 8192 rows still spreads over M/CH x J/64
// programs. Grid (chunks, J/64, R/16): program (c, jb, rb) walks the slot segments inside chunk
// c (segment ends by binary search in keys) and reads only those rows. A segment inside one
// chunk is that slot's whole sum: written straight to out. A slot spanning chunks c1 < c2
// leaves one fp32 partial per chunk: at 2c when it is the chunk's first segment, else 2c+1
// (only a chunk's first and last segments can span chunks, so 2 per chunk suffice);
// slot_reduce_finalize_kernel sums them in chunk order (deterministic, no float atomics) and
// writes every element no program wrote (absent slots, dead ranks). Z is staged 32 rows x 64
// columns at a time, one 8-column run per thread (16-byte loads when Z's rows allow).
// __launch_bounds__(256, 2): with (256) alone ptxas caps it at 80 registers on sm_80 and spills
// 36 bytes; (256, 2) allows 128 (it takes 128 on sm_90, 127 on sm_80, no spills).
__global__ void __launch_bounds__(256, 2) sorted_slot_reduce_kernel(
    const float* __restrict__ L, int64_t sl_m, int64_t sl_r, const void* __restrict__ Z, int z_dt,
    int64_t sz_m, int64_t sz_j, int vec_z, const int64_t* __restrict__ keys,
    const int64_t* __restrict__ order, const int64_t* __restrict__ ranks,
    const float* __restrict__ row_scale, void* __restrict__ out, int out_dt, int64_t so_s,
    int64_t so_r, int64_t so_j, float* __restrict__ part, int M, int J, int R, int CH,
    float alpha) {
  __shared__ SortedReduceSmem sm;
  const int tid = threadIdx.x;
  const int64_t c = blockIdx.x;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * 64;
  const int r0 = blockIdx.z * 16;
  const int rr = tid >> 4;
  const int64_t v0 = sorted_lower_bound(keys, M, 0);  // first valid sorted position
  const int64_t p0 = v0 + c * CH;
  if (p0 >= M) return;
  const int64_t pend = min(static_cast<int64_t>(M), p0 + CH);
  for (int64_t pos = p0; pos < pend;) {  // one slot segment per trip (block-uniform)
    const int64_t slot = keys[pos];
    const int64_t seg_end = sorted_lower_bound(keys, M, slot + 1);
    const int64_t seg_begin = pos == p0 ? sorted_lower_bound(keys, M, slot) : pos;
    const int64_t e = min(seg_end, pend);
    const int re = live_ranks(ranks, slot, R);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    if (r0 < re) {
      for (int64_t mc = pos; mc < e; mc += 32) {
        const int nr = static_cast<int>(min(static_cast<int64_t>(32), e - mc));
        sorted_reduce_step(acc, sm, order, mc, nr, L, sl_m, sl_r, r0, re, Z, z_dt, sz_m, sz_j,
                           vec_z != 0, /*z_topk=*/1, Dropout{}, j0, J);
      }
    }
    const int r = r0 + rr;
    if (r < re) {
      const int64_t c1 = (seg_begin - v0) / CH, c2 = (seg_end - 1 - v0) / CH;
      const float sc = alpha * (row_scale != nullptr ? row_scale[slot] : 1.f);
      sorted_reduce_store(acc, c1 == c2, out, out_dt, slot * so_s + r * so_r, so_j, sc, part,
                          2 * c + (pos == p0 ? 0 : 1), R, J, r, j0);
    }
    pos = e;
  }
}

// Grid (R*J / 1024, S): every element of out no sorted_slot_reduce_kernel program wrote: 0 for
// absent slots and dead ranks, the chunk-ordered sum of the partials for slots spanning chunks.
// rank_fast: element order r-fastest (out's r stride is 1, dB), else j-fastest (dA): coalesced.
__global__ void __launch_bounds__(256) slot_reduce_finalize_kernel(
    const float* __restrict__ part, const int64_t* __restrict__ keys,
    const int64_t* __restrict__ ranks, const float* __restrict__ row_scale,
    void* __restrict__ out, int out_dt, int64_t so_s, int64_t so_r, int64_t so_j, int M, int J,
    int R, int CH, int rank_fast, float alpha) {
  __shared__ int64_t seg[3];
  const int64_t slot = blockIdx.y;
  if (threadIdx.x == 0) {
    seg[0] = sorted_lower_bound(keys, M, 0);
    seg[1] = sorted_lower_bound(keys, M, slot);
    seg[2] = sorted_lower_bound(keys, M, slot + 1);
  }
  __syncthreads();
  const int64_t v0 = seg[0], a = seg[1], b = seg[2];
  const bool present = a < b;
  const int re = live_ranks(ranks, slot, R);
  const int64_t c1 = present ? (a - v0) / CH : 0, c2 = present ? (b - 1 - v0) / CH : 0;
  const float sc = alpha * (row_scale != nullptr ? row_scale[slot] : 1.f);
  const int64_t n_el = static_cast<int64_t>(R) * J;
  for (int i = 0; i < 4; ++i) {
    const int64_t el = (static_cast<int64_t>(blockIdx.x) * 4 + i) * 256 + threadIdx.x;
    if (el >= n_el) break;
    const int r = static_cast<int>(rank_fast ? el % R : el / J);
    const int64_t j = rank_fast ? el / R : el % J;
    const int64_t o = slot * so_s + r * so_r + j * so_j;
    if (!present || r >= re) {
      stf(out, o, out_dt, 0.f);
    } else if (c1 < c2) {
      stf(out, o, out_dt, sorted_partials_sum(part, a, v0, CH, c1, c2, R, J, r, j) * sc);
    }  // else: written by the chunk's program
  }
}

// ---- mixed adapters: host side ------------------------------------------------------------------

// Prefill: from this many rows on, the GEMMs take the rows sorted by slot (InitArgs::row_map)
// so each 128-row tile has one or two slots; below it (decode) the GEMV / one-tile GEMM gather
// per row and a sort would cost more than it saves. Same crossover as the Triton path
// (kernels/multi_lora.py), a guess until measured on a GPU. The shrink does not split K from
// here on: M blocks already fill the GPU.
constexpr int64_t kPrefillMinRows = 65;

struct MultiInputs {
  at::Tensor ids, ranks, scales;  // contiguous; ranks undefined when None
  // Rows in slot order (stable; -1 and out-of-range ids first) and the sorted keys (those ids
  // as -1): the prefill GEMMs' row_map, and the backward's per-slot segments at every M.
  at::Tensor order, keys;
  bool prefill = false;
  const int64_t* row_map() const { return prefill ? order.data_ptr<int64_t>() : nullptr; }
};

// order / keys: the caller's precomputed routing (lora.h: the stable sort below, done once per
// batch by the routing plan); used as given, so with them no sort runs here at all.
MultiInputs multi_inputs(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& scales,
                         const at::Tensor& adapter_ids, const std::optional<at::Tensor>& ranks,
                         const std::optional<at::Tensor>& order,
                         const std::optional<at::Tensor>& keys, bool need_segments) {
  check_cuda_inputs(x, lora_A);
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "scales must be float32 on CUDA, got ",
              scales.scalar_type());
  TORCH_CHECK(lora_A.size(1) < (int64_t(1) << 31), "lora_A: r_max must be < 2^31");
  const bool planned = check_routing(x, order, keys);  // dtype/shape/device only: no host sync
  MultiInputs mi{adapter_ids.contiguous(),
                 ranks.has_value() ? ranks->contiguous() : at::Tensor(), scales.contiguous(), {},
                 {}, x.size(0) >= kPrefillMinRows};
  if (planned) {
    mi.order = *order;  // contiguous (checked)
    mi.keys = *keys;
  } else if (mi.prefill || need_segments) {
    sort_routing(mi.ids, lora_A.size(0), mi.order, mi.keys);  // out-of-range ids as -1
  }
  return mi;
}

const int64_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<int64_t>() : nullptr;
}


// out [M, R] fp32 = the gathered shrink of P [M, K] against A(slot, r, k) (strides sa_*).
void launch_gather_shrink(const at::Tensor& P, const at::Tensor& A, int64_t sa_s, int64_t sa_r,
                          int64_t sa_k, const MultiInputs& mi, const float* row_scale,
                          at::Tensor& out, fl_stream_t stream) {
  const int64_t M = P.size(0), K = P.size(1), R = out.size(1);
  TORCH_CHECK(M <= 2147483647 && K <= 2147483647, "x: M and K must be < 2^31");
  if (M == 0 || R == 0) return;  // nothing to write (and a 0-block grid is a launch error)
  const int64_t sms = fl_sm_count();
  auto finalize = [&](const at::Tensor& part, int64_t splits) {
    FL_LAUNCH(shrink_finalize_kernel, cdiv(M * R, 256), 256, 0, stream,
        part.data_ptr<float>(), static_cast<int>(splits), mi.ids.data_ptr<int64_t>(), A.size(0),
        ptr_or_null(mi.ranks), row_scale, out.data_ptr<float>(), out.stride(0),
        static_cast<int>(M), static_cast<int>(R));
  };
  const bool rank_inner = sa_r == 1 && sa_k != 1;
  const int64_t a_el = A.element_size() == 4 ? 4 : 8;  // elements per 16 bytes (fp32: 4)
  const int vec_p = vec_ok(P, {P.stride(0)}, P.stride(1), P.element_size() == 4 ? 4 : 8);
  if (mi.prefill) {
    // Rank-inner runs here are 8 ranks: starts at multiples of 8 (16-bit) or 4 (fp32).
    const int vec_a = rank_inner ? vec_ok(A, {sa_s, sa_k}, sa_r, a_el)
                                 : vec_ok(A, {sa_s, sa_r}, sa_k, a_el);
    const int64_t tiles = cdiv(M, kTileRows);
    int64_t splits = std::max<int64_t>(
        1, std::min<int64_t>((2 * sms + tiles - 1) / tiles, K / kTileMinSplitK));
    const int64_t kc = ((K + splits - 1) / splits + 63) / 64 * 64;  // warps step k by 64
    splits = (K + kc - 1) / kc;
    TORCH_CHECK(splits <= 65535, "x: K too large for the split-K shrink");
    at::Tensor part;
    if (splits > 1) part = fl_empty({splits, M, R}, out.options());
    auto* kern = rank_inner ? &sorted_tile_shrink_kernel<true> : &sorted_tile_shrink_kernel<false>;
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
    FL_LAUNCH(kern, grid, 256, 0, stream,
        P.data_ptr(), dt_code(P.scalar_type()), P.stride(0), P.stride(1), vec_p, A.data_ptr(),
        dt_code(A.scalar_type()), sa_s, sa_r, sa_k, vec_a, mi.ids.data_ptr<int64_t>(), A.size(0),
        ptr_or_null(mi.ranks), row_scale, mi.order.data_ptr<int64_t>(), out.data_ptr<float>(),
        out.stride(0), splits > 1 ? part.data_ptr<float>() : nullptr, static_cast<int>(M),
        static_cast<int>(K), static_cast<int>(R), static_cast<int>(kc));
    if (splits > 1) finalize(part, splits);
    return;
  }
  // Decode. Splits: enough (M, split) blocks for ~2 per SM (a block's loads are all in flight
  // at once; more blocks than that just queue), each split >= kMinSplitK.
  int64_t splits = 1;
  if (K >= 2 * kMinSplitK) {
    const int64_t want = (2 * sms + M - 1) / M;
    splits = std::max<int64_t>(1, std::min<int64_t>(want, K / kMinSplitK));
  }
  const int64_t kc = (K + splits - 1) / splits;
  const int64_t kc_pass = (kc + kShrinkPass - 1) / kShrinkPass * kShrinkPass;
  splits = (K + kc_pass - 1) / kc_pass;
  TORCH_CHECK(splits <= 65535, "x: K too large for the split-K shrink");
  // Rank-inner runs are 4 ranks (8 bytes in fp16/bf16, 16 in fp32): starts at multiples of 4.
  const int vec_a = rank_inner ? vec_ok(A, {sa_s, sa_k}, sa_r, 4)
                               : vec_ok(A, {sa_s, sa_r}, sa_k, a_el);
  at::Tensor part;
  if (splits > 1) part = fl_empty({splits, M, R}, out.options());
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(splits));
  auto* kern = rank_inner ? &split_k_gather_shrink_kernel<true>
                          : &split_k_gather_shrink_kernel<false>;
  FL_LAUNCH(kern, grid, kShrinkThreads, 0, stream,
      P.data_ptr(), dt_code(P.scalar_type()), P.stride(0), P.stride(1), vec_p, A.data_ptr(),
      dt_code(A.scalar_type()), sa_s, sa_r, sa_k, vec_a, mi.ids.data_ptr<int64_t>(), A.size(0),
      ptr_or_null(mi.ranks), row_scale, out.data_ptr<float>(), out.stride(0),
      splits > 1 ? part.data_ptr<float>() : nullptr, static_cast<int>(M), static_cast<int>(K),
      static_cast<int>(R), static_cast<int>(kc_pass));
  if (splits > 1) finalize(part, splits);
}

// out[slot, r, j] (strides so_*) = row_scale[slot] sum_{rows of slot} L[m, r] Z[m, j].
void launch_slot_reduce(const at::Tensor& L, const at::Tensor& Z, const MultiInputs& mi,
                        const float* row_scale, at::Tensor& out, int64_t so_s, int64_t so_r,
                        int64_t so_j, fl_stream_t stream) {
  const int64_t M = Z.size(0), J = Z.size(1), R = L.size(1), S = out.size(0);
  TORCH_CHECK(S <= 65535, "lora_A: n_slots must be <= 65535 for the CUDA backward");
  TORCH_CHECK(cdiv(J, 64) <= 65535 && cdiv(R, 16) <= 65535,
              "lora_A/lora_B: in/out features must be < 2^22 and r_max < 2^20 for the CUDA "
              "backward");
  TORCH_CHECK(R * J < (int64_t(1) << 40), "lora_A: r_max x features too large");
  if (M == 0 || R == 0 || J == 0 || S == 0) return;  // out is empty (a 0-block grid: an error)
  const auto [chunks, CH] = sorted_reduce_chunks(M, J, R);
  at::Tensor part;  // [2 * chunks, R, J]: only slots spanning chunks use it
  if (chunks > 1) part = fl_empty({2 * chunks, R, J}, L.options().dtype(at::kFloat));
  float* part_p = chunks > 1 ? part.data_ptr<float>() : nullptr;
  const dim3 grid(static_cast<unsigned>(chunks), cdiv(J, 64), cdiv(R, 16));
  FL_LAUNCH(sorted_slot_reduce_kernel, grid, 256, 0, stream,
      L.data_ptr<float>(), L.stride(0), L.stride(1), Z.data_ptr(), dt_code(Z.scalar_type()),
      Z.stride(0), Z.stride(1),
      vec_ok(Z, {Z.stride(0)}, Z.stride(1), Z.element_size() == 4 ? 4 : 8) ? 1 : 0,
      mi.keys.data_ptr<int64_t>(), mi.order.data_ptr<int64_t>(),
      ptr_or_null(mi.ranks), row_scale, out.data_ptr(), dt_code(out.scalar_type()), so_s, so_r,
      so_j, part_p, static_cast<int>(M), static_cast<int>(J), static_cast<int>(R),
      static_cast<int>(CH), 1.f);
  const dim3 fgrid(cdiv(R * J, 1024), static_cast<unsigned>(S));
  FL_LAUNCH(slot_reduce_finalize_kernel, fgrid, 256, 0, stream,
      part_p, mi.keys.data_ptr<int64_t>(), ptr_or_null(mi.ranks), row_scale, out.data_ptr(),
      dt_code(out.scalar_type()), so_s, so_r, so_j, static_cast<int>(M), static_cast<int>(J),
      static_cast<int>(R), static_cast<int>(CH), so_r == 1 ? 1 : 0, 1.f);
}

std::tuple<at::Tensor, at::Tensor> multi_lora_linear_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scales,
    const at::Tensor& adapter_ids, const std::optional<at::Tensor>& ranks,
    const std::optional<at::Tensor>& order, const std::optional<at::Tensor>& keys,
    int64_t gemm) {
  check_multi(x, weight, bias, lora_A, lora_B, scales, adapter_ids, ranks);
  FL_DEVICE_GUARD(x);
  const int64_t gemm_v = resolve_gemm(gemm);  // before any launch: every size fails alike
  const auto mi = multi_inputs(x, lora_A, scales, adapter_ids, ranks, order, keys,
                               /*need_segments=*/false);
  const fl_stream_t stream = FL_STREAM();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(1);
  auto y = fl_empty({M, N}, x.options());
  auto xa = fl_empty({M, R}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, xa};
  if (K == 0) return empty_k_fwd(y, xa, bias);
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
  ia.row_map = mi.row_map();
  launch_gemm(x, weight, /*q_nk=*/true, y, ia, gemm_v, stream);
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_lora_linear_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scales, const at::Tensor& adapter_ids,
    const std::optional<at::Tensor>& ranks, const at::Tensor& xa, bool needs_dx, bool needs_dA,
    bool needs_dB, const std::optional<at::Tensor>& order, const std::optional<at::Tensor>& keys,
    int64_t gemm) {
  check_multi(x, weight, std::nullopt, lora_A, lora_B, scales, adapter_ids, ranks);
  check_multi_bwd(dy, x, weight, lora_A, xa);
  FL_DEVICE_GUARD(x);
  const int64_t gemm_v = resolve_gemm(gemm);
  // The per-slot reductions walk the rows sorted by slot at every M (decode too).
  const auto mi = multi_inputs(x, lora_A, scales, adapter_ids, ranks, order, keys,
                               /*need_segments=*/(needs_dA || needs_dB) && lora_A.size(0) > 0);
  const fl_stream_t stream = FL_STREAM();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(1);
  auto dx = needs_dx ? fl_empty({M, K}, x.options()) : fl_empty({0}, x.options());
  auto dA = needs_dA ? fl_empty(lora_A.sizes(), lora_A.options())
                     : fl_empty({0}, lora_A.options());
  auto dB = needs_dB ? fl_empty(lora_B.sizes(), lora_B.options())
                     : fl_empty({0}, lora_B.options());
  if (M == 0 || K == 0 || N == 0) {  // every gradient is an empty sum
    dx.zero_();
    dA.zero_();
    dB.zero_();
    return {dx, dA, dB};
  }
  const bool any_slot = lora_A.size(0) > 0;  // with none, dA / dB are [0, ...] and dx = dy W0
  at::Tensor ds;
  if (needs_dx || needs_dA) {
    ds = fl_empty({M, R}, x.options().dtype(at::kFloat));
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
    ia.row_map = mi.row_map();
    launch_gemm(dy, weight, /*q_nk=*/false, dx, ia, gemm_v, stream);
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

FL_TORCH_LIBRARY_IMPL(m) {
  m.impl("multi_lora_linear_fwd", &fused_lora::multi_lora_linear_fwd_cuda);
  m.impl("multi_lora_linear_bwd", &fused_lora::multi_lora_linear_bwd_cuda);
}
