// Thin wrappers over the sm_80 instructions the tensor-core kernels use: cp.async, ldmatrix and
// mma.sync m16n8k16 (fp32 accumulate). Fragment layouts (PTX ISA, "mma.m16n8k16"): with
// g = lane / 4 and t = lane % 4,
//   A 16x16 (row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B 16x8  (k x n):     b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C 16x8  (fp32):      c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
#pragma once

#include "../core/common.cuh"

namespace cuflash {

__device__ __forceinline__ uint32 smem_addr(const void* p) {
  return static_cast<uint32>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; `src_bytes` < 16 zero-fills the rest (0 writes zeros only).
__device__ __forceinline__ void cp_async_16(uint32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int kPending> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32 (&r)[4], uint32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32 (&r)[4], uint32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

template <typename T> struct Mma16816;

template <> struct Mma16816<f16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32 (&a)[4], uint32 b0,
                                             uint32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <> struct Mma16816<bf16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32 (&a)[4], uint32 b0,
                                             uint32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// A tile of 16-bit elements in shared memory, rows of kCols elements, stored with an XOR swizzle
// of its 16-byte chunks: chunk c of row r lives at chunk c ^ (r % 8). ldmatrix reads 8 rows of one
// chunk at a time; without the swizzle those 8 rows (row pitch a multiple of 128 B) hit the same
// 4 banks and serialise 8-way. Needs kCols a multiple of 64 (8 chunks per swizzle period).
template <int kRows, int kCols> struct SwizzledTile {
  static_assert(kCols % 64 == 0, "swizzle period is 8 chunks of 8 elements");
  static constexpr int kChunksPerRow = kCols / 8;
  static constexpr int kRowBytes = kCols * 2;
  static constexpr int kBytes = kRows * kRowBytes;

  static __device__ __forceinline__ uint32 offset(int row, int chunk) {
    return row * kRowBytes + ((chunk ^ (row & 7)) << 4);
  }

  // ldmatrix addressing for one thread that reads row (row_const + row_lane) and chunk
  // (chunk_const + chunk_bit), with row_const % 8 == 0 and chunk_const even, both compile-time
  // after unrolling. The swizzle only depends on chunk_const % 8, so four bases per thread cover
  // it and the rest folds into the instruction's immediate offset. (Left to itself the compiler
  // kept one address register per (k-step, tile) pair: ~48 registers and spills at D=128.)
  struct Reader {
    uint32 base[4];
    __device__ __forceinline__ Reader(uint32 tile, int row_lane, int chunk_bit) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        base[j] = tile + row_lane * kRowBytes + (((2 * j + chunk_bit) ^ (row_lane & 7)) << 4);
      }
    }
    __device__ __forceinline__ uint32 operator()(int row_const, int chunk_const) const {
      return base[(chunk_const / 2) % 4] + row_const * kRowBytes + (chunk_const / 8) * 128;
    }
  };
};

}  // namespace cuflash
