// The one place where the CUDA kernels' device intrinsics, launches, stream and device guard are
// spelled. The kernel sources (gemm.cu, lora_linear_cuda.cu, multi_lora_cuda.cu) use only what this
// header and CUDA's plain C++ surface (threadIdx/blockIdx/blockDim/gridDim, __syncthreads,
// __syncwarp, __shfl_xor_sync, __ballot_sync, __popc, atomicAdd, fmaf, min/max, __half /
// __nv_bfloat16 conversions, uint4, dim3, static __shared__ arrays) provide, so they build two
// ways:
//
//   * nvcc (FUSED_LORA_WITH_CUDA): the real thing, below.
//   * FUSED_LORA_SIM (host C++ only, no GPU): tools/simt_emu/src/simt_emu.h runs every CUDA thread of a
//     block as a fiber, with block barriers, warp collectives, cp.async, ldmatrix and mma.sync
//     emulated from their PTX ISA definitions. tests/test_cuda_sim.py builds the same kernel and
//     launcher sources that way and checks every op against fused_lora.reference on CPU CI,
//     because CI has no GPU and a kernel that never ran is not a kernel we ship untested.
//
// Interface (both builds):
//   FL_LAUNCH(kernel, grid, block, smem_bytes, stream, args...)   launch + check the launch
//   FL_SET_SMEM(kernel, bytes)        opt a kernel in to > 48 KB of dynamic shared memory
//                                     (call before every launch: it acts once per device)
//   FL_DYNAMIC_SMEM(name)             declares `unsigned char* name`, the dynamic shared memory
//   FL_TORCH_LIBRARY_IMPL(m)          registers the kernels: fused_lora_C at the CUDA key (the
//                                     emulator: fused_lora_sim at the CPU key)
//   FL_DEVICE_GUARD(tensor)           a device guard for the tensor's device, for the scope
//   fl_stream_t, FL_STREAM()          the current stream of the guarded device
//   fl_sm_count()                     SMs of the current device (cached; legal under capture)
//   fl_current_device()               the current device's index
//   fl_is_device_tensor(t)            t lives where the kernels run (CUDA; CPU in the emulator)
//   cp_async16(smem, gmem, pred)      16-byte global->shared copy; zero-fills when !pred
//   cp_async_commit(), cp_async_wait<N>()
//   ldmatrix_x4(r, smem) / ldmatrix_x4_trans(r, smem) / ldmatrix_x2(r, smem) /
//   ldmatrix_x2_trans(r, smem)        ldmatrix.sync.aligned.m8n8.{x4,x2}[.trans].shared.b16
//   mma_16816<T>(d, a, b)             d += a·b, mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32
//                                     (T = __half or __nv_bfloat16; a: 4 regs, b: 2, d: 4 fp32)
//   Hopper warpgroup MMA (sm_90a only; FL_HAS_WGMMA is 1 in the device passes that have it, and
//   the kernels that use it compile to a trap elsewhere):
//   smem_u32(p)                       p's shared-window address (what descriptors hold)
//   wgmma_desc_128b(addr, lbo, sbo)   a 128-byte-swizzle matrix descriptor (PTX ISA 9.7.15.5.1.2.2)
//   fence_proxy_async()               fence.proxy.async.shared::cta: this thread's generic-proxy
//                                     shared writes (stores, landed cp.async) become visible to
//                                     the async proxy wgmma reads through
//   wgmma_fence() / wgmma_commit() / wgmma_wait<N>()   wgmma.{fence,commit_group,wait_group}
//   wgmma_m64n128k16<T, TRANS_B>(d, desc_a, desc_b)   d[64] += A·B, wgmma.mma_async m64n128k16
//                                     f32 accumulators, A and B from shared memory (B N-major
//                                     when TRANS_B); every thread of the warpgroup calls it
//   wgmma_m64n256k16<T, TRANS_B>(d, desc_a, desc_b)   the same with N = 256, d[128]
//   wgmma_fence_acc(d)                pins d's registers in place around the async MMA (the
//                                     compiler must not move reads of d above wgmma_wait)
//   fl_has_wgmma()                    host: the current device runs the sm_90a kernels
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#if defined(FUSED_LORA_SIM)

#include "simt_emu.h"  // tools/simt_emu/src/: the emulator build puts it on the include path

#else  // nvcc

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>
#include <set>
#include <tuple>

#define FL_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)      \
  do {                                                               \
    kernel<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                  \
  } while (0)

#define FL_SET_SMEM(kernel, bytes) \
  ::fused_lora::fl_set_smem_once(reinterpret_cast<const void*>(kernel), (bytes))

#define FL_DYNAMIC_SMEM(name)                            \
  extern __shared__ __align__(128) unsigned char name##_[]; \
  unsigned char* name = name##_

#define FL_TORCH_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(fused_lora_C, CUDA, m)

#define FL_DEVICE_GUARD(t) const c10::cuda::CUDAGuard fl_device_guard_((t).device())

using fl_stream_t = cudaStream_t;
#define FL_STREAM() static_cast<cudaStream_t>(c10::cuda::getCurrentCUDAStream())

namespace fused_lora {

inline bool fl_is_device_tensor(const at::Tensor& t) { return t.is_cuda(); }

inline int fl_current_device() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

// > 48 KB of dynamic shared memory needs an opt-in per kernel and device; done once per
// (kernel, device, size), so launches pay a set lookup, not a driver call.
inline void fl_set_smem_once(const void* kernel, int bytes) {
  static std::mutex mu;
  static std::set<std::tuple<const void*, int, int>> done;
  const auto key = std::make_tuple(kernel, fl_current_device(), bytes);
  const std::lock_guard<std::mutex> lock(mu);
  if (done.count(key)) return;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.insert(key);
}

// A host attribute query (no sync, legal during graph capture), cached per device.
inline int fl_sm_count() {
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

// ---- cp.async (sm_80+) -------------------------------------------------------------------------
// The src-size operand 0 makes the copy write 16 zero bytes without reading global memory: tile
// edges cost no branch and never touch memory past the tensor.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- ldmatrix / mma.sync (sm_80+) --------------------------------------------------------------
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(s));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ---- wgmma (sm_90a) ------------------------------------------------------------------------------
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FL_HAS_WGMMA 1
#else
#define FL_HAS_WGMMA 0
#endif

// Host: true when this build holds the sm_90a kernels (setup.py defines FUSED_LORA_SM90A when
// FUSED_LORA_CUDA_ARCHS lists 90a) and the current device is compute capability 9.0 (an sm_90a
// cubin runs on 9.0 only). Cached per device; a host attribute query, legal under capture.
inline bool fl_has_wgmma() {
#if defined(FUSED_LORA_SM90A)
  static int cache[64] = {0};  // 0 unknown, 1 no, 2 yes
  const int dev = fl_current_device();
  if (dev < 64 && cache[dev] != 0) return cache[dev] == 2;
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  const bool yes = major == 9 && minor == 0;
  if (dev < 64) cache[dev] = yes ? 2 : 1;
  return yes;
#else
  return false;
#endif
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void fence_proxy_async() {
#if FL_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_fence() {
#if FL_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if FL_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if FL_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
template <int NA>
__device__ __forceinline__ void wgmma_fence_acc(float (&d)[NA]) {
#pragma unroll
  for (int i = 0; i < NA; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The 64 accumulator operands %0..%63, then desc_a (%64) and desc_b (%65); scale-d is 1 (D is
// accumulated: the kernels put the LoRA term there first), scale-a/b 1, trans-a 0.
#define FL_WGMMA_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
    "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define FL_WGMMA_ASM(TYPE, TRANS_B)                                                            \
  asm volatile(                                                                                \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                         \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "       \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "        \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "      \
      "%64, %65, 1, 1, 1, 0, " TRANS_B ";\n"                                                   \
      : FL_WGMMA_D8(0), FL_WGMMA_D8(8), FL_WGMMA_D8(16), FL_WGMMA_D8(24), FL_WGMMA_D8(32),     \
        FL_WGMMA_D8(40), FL_WGMMA_D8(48), FL_WGMMA_D8(56)                                      \
      : "l"(desc_a), "l"(desc_b))

template <typename T, int TRANS_B>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a,
                                                 uint64_t desc_b) {
  static_assert(TRANS_B == 0 || TRANS_B == 1, "TRANS_B is 0 or 1");
#if FL_HAS_WGMMA
  if constexpr (std::is_same_v<T, __half>) {
    if constexpr (TRANS_B) FL_WGMMA_ASM("f16", "1"); else FL_WGMMA_ASM("f16", "0");
  } else {
    if constexpr (TRANS_B) FL_WGMMA_ASM("bf16", "1"); else FL_WGMMA_ASM("bf16", "0");
  }
#else
  (void)d, (void)desc_a, (void)desc_b;
#endif
}
#undef FL_WGMMA_ASM
#define FL_WGMMA256_ASM(TYPE, TRANS_B)                                                         \
  asm volatile(                                                                                \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " "                         \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, " \
      "%128, %129, 1, 1, 1, 0, " TRANS_B ";\n"                                                 \
      : FL_WGMMA_D8(0), FL_WGMMA_D8(8), FL_WGMMA_D8(16), FL_WGMMA_D8(24), FL_WGMMA_D8(32),     \
        FL_WGMMA_D8(40), FL_WGMMA_D8(48), FL_WGMMA_D8(56), FL_WGMMA_D8(64), FL_WGMMA_D8(72),   \
        FL_WGMMA_D8(80), FL_WGMMA_D8(88), FL_WGMMA_D8(96), FL_WGMMA_D8(104),                  \
        FL_WGMMA_D8(112), FL_WGMMA_D8(120)                                                     \
      : "l"(desc_a), "l"(desc_b))

template <typename T, int TRANS_B>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t desc_a,
                                                 uint64_t desc_b) {
  static_assert(TRANS_B == 0 || TRANS_B == 1, "TRANS_B is 0 or 1");
#if FL_HAS_WGMMA
  if constexpr (std::is_same_v<T, __half>) {
    if constexpr (TRANS_B) FL_WGMMA256_ASM("f16", "1"); else FL_WGMMA256_ASM("f16", "0");
  } else {
    if constexpr (TRANS_B) FL_WGMMA256_ASM("bf16", "1"); else FL_WGMMA256_ASM("bf16", "0");
  }
#else
  (void)d, (void)desc_a, (void)desc_b;
#endif
}
#undef FL_WGMMA256_ASM
#undef FL_WGMMA_D8

}  // namespace fused_lora

#endif  // FUSED_LORA_SIM

namespace fused_lora {
// Both builds: a wgmma shared-memory matrix descriptor for the 128-byte swizzle (PTX ISA
// "Matrix Descriptor Format"): start address, leading and stride byte offsets, each encoded
// (x & 0x3FFFF) >> 4; base offset 0 (the swizzle atoms start on 1024-byte boundaries); mode 1.
__host__ __device__ __forceinline__ uint64_t wgmma_desc_128b(uint32_t addr, uint32_t lbo,
                                                             uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32) | (uint64_t(1) << 62);
}
}  // namespace fused_lora
