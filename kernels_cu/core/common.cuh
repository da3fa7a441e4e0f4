// Types, constants and the kernel parameter blocks shared by every cuflash kernel.
//
// NVRTC-clean: no host headers, no <cuda_fp16.h>. 16-bit floats are carried as raw bits
// (`f16`, `bf16`) and converted with inline PTX, so this compiles identically under NVRTC and nvcc.
#pragma once

#include "check.cuh"

namespace cuflash {

typedef long long int64;
typedef unsigned long long uint64;
typedef unsigned int uint32;
typedef unsigned short uint16;

// Storage types. Distinct structs (not typedefs) so templates can tell fp16 from bf16.
struct f16 { uint16 bits; };
struct bf16 { uint16 bits; };

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarpSize = 32;

// Parameters of every forward kernel. Mirrored field for field by `_launch.FWD_PARAMS` in Python
// (a NumPy structured dtype with align=True); the host passes sizeof() as CUFLASH_FWD_PARAMS_SIZE
// so a drift between the two fails at compile time instead of reading garbage.
// Strides are in elements; tensors are addressed as (batch, row, head, dim) whatever the layout.
// `Accum` is the softmax statistics type: float for fp16/bf16/fp32 inputs, double for fp64 (a float
// lse would cap fp64 gradients at ~1e-7 relative error; the API hands users a float32 copy).
// A user score or mask modification's auxiliary arrays (score.cuh's Aux): at most kMaxAux, each
// of at most kMaxAuxDims axes, strides in elements; unused slots are zero.
constexpr int kMaxAux = 8;
constexpr int kMaxAuxDims = 4;

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  void* lse;  // Accum (batch, heads_q, seqlen_q), natural log, row stride 1; null: not requested
  const void* sinks;  // Accum (heads_q,): each head's sink logit (sink.cuh); null: none
  const void* alibi;  // Accum (batch, heads_q) ALiBi slopes (score.cuh's Mods); null: none
  const void* bias;   // an additive bias (score.cuh's Mods), bias_dtype; null: none
  const void* mask;   // a boolean mask array, one byte each, 0 hides (score.cuh's Mods); null: none

  int64 q_batch_stride, q_row_stride, q_head_stride;
  int64 k_batch_stride, k_row_stride, k_head_stride;
  int64 v_batch_stride, v_row_stride, v_head_stride;
  int64 o_batch_stride, o_row_stride, o_head_stride;
  int64 lse_batch_stride, lse_head_stride;
  // (batch, head, query row, key) strides of the bias and the mask in elements, 0 where broadcast
  int64 bias_batch_stride, bias_head_stride, bias_row_stride, bias_col_stride;
  int64 mask_batch_stride, mask_head_stride, mask_row_stride, mask_col_stride;

  double scale;       // softmax scale (fp64 kernels use it directly)
  float scale_log2;   // scale * log2(e): exp(scale*(s-m)) == exp2(s*scale_log2 - m*scale_log2)
  int batch;
  int heads_q;
  int heads_kv;
  int group;          // heads_q / heads_kv
  int seqlen_q;
  int seqlen_k;
  int head_dim;       // the true head dim; kernels are compiled for a width >= head_dim
  int window_left;    // WindowMask's band (mask.cuh), each in [0, seqlen_q + seqlen_k]; else unused
  int window_right;
  int bias_dtype;     // the bias's itemsize: 2 float16, 4 float32, 8 float64
  double softcap;     // Softcap's cap (score.cuh), > 0 (Mods: 0 is no cap); else unused
  const void* aux[kMaxAux];  // a user modification's arrays (score.cuh's Aux); else unused
  int64 aux_strides[kMaxAux][kMaxAuxDims];
  // A user mask_mod's block map (block_map.cuh): a plane of ints per (batch, head), whose
  // entries start with `block_map_rows` row blocks; strides in planes, 0 where broadcast.
  // Null: none.
  const void* block_map;
  int64 block_map_batch_stride, block_map_head_stride;
  int block_map_rows;
};

// Parameters of the backward kernels (same conventions). `Accum` below is float for fp16/bf16/fp32
// inputs and double for fp64. dq_accum is Accum scratch (batch, heads_q, seqlen_q, head_dim_rounded),
// zeroed by the preprocess; delta = rowsum(dout * out) is Accum (batch, heads_q, seqlen_q).
// GQA: a dK/dV block owns one kv head and loops over its group's query heads, so dk/dv need no
// atomics and no scratch.
struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* o;
  const void* dout;
  const void* lse;  // Accum (batch, heads_q, seqlen_q), natural log, from the forward
  void* dq;
  void* dk;
  void* dv;
  void* dq_accum;
  void* delta;
  const void* alibi;  // as in FwdParams
  const void* bias;
  const void* mask;
  // The bias's gradient, Accum (batch, heads_q, seqlen_k, seqlen_q) contiguous, key-major, zeros
  // where no query sees the key; null: not asked for (score.cuh's Mods writes it)
  void* dbias;

  int64 q_batch_stride, q_row_stride, q_head_stride;
  int64 k_batch_stride, k_row_stride, k_head_stride;
  int64 v_batch_stride, v_row_stride, v_head_stride;
  int64 o_batch_stride, o_row_stride, o_head_stride;
  int64 do_batch_stride, do_row_stride, do_head_stride;
  int64 dq_batch_stride, dq_row_stride, dq_head_stride;
  int64 dk_batch_stride, dk_row_stride, dk_head_stride;
  int64 dv_batch_stride, dv_row_stride, dv_head_stride;
  int64 lse_batch_stride, lse_head_stride;
  int64 bias_batch_stride, bias_head_stride, bias_row_stride, bias_col_stride;
  int64 mask_batch_stride, mask_head_stride, mask_row_stride, mask_col_stride;

  double scale;
  float scale_log2;
  int batch;
  int heads_q;
  int heads_kv;
  int group;
  int seqlen_q;
  int seqlen_k;
  int head_dim;
  int head_dim_rounded;   // dq_accum row width (the compiled head-dim width)
  int deterministic;      // 1: dq by its own kernel in a fixed order instead of atomics
  int window_left;        // as in FwdParams
  int window_right;
  int bias_dtype;
  double softcap;
  const void* aux[kMaxAux];  // as in FwdParams
  int64 aux_strides[kMaxAux][kMaxAuxDims];
  const void* block_map;  // as in FwdParams
  int64 block_map_batch_stride, block_map_head_stride;
  int block_map_rows;
};

#ifdef CUFLASH_FWD_PARAMS_SIZE
static_assert(sizeof(FwdParams) == CUFLASH_FWD_PARAMS_SIZE,
              "FwdParams layout differs from cuflash/_launch.py FWD_PARAMS");
#endif
#ifdef CUFLASH_BWD_PARAMS_SIZE
static_assert(sizeof(BwdParams) == CUFLASH_BWD_PARAMS_SIZE,
              "BwdParams layout differs from cuflash/_launch.py BWD_PARAMS");
#endif

// ---- conversions between storage types and fp32 -------------------------------------------

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<f16>(f16 x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}
template <> __device__ __forceinline__ float to_float<bf16>(bf16 x) {
  return __uint_as_float(static_cast<uint32>(x.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ f16 from_float<f16>(float x) {
  f16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
  return r;
}
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) {
  bf16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
  return r;
}

// Two fp32 values packed as one 32-bit register of 16-bit floats, `lo` in the low half: the
// operand format of mma.sync.
template <typename T> __device__ __forceinline__ uint32 pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32 pack2<f16>(float lo, float hi) {
  uint32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <> __device__ __forceinline__ uint32 pack2<bf16>(float lo, float hi) {
  uint32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

template <typename T> struct AccumOf { typedef float type; };
template <> struct AccumOf<double> { typedef double type; };

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

template <typename T> __host__ __device__ constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }

// ---- epilogue stores of mma accumulators -------------------------------------------------------

// One accumulator row (row g or g + 8 of an m16 fragment, `half`) of kDTiles n8 column groups as
// T, 4 consecutive columns a thread: quad neighbours t and t ^ 1 swap a word, so that out[j] holds
// columns row_sector_col(j, t) .. + 3 (even t: 16j + 2t..+3, odd t: 16j + 8 + 2(t - 1)..+3) and a
// warp's 8-byte stores fill whole 32-byte sectors instead of half of each. `value(dt, e)` gives
// element e (0, 1) of the thread's pair in group dt. Every lane must call it (shuffles).
template <typename T, int kDTiles, typename Value>
__device__ __forceinline__ void row_sectors(uint2 (&out)[kDTiles / 2], int t, Value value) {
  static_assert(kDTiles % 2 == 0, "pairs of n8 column groups");
  const int odd = t & 1;
#pragma unroll
  for (int j = 0; j < kDTiles / 2; ++j) {
    const uint32 w0 = pack2<T>(value(2 * j, 0), value(2 * j, 1));
    const uint32 w1 = pack2<T>(value(2 * j + 1, 0), value(2 * j + 1, 1));
    const uint32 other = __shfl_xor_sync(0xffffffffu, odd ? w0 : w1, 1);
    out[j] = odd ? make_uint2(other, w1) : make_uint2(w0, other);
  }
}
__device__ __forceinline__ int row_sector_col(int j, int t) {
  return (2 * j + (t & 1)) * 8 + 2 * (t & ~1);
}
// The row_sectors of one row stored at `row` from column col0, with 8-byte stores; lanes whose
// row is out of range pass store = false. Needs the row 8-byte aligned and col0 a multiple of 16
// (the aligned kernels: 16-byte rows, head_dim % 8 == 0). `ext`: the tensor `row` lies in.
template <typename T, int kDTiles, typename Value>
__device__ __forceinline__ void store_row_sectors(T* row, int col0, int head_dim, int t,
                                                  bool store, const Extent& ext, Value value) {
  uint2 out[kDTiles / 2];
  row_sectors<T, kDTiles>(out, t, value);
  if (!store) return;
#pragma unroll
  for (int j = 0; j < kDTiles / 2; ++j) {
    const int col = col0 + row_sector_col(j, t);
    const uint2 words = out[j];
    if (col + 3 < head_dim) {
      CUFLASH_CHECK_ACCESS(ext, row + col, 8);
      *reinterpret_cast<uint2*>(row + col) = words;
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32 word = e < 2 ? words.x : words.y;
        if (col + e < head_dim) {
          CUFLASH_CHECK_ACCESS(ext, row + col + e, 2);
          reinterpret_cast<unsigned short*>(row)[col + e] =
              static_cast<unsigned short>(e % 2 ? word >> 16 : word & 0xffffu);
        }
      }
    }
  }
}

// ---- softmax probabilities (softmax.cuh for the forward; bwd_sm80.cu, bwd_sm90.cu) ------------

// 2^x with the MUFU instruction alone: exp2f adds a range check and two multiplies per element to
// keep results below 2^-126 denormal; probabilities that small are flushed to 0 here. 2^-inf = 0.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// lse (from the forward, natural log) of one query row in log2 units, as P = exp2(s * scale_log2 -
// lse_log2) wants it. A row that saw no key has lse = -inf; +inf makes its P exactly 0 (the
// straightforward -lse would make exp2 overflow to +inf, and inf * 0 = NaN downstream).
__device__ __forceinline__ float lse_log2(float lse) {
  return lse == neg_inf() ? -neg_inf() : lse * kLog2e;
}

}  // namespace cuflash
