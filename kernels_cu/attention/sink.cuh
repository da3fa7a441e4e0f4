// Attention sinks (gpt-oss): per query head a logit `sink` of a virtual key that has no value.
// Its exp joins each row's softmax denominator, so the output shrinks and lse grows; a row that
// sees no key keeps output 0 and gets lse = sink. Folded into each row once it is finished, so
// the key loop carries none of it. A sink of -inf is no sink (the row's statistics unchanged).
#pragma once

#include "../core/common.cuh"

namespace cuflash {

// Accurate exp and max, and -inf, in either Accum type (a row's statistics, once per row).
__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }
__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_of(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ void minus_infinity(float& x) { x = neg_inf(); }
__device__ __forceinline__ void minus_infinity(double& x) {
  x = __longlong_as_double(0xfff0000000000000ll);
}

// The sink of query head `head` in Accum units (natural log), or -inf: `p.sinks` is null when
// the call has none (the run-time form, for kernels whose dense instantiations are unaffected).
template <typename A>
__device__ __forceinline__ A sink_at(const FwdParams& p, int head) {
  A sink;
  minus_infinity(sink);
  return p.sinks == nullptr ? sink : static_cast<const A*>(p.sinks)[head];
}

// The compile-time form: kernels instantiated without sinks see the constant -inf, and every
// use of it folds away.
template <bool kSinks>
__device__ __forceinline__ float sink_of(const FwdParams& p, int head) {
  if constexpr (kSinks) return static_cast<const float*>(p.sinks)[head];
  return neg_inf();
}

// A finished row, max `m` (natural units) and denominator `total` (of exp(s - m)), gains the
// sink: m becomes max(m, sink), total is rescaled to it and gains exp(sink - m); `weight` is the
// factor the unnormalised output needs for the new max (output = acc * weight / total). Needs a
// row that saw a key (total > 0) and a finite sink.
template <typename A>
__device__ __forceinline__ void fold_sink(A& m, A& total, A& weight, A sink) {
  const A top = max_of(m, sink);
  weight = exp_of(m - top);
  total = total * weight + exp_of(sink - top);
  m = top;
}

}  // namespace cuflash
