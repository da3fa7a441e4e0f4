// A NaN or infinity in v must reach only the rows that see its key (docs/api.md, the NaN policy).
//
// The forward kernels form P V on whole tiles, and a hidden key's probability is an exact 0, but
// 0 * NaN and 0 * inf are NaN: where a mask edge cuts a tile, a non-finite v[j, d] of a key that
// row i does not see still lands in out[i, d]. Kernels with a mask edge therefore note whether
// their accumulators took any non-finite value (NonFinite, one FMA per value) and only then, after
// their stores, repair: a row whose out has NaN columns, where some key the row does not see among
// the keys its tile walked has a non-finite v, gets those columns recomputed from the keys it
// sees, exactly as the reference does, with plain loads (repair_row). Inputs without NaN or
// infinity never take that path; dense kernels carry none of it.
#pragma once

#include "../core/common.cuh"
#include "mask.cuh"
#include "score.cuh"
#include "sink.cuh"

namespace cuflash {

// Whether any value seen is NaN or infinite: x * 0 is (signed) 0 for finite x and NaN otherwise.
// Four independent sums (value i into sum i % 4), so that a kernel's check of its accumulators
// is not one chain of dependent FMAs. A finite double beyond float's range counts as infinite
// (only a wasted check follows).
struct NonFinite {
  float sum[4];
  __device__ __forceinline__ NonFinite() : sum{0.f, 0.f, 0.f, 0.f} {}
  __device__ __forceinline__ void see(float x, int i) { sum[i % 4] = fmaf(x, 0.f, sum[i % 4]); }
  __device__ __forceinline__ void see(double x, int i) {
    sum[i % 4] += static_cast<float>(x * 0.0);
  }
  __device__ __forceinline__ bool any() const {
    const float all = (sum[0] + sum[1]) + (sum[2] + sum[3]);
    return all != all;
  }
};

__device__ __forceinline__ double widen(double x) { return x; }
template <typename T> __device__ __forceinline__ float widen(T x) { return to_float<T>(x); }
template <typename T> struct Narrow {
  static __device__ __forceinline__ T from(float x) { return from_float<T>(x); }
};
template <> struct Narrow<double> {
  static __device__ __forceinline__ double from(double x) { return x; }
};

template <typename A> __device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);  // the same sum in every lane
  }
  return x;
}

// Row `row` (< seqlen_q) of (batch, head), by one whole warp, after the kernel's stores of that
// row are visible to it. `walked`: the keys (< seqlen_k) of the key tiles the row's tile visited;
// `sink`: the head's sink as the kernel's finaliser took it (sink.cuh; -inf: none).
template <typename T, int kHeadDim, typename MaskKind, typename ScoreKind,
          typename A = typename AccumOf<T>::type>
__device__ __forceinline__ void repair_row(const FwdParams& p, const Mask<MaskKind>& mask,
                                           const Score<ScoreKind, T>& score, int batch, int head,
                                           int row, Span walked, int lane, A sink) {
  constexpr int kCols = ceil_div(kHeadDim, kWarpSize);  // columns lane + 32 c of each lane
  const int kv_head = head / p.group;
  T* o = static_cast<T*>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride +
         row * p.o_row_stride;
  const T* q = static_cast<const T*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride +
               row * p.q_row_stride;
  const T* k = static_cast<const T*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + batch * p.v_batch_stride + kv_head * p.v_head_stride;

  uint32 nan_cols = 0;  // bit c: out[row, lane + 32 c] is NaN
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int d = lane + c * kWarpSize;
    if (d < p.head_dim) {
      CUFLASH_CHECK_ACCESS(o_extent<T>(p), o + d, sizeof(T));
      const A x = widen(o[d]);
      if (x != x) nan_cols |= 1u << c;
    }
  }
  if (!__any_sync(0xffffffffu, nan_cols != 0)) return;

  // Keys walked but hidden from the row: [walked.begin, seen.begin) and [seen.end, walked.end)
  // (all of `walked` when the row sees nothing), and those the score's mask array hides. A
  // non-finite v there in a NaN column: repair.
  const Span seen = mask.row_keys(row);
  bool leaked = false;
#pragma unroll 1
  for (int j = walked.begin; j < walked.end && !leaked; ++j) {
    if constexpr (ScoreKind::kHides) {
      if (j >= seen.begin && j < seen.end && !score.hides(row, j)) continue;  // seen, shown
    } else if (j == seen.begin && !seen.empty()) {  // the keys the row sees: skipped
      j = seen.end - 1;
      continue;
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      if (nan_cols >> c & 1) {
        const T* at = v + j * p.v_row_stride + lane + c * kWarpSize;
        CUFLASH_CHECK_ACCESS(v_extent<T>(p), at, sizeof(T));
        const A x = widen(*at);
        if (x - x != A(0)) leaked = true;  // NaN or +-inf
      }
    }
    leaked = __any_sync(0xffffffffu, leaked);
  }
  if (!leaked) return;  // every NaN came from what the row sees

  // out[row, d] = sum over the keys j the row sees of softmax(scale score(q.k))_j v[j, d], in one
  // pass with a running max, in Accum, the denominator starting from the head's sink (sink.cuh);
  // a NaN score makes the row NaN (it already is: not rewritten).
  const A scale = static_cast<A>(p.scale);
  A m = sink, l = A(0), acc[kCols], none;
  minus_infinity(none);
  if (m != none) l = A(1);  // the sink's own term, exp(sink - m)
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] = A(0);
#pragma unroll 1
  for (int j = seen.begin; j < seen.end; ++j) {
    if (score.hides(row, j)) continue;
    A dot = A(0);
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = lane + c * kWarpSize;
      if (d < p.head_dim) {
        const T* at = k + j * p.k_row_stride + d;
        CUFLASH_CHECK_ACCESS(q_extent<T>(p), q + d, sizeof(T));
        CUFLASH_CHECK_ACCESS(k_extent<T>(p), at, sizeof(T));
        dot += widen(q[d]) * widen(*at);  // q re-read (L1): no registers held for it
      }
    }
    const A s = score(warp_sum(dot), row, j) * scale;
    if (s != s) return;
    const A m_new = max_of(m, s);
    const A alpha = exp_of(m - m_new), pj = exp_of(s - m_new);
    l = l * alpha + pj;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = lane + c * kWarpSize;
      if (nan_cols >> c & 1) {
        const T* at = v + j * p.v_row_stride + d;
        CUFLASH_CHECK_ACCESS(v_extent<T>(p), at, sizeof(T));
        acc[c] = acc[c] * alpha + pj * widen(*at);
      }
    }
    m = m_new;
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int d = lane + c * kWarpSize;
    if (nan_cols >> c & 1) {
      CUFLASH_CHECK_ACCESS(o_extent<T>(p), o + d, sizeof(T));
      o[d] = Narrow<T>::from(l > A(0) ? acc[c] / l : A(0));
    }
  }
}

}  // namespace cuflash
