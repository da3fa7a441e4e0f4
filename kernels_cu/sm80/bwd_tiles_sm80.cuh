// The sm80 backward's shared pieces: its shared-memory budgets, padded shared tiles and the
// mma.sync fragment plumbing (ldmatrix readers, the SS and RS products, packing, paired stores
// and fp32 atomics) that bwd_sm80.cu's kernels are built from.
#pragma once

#include "../core/common.cuh"
#include "load_tile_sm80.cuh"
#include "mma_sm80.cuh"

namespace cuflash {

// Dynamic shared memory a tile configuration may use: the opt-in maximum per block of sm_80
// (A100, 163 KB). Double buffering is dropped where it would not fit, so every instantiation runs
// on A100 and H100 alike (sm_86/sm_89 offer only 99 KB and need smaller tiles).
constexpr int kSm80SmemBudget = 163 * 1024;
// The per-block maximum of cc 8.6 / 8.9 / 12.0 GPUs (99 KB), which the small dK/dV tiles
// (cuflash/_launch_bwd.py BWD_SM80_SMALL_DKDV_TILES) must fit.
constexpr int kSmallSmemBudget = 99 * 1024;

__host__ __device__ constexpr int cmin(int a, int b) { return a < b ? a : b; }

// ---- shared tiles and fragment plumbing --------------------------------------------------------

// A tile of 16-bit elements in shared memory, rows of kCols elements padded by one 16-byte chunk
// (the forward swizzles instead). ldmatrix reads 8 rows of one chunk; 16 bytes of padding put
// those rows 16 bytes apart modulo 128, in 8 different bank groups (conflict-free), and likewise
// the 8 rows x 4 words a warp stores per instruction in store_frags. Unlike the swizzle, every
// address a thread touches is one base plus a compile-time offset, so each operand needs one
// address register: with the swizzle, the Reader's 4 bases per operand and the 16 store addresses
// of dS^T (chunk ^ row % 8 is not affine in the chunk) were hoisted out of the main loop and
// spilled (ptxas: 255 registers, 20-76 bytes of spills at D = 64 and 128).
// Same interface as SwizzledTile, so load_tile fills it.
template <int kRows_, int kCols> struct PaddedTile {
  static_assert(kCols % 8 == 0, "whole 16-byte chunks");
  static constexpr int kRows = kRows_;
  static constexpr int kChunksPerRow = kCols / 8;
  static constexpr int kRowBytes = kCols * 2 + 16;
  static constexpr int kBytes = kRows * kRowBytes;

  static __device__ __forceinline__ uint32 offset(int row, int chunk) {
    return row * kRowBytes + chunk * 16;
  }

  // ldmatrix address of a thread that reads row (row_const + row_lane), chunk (chunk_const +
  // chunk_lane); the compile-time part folds into the instruction's immediate offset.
  struct Reader {
    uint32 base;
    __device__ __forceinline__ Reader(uint32 tile, int row_lane, int chunk_lane)
        : base(tile + offset(row_lane, chunk_lane)) {}
    __device__ __forceinline__ uint32 operator()(int row_const, int chunk_const) const {
      return base + row_const * kRowBytes + chunk_const * 16;
    }
  };

  // Stores packed C fragments (see pack_frags): m16 tile i, n8 tile j go to rows row0 + 16 i + ...,
  // columns from chunk chunk0 + j.
  template <int kM, int kN>
  static __device__ __forceinline__ void store_frags(uint32 tile, const uint32 (&pk)[kM][kN][2],
                                                     int row0, int chunk0) {
    const int lane = threadIdx.x % kWarpSize;
    const uint32 base = tile + offset(row0 + lane / 4, chunk0) + (lane % 4) * 4;
#pragma unroll
    for (int i = 0; i < kM; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < kN; ++j) {
          const uint32 addr = base + (i * 16 + h * 8) * kRowBytes + j * 16;
          asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(pk[i][j][h]));
        }
  }
};

// load_tile (written for SwizzledTile) counts its copies per thread as Tile::kBytes / 16 /
// kThreads. With the padding chunk that still equals the tile's rows * chunks / kThreads only while
// the tile has fewer rows than the block has threads; every tile here checks it.
template <typename Tile, int kThreads> __host__ __device__ constexpr bool load_tile_exact() {
  return (Tile::kBytes / 16 / kThreads) * kThreads == Tile::kRows * Tile::kChunksPerRow;
}

// Which mma operand an ldmatrix.x4 fills, and from which orientation of the shared tile (lane l
// addresses row `row`, chunk `chunk` of the operand's 16-row, 2-chunk block):
//   kA       A 16x16 from a [m][k] tile:              row l % 16,                 chunk l / 16
//   kATrans  A 16x16 from a [k][m] tile, .trans:      row l % 8 + 8 * (l / 16),   chunk l / 8 % 2
//   kB       two n8 B tiles from a [n][k] tile:       as kATrans
//   kBTrans  two n8 B tiles from a [k][n] tile, .trans: row l % 8 + 8 * (l / 8 % 2), chunk l / 16
// Lane l addresses matrix l / 8; the four 8x8 matrices land in the register order of the fragments
// in mma_sm80.cuh (A: a0..a3; B: b0, b1 of n8 tile nt, then b0, b1 of nt + 1).
enum class Frag { kA, kATrans, kB, kBTrans };

// The Reader of one operand for a warp whose part of the tile starts at row `row0`, chunk `chunk0`.
template <Frag kFrag, typename Tile>
__device__ __forceinline__ typename Tile::Reader frag_reader(uint32 tile, int row0, int chunk0) {
  const int lane = threadIdx.x % kWarpSize;
  int row, chunk;
  if constexpr (kFrag == Frag::kA) {
    row = lane % 16;
    chunk = lane / 16;
  } else if constexpr (kFrag == Frag::kBTrans) {
    row = lane % 8 + 8 * ((lane / 8) % 2);
    chunk = lane / 16;
  } else {
    row = lane % 8 + 8 * (lane / 16);
    chunk = (lane / 8) % 2;
  }
  return typename Tile::Reader(tile, row0 + row, chunk0 + chunk);
}

// A fragment of m16 tile `mt` at k16 step `ks`.
template <Frag kFrag, typename Reader>
__device__ __forceinline__ void load_a(uint32 (&a)[4], const Reader& r, uint32 off, int mt,
                                       int ks) {
  static_assert(kFrag == Frag::kA || kFrag == Frag::kATrans, "an A operand");
  if constexpr (kFrag == Frag::kA) {
    ldmatrix_x4(a, r(mt * 16, ks * 2) + off);
  } else {
    ldmatrix_x4_trans(a, r(ks * 16, mt * 2) + off);
  }
}

// B fragments of n8 tiles `nt` and `nt + 1` (b[0..1], b[2..3]) at k16 step `ks`.
template <Frag kFrag, typename Reader>
__device__ __forceinline__ void load_b(uint32 (&b)[4], const Reader& r, uint32 off, int nt,
                                       int ks) {
  static_assert(kFrag == Frag::kB || kFrag == Frag::kBTrans, "a B operand");
  if constexpr (kFrag == Frag::kB) {
    ldmatrix_x4(b, r(nt * 8, ks * 2) + off);
  } else {
    ldmatrix_x4_trans(b, r(ks * 16, nt) + off);
  }
}

template <int kM, int kN>
__device__ __forceinline__ void zero(float (&acc)[kM][kN][4]) {
#pragma unroll
  for (int i = 0; i < kM; ++i)
#pragma unroll
    for (int j = 0; j < kN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
}

// acc (kM m16 x kN n8 tiles) += A B over kK k16 steps, both operands from shared memory.
template <typename T, Frag kFragA, Frag kFragB, int kK, int kM, int kN, typename RA, typename RB>
__device__ __forceinline__ void gemm_ss(float (&acc)[kM][kN][4], const RA& ra, uint32 a_off,
                                        const RB& rb, uint32 b_off) {
  static_assert(kN % 2 == 0, "ldmatrix.x4 loads n8 tiles in pairs");
#pragma unroll
  for (int ks = 0; ks < kK; ++ks) {
    uint32 a[kM][4];
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) load_a<kFragA>(a[mt], ra, a_off, mt, ks);
#pragma unroll
    for (int nt = 0; nt < kN; nt += 2) {
      uint32 b[4];
      load_b<kFragB>(b, rb, b_off, nt, ks);
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
        Mma16816<T>::run(acc[mt][nt], a[mt], b[0], b[1]);
        Mma16816<T>::run(acc[mt][nt + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// C fragments packed pairwise to 16 bits: pk[mt][nt][h] holds row g + 8h, columns 2t, 2t + 1.
// Two neighbouring n8 tiles of that are exactly the A fragment of one k16 step (see gemm_rs).
template <typename T, int kM, int kN>
__device__ __forceinline__ void pack_frags(uint32 (&pk)[kM][kN][2], const float (&x)[kM][kN][4]) {
#pragma unroll
  for (int i = 0; i < kM; ++i)
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      pk[i][j][0] = pack2<T>(x[i][j][0], x[i][j][1]);
      pk[i][j][1] = pack2<T>(x[i][j][2], x[i][j][3]);
    }
}

// acc += A B with A from registers (packed C fragments whose columns are the k dimension, as P in
// the forward's O += P V) and B from shared memory.
template <typename T, Frag kFragB, int kK, int kM, int kN, typename RB>
__device__ __forceinline__ void gemm_rs(float (&acc)[kM][kN][4], const uint32 (&pk)[kM][2 * kK][2],
                                        const RB& rb, uint32 b_off) {
  static_assert(kN % 2 == 0, "ldmatrix.x4 loads n8 tiles in pairs");
#pragma unroll
  for (int ks = 0; ks < kK; ++ks) {
#pragma unroll
    for (int nt = 0; nt < kN; nt += 2) {
      uint32 b[4];
      load_b<kFragB>(b, rb, b_off, nt, ks);
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
        const uint32 a[4] = {pk[mt][2 * ks][0], pk[mt][2 * ks][1], pk[mt][2 * ks + 1][0],
                             pk[mt][2 * ks + 1][1]};
        Mma16816<T>::run(acc[mt][nt], a, b[0], b[1]);
        Mma16816<T>::run(acc[mt][nt + 1], a, b[2], b[3]);
      }
    }
  }
}

// Two neighbouring elements (col, col + 1) of one output row; columns >= head_dim are not stored.
// Aligned rows hold whole 8-element vectors (head_dim % 8 == 0), so col < head_dim covers both.
template <typename T, bool kAligned>
__device__ __forceinline__ void store_pair(T* row, int col, int head_dim, float x0, float x1,
                                           const Extent& ext) {
  if (kAligned) {
    if (col < head_dim) {
      CUFLASH_CHECK_ACCESS(ext, row + col, 4);
      *reinterpret_cast<uint32*>(row + col) = pack2<T>(x0, x1);
    }
  } else {
    if (col < head_dim) {
      CUFLASH_CHECK_ACCESS(ext, row + col, 2);
      row[col] = from_float<T>(x0);
    }
    if (col + 1 < head_dim) {
      CUFLASH_CHECK_ACCESS(ext, row + col + 1, 2);
      row[col + 1] = from_float<T>(x1);
    }
  }
}

// dst[0] += x0, dst[1] += x1 in global fp32 memory (dst 8-byte aligned).
__device__ __forceinline__ void atomic_add_pair(float* dst, float x0, float x1) {
#if __CUDA_ARCH__ >= 900
  // One vector reduction instead of two (sm_90+).
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(x0), "f"(x1) : "memory");
#else
  atomicAdd(dst, x0);
  atomicAdd(dst + 1, x1);
#endif
}

}  // namespace cuflash
