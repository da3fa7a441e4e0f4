// A user mask_mod's block map: which keys each block of query rows can see, and which queries
// each block of keys is seen by, so that kernels skip the tiles the mask_mod hides whole and
// leave its per-element test out of the tiles it shows whole (FlexAttention's block mask, kept
// as ranges).
//
// The map of one (batch, head), a plane of ints, is `row_blocks` entries for the query rows,
// kRows a block, then one entry per block of kRows keys; each entry is four ints {begin, end,
// full_begin, full_end}:
//   a row block's: the keys some row of the block sees lie in [begin, end) (none outside), and
//                  every row of the block sees every key of [full_begin, full_end);
//   a key block's: the same for the queries that see the block's keys.
// Empty ranges are written as {0, 0}. Then two ints per query row (kRows * row_blocks rows):
// {first, end} where the keys the row sees are the one interval [first, end) ({0, 0}: none),
// {-1, -1} where they are not one interval; then the same per key (kRows a key block) for
// the queries that see it. The map holds the causal or window band and the
// ragged ends too (a key past seqlen_k is never seen). block_map.cu builds it; strides count
// planes, 0 where a map is broadcast over batches or heads. The kernels read it through the
// user kind's Score (cuflash/_user_mods.py), whose kind says kBlockMap.
#pragma once

#include "../core/common.cuh"
#include "mask.cuh"

namespace cuflash {

struct BlockMap {
  static constexpr int kRows = 64;  // query rows (keys) per entry
  const int* entries;  // this (batch, head)'s; null: no map (every tile is walked and tested)
  int row_blocks, seqlen_q, seqlen_k;

  template <typename Params>
  __device__ __forceinline__ explicit BlockMap(const Params& p)
      : entries(static_cast<const int*>(p.block_map)),
        row_blocks(p.block_map_rows),
        seqlen_q(p.seqlen_q),
        seqlen_k(p.seqlen_k) {}
  template <typename Params>
  __device__ __forceinline__ BlockMap for_head(const Params& p, int batch, int head) const {
    BlockMap bound = *this;
    if (entries != nullptr) {
      bound.entries += plane_ints() * (batch * p.block_map_batch_stride +
                                       head * p.block_map_head_stride);
    }
    return bound;
  }
  __device__ __forceinline__ int plane_ints() const {
    return (4 + 2 * kRows) * (row_blocks + ceil_div(seqlen_k, kRows));
  }
  // The keys [x, y) query `row` sees when they are one interval ({0, 0}: none, also past
  // seqlen_q); x < 0 where they are not one interval.
  __device__ __forceinline__ int2 row_bounds(int row) const {
    if (row >= seqlen_q) return make_int2(0, 0);
    return __ldg(bounds() + row);
  }
  // The queries [x, y) that see key `col`, as row_bounds.
  __device__ __forceinline__ int2 col_bounds(int col) const {
    if (col >= seqlen_k) return make_int2(0, 0);
    return __ldg(bounds() + kRows * row_blocks + col);
  }
  __device__ __forceinline__ const int2* bounds() const {
    return reinterpret_cast<const int2*>(entries + 4 * (row_blocks + ceil_div(seqlen_k, kRows)));
  }
  __device__ __forceinline__ int4 entry(int i) const {
    return __ldg(reinterpret_cast<const int4*>(entries) + i);
  }

  // The entries [first, last] of `n` blocks that cover [begin, end) of `length` positions,
  // `base` the first block's entry.
  struct Cover {
    int lo, hi, full_lo, full_hi;  // the union of their ranges and the intersection of the full
  };
  __device__ __forceinline__ Cover cover(int base, int begin, int end, int length) const {
    Cover c = {0x7fffffff, 0, 0, 0x7fffffff};
    const int last = (min(end, length) - 1) / kRows;
    for (int b = begin / kRows; b <= last; ++b) {
      const int4 e = entry(base + b);
      if (e.y > e.x) {
        c.lo = min(c.lo, e.x);
        c.hi = max(c.hi, e.y);
      }
      c.full_lo = max(c.full_lo, e.z);
      c.full_hi = min(c.full_hi, e.w);
    }
    return c;
  }
  // `tiles` (tiles of kBlock positions) narrowed to those holding one of [lo, hi).
  template <int kBlock>
  __device__ __forceinline__ static Span narrow(Span tiles, const Cover& c) {
    if (c.hi <= c.lo) return {tiles.begin, tiles.begin};
    const int begin = max(tiles.begin, c.lo / kBlock);
    return {begin, max(begin, min(tiles.end, ceil_div(c.hi, kBlock)))};
  }

  // The key tiles of `tiles` that some row of [row_begin, row_end) sees.
  template <int kBlockN>
  __device__ __forceinline__ Span key_tiles(Span tiles, int row_begin, int row_end) const {
    if (entries == nullptr) return tiles;
    return narrow<kBlockN>(tiles, cover(0, row_begin, row_end, seqlen_q));
  }
  // The query tiles of `tiles` that see some key of [col_begin, col_end).
  template <int kBlockM>
  __device__ __forceinline__ Span query_tiles(Span tiles, int col_begin, int col_end) const {
    if (entries == nullptr) return tiles;
    return narrow<kBlockM>(tiles, cover(row_blocks, col_begin, col_end, seqlen_k));
  }
  // full() for rows inside one block (row_begin / kRows == (row_end - 1) / kRows): one read.
  __device__ __forceinline__ bool full_in_block(int row_begin, int col_begin, int col_end) const {
    if (entries == nullptr || row_begin >= seqlen_q) return false;
    const int4 e = entry(row_begin / kRows);
    return col_begin >= e.z && col_end <= e.w;
  }
  // Whether every row of [row_begin, row_end) sees every key of [col_begin, col_end).
  __device__ __forceinline__ bool full(int row_begin, int row_end, int col_begin,
                                       int col_end) const {
    if (entries == nullptr) return false;
    const Cover c = cover(0, row_begin, row_end, seqlen_q);
    return col_begin >= c.full_lo && col_end <= c.full_hi;
  }
};

}  // namespace cuflash
