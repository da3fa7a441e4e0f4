// What happens to each score between S = Q K^T and the mask: the score modifications.
//
// A score kind, a template type argument of every attention kernel beside its mask kind, fixes
// the modification at compile time, so that a kernel without one carries no code for it:
//     NoScore   scores as they are
//     Softcap   scale * s becomes cap * tanh(scale * s / cap) (flash-attn's order: scale, then
//               cap); cap from the parameter block (`softcap`, > 0)
// Kernels keep scores in raw units and fold the softmax scale into the exponent (scale_log2), so a
// modification maps raw scores to raw scores: Softcap's is (cap / scale) * tanh(s * scale / cap),
// whose scaled value is the capped score. The softmax, lse and everything after it are unchanged.
// Backward kernels recompute P from the modified score and multiply dS by `slope`, the
// derivative of the modified score by the raw one, which they compute from the modified score.
// A masked score is set to -inf (or P to 0) after the modification, so it stays hidden. The
// tensor-core backwards that form P while dP's product runs keep the modified scores instead when
// a kind modifies them (a register array of slopes beside P would spill) and form P with dS.
#pragma once

#include "common.cuh"

namespace cuflash {

struct NoScore {
  static constexpr bool kModifies = false;
};
struct Softcap {
  static constexpr bool kModifies = true;
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
// fp64 inputs). Built once per kernel from the parameter block.
template <typename Kind, typename T, typename A = typename AccumOf<T>::type> struct Score;

template <typename T, typename A> struct Score<NoScore, T, A> {
  template <typename Params> __device__ __forceinline__ explicit Score(const Params&) {}
  __device__ __forceinline__ A operator()(A s) const { return s; }
  __device__ __forceinline__ A slope(A) const { return A(1); }
};

template <typename T, typename A> struct Score<Softcap, T, A> {
  A inner;  // scale / cap: the raw score's argument of tanh
  A outer;  // cap / scale: tanh back in raw units
  template <typename Params>
  __device__ __forceinline__ explicit Score(const Params& p)
      : inner(static_cast<A>(p.scale / p.softcap)), outer(static_cast<A>(p.softcap / p.scale)) {}
  __device__ __forceinline__ A operator()(A s) const { return outer * tanh_for<T>(s * inner); }
  // d modified / d raw = 1 - tanh^2, with tanh = modified * inner; 0 for a hidden (-inf) score,
  // whose P is 0, so that its dS is 0 and not 0 * inf.
  __device__ __forceinline__ A slope(A modified) const {
    const A t = modified * inner;
    const A d = A(1) - t * t;
    return d > A(0) ? d : A(0);
  }
};

}  // namespace cuflash
