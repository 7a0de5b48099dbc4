// SIMT emulator runtime: the fiber scheduler, barriers, warp collectives, cp.async, ldmatrix and
// mma.sync. The model is described in simt_emu.h. No torch headers here (fast to compile).
//
// Sources followed (NVIDIA PTX ISA, "Warp Level Matrix Multiply-Accumulate Instructions"):
//   * ldmatrix: "Warp-level matrix load instruction: ldmatrix" (section 9.7.14.5.15 in PTX ISA
//     8.x): for .m8n8 .b16, threads 0-7 / 8-15 / 16-23 / 24-31 give the 8 row addresses of
//     matrix 0 / 1 / 2 / 3 (.x1: threads 0-7, .x2: 0-15; the other addresses are not used),
//     each row 16 contiguous, 16-byte aligned bytes; "each thread in a warp loads fragments of
//     a row, with thread 0 receiving the first fragment in its register r ... a group of four
//     threads loads an entire row": lane l's register i holds row l/4, columns 2(l%4) and
//     2(l%4)+1 of matrix i (lower column in the low half). .trans loads the matrix
//     column-major: the same register gets rows 2(l%4), 2(l%4)+1 of column l/4.
//   * mma: "Matrix Fragments for mma.m16n8k16 with floating point type" (9.7.14.5.8),
//     groupID = lane >> 2, threadID_in_group = lane % 4:
//       A (16x16, .f16/.bf16, 4 x .f16x2 registers a0..a7): row = groupID for a0,a1,a4,a5 and
//         groupID+8 for a2,a3,a6,a7; col = 2*threadID_in_group + (i & 1), +8 for i >= 4.
//       B (16x8, 2 registers b0..b3): row = 2*threadID_in_group + (i & 1), +8 for i >= 2;
//         col = groupID.
//       C/D (16x8 .f32, c0..c3): row = groupID for c0,c1, groupID+8 for c2,c3;
//         col = 2*threadID_in_group + (i & 1).
#define FL_SIM_NO_TORCH
#include "simt_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <mutex>
#include <new>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FL_SIM_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define FL_SIM_ASAN 0
#endif

// Context switch: a hand-written x86-64 switch (callee-saved registers, MXCSR and the x87 control
// word; no syscall) unless FUSED_LORA_SIM_UCONTEXT is defined or the target is not x86-64, then
// ucontext's swapcontext (which saves the signal mask with a syscall per switch: ~10x slower).
#if defined(__x86_64__) && !defined(FUSED_LORA_SIM_UCONTEXT)
#define FL_SIM_ASM_SWITCH 1
#else
#define FL_SIM_ASM_SWITCH 0
#include <ucontext.h>
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

// Every __shared__ variable of the translation units built with simt_emu.h (ld defines these).
extern "C" unsigned char __start_fl_sim_shared[] __attribute__((weak));
extern "C" unsigned char __stop_fl_sim_shared[] __attribute__((weak));

namespace fused_lora {
namespace sim {
namespace {

enum class St : uint8_t { Ready, Barrier, Warp, Done, Failed };
enum Op : uint8_t {
  kOpNone = 0, kOpSyncwarp, kOpShfl, kOpVote, kOpLdm, kOpMma,
  kOpWgFence, kOpWgMma, kOpWgCommit, kOpWgWait,  // warpgroup collectives
};

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int group;
  bool pred;
};

struct Fiber {
#if FL_SIM_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  unsigned char* map = nullptr;  // mmap'd region: guard page + stack
  unsigned char* stack_lo = nullptr;
  size_t stack_size = 0;
  int tid = 0, warp = 0, lane = 0;
  uint3 idx{};
  St st = St::Ready;
  // The warp collective this lane waits at.
  uint8_t op = kOpNone;
  int kind = 0;  // shfl / vote kind, ldmatrix count, mma dtype
  bool flag = false;  // ldmatrix .trans
  unsigned mask = 0;
  int arg = 0, width = 32;
  uint64_t val = 0, res = 0;
  const void* p0 = nullptr;
  const void* p1 = nullptr;
  void* out = nullptr;
  // cp.async: copies not yet performed (issue order), commit count.
  std::vector<Copy> copies;
  size_t copy_head = 0;
  int committed = 0;
  void* asan_fake = nullptr;
};

// One queued wgmma.mma_async (a whole warpgroup's): operands are read when it is retired.
struct WgOp {
  bool bf16, trans_b;
  int n;  // N of m64nNk16: 128 or 256
  uint64_t da, db;
  float* d[128];  // each thread's 64 accumulators
};
struct WgState {
  int arrived = 0;
  std::vector<WgOp> open;                  // issued, not yet committed
  std::deque<std::vector<WgOp>> groups;    // committed, oldest first
};

struct Sim {
  std::recursive_mutex mu;
  bool active = false;
  std::string name;
  std::vector<Fiber*> fibers;  // stable addresses, reused across launches
  int n = 0, nwarps = 0;
  std::vector<unsigned> warp_waiting, warp_gone;
  std::vector<WgState> wgs;
  std::vector<int> ready;  // ring buffer
  size_t rq_head = 0, rq_count = 0;
  int bar_count = 0, done_count = 0;
  Fiber* cur = nullptr;
#if FL_SIM_ASM_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched_uc;
#endif
  BodyFn fn = nullptr;
  void* ctx = nullptr;
  bool failed = false;
  std::string error;
  unsigned char* dyn = nullptr;
  size_t dyn_size = 0;
  std::unordered_map<const void*, long long> max_dyn;
  int order = 0;  // 0: threads start in order 0..n-1; 1: reversed
  bool switch_from_sched = false;
  // stats
  long long launches = 0, blocks = 0, switches = 0, mma = 0, wgmma = 0;
  // ASan fiber bookkeeping
  void* sched_fake = nullptr;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
};

Sim& G() {
  static Sim* g = new Sim();  // never destroyed: fibers may be referenced at exit
  return *g;
}

constexpr long long kSmemOptInMax = 227 * 1024;  // H100: 227 KB of dynamic shared memory
constexpr long long kSmemDefaultMax = 48 * 1024;

size_t stack_bytes() {
  static const size_t s = [] {
    const char* e = std::getenv("FUSED_LORA_SIM_STACK_KB");
    long kb = e ? std::atol(e) : 0;
    if (kb < 64) kb = FL_SIM_ASAN ? 1024 : 256;
    return static_cast<size_t>(kb) * 1024;
  }();
  return s;
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof(buf), f, ap);
  va_end(ap);
  return buf;
}

std::string where(const Fiber* f) {
  Sim& g = G();
  std::string s = fmt("fused_lora sim: kernel %s, block (%u,%u,%u)", g.name.c_str(), blockIdx.x, blockIdx.y,
                      blockIdx.z);
  if (f != nullptr)
    s += fmt(", thread (%u,%u,%u) (warp %d, lane %d)", f->idx.x, f->idx.y, f->idx.z, f->warp,
             f->lane);
  return s + ": ";
}

const char* op_name(const Fiber& f) {
  switch (f.op) {
    case kOpSyncwarp: return "__syncwarp";
    case kOpShfl:
      return f.kind == kShflIdx   ? "__shfl_sync"
             : f.kind == kShflXor ? "__shfl_xor_sync"
             : f.kind == kShflUp  ? "__shfl_up_sync"
                                  : "__shfl_down_sync";
    case kOpVote:
      return f.kind == kVoteBallot ? "__ballot_sync" : f.kind == kVoteAny ? "__any_sync" : "__all_sync";
    case kOpLdm:
      return f.kind == 4 ? (f.flag ? "ldmatrix_x4_trans" : "ldmatrix_x4")
             : f.kind == 2 ? (f.flag ? "ldmatrix_x2_trans" : "ldmatrix_x2")
                           : "ldmatrix";
    case kOpMma: return f.kind ? "mma_16816<bf16>" : "mma_16816<f16>";
    case kOpWgFence: return "wgmma_fence";
    case kOpWgMma:
      return f.arg == 256 ? (f.kind ? "wgmma_m64n256k16<bf16>" : "wgmma_m64n256k16<f16>")
                          : (f.kind ? "wgmma_m64n128k16<bf16>" : "wgmma_m64n128k16<f16>");
    case kOpWgCommit: return "wgmma_commit";
    case kOpWgWait: return "wgmma_wait";
    default: return "?";
  }
}

std::string wait_desc(const Fiber& f) {
  if (f.st == St::Barrier) return "__syncthreads()";
  if (f.st == St::Done) return "exited";
  if (f.st == St::Warp) return fmt("%s(mask 0x%08x)", op_name(f), f.mask);
  return "runnable";
}

// ---- ASan fiber annotations ---------------------------------------------------------------------
inline void asan_start(void** fake, const void* bottom, size_t size) {
#if FL_SIM_ASAN
  __sanitizer_start_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}
inline void asan_finish(void* fake, bool from_sched) {
#if FL_SIM_ASAN
  Sim& g = G();
  const void* b = nullptr;
  size_t s = 0;
  __sanitizer_finish_switch_fiber(fake, &b, &s);
  if (from_sched) g.main_bottom = b, g.main_size = s;
#else
  (void)fake, (void)from_sched;
#endif
}

// ---- context switch -----------------------------------------------------------------------------
#if FL_SIM_ASM_SWITCH
extern "C" void fl_sim_switch(void** save_sp, void* new_sp);
extern "C" void fl_sim_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl fl_sim_switch
  .hidden fl_sim_switch
  .type fl_sim_switch,@function
fl_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fl_sim_switch,.-fl_sim_switch

  .p2align 4
  .globl fl_sim_trampoline
  .hidden fl_sim_trampoline
  .type fl_sim_trampoline,@function
fl_sim_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %rbx, %rdi
  call fl_sim_fiber_entry
  ud2
  .cfi_endproc
  .size fl_sim_trampoline,.-fl_sim_trampoline
)");
#endif

extern "C" __attribute__((visibility("hidden"), used)) void fl_sim_fiber_entry(Fiber* f);

#if !FL_SIM_ASM_SWITCH
void uc_entry() { fl_sim_fiber_entry(G().cur); }
#endif

// A fresh context for f that starts in fl_sim_fiber_entry(f) on its own stack.
void init_context(Fiber* f) {
#if FL_SIM_ASM_SWITCH
  uintptr_t top = reinterpret_cast<uintptr_t>(f->stack_lo + f->stack_size) & ~uintptr_t(15);
  uint64_t* ret_slot = reinterpret_cast<uint64_t*>(top - 24);  // entry rsp % 16 == 8 after call
  uint64_t* sp = ret_slot - 7;
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  std::memset(sp, 0, 8 * 8);
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<unsigned char*>(sp) + 4, &fpcw, 2);
  sp[5] = reinterpret_cast<uint64_t>(f);  // rbx
  ret_slot[0] = reinterpret_cast<uint64_t>(&fl_sim_trampoline);
  f->sp = sp;
#else
  f->uc.uc_stack.ss_sp = f->stack_lo;
  f->uc.uc_stack.ss_size = f->stack_size;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, &uc_entry, 0);
#endif
}

// Switch from the running fiber `from` (nullptr: the scheduler) to `to` (nullptr: the
// scheduler). `from_dead`: `from` never runs again (it exited or failed): nothing is saved.
void switch_to(Fiber* from, Fiber* to, bool from_dead = false) {
  Sim& g = G();
  ++g.switches;
  g.cur = to;
  if (to != nullptr) threadIdx = to->idx;
  g.switch_from_sched = from == nullptr;
  void** fake = from_dead ? nullptr : (from ? &from->asan_fake : &g.sched_fake);
  if (to != nullptr)
    asan_start(fake, to->stack_lo, to->stack_size);
  else
    asan_start(fake, g.main_bottom, g.main_size);
#if FL_SIM_ASM_SWITCH
  static void* dead_sp;
  void** save = from_dead ? &dead_sp : (from ? &from->sp : &g.sched_sp);
  fl_sim_switch(save, to ? to->sp : g.sched_sp);
#else
  static ucontext_t dead_uc;
  ucontext_t* save = from_dead ? &dead_uc : (from ? &from->uc : &g.sched_uc);
  swapcontext(save, to ? &to->uc : &g.sched_uc);
#endif
  // Resumed (a dead fiber never is).
  asan_finish(from ? from->asan_fake : g.sched_fake, g.switch_from_sched);
}

// ---- ready queue -----------------------------------------------------------------------------
inline void push_ready(Fiber* f) {
  Sim& g = G();
  f->st = St::Ready;
  g.ready[(g.rq_head + g.rq_count) % g.ready.size()] = f->tid;
  ++g.rq_count;
}
inline Fiber* pop_ready() {
  Sim& g = G();
  if (g.rq_count == 0) return nullptr;
  const int t = g.ready[g.rq_head];
  g.rq_head = (g.rq_head + 1) % g.ready.size();
  --g.rq_count;
  return g.fibers[t];
}

// The running fiber f blocks (its state already set): run the next ready fiber, or return to
// the scheduler when there is none. Returns when f is resumed.
void block_current(Fiber* f) {
  Fiber* nx = pop_ready();
  switch_to(f, nx);
}

[[noreturn]] void die(Fiber* f) {
  switch_to(f, nullptr, true);
  std::abort();  // unreachable: a failed fiber is never resumed
}

[[noreturn]] void fail_fiber(Fiber* f, const std::string& msg) {
  Sim& g = G();
  if (!g.failed) {
    g.failed = true;
    g.error = where(f) + msg;
  }
  f->st = St::Failed;
  die(f);
}

Fiber* cur_fiber(const char* what) {
  Sim& g = G();
  if (g.cur == nullptr)
    throw std::logic_error(std::string("fused_lora sim: ") + what +
                           " called outside a kernel launch");
  return g.cur;
}

void release_barrier() {
  Sim& g = G();
  for (int t = 0; t < g.n; ++t)
    if (g.fibers[t]->st == St::Barrier) push_ready(g.fibers[t]);
  g.bar_count = 0;
}

// ---- shared memory -------------------------------------------------------------------------------
inline bool in_range(const void* p, size_t n, const unsigned char* lo, const unsigned char* hi) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  return lo != nullptr && c >= lo && c + n <= hi;
}
bool is_shared(const void* p, size_t n) {
  Sim& g = G();
  return in_range(p, n, __start_fl_sim_shared, __stop_fl_sim_shared) ||
         in_range(p, n, g.dyn, g.dyn + g.dyn_size);
}

#if FL_SIM_ASAN
__attribute__((no_sanitize_address))
#endif
void poison(unsigned char* p, size_t n) {
  for (size_t i = 0; i < n; ++i) p[i] = 0xFF;
}

void poison_shared() {
  Sim& g = G();
  unsigned char* lo = __start_fl_sim_shared;
  unsigned char* hi = __stop_fl_sim_shared;
  if (lo != nullptr && hi > lo) poison(lo, static_cast<size_t>(hi - lo));
  if (g.dyn_size) std::memset(g.dyn, 0xFF, g.dyn_size);
}

// ---- warp collectives --------------------------------------------------------------------------
inline uint16_t ld16(const unsigned char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline float b16_to_float(uint16_t v, bool bf16) {
  if (bf16) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw r;
  r.x = v;
  return __half2float(__half(r));
}

// Performs the collective that every lane of `mask` in warp `w` waits at (the caller checked
// that they agree). `self` is the lane that arrived last (it is running).
void perform(Fiber* self, int w, unsigned mask) {
  Sim& g = G();
  Fiber** lanes = &g.fibers[w * 32];
  const Fiber& f0 = *self;
  switch (f0.op) {
    case kOpSyncwarp: break;
    case kOpShfl: {
      for (int l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        Fiber& f = *lanes[l];
        const int width = f.width;
        const int base = l & ~(width - 1);
        int src = l;
        switch (f.kind) {
          case kShflIdx: src = base + (f.arg & (width - 1)); break;
          case kShflXor: src = l ^ f.arg; break;
          case kShflUp: src = l - f.arg; break;
          case kShflDown: src = l + f.arg; break;
        }
        if (src < base || src >= base + width || src > 31) src = l;  // own value
        if (!(mask >> src & 1u))
          fail_fiber(&f, fmt("%s(mask 0x%08x): lane %d reads lane %d, which is not in the mask "
                             "(undefined value on a GPU)",
                             op_name(f), mask, l, src));
        f.res = lanes[src]->val;
      }
      break;
    }
    case kOpVote: {
      unsigned ballot = 0;
      for (int l = 0; l < 32; ++l)
        if ((mask >> l & 1u) && lanes[l]->val) ballot |= 1u << l;
      uint64_t r = ballot;
      if (f0.kind == kVoteAny) r = ballot != 0;
      if (f0.kind == kVoteAll) r = ballot == mask;
      for (int l = 0; l < 32; ++l)
        if (mask >> l & 1u) lanes[l]->res = r;
      break;
    }
    case kOpLdm: {
      const int num = f0.kind;
      const unsigned char* rows[4][8];
      for (int i = 0; i < num; ++i)
        for (int r = 0; r < 8; ++r) {
          const Fiber& f = *lanes[8 * i + r];
          const unsigned char* a = static_cast<const unsigned char*>(f.p0);
          if (reinterpret_cast<uintptr_t>(a) % 16 != 0)
            fail_fiber(self, fmt("%s: the row address %p of lane %d is not 16-byte aligned",
                                 op_name(f0), static_cast<const void*>(a), 8 * i + r));
          if (!is_shared(a, 16))
            fail_fiber(self, fmt("%s: the row address %p of lane %d is not in shared memory",
                                 op_name(f0), static_cast<const void*>(a), 8 * i + r));
          rows[i][r] = a;
        }
      for (int l = 0; l < 32; ++l) {
        uint32_t* out = static_cast<uint32_t*>(lanes[l]->out);
        const int rr = l >> 2, cc = 2 * (l & 3);
        for (int i = 0; i < num; ++i) {
          uint16_t e0, e1;
          if (!f0.flag) {
            e0 = ld16(rows[i][rr] + 2 * cc);
            e1 = ld16(rows[i][rr] + 2 * (cc + 1));
          } else {
            e0 = ld16(rows[i][cc] + 2 * rr);
            e1 = ld16(rows[i][cc + 1] + 2 * rr);
          }
          out[i] = static_cast<uint32_t>(e0) | (static_cast<uint32_t>(e1) << 16);
        }
      }
      break;
    }
    case kOpMma: {
      ++g.mma;
      const bool bf16 = f0.kind != 0;
      float A[16][16], B[16][8], D[16][8];
      for (int l = 0; l < 32; ++l) {
        const Fiber& f = *lanes[l];
        const uint32_t* a = static_cast<const uint32_t*>(f.p0);
        const uint32_t* b = static_cast<const uint32_t*>(f.p1);
        const float* c = static_cast<const float*>(f.out);
        const int gid = l >> 2, t = l & 3;
        for (int reg = 0; reg < 4; ++reg) {
          const int row = gid + ((reg & 1) ? 8 : 0);       // a0,a1 | a2,a3 | a4,a5 | a6,a7
          const int col = 2 * t + ((reg & 2) ? 8 : 0);
          A[row][col] = b16_to_float(static_cast<uint16_t>(a[reg] & 0xFFFFu), bf16);
          A[row][col + 1] = b16_to_float(static_cast<uint16_t>(a[reg] >> 16), bf16);
        }
        for (int reg = 0; reg < 2; ++reg) {
          const int row = 2 * t + (reg ? 8 : 0);
          B[row][gid] = b16_to_float(static_cast<uint16_t>(b[reg] & 0xFFFFu), bf16);
          B[row + 1][gid] = b16_to_float(static_cast<uint16_t>(b[reg] >> 16), bf16);
        }
        D[gid][2 * t] = c[0];
        D[gid][2 * t + 1] = c[1];
        D[gid + 8][2 * t] = c[2];
        D[gid + 8][2 * t + 1] = c[3];
      }
      for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 8; ++n) {
          float acc = D[m][n];
          for (int k = 0; k < 16; ++k) acc = std::fma(A[m][k], B[k][n], acc);
          D[m][n] = acc;
        }
      for (int l = 0; l < 32; ++l) {
        float* d = static_cast<float*>(lanes[l]->out);
        const int gid = l >> 2, t = l & 3;
        d[0] = D[gid][2 * t];
        d[1] = D[gid][2 * t + 1];
        d[2] = D[gid + 8][2 * t];
        d[3] = D[gid + 8][2 * t + 1];
      }
      break;
    }
    default: break;
  }
}

// f (running) arrives at the collective described by its op fields; returns when it completed.
void warp_collective(Fiber* f) {
  Sim& g = G();
  const unsigned bit = 1u << f->lane;
  const unsigned mask = f->mask;
  if (!(mask & bit))
    fail_fiber(f, fmt("%s(mask 0x%08x): the mask does not include the calling lane",
                      op_name(*f), mask));
  if (const unsigned gone = g.warp_gone[f->warp] & mask)
    fail_fiber(f, fmt("%s(mask 0x%08x): lane %d of the mask has exited (or does not exist): "
                      "a divergent warp collective",
                      op_name(*f), mask, __builtin_ctz(gone)));
  unsigned& waiting = g.warp_waiting[f->warp];
  waiting |= bit;
  if ((waiting & mask) == mask) {
    Fiber** lanes = &g.fibers[f->warp * 32];
    bool match = true;
    for (int l = 0; l < 32 && match; ++l) {
      if (!(mask >> l & 1u)) continue;
      const Fiber& o = *lanes[l];
      match = o.op == f->op && o.mask == mask && o.kind == f->kind && o.flag == f->flag &&
              o.width == f->width;
    }
    if (match) {
      perform(f, f->warp, mask);
      waiting &= ~mask;
      for (int l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        lanes[l]->op = kOpNone;
        if (lanes[l] != f) push_ready(lanes[l]);
      }
      return;
    }
    // Lanes of the mask wait at another collective: reported if it never resolves.
  }
  f->st = St::Warp;
  block_current(f);
}

// ---- warpgroup collectives (wgmma) -------------------------------------------------------------
// The dynamic shared memory's shared-window address: not 1024-byte aligned on purpose (see
// simt_emu.h), and low enough that every address fits a descriptor's 18 bits.
constexpr uint32_t kDynShared = 0x410;

// Byte `a` of the shared window as the 128-byte swizzle places it: 16-byte chunk bits 4-6 XOR
// row bits 7-9 (Swizzle<3,4,3> of the PTX ISA's canonical layouts), then into the dynamic
// shared memory; nullptr when outside it.
const unsigned char* swizzled(uint32_t a) {
  Sim& g = G();
  const uint32_t p = a ^ (((a >> 7) & 7u) << 4);
  if (p < kDynShared || p + 2 > kDynShared + g.dyn_size) return nullptr;
  return g.dyn + (p - kDynShared);
}

// Retires one queued MMA: D[64][N] += A[64][16] B[16][N], fp32 in k order (PTX ISA
// 9.7.15.5.1: A K-major; B K-major, or N-major when trans_b; D fragments: thread i of the
// warpgroup holds rows 16(i/32) + (i%32)/4 (+8) and columns 8j + 2(i%4) (+1), j < N/8, as
// d[4j .. 4j+3]).
void retire(Fiber* self, const WgOp& op) {
  ++G().wgmma;
  const auto field = [](uint64_t d, int lo) { return static_cast<uint32_t>((d >> lo) & 0x3FFF) << 4; };
  for (const uint64_t d : {op.da, op.db}) {
    if ((d >> 62) != 1 || ((d >> 49) & 7) != 0)
      fail_fiber(self, fmt("wgmma descriptor 0x%016llx: the emulator models the 128-byte swizzle "
                           "with base offset 0 only", static_cast<unsigned long long>(d)));
  }
  const uint32_t a0 = field(op.da, 0), a_sbo = field(op.da, 32);
  const uint32_t b0 = field(op.db, 0), b_lbo = field(op.db, 16), b_sbo = field(op.db, 32);
  static thread_local float A[64][16], B[16][256], D[64][256];
  const int NN = op.n;
  auto load = [&](uint32_t addr, const char* which, int r, int c) -> float {
    const unsigned char* q = swizzled(addr);
    if (q == nullptr)
      fail_fiber(self, fmt("wgmma: element (%d, %d) of %s is at shared address 0x%x, outside the "
                           "dynamic shared memory", r, c, which, addr));
    return b16_to_float(ld16(q), op.bf16);
  };
  for (int m = 0; m < 64; ++m)  // K-major: rows of 128 bytes in atoms of 8, atoms SBO apart
    for (int k = 0; k < 16; ++k)
      A[m][k] = load(a0 + (m % 8) * 128 + (m / 8) * a_sbo + k * 2, "A", m, k);
  for (int n = 0; n < NN; ++n)
    for (int k = 0; k < 16; ++k) {
      const uint32_t off = op.trans_b
          ? (n % 64) * 2 + (n / 64) * b_lbo + (k % 8) * 128 + (k / 8) * b_sbo  // N-major
          : (n % 8) * 128 + (n / 8) * b_sbo + k * 2;                            // K-major
      B[k][n] = load(b0 + off, "B", k, n);
    }
  for (int i = 0; i < 128; ++i) {
    const float* d = op.d[i];
    const int r = 16 * (i / 32) + (i % 32) / 4, c = 2 * (i % 4);
    for (int j = 0; j < NN / 8; ++j) {
      D[r][8 * j + c] = d[4 * j];
      D[r][8 * j + c + 1] = d[4 * j + 1];
      D[r + 8][8 * j + c] = d[4 * j + 2];
      D[r + 8][8 * j + c + 1] = d[4 * j + 3];
    }
  }
  for (int m = 0; m < 64; ++m)
    for (int n = 0; n < NN; ++n) {
      float acc = D[m][n];
      for (int k = 0; k < 16; ++k) acc = std::fma(A[m][k], B[k][n], acc);
      D[m][n] = acc;
    }
  for (int i = 0; i < 128; ++i) {
    float* d = op.d[i];
    const int r = 16 * (i / 32) + (i % 32) / 4, c = 2 * (i % 4);
    for (int j = 0; j < NN / 8; ++j) {
      d[4 * j] = D[r][8 * j + c];
      d[4 * j + 1] = D[r][8 * j + c + 1];
      d[4 * j + 2] = D[r + 8][8 * j + c];
      d[4 * j + 3] = D[r + 8][8 * j + c + 1];
    }
  }
}

// f (running) arrives at the warpgroup collective in its op fields; returns when it completed.
void wg_collective(Fiber* f) {
  Sim& g = G();
  if (g.n % 128 != 0)
    fail_fiber(f, fmt("%s in a block of %d threads: warpgroups need a multiple of 128",
                      op_name(*f), g.n));
  const int wg = f->tid / 128;
  for (int w = 4 * wg; w < 4 * wg + 4; ++w)
    if (const unsigned gone = g.warp_gone[w])
      fail_fiber(f, fmt("%s: thread %d of the warpgroup has exited (a divergent warpgroup "
                        "collective)", op_name(*f), w * 32 + __builtin_ctz(gone)));
  WgState& st = g.wgs[wg];
  if (++st.arrived < 128) {
    f->st = St::Warp;
    block_current(f);
    return;
  }
  st.arrived = 0;
  Fiber** th = &g.fibers[wg * 128];
  for (int i = 0; i < 128; ++i) {
    const Fiber& o = *th[i];
    if (o.op != f->op || o.kind != f->kind || o.flag != f->flag || o.val != f->val ||
        o.res != f->res || o.arg != f->arg)
      fail_fiber(f, fmt("%s: thread %d of the warpgroup is at %s (or passed other operands): a "
                        "divergent warpgroup collective", op_name(*f), wg * 128 + i,
                        op_name(o)));
  }
  switch (f->op) {
    case kOpWgMma: {
      WgOp op{f->kind != 0, f->flag, f->arg, f->val, f->res, {}};
      for (int i = 0; i < 128; ++i) op.d[i] = static_cast<float*>(th[i]->out);
      st.open.push_back(op);
      break;
    }
    case kOpWgCommit:
      st.groups.push_back(std::move(st.open));
      st.open.clear();
      break;
    case kOpWgWait:
      while (static_cast<int>(st.groups.size()) > f->arg) {
        for (const WgOp& op : st.groups.front()) retire(f, op);
        st.groups.pop_front();
      }
      break;
    default: break;  // kOpWgFence: register ordering only
  }
  for (int i = 0; i < 128; ++i) {
    th[i]->op = kOpNone;
    if (th[i] != f) push_ready(th[i]);
  }
}

std::string deadlock_report() {
  Sim& g = G();
  std::string s = "deadlock: no thread of the block can proceed (a hang on a GPU). ";
  int at_bar = 0;
  for (int t = 0; t < g.n; ++t) at_bar += g.fibers[t]->st == St::Barrier;
  s += fmt("%d of %d threads wait at __syncthreads(), %d exited", at_bar, g.n, g.done_count);
  int reported = 0;
  for (int w = 0; w < g.nwarps && reported < 3; ++w) {
    for (int l = 0; l < 32; ++l) {
      const int t = w * 32 + l;
      if (t >= g.n) break;
      const Fiber& f = *g.fibers[t];
      if (f.st != St::Warp) continue;
      s += fmt("; warp %d lane %d waits at %s", w, l, wait_desc(f).c_str());
      for (int o = 0; o < 32; ++o) {
        if (!(f.mask >> o & 1u) || w * 32 + o >= g.n) continue;
        const Fiber& of = *g.fibers[w * 32 + o];
        if (of.st != St::Warp || of.op != f.op || of.mask != f.mask || of.kind != f.kind) {
          s += fmt(" while lane %d of its mask is at %s (a divergent warp collective)", o,
                   wait_desc(of).c_str());
          break;
        }
      }
      ++reported;
      break;
    }
  }
  return s;
}

}  // namespace

// ---- fiber body -----------------------------------------------------------------------------
extern "C" void fl_sim_fiber_entry(Fiber* f) {
  Sim& g = G();
  asan_finish(nullptr, g.switch_from_sched);
  std::string err;
  try {
    g.fn(g.ctx);
  } catch (const std::exception& e) {
    err = e.what();
    const size_t bt = err.find("\nException raised from");  // c10::Error's backtrace
    if (bt != std::string::npos) err.resize(bt);
  } catch (...) {
    err = "an unknown exception";
  }
  if (!err.empty()) fail_fiber(f, "the kernel threw: " + err);
  // Thread exit.
  f->st = St::Done;
  ++g.done_count;
  const unsigned bit = 1u << f->lane;
  g.warp_gone[f->warp] |= bit;
  f->copies.clear();
  f->copy_head = 0;
  if (g.n % 128 == 0) {
    const WgState& st = g.wgs[f->tid / 128];
    if (st.arrived > 0)
      fail_fiber(f, "exited while its warpgroup waits at a wgmma collective (a divergent "
                    "warpgroup collective)");
    if (!st.open.empty() || !st.groups.empty())
      fail_fiber(f, "exited with wgmma operations of its warpgroup not waited for "
                    "(wgmma_commit + wgmma_wait<0> before the accumulators are used)");
  }
  const unsigned waiting = g.warp_waiting[f->warp];
  for (int l = 0; l < 32; ++l) {
    if (!(waiting >> l & 1u)) continue;
    const Fiber& o = *g.fibers[f->warp * 32 + l];
    if (o.mask & bit)
      fail_fiber(f, fmt("exited while lane %d of its warp waits at %s, whose mask includes it "
                        "(a divergent warp collective)",
                        l, wait_desc(o).c_str()));
  }
  if (g.bar_count > 0 && g.bar_count + g.done_count == g.n) release_barrier();
  switch_to(f, pop_ready(), true);
  std::abort();  // unreachable
}

// ---- public entry points --------------------------------------------------------------------------
void fail(const std::string& msg) {
  Sim& g = G();
  if (g.cur == nullptr) throw std::runtime_error("fused_lora sim: " + msg);
  fail_fiber(g.cur, msg);
}

unsigned char* dynamic_smem() { return G().dyn; }
bool in_launch() { return G().active; }

int sim_sm_count() {
  static const int n = [] {
    const char* e = std::getenv("FUSED_LORA_SIM_SMS");
    const int v = e ? std::atoi(e) : 0;
    return v > 0 ? v : 4;
  }();
  return n;
}

void set_schedule(int order) { G().order = order; }

void set_max_dyn_smem(const void* kernel_id, const char* name, long long bytes) {
  Sim& g = G();
  if (bytes < 0 || bytes > kSmemOptInMax)
    throw std::runtime_error(fmt("fused_lora sim: FL_SET_SMEM(%s, %lld): more than the %lld bytes "
                                 "of dynamic shared memory an H100 block can have (227 KB)",
                                 name, bytes, kSmemOptInMax));
  std::lock_guard<std::recursive_mutex> lock(g.mu);
  g.max_dyn[kernel_id] = bytes;
}

void syncthreads() {
  Sim& g = G();
  Fiber* f = cur_fiber("__syncthreads");
  ++g.bar_count;
  if (g.bar_count + g.done_count == g.n) {
    release_barrier();
    return;
  }
  f->st = St::Barrier;
  block_current(f);
}

void syncwarp(unsigned mask) {
  Fiber* f = cur_fiber("__syncwarp");
  f->op = kOpSyncwarp;
  f->kind = 0;
  f->flag = false;
  f->width = 32;
  f->mask = mask;
  warp_collective(f);
}

uint64_t shfl(int kind, unsigned mask, uint64_t v, int arg, int width) {
  Fiber* f = cur_fiber("__shfl*_sync");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail_fiber(f, fmt("__shfl*_sync: width %d is not a power of 2 in [1, 32]", width));
  f->op = kOpShfl;
  f->kind = kind;
  f->flag = false;
  f->mask = mask;
  f->val = v;
  f->arg = arg;
  f->width = width;
  warp_collective(f);
  return f->res;
}

unsigned vote(int kind, unsigned mask, bool pred) {
  Fiber* f = cur_fiber("__ballot/__any/__all_sync");
  f->op = kOpVote;
  f->kind = kind;
  f->flag = false;
  f->width = 32;
  f->mask = mask;
  f->val = pred;
  warp_collective(f);
  return static_cast<unsigned>(f->res);
}

void ldmatrix(int num, bool trans, uint32_t* r, const void* smem) {
  Fiber* f = cur_fiber("ldmatrix");
  f->op = kOpLdm;
  f->kind = num;
  f->flag = trans;
  f->width = 32;
  f->mask = 0xffffffffu;  // .aligned: the whole warp
  f->p0 = smem;
  f->out = r;
  warp_collective(f);
}

void mma_16816(bool bf16, float* d, const uint32_t* a, const uint32_t* b) {
  Fiber* f = cur_fiber("mma_16816");
  f->op = kOpMma;
  f->kind = bf16 ? 1 : 0;
  f->flag = false;
  f->width = 32;
  f->mask = 0xffffffffu;
  f->p0 = a;
  f->p1 = b;
  f->out = d;
  warp_collective(f);
}

uint32_t smem_addr(const void* p) {
  Fiber* f = cur_fiber("smem_u32");
  Sim& g = G();
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (g.dyn == nullptr || c < g.dyn || c > g.dyn + g.dyn_size)
    fail_fiber(f, fmt("smem_u32(%p): the emulator gives shared-window addresses to the dynamic "
                      "shared memory only", p));
  return kDynShared + static_cast<uint32_t>(c - g.dyn);
}

namespace {
void wg_op(const char* what, uint8_t op, int kind, bool flag, uint64_t v0, uint64_t v1,
           float* out, int arg) {
  Fiber* f = cur_fiber(what);
  f->op = op;
  f->kind = kind;
  f->flag = flag;
  f->width = 32;
  f->mask = 0xffffffffu;
  f->val = v0;
  f->res = v1;
  f->out = out;
  f->arg = arg;
  wg_collective(f);
}
}  // namespace

void wg_fence() { wg_op("wgmma_fence", kOpWgFence, 0, false, 0, 0, nullptr, 0); }
void wg_commit() { wg_op("wgmma_commit", kOpWgCommit, 0, false, 0, 0, nullptr, 0); }
void wg_wait(int n) { wg_op("wgmma_wait", kOpWgWait, n, false, 0, 0, nullptr, n); }
void wgmma(bool bf16, bool trans_b, int n, float* d, uint64_t desc_a, uint64_t desc_b) {
  wg_op(n == 256 ? "wgmma_m64n256k16" : "wgmma_m64n128k16", kOpWgMma, bf16 ? 1 : 0, trans_b,
        desc_a, desc_b, d, n);
}

void cp_async16(void* smem, const void* gmem, bool pred) {
  Fiber* f = cur_fiber("cp_async16");
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0)
    fail_fiber(f, fmt("cp_async16: the shared address %p is not 16-byte aligned", smem));
  if (!is_shared(smem, 16))
    fail_fiber(f, fmt("cp_async16: the destination %p is not in shared memory", smem));
  if (reinterpret_cast<uintptr_t>(gmem) % 16 != 0)
    fail_fiber(f, fmt("cp_async16: the global address %p is not 16-byte aligned (pred=%d)", gmem,
                      static_cast<int>(pred)));
  f->copies.push_back({static_cast<unsigned char*>(smem),
                       static_cast<const unsigned char*>(gmem), f->committed, pred});
}

void cp_async_commit() { ++cur_fiber("cp_async_commit")->committed; }

void cp_async_wait(int n) {
  Fiber* f = cur_fiber("cp_async_wait");
  const int target = f->committed - n;  // groups < target must be complete
  size_t h = f->copy_head;
  while (h < f->copies.size() && f->copies[h].group < target) {
    const Copy& c = f->copies[h++];
    if (c.pred)
      std::memcpy(c.dst, c.src, 16);
    else
      std::memset(c.dst, 0, 16);
  }
  if (h == f->copies.size()) {
    f->copies.clear();
    h = 0;
  }
  f->copy_head = h;
}

Stats stats() {
  Sim& g = G();
  std::lock_guard<std::recursive_mutex> lock(g.mu);
  Stats s{g.launches, g.blocks, g.switches, 0, static_cast<long long>(stack_bytes()), g.mma,
          g.wgmma};
  for (Fiber* f : g.fibers) {
    const uint64_t* w = reinterpret_cast<const uint64_t*>(f->stack_lo);
    const size_t nw = f->stack_size / 8;
    size_t i = 0;
    while (i < nw && w[i] == 0) ++i;
    s.stack_used = std::max<long long>(s.stack_used, static_cast<long long>((nw - i) * 8));
  }
  return s;
}

std::string run_launch(const char* name, const void* kernel_id, dim3 grid, dim3 block,
                       size_t dyn_smem, BodyFn fn, void* ctx) {
  Sim& g = G();
  std::lock_guard<std::recursive_mutex> lock(g.mu);
  // "kernel (dir/file.cu:line)" -> "kernel (file.cu:line)"
  std::string pretty = name;
  const size_t open = pretty.find(" (");
  const size_t slash = pretty.rfind('/');
  if (open != std::string::npos && slash != std::string::npos && slash > open)
    pretty.erase(open + 2, slash - open - 1);
  const std::string pre = "fused_lora sim: launch of " + pretty + ": ";
  if (g.active) return pre + "a kernel launch from inside a kernel";
  const unsigned long long nthreads =
      static_cast<unsigned long long>(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || nthreads > 1024 || block.x > 1024 ||
      block.y > 1024 || block.z > 64)
    return pre + fmt("invalid block (%u,%u,%u): at most 1024 threads, z <= 64", block.x, block.y,
                     block.z);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535)
    return pre + fmt("invalid grid (%u,%u,%u): x in [1, 2^31-1], y and z in [1, 65535]", grid.x,
                     grid.y, grid.z);
  long long limit = kSmemDefaultMax;
  if (kernel_id != nullptr) {
    auto it = g.max_dyn.find(kernel_id);
    if (it != g.max_dyn.end()) limit = it->second;
  }
  if (static_cast<long long>(dyn_smem) > limit)
    return pre + fmt("%zu bytes of dynamic shared memory, over the kernel's limit of %lld (more "
                     "than 48 KB needs FL_SET_SMEM first; at most 227 KB)",
                     dyn_smem, limit);

  // Fibers (stacks reused across blocks and launches).
  const int n = static_cast<int>(nthreads);
  const size_t ssz = stack_bytes();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (static_cast<int>(g.fibers.size()) < n) {
    Fiber* f = new Fiber();
    void* m = mmap(nullptr, ssz + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      delete f;
      return pre + "out of memory for fiber stacks";
    }
    mprotect(m, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    f->map = static_cast<unsigned char*>(m);
    f->stack_lo = f->map + page;
    f->stack_size = ssz;
#if !FL_SIM_ASM_SWITCH
    getcontext(&f->uc);
#endif
    g.fibers.push_back(f);
  }
  g.ready.assign(1024, 0);
  g.n = n;
  g.nwarps = (n + 31) / 32;
  g.warp_waiting.assign(g.nwarps, 0);
  g.warp_gone.assign(g.nwarps, 0);
  g.wgs.assign(static_cast<size_t>((n + 127) / 128), WgState{});
  if (dyn_smem > 0) {
    void* p = nullptr;
    if (posix_memalign(&p, 128, dyn_smem) != 0) return pre + "out of memory";
    g.dyn = static_cast<unsigned char*>(p);
  } else {
    g.dyn = nullptr;
  }
  g.dyn_size = dyn_smem;
  g.name = pretty;
  g.fn = fn;
  g.ctx = ctx;
  g.failed = false;
  g.error.clear();
  g.active = true;
  ++g.launches;
  gridDim = grid;
  blockDim = block;
  for (int t = 0; t < n; ++t) {
    Fiber* f = g.fibers[t];
    f->tid = t;
    f->warp = t / 32;
    f->lane = t % 32;
    f->idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
  }

  std::string result;
  for (unsigned bz = 0; bz < grid.z && !g.failed; ++bz)
    for (unsigned by = 0; by < grid.y && !g.failed; ++by)
      for (unsigned bx = 0; bx < grid.x && !g.failed; ++bx) {
        blockIdx = uint3{bx, by, bz};
        ++g.blocks;
        poison_shared();
        g.rq_head = g.rq_count = 0;
        g.bar_count = g.done_count = 0;
        for (WgState& st : g.wgs) st = WgState{};
        for (int w = 0; w < g.nwarps; ++w) {
          g.warp_waiting[w] = 0;
          const int live = std::min(32, n - w * 32);
          g.warp_gone[w] = live == 32 ? 0u : ~((1u << live) - 1u);
        }
        for (int i = 0; i < n; ++i) {
          Fiber* f = g.fibers[g.order == 1 ? n - 1 - i : i];
          f->op = kOpNone;
          f->copies.clear();
          f->copy_head = 0;
          f->committed = 0;
          f->asan_fake = nullptr;
#if FL_SIM_ASAN
          __asan_unpoison_memory_region(f->stack_lo, f->stack_size);
#endif
          init_context(f);
          push_ready(f);
        }
        switch_to(nullptr, pop_ready());
        // Back here when no fiber can run: the block is done, failed or deadlocked.
        g.cur = nullptr;
        if (g.failed) break;
        if (g.done_count != n) {
          g.failed = true;
          g.error = where(nullptr) + deadlock_report();
        }
      }
  if (g.failed) result = g.error;
  g.active = false;
  g.cur = nullptr;
  std::free(g.dyn);
  g.dyn = nullptr;
  g.dyn_size = 0;
  return result;
}

}  // namespace sim
}  // namespace fused_lora
