// Building blocks of the SIMT kernels (fp32 / fp64 on CUDA cores, no tensor cores): 16-byte
// register packs, the shared-memory micro-GEMMs every thread runs, global -> shared tile copies and
// row stores.
//
// Register-tiled like a SIMT GEMM: a thread owns a small (rows x columns) block of each product and
// walks the reduction axis one 16-byte vector at a time, so one shared-memory load feeds several
// FMAs. Thread rows are strided (row0 + i * kRowStep) and thread columns too, which keeps the few
// distinct addresses a warp reads at once in distinct banks (see the padding in the traits).
#pragma once

#include "../core/common.cuh"

namespace cuflash {

// Elements of T in one 16-byte vector (float4 / double2): the unit of every vector load and store.
template <typename T> struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T> __device__ __forceinline__ Pack<T> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T>*>(p);
}
template <typename T> __device__ __forceinline__ void store_pack(T* p, const Pack<T>& x) {
  *reinterpret_cast<Pack<T>*>(p) = x;
}

__device__ __forceinline__ float madd(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double madd(double a, double b, double c) { return fma(a, b, c); }

template <typename T> __device__ __forceinline__ T infinity();
template <> __device__ __forceinline__ float infinity<float>() { return -neg_inf(); }
template <> __device__ __forceinline__ double infinity<double>() {
  return __longlong_as_double(0x7ff0000000000000ULL);
}

// Loads of the Accum type from any storage type (the row-wise backward kernels are shared by all).
template <typename T> __device__ __forceinline__ typename AccumOf<T>::type to_accum(T x) {
  return to_float(x);
}
template <> __device__ __forceinline__ double to_accum<double>(double x) { return x; }
template <typename T> __device__ __forceinline__ T from_accum(typename AccumOf<T>::type x) {
  return from_float<T>(x);
}
template <> __device__ __forceinline__ double from_accum<double>(double x) { return x; }

// Traps when the launch gave less dynamic shared memory than the traits need. The Python tile
// tables and the C++ traits state the size in two places; a drift must fail loudly, not corrupt
// memory.
__device__ __forceinline__ void check_dynamic_smem(uint32 needed) {
#ifdef __CUDA_ARCH__
  uint32 have;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
  if (have < needed) __trap();
#endif
}

__host__ __device__ constexpr int min_int(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int max_int(int a, int b) { return a > b ? a : b; }

template <typename T, int N> __device__ __forceinline__ void fill(T (&x)[N], T value) {
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] = value;
}
template <typename T, int M, int N> __device__ __forceinline__ void fill(T (&x)[M][N], T value) {
#pragma unroll
  for (int i = 0; i < M; ++i) fill(x[i], value);
}

// ---- micro-GEMMs on shared memory --------------------------------------------------------------

// acc[i][j] += sum_k A[i * kRowStep][k] * B[j * kColStep][k] for k < kK: both operands k-contiguous
// (S = Q K^T, dP = dO V^T). `a` and `b` point at this thread's first A row and first B row.
//
// The k loops stay rolled (`unroll 1`): unrolled, ptxas hoists the next step's loads, which costs
// a whole second operand set of registers and spilled at the 3-blocks-per-SM budget; the 8-12
// resident warps hide the shared-memory latency instead.
template <int kM, int kN, int kK, int kRowStep, int kColStep, int kLdA, int kLdB, typename T>
__device__ __forceinline__ void gemm_nt(T (&acc)[kM][kN], const T* a, const T* b) {
  constexpr int kVec = Pack<T>::kSize;
#pragma unroll 1
  for (int k = 0; k < kK; k += kVec) {
    Pack<T> bk[kN];
#pragma unroll
    for (int j = 0; j < kN; ++j) bk[j] = load_pack(b + j * kColStep * kLdB + k);
#pragma unroll
    for (int i = 0; i < kM; ++i) {
      const Pack<T> ak = load_pack(a + i * kRowStep * kLdA + k);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
#pragma unroll
        for (int j = 0; j < kN; ++j) acc[i][j] = madd(ak.v[e], bk[j].v[e], acc[i][j]);
      }
    }
  }
}

// acc[i][c * kVec + f] += sum_k A[i * kRowStep][k] * B[k][c * kColStep + f] for k < kK: A is
// k-contiguous, B row-major (O += P V, dV += P^T dO, dQ += dS K). `a` points at this thread's first
// A row, `b` at this thread's first B column in row 0; each thread owns kC vectors of columns.
template <int kM, int kC, int kK, int kRowStep, int kColStep, int kLdA, int kLdB, typename T>
__device__ __forceinline__ void gemm_nn(T (&acc)[kM][kC * Pack<T>::kSize], const T* a, const T* b) {
  constexpr int kVec = Pack<T>::kSize;
#pragma unroll 1
  for (int k = 0; k < kK; k += kVec) {
    Pack<T> ak[kM];
#pragma unroll
    for (int i = 0; i < kM; ++i) ak[i] = load_pack(a + i * kRowStep * kLdA + k);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
#pragma unroll
      for (int c = 0; c < kC; ++c) {
        const Pack<T> bk = load_pack(b + (k + e) * kLdB + c * kColStep);
#pragma unroll
        for (int i = 0; i < kM; ++i) {
#pragma unroll
          for (int f = 0; f < kVec; ++f) {
            acc[i][c * kVec + f] = madd(ak[i].v[e], bk.v[f], acc[i][c * kVec + f]);
          }
        }
      }
    }
  }
}

// ---- global -> shared copies -------------------------------------------------------------------
// cp.async (sm_80+) lets the copy of the next tile run under the math of the current one; its
// src-size operand zero-fills what lies outside the matrix. Older GPUs copy through registers.

// One 16-byte vector (kAligned) or one element; `valid` false writes zeros and reads nothing.
// `ext`: the tensor `gmem` points into (checked builds, check.cuh).
template <int kBytes>
__device__ __forceinline__ void copy_async(void* smem, const void* gmem, bool valid,
                                           const Extent& ext) {
  if (valid) CUFLASH_CHECK_ACCESS(ext, gmem, kBytes);
#if __CUDA_ARCH__ >= 800
  const uint32 dst = static_cast<uint32>(__cvta_generic_to_shared(smem));
  if (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n"
                 :: "r"(dst), "l"(gmem), "n"(kBytes), "r"(valid ? kBytes : 0));
  }
#else
  if (kBytes == 16) {
    Pack<float> x = {{0.f, 0.f, 0.f, 0.f}};
    if (valid) x = *static_cast<const Pack<float>*>(gmem);
    *static_cast<Pack<float>*>(smem) = x;
  } else if (kBytes == 8) {
    *static_cast<uint64*>(smem) = valid ? *static_cast<const uint64*>(gmem) : 0ull;
  } else {
    *static_cast<uint32*>(smem) = valid ? *static_cast<const uint32*>(gmem) : 0u;
  }
#endif
}

// Waits for every copy this thread issued; __syncthreads() then makes them visible to the block.
__device__ __forceinline__ void copy_async_wait_all() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Copies a (kRows x kCols) tile of a global matrix (row stride `row_stride` elements, unit column
// stride; `gmem` points at the tile's first row) into shared memory with leading dimension kLd.
// Rows >= `rows` and columns >= `cols` are zero-filled: padding must add exact zeros to every
// product, and garbage could be NaN (0 * NaN = NaN).
template <int kRows, int kCols, int kLd, int kThreads, bool kAligned, typename T>
__device__ __forceinline__ void copy_tile(T* smem, const T* gmem, int64 row_stride, int rows,
                                          int cols, int tid, const Extent& ext) {
  constexpr int kVec = Pack<T>::kSize;
  constexpr int kVecsPerRow = kCols / kVec;
  // The block copies kRowsPerStep whole rows per step; thread `tid` always copies vector `c` of
  // its rows, so one pointer per operand advances by a constant (no per-step address registers).
  constexpr int kRowsPerStep = kThreads / kVecsPerRow;
  static_assert(kThreads % kVecsPerRow == 0 && kRows % kRowsPerStep == 0, "steps of whole rows");
  const int r0 = tid / kVecsPerRow;
  const int c = tid % kVecsPerRow * kVec;
  T* dst = smem + r0 * kLd + c;
  const T* src = gmem + r0 * row_stride + c;
  const int64 src_step = kRowsPerStep * row_stride;
#pragma unroll
  for (int step = 0; step < kRows / kRowsPerStep; ++step) {
    const int r = r0 + step * kRowsPerStep;
    if (kAligned) {
      // head_dim * sizeof(T) % 16 == 0: a vector is wholly inside or wholly outside the matrix.
      const bool valid = r < rows && c < cols;
      copy_async<16>(dst, valid ? src : gmem, valid, ext);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const bool valid = r < rows && c + e < cols;
        copy_async<sizeof(T)>(dst + e, valid ? src + e : gmem, valid, ext);
      }
    }
    dst += kRowsPerStep * kLd;
    src += src_step;
  }
}

// Stores this thread's columns of one row: kC vectors at (col0 + c * kColStep); only the columns
// < `cols` (the true head dim) are written.
template <int kC, int kColStep, bool kAligned, typename T>
__device__ __forceinline__ void store_row(T* row, const T (&x)[kC * Pack<T>::kSize], int col0,
                                          int cols, const Extent& ext) {
  constexpr int kVec = Pack<T>::kSize;
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    const int col = col0 + c * kColStep;
    if (kAligned) {
      if (col < cols) {
        Pack<T> v;
#pragma unroll
        for (int f = 0; f < kVec; ++f) v.v[f] = x[c * kVec + f];
        CUFLASH_CHECK_ACCESS(ext, row + col, sizeof(v));
        store_pack(row + col, v);
      }
    } else {
#pragma unroll
      for (int f = 0; f < kVec; ++f) {
        if (col + f >= cols) continue;
        CUFLASH_CHECK_ACCESS(ext, row + col + f, sizeof(T));
        row[col + f] = x[c * kVec + f];
      }
    }
  }
}

// ---- warp reductions ---------------------------------------------------------------------------

// Max / sum over the kLanes consecutive lanes that share a row (kLanes a power of two <= 32).
template <int kLanes, typename T> __device__ __forceinline__ T group_max(T x) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    x = fmax(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}
template <int kLanes, typename T> __device__ __forceinline__ T group_sum(T x) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

}  // namespace cuflash
