// Which (query, key) pairs attention uses: the one mask implementation every kernel asks.
//
// Every mask is a band around the bottom-right aligned diagonal. With shift = seqlen_k - seqlen_q,
// query i sees key j iff
//     0 <= j < seqlen_k   and   i + shift - left <= j <= i + shift + right.
// The mask kind, a template type argument of each kernel, fixes at compile time which edges of the
// band exist, so that a dense or causal kernel carries no code for the edges it does not have:
//     NoMask      no edge (only the ragged end j < seqlen_k)
//     CausalMask  right = 0, no left edge
//     WindowMask  left and right from the parameter block (window_left, window_right); the host
//                 writes an unbounded side as seqlen_q + seqlen_k, which no row reaches.
// Kernels ask a Mask for the key range a query tile visits, the query range a key tile is seen by
// (backward), whether a tile needs per-element work, and each row's visible keys; none computes a
// diagonal of its own.
#pragma once

#include "../core/common.cuh"

namespace cuflash {

// kLeft, kRight: which edges exist; kWindow: their offsets come from the parameter block.
struct NoMask {
  static constexpr bool kLeft = false, kRight = false, kWindow = false;
};
struct CausalMask {
  static constexpr bool kLeft = false, kRight = true, kWindow = false;
};
struct WindowMask {
  static constexpr bool kLeft = true, kRight = true, kWindow = true;
};

// How far key `col` lies from row `row`'s bottom-right aligned diagonal: |row + shift - col|
// (ALiBi's distance, score.cuh).
struct Diagonal {
  int shift;
  template <typename Params>
  __device__ __forceinline__ explicit Diagonal(const Params& p)
      : shift(p.seqlen_k - p.seqlen_q) {}
  __device__ __forceinline__ int distance(int row, int col) const {
    return abs(row + shift - col);
  }
};

// A half-open range [begin, end) of keys or queries; empty when end <= begin.
struct Span {
  int begin, end;
  __device__ __forceinline__ bool empty() const { return end <= begin; }
};

template <typename Kind> struct Mask {
  static constexpr bool kLeft = Kind::kLeft, kRight = Kind::kRight;
  static constexpr bool kMasks = kLeft || kRight;  // anything besides the ragged end

  int seqlen_q, seqlen_k;
  int hi;  // row i's last key is i + hi (before clipping to the keys that exist)
  int lo;  // row i's first key is i + lo (before clipping to 0)

  template <typename Params>
  __device__ __forceinline__ explicit Mask(const Params& p)
      : seqlen_q(p.seqlen_q), seqlen_k(p.seqlen_k) {
    const int shift = p.seqlen_k - p.seqlen_q;
    hi = shift + (Kind::kWindow ? p.window_right : 0);  // CausalMask: right = 0
    lo = shift - (Kind::kWindow ? p.window_left : 0);
  }

  // Keys row `row` sees: [first, end). With no left edge `first` is the constant 0.
  __device__ __forceinline__ int first_key(int row) const { return kLeft ? max(0, row + lo) : 0; }
  __device__ __forceinline__ int end_key(int row) const {
    return kRight ? max(0, min(seqlen_k, row + hi + 1)) : seqlen_k;
  }
  __device__ __forceinline__ Span row_keys(int row) const { return {first_key(row), end_key(row)}; }
  // Whether row `row` does not see key `col`, for any col >= 0.
  __device__ __forceinline__ bool hides(int row, int col) const {
    return col >= end_key(row) || (kLeft && col < first_key(row));
  }
  // hides() for 0 <= col < seqlen_k: the band's edges alone, unclipped (callers that test the
  // ragged end themselves keep the dense and causal code as it was).
  __device__ __forceinline__ bool band_hides(int row, int col) const {
    return (kRight && col > row + hi) || (kLeft && col < row + lo);
  }
  // Row `row`'s last key, end_key(row) - 1 where it sees one; unclipped below (then it is less
  // than first_key(row)), so that a per-element test is one compare: col > last_key(row).
  __device__ __forceinline__ int last_key(int row) const {
    return kRight ? min(seqlen_k - 1, row + hi) : seqlen_k - 1;
  }
  // The queries that see key `col` (0 <= col < seqlen_k), [first_query, end_query), before
  // clipping to [0, seqlen_q): the per-key view of the backward's dK/dV, one compare per element.
  __device__ __forceinline__ int first_query(int col) const { return kRight ? col - hi : 0; }
  __device__ __forceinline__ int end_query(int col) const {
    return kLeft ? col - lo + 1 : seqlen_q;
  }

  // Keys some row of [row_begin, row_end) sees (rows past seqlen_q count as rows: callers may pass
  // a whole tile). Rows' bands move right with the row, so the first and last rows bound it.
  __device__ __forceinline__ Span keys(int row_begin, int row_end) const {
    const int end = kRight ? max(0, min(seqlen_k, row_end - 1 + hi + 1)) : seqlen_k;
    return {min(first_key(row_begin), end), end};
  }
  // keys(row_begin, row_end).end, clamped in the other order (the same value): fwd_sm90's tile
  // ranges as they were, which ptxas schedules differently from keys()'s.
  __device__ __forceinline__ int keys_end(int row_end) const {
    return kRight ? min(seqlen_k, max(0, row_end + hi)) : seqlen_k;
  }
  // keys() in whole tiles of `block` keys: [begin / block, ceil(end / block)).
  template <int kBlock>
  __device__ __forceinline__ Span key_tiles(int row_begin, int row_end) const {
    const Span k = keys(row_begin, row_end);
    return {k.begin / kBlock, k.empty() ? k.begin / kBlock : ceil_div(k.end, kBlock)};
  }

  // Queries that see some key of [col_begin, col_end), clipped to [0, seqlen_q).
  __device__ __forceinline__ Span queries(int col_begin, int col_end) const {
    const int begin = kRight ? min(seqlen_q, max(0, col_begin - hi)) : 0;
    const int end = kLeft ? max(begin, min(seqlen_q, col_end - 1 - lo + 1)) : seqlen_q;
    return {begin, end};
  }
  template <int kBlock>
  __device__ __forceinline__ Span query_tiles(int col_begin, int col_end) const {
    const Span q = queries(col_begin, col_end);
    return {q.begin / kBlock, q.empty() ? q.begin / kBlock : ceil_div(q.end, kBlock)};
  }

  // Whether every row of [row_begin, row_end) sees every key of [col_begin, col_end): such a tile
  // needs no per-element work. The ragged end (keys past seqlen_k) counts as hidden.
  __device__ __forceinline__ bool full(int row_begin, int row_end, int col_begin,
                                       int col_end) const {
    return col_end <= seqlen_k && (!kRight || col_end - 1 <= row_begin + hi) &&
           (!kLeft || col_begin >= row_end - 1 + lo);
  }
  // Whether the band's edges (not the ragged end) cut the tile: full() without the ragged test.
  __device__ __forceinline__ bool cuts(int row_begin, int row_end, int col_begin,
                                       int col_end) const {
    return (kRight && col_end - 1 > row_begin + hi) || (kLeft && col_begin < row_end - 1 + lo);
  }
};

}  // namespace cuflash
