// SIMT emulator: the CUDA kernels of csrc/ compiled as plain host C++ (g++ -DFUSED_LORA_SIM) and
// run on CPU tensors, so CPU CI executes every kernel and launcher (tests/test_cuda_sim.py).
// Included by csrc/cuda_compat.cuh under FUSED_LORA_SIM; implemented in simt_emu.cpp.
//
// Execution model
//   * launch(grid, block, dyn_smem, body): blocks run one after another; every thread of a
//     block is a fiber (its own stack) running body(). A fiber runs until it blocks (barrier,
//     warp collective) or exits; then the next ready fiber runs (FIFO). No preemption: a
//     spin-wait on memory written by another thread of the block never ends.
//   * __shared__ is `static` placed in the ELF section fl_sim_shared: since blocks run one at a
//     time, a function-static array is exactly one block's shared memory. The whole section
//     and the dynamic shared memory (FL_DYNAMIC_SMEM, 128-byte aligned, dyn_smem bytes) are
//     filled with 0xFF at the start of every block: a kernel that reads shared memory it did
//     not write in this block reads NaN (fp32/fp16/bf16) or -1 and fails its test.
//   * threadIdx/blockIdx/blockDim/gridDim are thread_local globals the scheduler sets at every
//     fiber switch.
//   * __syncthreads(): all non-exited threads of the block (exited threads count as arrived).
//   * Warp collectives (__syncwarp, __shfl*_sync, __ballot/any/all_sync, ldmatrix, mma.sync)
//     complete when every lane of the mask (the whole warp for ldmatrix/mma: .aligned) waits at
//     the same collective with the same mask. A lane of the mask that has exited is an error at
//     once; lanes waiting at different collectives (or a barrier) are reported when no fiber can
//     run any more (a deadlock on a GPU), as is any other deadlock.
//   * cp.async: copies are deferred into per-thread commit groups and performed when
//     cp_async_wait<N> leaves at most N groups pending (reading a stage before waiting for it
//     reads the previous contents: poison or an older stage). Both addresses must be 16-byte
//     aligned, the destination in shared memory.
//   * ldmatrix / mma.sync m16n8k16: from the PTX ISA text (see simt_emu.cpp for the sections);
//     mma accumulates in fp32 in k order (products of fp16/bf16 are exact in fp32).
//   * wgmma (warpgroup collectives: the 128 threads of warps 4w..4w+3, all of them, .aligned):
//     wgmma_fence / wgmma_m64n{128,256}k16 / wgmma_commit / wgmma_wait complete when every thread of
//     the warpgroup waits at the same one with the same descriptors. An MMA is only queued when
//     issued; it reads shared memory and updates the accumulators when wgmma_wait retires its
//     group, so a stage overwritten before its MMAs were waited for gives wrong results, as it
//     may on a GPU. Descriptors are decoded from the PTX ISA (128-byte swizzle only: XOR of
//     address bits 4-6 with bits 7-9 of the shared-window address); the dynamic shared memory
//     sits at shared address 0x410, deliberately not 1024-byte aligned, so a kernel must align
//     its swizzle atoms itself. Groups still pending when a thread exits are an error.
//     Not checked: fence.proxy.async (a no-op here) and reads of accumulators in flight.
//   * Errors (a kernel bug the emulator detects) are recorded with the block/thread, the launch
//     is abandoned (no unwinding across fiber stacks) and launch() throws c10::Error naming the
//     kernel: a RuntimeError in Python. The emulator stays usable after an error.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef FL_SIM_NO_TORCH
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#endif

// ---- CUDA keywords (host_defines.h defines most of them as nothing on a host compiler) ----------
#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __align__
#define __align__(n) __attribute__((aligned(n)))
#endif
#undef __shared__
#if defined(__ELF__)
#define __shared__ static __attribute__((section("fl_sim_shared")))
#else
#define __shared__ static
#endif

// ---- thread coordinates ----------------------------------------------------------------------------
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace fused_lora {
namespace sim {

struct Stream {};  // fl_stream_t: kernels run synchronously on the calling thread

// ---- runtime (simt_emu.cpp) -----------------------------------------------------------------
using BodyFn = void (*)(void*);
// Runs the launch; "" on success, else the error message (the caller throws).
std::string run_launch(const char* name, const void* kernel_id, dim3 grid, dim3 block,
                       size_t dyn_smem, BodyFn fn, void* ctx);
void set_max_dyn_smem(const void* kernel_id, const char* name, long long bytes);
int sim_sm_count();
// Order in which a block's threads first run: 0 = 0..n-1 (default), 1 = n-1..0. Running a test
// both ways exposes many missing __syncthreads() (a read of data another thread writes later).
void set_schedule(int order);
[[noreturn]] void fail(const std::string& msg);  // from inside a kernel: a kernel bug
unsigned char* dynamic_smem();
bool in_launch();

void syncthreads();
void syncwarp(unsigned mask);
uint64_t shfl(int kind, unsigned mask, uint64_t v, int arg, int width);  // kind: see below
unsigned vote(int kind, unsigned mask, bool pred);
void cp_async16(void* smem, const void* gmem, bool pred);
void cp_async_commit();
void cp_async_wait(int n);
void ldmatrix(int num, bool trans, uint32_t* r, const void* smem);
void mma_16816(bool bf16, float* d, const uint32_t* a, const uint32_t* b);
uint32_t smem_addr(const void* p);
void wg_fence();
void wgmma(bool bf16, bool trans_b, int n, float* d, uint64_t desc_a, uint64_t desc_b);
void wg_commit();
void wg_wait(int n);

enum : int { kShflIdx = 0, kShflXor = 1, kShflUp = 2, kShflDown = 3 };
enum : int { kVoteBallot = 0, kVoteAny = 1, kVoteAll = 2 };

// Statistics for the tests (selftest op sim_stats): launches, blocks, fiber switches, the stack
// high-water mark over all fibers so far, the stack size, and the mma.sync (per warp) and
// wgmma (per warpgroup) instructions performed so far: which tensor-core path ran.
struct Stats {
  long long launches, blocks, switches, stack_used, stack_size, mma, wgmma;
};
Stats stats();

template <class F>
void body_thunk(void* ctx) {
  (*static_cast<F*>(ctx))();
}

#ifndef FL_SIM_NO_TORCH
// Runs body() as every thread of every block; a detected kernel bug throws c10::Error.
template <class F>
void launch(dim3 grid, dim3 block, size_t dyn_smem, F&& body, const char* name = "kernel",
            const void* kernel_id = nullptr) {
  using Fn = std::remove_reference_t<F>;
  const std::string err = run_launch(name, kernel_id, grid, block, dyn_smem, &body_thunk<Fn>,
                                     const_cast<void*>(static_cast<const void*>(&body)));
  TORCH_CHECK(err.empty(), err);
}

// FL_LAUNCH: the arguments are evaluated once, on the host, like a <<<>>> launch's; each thread
// then calls the kernel with copies converted to the parameter types.
template <class K, class... A>
void launch_kernel(const char* name, const void* kernel_id, dim3 grid, dim3 block,
                   size_t dyn_smem, K kernel, A&&... args) {
  auto params = std::make_tuple(std::forward<A>(args)...);
  launch(grid, block, dyn_smem, [&] { std::apply(kernel, params); }, name, kernel_id);
}
#endif

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type > 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, static_cast<const void*>(&v), sizeof(T));
  return u;
}
template <class T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(static_cast<void*>(&v), &u, sizeof(T));
  return v;
}

}  // namespace sim

}  // namespace fused_lora

// ---- launches, attributes, streams (cuda_compat.cuh's interface) ------------------------------
#define FL_SIM_STR2(x) #x
#define FL_SIM_STR(x) FL_SIM_STR2(x)
#define FL_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)                                 \
  ::fused_lora::sim::launch_kernel(#kernel " (" __FILE__ ":" FL_SIM_STR(__LINE__) ")",         \
                                   reinterpret_cast<const void*>(kernel), dim3(grid),          \
                                   dim3(block), static_cast<size_t>(smem_bytes), kernel,       \
                                   __VA_ARGS__)
#define FL_SET_SMEM(kernel, bytes)                                                       \
  ::fused_lora::sim::set_max_dyn_smem(reinterpret_cast<const void*>(kernel), #kernel,    \
                                      static_cast<long long>(bytes))
#define FL_DYNAMIC_SMEM(name) unsigned char* name = ::fused_lora::sim::dynamic_smem()
#define FL_TORCH_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(fused_lora_sim, CPU, m)
#define FL_DEVICE_GUARD(t) (void)(t)
#define FL_STREAM() ::fused_lora::sim::Stream{}
#ifndef C10_CUDA_KERNEL_LAUNCH_CHECK
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
#endif
using fl_stream_t = ::fused_lora::sim::Stream;

#ifndef FL_SIM_NO_TORCH
namespace fused_lora {
inline bool fl_is_device_tensor(const at::Tensor& t) { return t.device().is_cpu(); }
inline int fl_current_device() { return 0; }
// FUSED_LORA_SIM_SMS (default 4): small, so the split heuristics split.
inline int fl_sm_count() { return sim::sim_sm_count(); }
}  // namespace fused_lora
#endif

// ---- device intrinsics ---------------------------------------------------------------------------
inline void __syncthreads() { ::fused_lora::sim::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::fused_lora::sim::syncwarp(mask); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  using namespace ::fused_lora::sim;
  return from_bits<T>(shfl(kShflIdx, mask, to_bits(v), src_lane, width));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  using namespace ::fused_lora::sim;
  return from_bits<T>(shfl(kShflXor, mask, to_bits(v), lane_mask, width));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace ::fused_lora::sim;
  return from_bits<T>(shfl(kShflUp, mask, to_bits(v), static_cast<int>(delta), width));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace ::fused_lora::sim;
  return from_bits<T>(shfl(kShflDown, mask, to_bits(v), static_cast<int>(delta), width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return ::fused_lora::sim::vote(::fused_lora::sim::kVoteBallot, mask, pred != 0);
}
inline int __any_sync(unsigned mask, int pred) {
  return ::fused_lora::sim::vote(::fused_lora::sim::kVoteAny, mask, pred != 0) != 0;
}
inline int __all_sync(unsigned mask, int pred) {
  return ::fused_lora::sim::vote(::fused_lora::sim::kVoteAll, mask, pred != 0) != 0;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

// Blocks run one at a time and a fiber is never preempted: a plain read-modify-write is atomic.
template <class T>
inline T fl_sim_atomic_add(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
inline float atomicAdd(float* p, float v) { return fl_sim_atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return fl_sim_atomic_add(p, v); }
inline int atomicAdd(int* p, int v) { return fl_sim_atomic_add(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return fl_sim_atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return fl_sim_atomic_add(p, v);
}
template <class T>
inline T fl_sim_atomic_max(T* p, T v) {
  const T old = *p;
  *p = old > v ? old : v;
  return old;
}
inline int atomicMax(int* p, int v) { return fl_sim_atomic_max(p, v); }
inline unsigned atomicMax(unsigned* p, unsigned v) { return fl_sim_atomic_max(p, v); }
inline long long atomicMax(long long* p, long long v) { return fl_sim_atomic_max(p, v); }
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  return fl_sim_atomic_max(p, v);
}
inline int atomicMin(int* p, int v) {
  const int old = *p;
  *p = old < v ? old : v;
  return old;
}
inline int atomicExch(int* p, int v) {
  const int old = *p;
  *p = v;
  return old;
}
inline int atomicCAS(int* p, int cmp, int v) {
  const int old = *p;
  if (old == cmp) *p = v;
  return old;
}

// CUDA's min/max overloads (int, int64, unsigned, float, double and mixes of them, with the
// usual arithmetic conversions).
template <class A, class B,
          std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
constexpr std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B,
          std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
constexpr std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
// fmaf: <cmath>'s (a single rounding, like the GPU's FFMA).

// ---- cp.async / ldmatrix / mma.sync (cuda_compat.cuh's interface) ----------------------------------
namespace fused_lora {

inline void cp_async16(void* smem, const void* gmem, bool pred) {
  sim::cp_async16(smem, gmem, pred);
}
inline void cp_async_commit() { sim::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group takes N >= 0");
  sim::cp_async_wait(N);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { sim::ldmatrix(4, false, r, smem); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  sim::ldmatrix(4, true, r, smem);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* smem) { sim::ldmatrix(2, false, r, smem); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem) {
  sim::ldmatrix(2, true, r, smem);
}

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "mma_16816<T>: T is __half or __nv_bfloat16");
  sim::mma_16816(std::is_same_v<T, __nv_bfloat16>, d, a, b);
}

// ---- wgmma (the emulator has it on every "device") -----------------------------------------------
#define FL_HAS_WGMMA 1
inline bool fl_has_wgmma() { return true; }
inline uint32_t smem_u32(const void* p) { return sim::smem_addr(p); }
inline void fence_proxy_async() {}
inline void wgmma_fence() { sim::wg_fence(); }
inline void wgmma_commit() { sim::wg_commit(); }
template <int N>
inline void wgmma_wait() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes N in [0, 7]");
  sim::wg_wait(N);
}
template <int NA>
inline void wgmma_fence_acc(float (&)[NA]) {}
template <typename T, int TRANS_B>
inline void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "wgmma_m64n128k16<T>: T is __half or __nv_bfloat16");
  static_assert(TRANS_B == 0 || TRANS_B == 1, "TRANS_B is 0 or 1");
  sim::wgmma(std::is_same_v<T, __nv_bfloat16>, TRANS_B != 0, 128, d, desc_a, desc_b);
}
template <typename T, int TRANS_B>
inline void wgmma_m64n256k16(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "wgmma_m64n256k16<T>: T is __half or __nv_bfloat16");
  static_assert(TRANS_B == 0 || TRANS_B == 1, "TRANS_B is 0 or 1");
  sim::wgmma(std::is_same_v<T, __nv_bfloat16>, TRANS_B != 0, 256, d, desc_a, desc_b);
}

}  // namespace fused_lora
