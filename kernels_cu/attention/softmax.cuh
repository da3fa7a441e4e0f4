// Online softmax over mma.sync accumulator fragments.
//
// A warp owns whole query rows (warps split along M), so a row's statistics live in the 4 threads
// of one quad and need only two xor-shuffles. Each thread holds kMTiles m16 tiles; in each, two
// rows (g and g+8): row index r = 2 * mtile + (i / 2) for accumulator element i of a C fragment.
#pragma once

#include "../core/common.cuh"
#include "sink.cuh"

namespace cuflash {

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <int kMTiles> struct OnlineSoftmax {
  static constexpr int kRows = 2 * kMTiles;
  float row_max[kRows];  // running max of the raw scores (before scale), -inf until a key is seen
  float row_sum[kRows];  // this thread's partial sum of exp; reduced over the quad in finalize()

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = neg_inf();
      row_sum[r] = 0.f;
    }
  }

  // Row r's new running max from one tile of scores: sets alpha[r] (the rescale factor of what
  // was accumulated) and returns the new max, scaled (the exponentials' offset).
  template <int kNTiles>
  __device__ __forceinline__ float new_row_max(const float (&s)[kMTiles][kNTiles][4], int r,
                                               float scale_log2, float (&alpha)[kRows]) {
    const int mt = r / 2, half = r % 2;
    // The row max as a pairwise tree (depth log2 kNTiles, not a chain of kNTiles dependent
    // FMNMX): the exponentials wait for it.
    float m[kNTiles];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      m[nt] = fmaxf(s[mt][nt][2 * half], s[mt][nt][2 * half + 1]);
    }
#pragma unroll
    for (int w = 1; w < kNTiles; w *= 2) {
#pragma unroll
      for (int i = 0; i + w < kNTiles; i += 2 * w) m[i] = fmaxf(m[i], m[i + w]);
    }
    const float new_max = quad_max(fmaxf(row_max[r], m[0]));
    // A row that has seen only masked keys keeps max = -inf; subtracting it would give
    // (-inf) - (-inf) = NaN. Use 0 instead: every exp below is then exp(-inf) = 0.
    const float max_scaled = new_max == neg_inf() ? 0.f : new_max * scale_log2;
    alpha[r] = exp2_ftz(row_max[r] * scale_log2 - max_scaled);
    row_max[r] = new_max;
    return max_scaled;
  }

  // Row r's exponentials P = exp(scale * (s - max)), in place, added to its running sum (after
  // rescaling that by alpha[r]) in two chains of FADD, half as deep, between the MUFUs.
  // after_each(i, chain) runs after the row's i-th exponential with the running sum of the
  // chain it went into.
  template <int kNTiles, typename AfterEach>
  __device__ __forceinline__ void exponentiate_row(float (&s)[kMTiles][kNTiles][4], int r,
                                                   float scale_log2, float max_scaled,
                                                   const float (&alpha)[kRows],
                                                   AfterEach after_each) {
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[r / 2][nt][2 * (r % 2) + e];
        x = exp2_ftz(x * scale_log2 - max_scaled);
        sum[e] += x;
        after_each(2 * nt + e, sum[e]);
      }
    }
    row_sum[r] = row_sum[r] * alpha[r] + (sum[0] + sum[1]);
  }

  // Folds one tile of scores into the statistics: updates the running max, turns `s` into
  // P = exp(scale * (s - max)) in place, adds P to the running sums and returns in `alpha` the
  // factor by which everything accumulated so far must be rescaled.
  template <int kNTiles>
  __device__ __forceinline__ void update(float (&s)[kMTiles][kNTiles][4], float scale_log2,
                                         float (&alpha)[kRows]) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float max_scaled = new_row_max(s, r, scale_log2, alpha);
      exponentiate_row(s, r, scale_log2, max_scaled, alpha, [](int, float) {});
    }
  }

  // update() as a turn that warpgroups take one after another: wait_turn() first, then every
  // row's max, the first kHandOverAt exponentials (of the thread's kRows * kNTiles * 2), and
  // pass_turn(dep), then the remaining exponentials. dep is computed from every row max and
  // from the running sum of the chain the last of those exponentials went into (so from half
  // of them): a kernel can make the hand-over wait for that work through it.
  template <int kHandOverAt, int kNTiles, typename Wait, typename Pass>
  __device__ __forceinline__ void update_in_turn(float (&s)[kMTiles][kNTiles][4],
                                                 float scale_log2, float (&alpha)[kRows],
                                                 Wait wait_turn, Pass pass_turn) {
    static_assert(kHandOverAt >= 1 && kHandOverAt <= kRows * kNTiles * 2, "inside the tile");
    wait_turn();
    float max_scaled[kRows];
    float max_dep = 0.f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      max_scaled[r] = new_row_max(s, r, scale_log2, alpha);
      max_dep += max_scaled[r];
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      exponentiate_row(s, r, scale_log2, max_scaled[r], alpha, [&](int i, float chain) {
        if (r * kNTiles * 2 + i + 1 == kHandOverAt) pass_turn(chain + max_dep);
      });
    }
  }

  template <int kDTiles>
  __device__ __forceinline__ void rescale(float (&acc)[kMTiles][kDTiles][4],
                                          const float (&alpha)[kRows]) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        acc[mt][dt][0] *= alpha[2 * mt];
        acc[mt][dt][1] *= alpha[2 * mt];
        acc[mt][dt][2] *= alpha[2 * mt + 1];
        acc[mt][dt][3] *= alpha[2 * mt + 1];
      }
    }
  }

  // Normalises the output by the row sums and returns each row's log-sum-exp (natural log). A row
  // that saw no key has sum 0: its output stays 0 (not 0/0) and its lse is -inf.
  template <int kDTiles>
  __device__ __forceinline__ void finalize(float (&acc)[kMTiles][kDTiles][4], float scale,
                                           float (&lse)[kRows]) {
    float inv[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float sum = quad_sum(row_sum[r]);
      const bool empty = sum == 0.f;
      inv[r] = empty ? 0.f : 1.f / sum;
      lse[r] = empty ? neg_inf() : row_max[r] * scale + logf(sum);
    }
    rescale(acc, inv);
  }

  // The same with the head's `sink` (sink.cuh; -inf: none) joining the denominator: a row that
  // saw no key gets lse = sink.
  template <int kDTiles>
  __device__ __forceinline__ void finalize(float (&acc)[kMTiles][kDTiles][4], float scale,
                                           float (&lse)[kRows], float sink) {
    float inv[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float total = quad_sum(row_sum[r]), m = row_max[r] * scale, weight = 1.f;
      const bool empty = total == 0.f;
      if (sink != neg_inf() && !empty) fold_sink(m, total, weight, sink);
      inv[r] = empty ? 0.f : weight / total;
      lse[r] = empty ? sink : m + logf(total);
    }
    rescale(acc, inv);
  }
};

}  // namespace cuflash
