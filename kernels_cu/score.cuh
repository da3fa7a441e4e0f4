// What happens to each score between S = Q K^T and the mask: the score modifications.
//
// A score kind, a template type argument of every attention kernel beside its mask kind, fixes
// the modification at compile time, so that a kernel without one carries no code for it:
//     NoScore   scores as they are
//     Softcap   scale * s becomes cap * tanh(scale * s / cap) (flash-attn's order: scale, then
//               cap); cap from the parameter block (`softcap`, > 0)
//     Alibi     ALiBi (flash-attn's convention): -slope * the key's distance from the row's
//               bottom-right aligned diagonal (mask.cuh's Diagonal) is added to the scaled
//               score, after a softcap where the block has one (softcap > 0, a run-time test,
//               so that ALiBi costs one kind, not two); the slopes are Accum (batch, heads_q)
//               at `alibi`
// A kernel builds its Score once from the parameter block and binds it to each (batch, query head)
// it computes (`for_head`); each call passes the score's query row and key column. The kinds that
// read neither return themselves and ignore the position, and the compiler drops the index math.
#pragma once

#include "common.cuh"
#include "mask.cuh"

namespace cuflash {

// kModifies: the scores change; kPositional: how depends on the row and key.
struct NoScore {
  static constexpr bool kModifies = false, kPositional = false;
};
struct Softcap {
  static constexpr bool kModifies = true, kPositional = false;
};
struct Alibi {
  static constexpr bool kModifies = true, kPositional = true;
};

// tanh in the precision a kernel's inputs need: the MUFU approximation (relative error ~2^-11,
// finer than a 16-bit score's rounding) for fp16/bf16 inputs, libdevice's tanhf and tanh for
// fp32 and fp64, whose tests hold them to 1e-5 and 1e-12.
template <typename T> __device__ __forceinline__ float tanh_for(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
template <> __device__ __forceinline__ float tanh_for<float>(float x) { return tanhf(x); }
template <typename T> __device__ __forceinline__ double tanh_for(double x) { return tanh(x); }

// The modification of kind `Kind` for inputs of type T, on scores of type A (float, or double for
// fp64 inputs). `score(s, row, col)` modifies the raw score of query row `row` and key `col`;
// `slope(modified, row, col)` is its derivative by the raw score.
template <typename Kind, typename T, typename A = typename AccumOf<T>::type> struct Score;

template <typename T, typename A> struct Score<NoScore, T, A> {
  template <typename Params> __device__ __forceinline__ explicit Score(const Params&) {}
  template <typename Params>
  __device__ __forceinline__ Score for_head(const Params&, int, int) const {
    return *this;
  }
  __device__ __forceinline__ A operator()(A s, int, int) const { return s; }
  __device__ __forceinline__ A slope(A, int, int) const { return A(1); }
};

// 1 - tanh^2 for tanh = t, the derivative of a capped score; 0 for a hidden (-inf) score, whose
// P is 0, so that its dS is 0 and not 0 * inf.
template <typename A> __device__ __forceinline__ A tanh_slope(A t) {
  const A d = A(1) - t * t;
  return d > A(0) ? d : A(0);
}

template <typename T, typename A> struct Score<Softcap, T, A> {
  A inner;  // scale / cap: the raw score's argument of tanh
  A outer;  // cap / scale: tanh back in raw units
  template <typename Params>
  __device__ __forceinline__ explicit Score(const Params& p)
      : inner(static_cast<A>(p.scale / p.softcap)), outer(static_cast<A>(p.softcap / p.scale)) {}
  template <typename Params>
  __device__ __forceinline__ Score for_head(const Params&, int, int) const {
    return *this;
  }
  __device__ __forceinline__ A operator()(A s, int, int) const {
    return outer * tanh_for<T>(s * inner);
  }
  __device__ __forceinline__ A slope(A modified, int, int) const {
    return tanh_slope(modified * inner);  // tanh = modified * inner
  }
};

template <typename T, typename A> struct Score<Alibi, T, A> {
  A inner, outer;  // the softcap's, as above; inner = 0 without one
  A decay;         // the head's slope / scale: the bias of one position, in raw units
  Diagonal diagonal;
  template <typename Params>
  __device__ __forceinline__ explicit Score(const Params& p)
      : inner(p.softcap > 0 ? static_cast<A>(p.scale / p.softcap) : A(0)),
        outer(p.softcap > 0 ? static_cast<A>(p.softcap / p.scale) : A(0)),
        decay(A(0)),
        diagonal(p) {}
  template <typename Params>
  __device__ __forceinline__ Score for_head(const Params& p, int batch, int head) const {
    Score bound = *this;
    const A slope = static_cast<const A*>(p.alibi)[batch * p.heads_q + head];
    bound.decay = static_cast<A>(static_cast<double>(slope) / p.scale);
    return bound;
  }
  __device__ __forceinline__ A bias(int row, int col) const {
    return decay * static_cast<A>(diagonal.distance(row, col));
  }
  __device__ __forceinline__ A operator()(A s, int row, int col) const {
    if (inner != A(0)) s = outer * tanh_for<T>(s * inner);
    return s - bias(row, col);
  }
  // the capped score is modified + bias; 1 without a cap
  __device__ __forceinline__ A slope(A modified, int row, int col) const {
    return inner != A(0) ? tanh_slope((modified + bias(row, col)) * inner) : A(1);
  }
};

}  // namespace cuflash
