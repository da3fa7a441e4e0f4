// The sm80 backward's row-wise kernels (one thread block per kBlockM query rows): delta =
// rowsum(dout * out) with the dq_accum rows zeroed, and dq_accum -> dq. Part of bwd_sm80.cu.
#pragma once

#include "../core/common.cuh"

namespace cuflash {

// ---- row-wise kernels: delta and dq_accum zeroing, dq_accum -> dq -------------------------------

// kVecs threads per row, each owning one 8-element (16-byte) vector; kBlockM rows per block.
template <int kHeadDim_, int kBlockM_, int kWarps_> struct BwdRowSm80Traits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kThreads = kWarps_ * kWarpSize;
  static constexpr int kVecs = kHeadDim / 8;            // threads per row
  static constexpr int kRowsPerPass = kThreads / kVecs;
  static constexpr int kPasses = kBlockM / kRowsPerPass;
  static_assert(kVecs <= kWarpSize && kWarpSize % kVecs == 0, "a row's threads share one warp");
  static_assert(kBlockM % kRowsPerPass == 0, "whole passes");
};

// 8 elements of a row from column col, as floats; elements at or past head_dim read as 0.
template <typename T, bool kAligned>
__device__ __forceinline__ void load_vec8(float (&x)[8], const T* row, int col, int head_dim,
                                          const Extent& ext) {
  if (kAligned) {
    uint32 w[4] = {0, 0, 0, 0};
    if (col < head_dim) {
      CUFLASH_CHECK_ACCESS(ext, row + col, 16);
      const uint4 u = *reinterpret_cast<const uint4*>(row + col);
      w[0] = u.x, w[1] = u.y, w[2] = u.z, w[3] = u.w;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      x[2 * j] = to_float<T>(T{static_cast<uint16>(w[j] & 0xffffu)});
      x[2 * j + 1] = to_float<T>(T{static_cast<uint16>(w[j] >> 16)});
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (col + j < head_dim) CUFLASH_CHECK_ACCESS(ext, row + col + j, 2);
      x[j] = col + j < head_dim ? to_float<T>(row[col + j]) : 0.f;
    }
  }
}

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, typename MaskKind,
          typename ScoreKind, bool kAligned>
__global__ void __launch_bounds__(kWarps * kWarpSize)
bwd_preprocess_sm80(const __grid_constant__ BwdParams p) {
  typedef BwdRowSm80Traits<kHeadDim, kBlockM, kWarps> Tr;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int m0 = blockIdx.x * kBlockM;
  const int vec = threadIdx.x % Tr::kVecs;
  const int col = vec * 8;
  const int64 head_rows = (static_cast<int64>(batch) * p.heads_q + head) * p.seqlen_q;
  const T* dout =
      static_cast<const T*>(p.dout) + batch * p.do_batch_stride + head * p.do_head_stride;
  const T* out = static_cast<const T*>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride;
  float* delta = static_cast<float*>(p.delta) + head_rows;
  float* dq_accum = static_cast<float*>(p.dq_accum);  // null in deterministic mode

#pragma unroll
  for (int pass = 0; pass < Tr::kPasses; ++pass) {
    const int row = m0 + pass * Tr::kRowsPerPass + threadIdx.x / Tr::kVecs;
    const bool valid = row < p.seqlen_q;
    float sum = 0.f;
    if (valid) {
      float a[8], b[8];
      load_vec8<T, kAligned>(a, dout + row * p.do_row_stride, col, p.head_dim, dout_extent<T>(p));
      load_vec8<T, kAligned>(b, out + row * p.o_row_stride, col, p.head_dim, o_extent<T>(p));
#pragma unroll
      for (int j = 0; j < 8; ++j) sum = fmaf(a[j], b[j], sum);
    }
    // Every lane takes part in the shuffles (the row's kVecs lanes are aligned within the warp).
#pragma unroll
    for (int offset = Tr::kVecs / 2; offset > 0; offset /= 2) {
      sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    if (valid && vec == 0) {
      CUFLASH_CHECK_ACCESS(delta_extent<float>(p), delta + row, 4);
      delta[row] = sum;
    }
    if (valid && dq_accum != nullptr && col < p.head_dim_rounded) {
      float4* dst =
          reinterpret_cast<float4*>(dq_accum + (head_rows + row) * p.head_dim_rounded + col);
      CUFLASH_CHECK_ACCESS(dq_accum_extent<float>(p), dst, 32);
      dst[0] = make_float4(0.f, 0.f, 0.f, 0.f);
      dst[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
}

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, typename MaskKind,
          typename ScoreKind, bool kAligned>
__global__ void __launch_bounds__(kWarps * kWarpSize)
bwd_convert_dq_sm80(const __grid_constant__ BwdParams p) {
  typedef BwdRowSm80Traits<kHeadDim, kBlockM, kWarps> Tr;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int m0 = blockIdx.x * kBlockM;
  const int col = threadIdx.x % Tr::kVecs * 8;
  const int64 head_rows = (static_cast<int64>(batch) * p.heads_q + head) * p.seqlen_q;
  const float* dq_accum = static_cast<const float*>(p.dq_accum);
  T* dq = static_cast<T*>(p.dq) + batch * p.dq_batch_stride + head * p.dq_head_stride;

#pragma unroll
  for (int pass = 0; pass < Tr::kPasses; ++pass) {
    const int row = m0 + pass * Tr::kRowsPerPass + threadIdx.x / Tr::kVecs;
    if (row >= p.seqlen_q || col >= p.head_dim) continue;
    const float4* src =
        reinterpret_cast<const float4*>(dq_accum + (head_rows + row) * p.head_dim_rounded + col);
    CUFLASH_CHECK_ACCESS(dq_accum_extent<float>(p), src, 32);
    const float4 lo = src[0], hi = src[1];
    const float x[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    T* dst = dq + row * p.dq_row_stride + col;
    if (kAligned) {
      const uint4 u = make_uint4(pack2<T>(x[0], x[1]), pack2<T>(x[2], x[3]), pack2<T>(x[4], x[5]),
                                 pack2<T>(x[6], x[7]));
      CUFLASH_CHECK_ACCESS(dq_extent<T>(p), dst, 16);
      *reinterpret_cast<uint4*>(dst) = u;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (col + j < p.head_dim) {
          CUFLASH_CHECK_ACCESS(dq_extent<T>(p), dst + j, 2);
          dst[j] = from_float<T>(x[j]);
        }
      }
    }
  }
}

}  // namespace cuflash
