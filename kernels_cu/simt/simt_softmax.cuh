// Online softmax of the SIMT kernels, in the input precision (float for fp32, double for fp64).
#pragma once

#include "../core/common.cuh"
#include "simt_common.cuh"
#include "../attention/sink.cuh"

namespace cuflash {

// Scores live in the units whose exponential is cheapest at full accuracy: log2 units for float
// (exp2f is one MUFU op; ln -> log2 is folded into scale_log2 on the host), natural units for
// double (exp() to full double accuracy; there is no fast double exp2 to gain from).
template <typename T> struct ScoreUnits;

template <> struct ScoreUnits<float> {
  template <typename Params> static __device__ __forceinline__ float scale(const Params& p) {
    return p.scale_log2;
  }
  static __device__ __forceinline__ float exp(float x) { return exp2f(x); }
  // Natural-log lse of a row from its max (these units) and its sum of exp(score - max).
  static __device__ __forceinline__ float lse(float max, float sum) {
    return (max + log2f(sum)) * 0.6931471805599453f;
  }
  static __device__ __forceinline__ float from_natural(float x) { return x * kLog2e; }
};

template <> struct ScoreUnits<double> {
  template <typename Params> static __device__ __forceinline__ double scale(const Params& p) {
    return p.scale;
  }
  static __device__ __forceinline__ double exp(double x) { return ::exp(x); }
  static __device__ __forceinline__ double lse(double max, double sum) { return max + log(sum); }
  static __device__ __forceinline__ double from_natural(double x) { return x; }
};

// Running softmax statistics of kRows rows, each row shared by kLanes consecutive lanes that hold
// kCols of its scores per tile (FlashAttention-2's rescaled accumulator).
template <typename T, int kRows, int kCols, int kLanes> struct OnlineSoftmax {
  T row_max[kRows];  // max of the scaled scores seen so far, -inf before the row's first key
  T row_sum[kRows];  // this thread's share of sum(exp(score - row_max)); reduced in finalize()

  __device__ __forceinline__ void init() {
    fill(row_max, -infinity<T>());
    fill(row_sum, T(0));
  }

  // Folds one tile of scaled scores (masked entries -inf) into the statistics. Scores become
  // unnormalised probabilities in place; `alpha` receives the factor that rescales what the
  // accumulator holds so far.
  __device__ __forceinline__ void online_softmax(T (&s)[kRows][kCols], T (&alpha)[kRows]) {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      T tile_max = s[i][0];
#pragma unroll
      for (int j = 1; j < kCols; ++j) tile_max = fmax(tile_max, s[i][j]);
      const T new_max = fmax(row_max[i], group_max<kLanes>(tile_max));
      // A row that has seen no key yet has max -inf, and exp(-inf - (-inf)) is NaN. Subtracting 0
      // instead keeps every probability exp(-inf) = 0 and alpha = 0, so the row stays all zeros.
      const T ref = new_max == -infinity<T>() ? T(0) : new_max;
      alpha[i] = ScoreUnits<T>::exp(row_max[i] - ref);
      row_max[i] = new_max;
      T sum = 0;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        s[i][j] = ScoreUnits<T>::exp(s[i][j] - ref);
        sum += s[i][j];
      }
      row_sum[i] = madd(row_sum[i], alpha[i], sum);
    }
  }

  template <int kD>
  __device__ __forceinline__ void rescale_o(T (&acc)[kRows][kD], const T (&alpha)[kRows]) {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
#pragma unroll
      for (int d = 0; d < kD; ++d) acc[i][d] *= alpha[i];
    }
  }

  // Normalises the accumulator and returns each row's natural-log lse, the head's `sink`
  // (sink.cuh, natural units; -inf: none) joining the denominator. A row that saw no key has sum
  // 0: it keeps output 0 (acc is 0) and gets lse = sink (-inf without one, not 0 * inf = NaN).
  template <int kD>
  __device__ __forceinline__ void finalize(T (&acc)[kRows][kD], T (&lse)[kRows], T sink) {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const T sum = group_sum<kLanes>(row_sum[i]);
      const bool empty = sum == T(0);
      T inv = empty ? T(0) : T(1) / sum;
      lse[i] = empty ? sink : ScoreUnits<T>::lse(row_max[i], sum);
      if (sink != -infinity<T>() && !empty) {  // lse as the max, the sum exp(lse - lse) = 1
        T m = lse[i], total = T(1), weight;
        fold_sink(m, total, weight, sink);
        inv *= weight / total;
        lse[i] = m + log(total);
      }
#pragma unroll
      for (int d = 0; d < kD; ++d) acc[i][d] *= inv;
    }
  }
};

}  // namespace cuflash
