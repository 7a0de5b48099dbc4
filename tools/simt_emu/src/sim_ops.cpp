// The CUDA kernels and launchers of csrc/ built for the SIMT emulator (simt_emu.h) as one host
// translation unit: torch.ops.fused_lora_sim.{lora_linear_fwd, lora_linear_bwd,
// multi_lora_linear_fwd, multi_lora_linear_bwd, moe_lora_linear_fwd, moe_lora_linear_bwd} run
// them on CPU tensors (same arguments as torch.ops.fused_lora_C.*), plus self-test ops that check the emulator itself
// (tests/test_cuda_sim.py). Built by tools/simt_emu (csrc/ on the include path); never part of
// setup.py's build nor of the installed package.
#define FUSED_LORA_SIM 1

#include "lora.h"

#ifndef FL_SIM_NO_KERNELS  // -DFL_SIM_NO_KERNELS: the emulator's self-tests only
#include "gemm.cu"
#include "lora_linear_cuda.cu"
#include "multi_lora_cuda.cu"
#include "moe_lora_cuda.cu"
#else
#include "cuda_common.cuh"
#endif

#include <stdexcept>

namespace fused_lora {
namespace simtest {

// ---- warp collectives and bit intrinsics ---------------------------------------------------------
// Block of 64 threads (2 warps); thread t writes row t of out [64, 16] (int64).
__global__ void warp_kernel(const int* x, int64_t* out) {
  __shared__ int counter;
  const int t = threadIdx.x, lane = t & 31;
  const int v = x[t];
  int64_t* o = out + t * 16;
  int s = v;
  for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
  o[0] = s;
  o[1] = __shfl_sync(0xffffffffu, v, 5);
  o[2] = __shfl_sync(0xffffffffu, v, (lane + 1) & 31);  // per-lane source
  o[3] = __shfl_down_sync(0xffffffffu, v, 3);
  o[4] = __shfl_up_sync(0xffffffffu, v, 2);
  o[5] = __shfl_sync(0xffffffffu, v, 3, 8);  // width 8: lane 3 of each group of 8
  o[6] = static_cast<int64_t>(__ballot_sync(0xffffffffu, v > 0));
  o[7] = __any_sync(0xffffffffu, v > 100);
  o[8] = __all_sync(0xffffffffu, v > -1000);
  float f = static_cast<float>(v);
  for (int d = 1; d < 32; d <<= 1) f += __shfl_xor_sync(0xffffffffu, f, d);
  o[9] = static_cast<int64_t>(f);
  o[10] = __popc(static_cast<unsigned>(v));
  o[11] = __ffs(v) * 100 + __clz(v);
  // Two half-warps, each a collective of its own (disjoint masks).
  if (lane < 16)
    o[12] = __shfl_xor_sync(0x0000ffffu, v, 8);
  else
    o[12] = __shfl_xor_sync(0xffff0000u, v, 4);
  const int64_t big = static_cast<int64_t>(v) << 33;
  o[13] = __shfl_xor_sync(0xffffffffu, big, 1) >> 33;
  if (t == 0) counter = 0;
  __syncthreads();
  atomicAdd(&counter, v);
  __syncthreads();
  o[14] = counter;
  __syncwarp();
  o[15] = max(static_cast<int64_t>(v), int64_t(7)) + min(v, 3);
}

at::Tensor selftest_warp(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kInt && x.numel() == 64, "x: int32 [64]");
  const auto xc = x.contiguous();
  auto out = at::empty({64, 16}, x.options().dtype(at::kLong));
  FL_LAUNCH(warp_kernel, 1, 64, 0, FL_STREAM(), xc.data_ptr<int>(), out.data_ptr<int64_t>());
  return out;
}

// ---- mma.sync / ldmatrix / cp.async: a one-warp GEMM C[M, N] = A[M, K] B[K, N] (fp32 out) ------
// One warp per 16x16 output tile (two m16n8k16 per k-step), K in steps of 16 through a 2-stage
// cp.async pipeline in dynamic shared memory. Operand layouts (mode):
//   0: fragments straight from global per the ISA tables (A [M, K], B [K, N]); no smem
//   1: A [M, K] ldmatrix_x4;      B [N, K] ldmatrix_x2 per n-tile
//   2: A [M, K] ldmatrix_x4;      B [K, N] ldmatrix_x2_trans per n-tile
//   3: A [K, M] ldmatrix_x4_trans; B [N, K] ldmatrix_x4 (both n-tiles)
//   4: A [M, K] ldmatrix_x4;      B [K, N] ldmatrix_x4_trans (both n-tiles: gemm.cu's pattern)
// bug: 0 none; 1 no cp_async_wait (reads stages before they land); 2 misaligned cp.async
// destination; 3 every copy predicated off (zero fill, source never read); 4 misaligned
// ldmatrix row; 5 lanes >= 16 skip the mma (divergent).
constexpr int kLds = 24;  // halves per smem row: 16 + 8 pad (48 B: 16-byte aligned rows)
constexpr int kTile = 16 * kLds;

inline uint32_t pack2(const uint16_t lo, const uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}
template <typename T>
inline uint16_t bits16(T v) {
  uint16_t u;
  std::memcpy(&u, static_cast<const void*>(&v), 2);
  return u;
}

template <typename T>
__global__ void mini_gemm_kernel(const T* A, const T* B, float* C, int M, int N, int K, int mode,
                                 int bug) {
  FL_DYNAMIC_SMEM(smem);
  T* As = reinterpret_cast<T*>(smem);  // [2][16][kLds]
  T* Bs = As + 2 * kTile;              // [2][16][kLds]
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3, r8 = lane & 7, q = lane >> 3;
  const int m0 = blockIdx.x * 16, n0 = blockIdx.y * 16;
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  const int nk = K / 16;
  const bool a_km = mode == 3, b_nk = mode == 1 || mode == 3;
  // 16 rows x 2 chunks of 16 bytes per 16x16 tile: lane -> (row lane/2, chunk lane%2).
  auto load_tile = [&](T* tile, const T* g0, int64_t ld) {
    const int row = lane >> 1, col = (lane & 1) * 8 + (bug == 2 ? 4 : 0);
    const bool pred = bug != 3;
    cp_async16(tile + row * kLds + col,
               pred ? static_cast<const void*>(g0 + row * ld + col)
                    : reinterpret_cast<const void*>(uintptr_t(64)),
               pred);
  };
  auto load_stage = [&](int s, int k0) {
    load_tile(As + s * kTile, a_km ? A + int64_t(k0) * M + m0 : A + int64_t(m0) * K + k0,
              a_km ? M : K);
    load_tile(Bs + s * kTile, b_nk ? B + int64_t(n0) * K + k0 : B + int64_t(k0) * N + n0,
              b_nk ? K : N);
  };
  if (mode == 0) {
    for (int kt = 0; kt < nk; ++kt) {
      const int k0 = kt * 16;
      auto a_at = [&](int m, int k) { return bits16(A[int64_t(m0 + m) * K + k0 + k]); };
      auto b_at = [&](int k, int n) { return bits16(B[int64_t(k0 + k) * N + n0 + n]); };
      uint32_t a[4], b[2][2];
      a[0] = pack2(a_at(g, 2 * t), a_at(g, 2 * t + 1));
      a[1] = pack2(a_at(g + 8, 2 * t), a_at(g + 8, 2 * t + 1));
      a[2] = pack2(a_at(g, 2 * t + 8), a_at(g, 2 * t + 9));
      a[3] = pack2(a_at(g + 8, 2 * t + 8), a_at(g + 8, 2 * t + 9));
      for (int j = 0; j < 2; ++j) {
        b[j][0] = pack2(b_at(2 * t, 8 * j + g), b_at(2 * t + 1, 8 * j + g));
        b[j][1] = pack2(b_at(2 * t + 8, 8 * j + g), b_at(2 * t + 9, 8 * j + g));
      }
      if (bug == 5 && lane >= 16) return;
      for (int j = 0; j < 2; ++j) mma_16816<T>(acc[j], a, b[j]);
    }
  } else {
    load_stage(0, 0);
    cp_async_commit();
    for (int kt = 0; kt < nk; ++kt) {
      if (kt + 1 < nk) load_stage((kt + 1) & 1, (kt + 1) * 16);
      cp_async_commit();
      if (bug != 1) cp_async_wait<1>();
      __syncthreads();
      const T* as = As + (kt & 1) * kTile;
      const T* bs = Bs + (kt & 1) * kTile;
      uint32_t a[4], b[2][2];
      if (a_km)
        ldmatrix_x4_trans(a, as + (r8 + (q >> 1) * 8) * kLds + (q & 1) * 8);
      else
        ldmatrix_x4(a, as + (r8 + (q & 1) * 8) * kLds + (q >> 1) * 8 + (bug == 4 ? 1 : 0));
      if (mode == 1 || mode == 2) {
        for (int j = 0; j < 2; ++j) {
          uint32_t r[2];
          if (mode == 1)
            ldmatrix_x2(r, bs + (8 * j + r8) * kLds + (q & 1) * 8);
          else
            ldmatrix_x2_trans(r, bs + (r8 + (q & 1) * 8) * kLds + 8 * j);
          b[j][0] = r[0];
          b[j][1] = r[1];
        }
      } else {
        uint32_t r[4];
        if (mode == 3)
          ldmatrix_x4(r, bs + ((q >> 1) * 8 + r8) * kLds + (q & 1) * 8);
        else
          ldmatrix_x4_trans(r, bs + (r8 + (q & 1) * 8) * kLds + (q >> 1) * 8);
        b[0][0] = r[0];
        b[0][1] = r[1];
        b[1][0] = r[2];
        b[1][1] = r[3];
      }
      for (int j = 0; j < 2; ++j) mma_16816<T>(acc[j], a, b[j]);
      __syncthreads();
    }
    cp_async_wait<0>();
  }
  for (int j = 0; j < 2; ++j) {
    float* c0 = C + int64_t(m0 + g) * N + n0 + 8 * j + 2 * t;
    float* c1 = c0 + int64_t(8) * N;
    c0[0] = acc[j][0];
    c0[1] = acc[j][1];
    c1[0] = acc[j][2];
    c1[1] = acc[j][3];
  }
}

at::Tensor selftest_gemm(const at::Tensor& a, const at::Tensor& b, int64_t mode, int64_t bug) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16),
              "a, b: fp16 or bf16");
  TORCH_CHECK(mode >= 0 && mode <= 4, "mode in [0, 4]");
  const auto ac = a.contiguous(), bc = b.contiguous();
  const bool a_km = mode == 3, b_nk = mode == 1 || mode == 3;
  const int64_t M = a_km ? ac.size(1) : ac.size(0), K = a_km ? ac.size(0) : ac.size(1);
  const int64_t N = b_nk ? bc.size(0) : bc.size(1);
  TORCH_CHECK((b_nk ? bc.size(1) : bc.size(0)) == K, "a, b: inner sizes differ");
  TORCH_CHECK(M % 16 == 0 && N % 16 == 0 && K % 16 == 0 && K > 0, "M, N, K: multiples of 16");
  auto c = at::empty({M, N}, a.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(M / 16), static_cast<unsigned>(N / 16));
  const size_t smem = 4 * kTile * 2;
  if (a.scalar_type() == at::kHalf)
    FL_LAUNCH(mini_gemm_kernel<__half>, grid, 32, smem, FL_STREAM(),
              reinterpret_cast<const __half*>(ac.data_ptr()),
              reinterpret_cast<const __half*>(bc.data_ptr()), c.data_ptr<float>(),
              static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), static_cast<int>(mode),
              static_cast<int>(bug));
  else
    FL_LAUNCH(mini_gemm_kernel<__nv_bfloat16>, grid, 32, smem, FL_STREAM(),
              reinterpret_cast<const __nv_bfloat16*>(ac.data_ptr()),
              reinterpret_cast<const __nv_bfloat16*>(bc.data_ptr()), c.data_ptr<float>(),
              static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), static_cast<int>(mode),
              static_cast<int>(bug));
  return c;
}

// ---- cp.async commit groups: snapshots of shared memory (one thread) ---------------------------------
// out [8, 64] uint8: the 64 bytes of 4 destinations after each step.
__global__ void cp_async_kernel(const unsigned char* src, unsigned char* out) {
  FL_DYNAMIC_SMEM(smem);
  int step = 0;
  auto snap = [&] {
    for (int i = 0; i < 64; ++i) out[step * 64 + i] = smem[i];
    ++step;
  };
  cp_async16(smem + 0, src + 0, true);
  cp_async_commit();  // group 0
  cp_async16(smem + 16, src + 16, true);
  cp_async_commit();  // group 1
  cp_async16(smem + 32, src + 32, true);  // not committed yet
  snap();                                 // 0: nothing landed
  cp_async_wait<2>();
  snap();  // 1: two groups pending <= 2: nothing
  cp_async_wait<1>();
  snap();  // 2: group 0
  cp_async_wait<0>();
  snap();  // 3: groups 0, 1 (the uncommitted copy is not waited for)
  cp_async_commit();
  cp_async_wait<0>();
  snap();  // 4: all three
  cp_async16(smem + 48, reinterpret_cast<const void*>(uintptr_t(16)), false);  // never read
  cp_async_commit();
  cp_async_commit();  // an empty group
  cp_async_wait<1>();
  snap();  // 5: the zero fill landed
  smem[0] = 7;
  snap();  // 6
  cp_async16(smem + 0, src + 48, true);
  cp_async_commit();
  cp_async_wait<0>();
  snap();  // 7
}

at::Tensor selftest_cp_async(const at::Tensor& src) {
  TORCH_CHECK(src.scalar_type() == at::kByte && src.numel() == 64 && src.is_contiguous() &&
                  reinterpret_cast<uintptr_t>(src.data_ptr()) % 16 == 0,
              "src: 16-byte aligned contiguous uint8 [64]");
  auto out = at::empty({8, 64}, src.options());
  FL_LAUNCH(cp_async_kernel, 1, 1, 64, FL_STREAM(), src.data_ptr<uint8_t>(), out.data_ptr<uint8_t>());
  return out;
}

// ---- shared memory poison --------------------------------------------------------------------------
// what 0: read dynamic smem nobody wrote; 1: static smem written by block 0 only, read by both
// blocks; 2: thread t reads element t-1 written by thread t-1 without a barrier (a race the
// default schedule hides and set_schedule(1) exposes); 3: same with element t+1 (the reverse).
__global__ void smem_kernel(int what, float* out) {
  FL_DYNAMIC_SMEM(dyn);
  __shared__ float st[64];
  const int t = threadIdx.x;
  float* d = reinterpret_cast<float*>(dyn);
  if (what == 0) {
    out[blockIdx.x * 64 + t] = d[t];
  } else if (what == 1) {
    if (blockIdx.x == 0) st[t] = static_cast<float>(t);
    __syncthreads();
    out[blockIdx.x * 64 + t] = st[t];
  } else {
    st[t] = static_cast<float>(t);
    const int o = what == 2 ? (t + 63) % 64 : (t + 1) % 64;
    out[blockIdx.x * 64 + t] = st[o];  // missing __syncthreads()
  }
}

at::Tensor selftest_smem(int64_t what) {
  auto out = at::empty({2, 64}, at::TensorOptions().dtype(at::kFloat));
  FL_LAUNCH(smem_kernel, 2, 64, 256, FL_STREAM(), static_cast<int>(what), out.data_ptr<float>());
  return out;
}

// ---- kernel bugs the emulator must report (each launch raises) -------------------------------------
__global__ void bug_kernel(int what, float* gbuf) {
  FL_DYNAMIC_SMEM(dyn);
  const int t = threadIdx.x, lane = t & 31;
  float v = static_cast<float>(t);
  switch (what) {
    case 0:  // a shuffle while half the warp has exited
      if (lane >= 16) return;
      v = __shfl_xor_sync(0xffffffffu, v, 1);
      break;
    case 1:  // half the warp at a shuffle, the other half at a barrier
      if (lane < 16)
        v = __shfl_xor_sync(0xffffffffu, v, 1);
      else
        __syncthreads();
      break;
    case 2:  // lane 0 waits for lane 1 at __syncwarp, lane 1 waits at __syncthreads
      if (t == 0) __syncwarp(0x3u);
      if (t == 1) __syncthreads();
      break;
    case 3:  // misaligned cp.async destination
      cp_async16(dyn + 8, gbuf, true);
      break;
    case 4:  // misaligned cp.async source
      cp_async16(dyn, gbuf + 1, true);
      break;
    case 5: {  // cp.async into memory that is not shared
      alignas(16) unsigned char local[16];
      cp_async16(local, gbuf, true);
      cp_async_wait<0>();
      break;
    }
    case 6: {  // ldmatrix from global memory
      uint32_t r[4];
      ldmatrix_x4(r, gbuf + (lane & 7) * 8);
      break;
    }
    case 7:  // a shuffle reading a lane outside its mask
      if (lane >= 16) return;
      v = __shfl_sync(0x0000ffffu, v, 20);
      break;
    case 11:  // the kernel throws
      TORCH_CHECK(t != 5, "device-side check failed in thread ", t);
      break;
    case 12:  // mask without the calling lane
      if (lane == 3) v = __shfl_xor_sync(0x1u, v, 1);
      break;
    case 13: {  // mma by half a warp
      if (lane >= 16) return;
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
      mma_16816<__half>(d, a, b);
      break;
    }
    case 14:  // a launch from inside a kernel
      if (t == 0) FL_LAUNCH(smem_kernel, 1, 1, 0, FL_STREAM(), 0, gbuf);
      break;
    default: break;
  }
  gbuf[64 + t] = v;
}

void selftest_bug(int64_t what) {
  alignas(16) static float gbuf[256];
  switch (what) {
    case 8:  // opt-in beyond the H100's 227 KB
      FL_SET_SMEM(bug_kernel, 228 * 1024);
      return;
    case 9:  // 64 KB of dynamic smem without the opt-in (smem_kernel never gets one)
      FL_LAUNCH(smem_kernel, 1, 64, 64 * 1024, FL_STREAM(), 0, gbuf);
      return;
    case 10:  // 1025 threads
      FL_LAUNCH(bug_kernel, 1, 1025, 0, FL_STREAM(), 99, gbuf);
      return;
    default:
      FL_LAUNCH(bug_kernel, 1, 64, 64, FL_STREAM(), static_cast<int>(what), gbuf);
  }
}

// ---- wgmma: deferred operand reads and the bugs the emulator reports -----------------------------
// One warpgroup, A [64][16] and B [128][16] (K-major, 128-byte swizzle) all ones in 1024-aligned
// atoms: D = A B^T is 16 everywhere. what 1: A is overwritten with 2s after the MMA is issued
// but before wgmma_wait retires it, so the emulator (which reads operands at retirement, the
// latest a GPU may) gives 32: a kernel that reuses a stage too early fails its test.
// what >= 10: kernel bugs (the launch raises).
__global__ void wgmma_kernel(int what, float* out) {
  FL_DYNAMIC_SMEM(raw);
  unsigned char* sm = raw + ((1024 - smem_u32(raw) % 1024) % 1024);
  __half* a = reinterpret_cast<__half*>(sm);          // 64 rows x 128 B
  __half* b = reinterpret_cast<__half*>(sm + 8192);   // 128 rows x 128 B
  const int t = threadIdx.x;
  for (int i = t; i < (8192 + 16384) / 2; i += blockDim.x) a[i] = __float2half(1.f);
  __syncthreads();
  float d[64];
  for (int i = 0; i < 64; ++i) d[i] = 0.f;
  uint64_t da = wgmma_desc_128b(smem_u32(a), 16, 1024);
  const uint64_t db = wgmma_desc_128b(smem_u32(b), 16, 1024);
  if (what == 13) da = (da & ~(uint64_t(3) << 62)) | (uint64_t(2) << 62);  // 64-byte swizzle
  if (what == 14) da = wgmma_desc_128b(smem_u32(a) + 64 * 1024, 16, 1024);  // past the smem
  if (what == 15) (void)smem_u32(&d[0]);                                     // not shared
  if (what == 11 && t >= 64) return;  // half the warpgroup leaves
  wgmma_fence();
  wgmma_m64n128k16<__half, 0>(d, da, db);
  wgmma_commit();
  if (what == 12) return;  // exits with the group pending
  __syncthreads();
  if (what == 1)
    for (int i = t; i < 8192 / 2; i += blockDim.x) a[i] = __float2half(2.f);
  __syncthreads();
  wgmma_wait<0>();
  for (int i = 0; i < 64; ++i) out[t * 64 + i] = d[i];
}

at::Tensor selftest_wgmma(int64_t what) {
  const int threads = what == 10 ? 64 : 128;  // 10: a block that is not whole warpgroups
  auto out = at::zeros({128, 64}, at::TensorOptions().dtype(at::kFloat));
  FL_SET_SMEM(wgmma_kernel, 8192 + 16384 + 1024);
  FL_LAUNCH(wgmma_kernel, 1, threads, 8192 + 16384 + 1024, FL_STREAM(), static_cast<int>(what),
            out.data_ptr<float>());
  return out;
}

// Thread t reads x[t + offset]: with offset > 0 the last threads read past the tensor (an
// AddressSanitizer build reports a heap-buffer-overflow; a plain build reads garbage).
__global__ void oob_kernel(const float* x, float* out, int offset) {
  out[threadIdx.x] = x[threadIdx.x + offset];
}

at::Tensor selftest_oob(const at::Tensor& x, int64_t offset) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32");
  auto out = at::empty({x.numel()}, x.options());
  FL_LAUNCH(oob_kernel, 1, static_cast<unsigned>(x.numel()), 0, FL_STREAM(), x.data_ptr<float>(),
            out.data_ptr<float>(), static_cast<int>(offset));
  return out;
}

bool is_asan() {
#if defined(__SANITIZE_ADDRESS__)
  return true;
#else
  return false;
#endif
}

std::vector<int64_t> sim_stats() {
  const auto s = sim::stats();
  return {s.launches, s.blocks, s.switches, s.stack_used, s.stack_size, s.mma, s.wgmma};
}

void set_schedule(int64_t order) {
  TORCH_CHECK(order == 0 || order == 1, "order: 0 (forward) or 1 (reverse)");
  sim::set_schedule(static_cast<int>(order));
}

bool has_kernels() {
#ifndef FL_SIM_NO_KERNELS
  return true;
#else
  return false;
#endif
}

}  // namespace simtest
}  // namespace fused_lora

TORCH_LIBRARY(fused_lora_sim, m) {
  m.def(fused_lora::kFwdSchema);
  m.def(fused_lora::kBwdSchema);
  m.def(fused_lora::kMultiFwdSchema);
  m.def(fused_lora::kMultiBwdSchema);
  m.def(fused_lora::kMoeFwdSchema);
  m.def(fused_lora::kMoeBwdSchema);
#ifndef FL_SIM_NO_KERNELS
  m.def(fused_lora::kGemmChoiceSchema, &fused_lora::gemm_choice);  // the emulator is device 0
#endif
  m.def("selftest_warp(Tensor x) -> Tensor", &fused_lora::simtest::selftest_warp);
  m.def("selftest_gemm(Tensor a, Tensor b, int mode, int bug) -> Tensor",
        &fused_lora::simtest::selftest_gemm);
  m.def("selftest_cp_async(Tensor src) -> Tensor", &fused_lora::simtest::selftest_cp_async);
  m.def("selftest_smem(int what) -> Tensor", &fused_lora::simtest::selftest_smem);
  m.def("selftest_bug(int what) -> ()", &fused_lora::simtest::selftest_bug);
  m.def("selftest_wgmma(int what) -> Tensor", &fused_lora::simtest::selftest_wgmma);
  m.def("selftest_oob(Tensor x, int offset) -> Tensor", &fused_lora::simtest::selftest_oob);
  m.def("is_asan() -> bool", &fused_lora::simtest::is_asan);
  m.def("sim_stats() -> int[]", &fused_lora::simtest::sim_stats);
  m.def("set_schedule(int order) -> ()", &fused_lora::simtest::set_schedule);
  m.def("has_kernels() -> bool", &fused_lora::simtest::has_kernels);
}
