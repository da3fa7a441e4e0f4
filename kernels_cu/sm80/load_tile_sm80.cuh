// Global -> shared tile copy shared by the sm_80 tensor-core kernels (fwd_sm80.cu, bwd_sm80.cu).
#pragma once

#include "../core/common.cuh"
#include "mma_sm80.cuh"

namespace cuflash {

// Copies rows [row0, row0 + Tile rows) of a (rows, head_dim) slice of global memory into a
// swizzled shared tile; rows >= n_rows and columns >= head_dim become zeros. Aligned: 16-byte
// cp.async (asynchronous; the caller commits and waits). Unaligned: element loads, 16-byte stores.
// `ext`: the tensor `gmem` points into (checked builds, check.cuh).
//
// Each thread keeps one chunk column and steps down the rows by kRowStep, so its shared offsets
// differ by compile-time constants and its global address by one running pointer: computing a
// fresh 64-bit address per chunk cost ~100 bytes of spills at D=256.
template <typename Tile, int kThreads, bool kAligned, typename T>
__device__ __forceinline__ void load_tile(uint32 smem_base, const T* gmem, int64 row_stride,
                                          int row0, int n_rows, int head_dim, const Extent& ext) {
  constexpr int kChunks = Tile::kChunksPerRow;
  static_assert(kThreads % kChunks == 0, "every thread keeps one chunk column");
  constexpr int kRowStep = kThreads / kChunks;
  constexpr int kSteps = Tile::kBytes / 16 / kThreads;
  static_assert(kRowStep % 4 == 0, "row % 8 takes at most two values per thread");
  const int chunk = threadIdx.x % kChunks;
  const int row = threadIdx.x / kChunks;
  const int col = chunk * 8;
  const T* src = gmem + (row0 + row) * row_stride + col;
  const int64 src_step = kRowStep * row_stride;
  // Rows row + i * kRowStep share row % 8 for even i (kRowStep % 8 is 0 or 4), and likewise for
  // odd i: two swizzled bases cover every step.
  const uint32 dst_even = smem_base + Tile::offset(row, chunk);
  const uint32 dst_odd = smem_base + Tile::offset(row + kRowStep, chunk) - kRowStep * Tile::kRowBytes;
  const int rows_left = n_rows - row0 - row;
  const bool col_ok = col < head_dim;
  if constexpr (kAligned) {
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {
      const uint32 dst = ((i & 1) ? dst_odd : dst_even) + i * kRowStep * Tile::kRowBytes;
      const bool ok = i * kRowStep < rows_left && col_ok;
      if (ok) CUFLASH_CHECK_ACCESS(ext, src + i * src_step, 16);
      // An invalid chunk still needs a legal address; 0 source bytes makes it a zero fill.
      cp_async_16(dst, ok ? src + i * src_step : gmem, ok ? 16 : 0);
    }
  } else {
    // The fallback for unaligned inputs: one chunk at a time keeps its registers few.
#pragma unroll 1
    for (int i = 0; i < kSteps; ++i) {
      const uint32 dst = ((i & 1) ? dst_odd : dst_even) + i * kRowStep * Tile::kRowBytes;
      const bool row_ok = i * kRowStep < rows_left;
      uint16 e[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        CUFLASH_CHECK_ACCESS_IF(row_ok && col + j < head_dim, ext, src + i * src_step + j, 2);
        e[j] = (row_ok && col + j < head_dim) ? src[i * src_step + j].bits : uint16(0);
      }
      const uint32 w0 = e[0] | (uint32(e[1]) << 16), w1 = e[2] | (uint32(e[3]) << 16);
      const uint32 w2 = e[4] | (uint32(e[5]) << 16), w3 = e[6] | (uint32(e[7]) << 16);
      asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n"
                   :: "r"(dst), "r"(w0), "r"(w1), "r"(w2), "r"(w3));
    }
  }
}

}  // namespace cuflash
