// Hopper asynchronous-copy plumbing (sm_90): mbarriers, TMA tensor loads, register reallocation and
// the wgmma shared-memory descriptor. Inline PTX throughout (no <cuda/ptx>), so the file reads the
// same under NVRTC and nvcc and every instruction is visible at its call site.
#pragma once

#include "../core/common.cuh"

namespace cuflash {

// A CUtensorMap as the kernel receives it: 128 opaque bytes, 64-byte aligned, encoded on the host
// by cuTensorMapEncodeTiled (cuflash/_launch_sm90.py) and passed by value as __grid_constant__.
struct alignas(64) TmaMap {
  uint64 opaque[16];
};

__device__ __forceinline__ uint32 smem_u32(const void* p) {
  return static_cast<uint32>(__cvta_generic_to_shared(p));
}

// The 1024-byte-aligned start of a kernel's dynamic shared memory (swizzle atoms need 1024; the
// window itself is only 16-byte aligned, so a launch provides kBytes = the layout + 1024). Traps
// when the launch gave less than kBytes: the Python side must mirror the kernel's layout.
template <int kBytes> __device__ __forceinline__ uint32 smem_base_1024(const char* smem_raw) {
  uint32 dyn_smem;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_smem));
  if (dyn_smem < kBytes) __trap();
  return (smem_u32(smem_raw) + 1023) & ~1023u;
}

// ---- mbarrier --------------------------------------------------------------------------------

__device__ __forceinline__ void mbar_init(uint32 bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the async proxy (TMA) before anyone uses them.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32 bar, uint32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n"
               :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}
// Blocks until the phase with parity `parity` has completed. A fresh barrier counts as having
// completed the phase before phase 0, so waiting on parity 1 returns at once (the producer's
// first pass over its empty slots relies on that).
__device__ __forceinline__ bool mbar_try_wait(uint32 bar, uint32 parity) {
  uint32 done;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  return done != 0;
}
__device__ __forceinline__ void mbar_wait(uint32 bar, uint32 parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

// ---- TMA -------------------------------------------------------------------------------------

__device__ __forceinline__ void tma_prefetch(const TmaMap& map) {
  asm volatile("prefetch.tensormap [%0];\n" :: "l"(reinterpret_cast<uint64>(&map)) : "memory");
}
// One box of a rank-4 tensor map (coordinates innermost first) into shared memory; completion is
// counted on `bar` in bytes (the whole box, out-of-bounds zero fill included).
__device__ __forceinline__ void tma_load_4d(uint32 dst, const TmaMap& map, uint32 bar, int c0,
                                            int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];\n"
      :: "r"(dst), "l"(reinterpret_cast<uint64>(&map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2),
         "r"(c3)
      : "memory");
}
// The same with an L2 cache policy (l2_policy) for the box's lines.
__device__ __forceinline__ void tma_load_4d(uint32 dst, const TmaMap& map, uint32 bar, int c0,
                                            int c1, int c2, int c3, uint64 policy) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%3, %4, %5, %6}], [%2], %7;\n"
      :: "r"(dst), "l"(reinterpret_cast<uint64>(&map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2),
         "r"(c3), "l"(policy)
      : "memory");
}
// Fetches a box of a 4D tensor into L2 (no shared memory, no barrier).
__device__ __forceinline__ void tma_prefetch_l2_4d(const TmaMap& map, int c0, int c1, int c2,
                                                   int c3) {
  asm volatile("cp.async.bulk.prefetch.tensor.4d.L2.global.tile [%0, {%1, %2, %3, %4}];\n"
               :: "l"(reinterpret_cast<uint64>(&map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}
enum class L2Evict { kFirst, kLast };
// An L2 cache policy for all of a load's lines: evicted first (read once) or last (read again).
template <L2Evict kEvict> __device__ __forceinline__ uint64 l2_policy() {
  uint64 policy;
  if constexpr (kEvict == L2Evict::kFirst) {
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  } else {
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
  }
  return policy;
}

// ---- TMA reductions and the shared-memory writes that feed async-proxy readers ----------------

// Orders this thread's generic-proxy shared-memory writes before later async-proxy reads (wgmma
// operands from shared memory).
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void st_shared_b32(uint32 addr, uint32 x) {
  asm volatile("st.shared.b32 [%0], %1;\n" :: "r"(addr), "r"(x) : "memory");
}
__device__ __forceinline__ void st_shared_v2_b32(uint32 addr, uint32 x, uint32 y) {
  asm volatile("st.shared.v2.b32 [%0], {%1, %2};\n" :: "r"(addr), "r"(x), "r"(y) : "memory");
}
__device__ __forceinline__ void st_shared_v2_f32(uint32 addr, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" :: "r"(addr), "f"(x), "f"(y) : "memory");
}

// dst box at (c0, c1, c2, c3) of a rank-4 tensor map += the shared-memory box at `src`, by the
// TMA unit (bulk-group completion).
__device__ __forceinline__ void tma_reduce_add_4d(const TmaMap& map, uint32 src, int c0, int c1,
                                                  int c2, int c3) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group"
      " [%0, {%2, %3, %4, %5}], [%1];\n"
      :: "l"(reinterpret_cast<uint64>(&map)), "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// The shared-memory box at `src` to the box at (c0, c1, c2, c3) of a rank-4 tensor map, by the
// TMA unit (bulk-group completion); out-of-bounds elements are not written.
__device__ __forceinline__ void tma_store_4d(const TmaMap& map, uint32 src, int c0, int c1,
                                             int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group"
      " [%0, {%2, %3, %4, %5}], [%1];\n"
      :: "l"(reinterpret_cast<uint64>(&map)), "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
__device__ __forceinline__ void bulk_commit_group() {
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
// Waits until at most kPending bulk groups are pending reading their shared-memory source.
template <int kPending> __device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" :: "n"(kPending) : "memory");
}
// Waits until at most kPending bulk groups are pending at all.
template <int kPending> __device__ __forceinline__ void bulk_wait_group() {
  asm volatile("cp.async.bulk.wait_group %0;\n" :: "n"(kPending) : "memory");
}

// ---- named barriers (bar 0 is __syncthreads) ---------------------------------------------------

__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}

// 0, computed from `x` (x * 0 is +-0 or NaN and cvt.rzi turns both into 0; ptxas folds neither
// step): a barrier whose thread count adds it is issued after the work that produced x. ptxas
// moves register work freely across bar.sync / bar.arrive, which order memory only.
__device__ __forceinline__ int zero_after(float x) {
  int z;
  asm("{\n .reg .f32 t;\n mul.f32 t, %1, 0f00000000;\n cvt.rzi.s32.f32 %0, t;\n}\n"
      : "=r"(z) : "f"(x));
  return z;
}

// ---- register reallocation between warpgroups (sm_90a) ----------------------------------------

template <int kRegs> __device__ __forceinline__ void regs_dealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(kRegs));
}
template <int kRegs> __device__ __forceinline__ void regs_alloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(kRegs));
}

// ---- wgmma shared-memory descriptor -------------------------------------------------------------
// Bits 0-13: start address >> 4; 16-29: leading byte offset >> 4; 32-45: stride byte offset >> 4;
// 62-63: swizzle mode (1 = 128-byte). Tiles here are 128-byte-swizzled "chunks" of 64 16-bit
// columns (rows at 128 B, 8-row swizzle atoms at 1024 B, every chunk 1024-byte aligned):
//   K-major (Q, K for S = Q K^T): stride offset 1024 B (next 8 rows); leading offset unused (1);
//     a k16 step adds 32 B inside a chunk.
//   MN-major (V as the B operand of P V, transposed): leading offset = bytes from one 64-column
//     chunk to the next, stride offset 1024 B (next 8 keys); a k16 step adds 16 rows = 2048 B.
constexpr uint64 kDescSwizzle128 = 1ull << 62;

__device__ __forceinline__ uint64 make_desc(uint32 smem_byte_addr, uint32 leading_bytes,
                                            uint32 stride_bytes) {
  return kDescSwizzle128 | (static_cast<uint64>((stride_bytes >> 4) & 0x3fff) << 32) |
         (static_cast<uint64>((leading_bytes >> 4) & 0x3fff) << 16) |
         static_cast<uint64>((smem_byte_addr >> 4) & 0x3fff);
}

}  // namespace cuflash
