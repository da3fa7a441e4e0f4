// The checked build. CUFLASH_DEBUG=1 in the environment compiles every kernel with -DCUFLASH_DEBUG
// (and -lineinfo): then each global load, store and atomic a kernel issues first asserts that its
// bytes lie inside the tensor they belong to, and a failure prints the kernel's source line, the
// tensor, the address and the thread, then traps. Release builds keep `Extent` empty and compile
// every check away: their PTX is unchanged but for which of two equal loop counters the unaligned
// sm80 tile copy keeps (docs/reliability.md).
//
// TMA copies are not checked here: the hardware bounds them by the tensor map, whose shape and
// strides are the tensor's own (cuflash/_launch_sm90.py encodes them from the array).
#pragma once

namespace cuflash {

typedef long long int64;  // as in common.cuh, which includes this header first

#ifdef CUFLASH_DEBUG

extern "C" __device__ int printf(const char*, ...);

// Bytes [lo, hi) of one tensor argument, and the source line that named it (the kernel's call
// of a helper, or the access itself).
struct Extent {
  const char* name;
  const char* lo;
  const char* hi;
  const char* file;
  int line;
};

__device__ __noinline__ void access_failed(const Extent& e, const void* p, int64 bytes,
                                           const char* file, int line) {
  printf("CUFLASH_DEBUG %s:%d (access at %s:%d): block (%d, %d, %d) thread %d: %lld bytes at %p "
         "are outside %s [%p, %p)\n",
         e.file, e.line, file, line, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, bytes, p,
         e.name, e.lo, e.hi);
  __trap();
}

__device__ __forceinline__ void check_access(const Extent& e, const void* p, int64 bytes,
                                             const char* file, int line) {
  const char* c = static_cast<const char*>(p);
  if (c < e.lo || c + bytes > e.hi) access_failed(e, p, bytes, file, line);
}

// A (batch, rows, heads, cols) tensor with element strides and unit column stride.
template <typename T>
__device__ __forceinline__ Extent extent_of(const char* name, const void* base, int batch, int rows,
                                            int heads, int cols, int64 batch_stride,
                                            int64 row_stride, int64 head_stride, const char* file,
                                            int line) {
  const char* lo = static_cast<const char*>(base);
  if (base == nullptr || batch <= 0 || rows <= 0 || heads <= 0 || cols <= 0) {
    return {name, lo, lo, file, line};
  }
  const int64 end = (batch - 1) * batch_stride + (rows - 1) * row_stride +
                    (heads - 1) * head_stride + cols;
  return {name, lo, lo + end * int64(sizeof(T)), file, line};
}

#define CUFLASH_CHECK_ACCESS(extent, ptr, bytes) \
  ::cuflash::check_access((extent), (ptr), (bytes), __FILE__, __LINE__)
#define CUFLASH_CHECK_ACCESS_IF(cond, extent, ptr, bytes) \
  do {                                                     \
    if (cond) CUFLASH_CHECK_ACCESS(extent, ptr, bytes);    \
  } while (0)
// The per-tensor functions below take their caller's line as default arguments.
#define CUFLASH_SITE , const char* file = __builtin_FILE(), int line = __builtin_LINE()
#define CUFLASH_SITE_ARGS , file, line

#else

struct Extent {};

template <typename T>
__device__ __forceinline__ Extent extent_of(const char*, const void*, int, int, int, int, int64,
                                            int64, int64) {
  return {};
}

#define CUFLASH_CHECK_ACCESS(extent, ptr, bytes) ((void)0)
// Not even `cond` is evaluated: an empty `if` can still move code generation.
#define CUFLASH_CHECK_ACCESS_IF(cond, extent, ptr, bytes) ((void)0)
#define CUFLASH_SITE
#define CUFLASH_SITE_ARGS

#endif  // CUFLASH_DEBUG

// The tensors of FwdParams / BwdParams (P, common.cuh), by name. T is the storage type, A the
// Accum type.
template <typename T, typename P>
__device__ __forceinline__ Extent q_extent(const P& p CUFLASH_SITE) {
  return extent_of<T>("q", p.q, p.batch, p.seqlen_q, p.heads_q, p.head_dim, p.q_batch_stride,
                      p.q_row_stride, p.q_head_stride CUFLASH_SITE_ARGS);
}
template <typename T, typename P>
__device__ __forceinline__ Extent k_extent(const P& p CUFLASH_SITE) {
  return extent_of<T>("k", p.k, p.batch, p.seqlen_k, p.heads_kv, p.head_dim, p.k_batch_stride,
                      p.k_row_stride, p.k_head_stride CUFLASH_SITE_ARGS);
}
template <typename T, typename P>
__device__ __forceinline__ Extent v_extent(const P& p CUFLASH_SITE) {
  return extent_of<T>("v", p.v, p.batch, p.seqlen_k, p.heads_kv, p.head_dim, p.v_batch_stride,
                      p.v_row_stride, p.v_head_stride CUFLASH_SITE_ARGS);
}
template <typename T, typename P>
__device__ __forceinline__ Extent o_extent(const P& p CUFLASH_SITE) {
  return extent_of<T>("out", p.o, p.batch, p.seqlen_q, p.heads_q, p.head_dim, p.o_batch_stride,
                      p.o_row_stride, p.o_head_stride CUFLASH_SITE_ARGS);
}
template <typename A, typename P>
__device__ __forceinline__ Extent lse_extent(const P& p CUFLASH_SITE) {
  return extent_of<A>("lse", p.lse, p.batch, p.seqlen_q, p.heads_q, 1, p.lse_batch_stride, 1,
                      p.lse_head_stride CUFLASH_SITE_ARGS);
}
template <typename T, typename P>
__device__ __forceinline__ Extent dout_extent(const P& p CUFLASH_SITE) {
  return extent_of<T>("dout", p.dout, p.batch, p.seqlen_q, p.heads_q, p.head_dim,
                      p.do_batch_stride, p.do_row_stride, p.do_head_stride CUFLASH_SITE_ARGS);
}
template <typename T, typename P>
__device__ __forceinline__ Extent dq_extent(const P& p CUFLASH_SITE) {
  return extent_of<T>("dq", p.dq, p.batch, p.seqlen_q, p.heads_q, p.head_dim, p.dq_batch_stride,
                      p.dq_row_stride, p.dq_head_stride CUFLASH_SITE_ARGS);
}
template <typename T, typename P>
__device__ __forceinline__ Extent dk_extent(const P& p CUFLASH_SITE) {
  return extent_of<T>("dk", p.dk, p.batch, p.seqlen_k, p.heads_kv, p.head_dim, p.dk_batch_stride,
                      p.dk_row_stride, p.dk_head_stride CUFLASH_SITE_ARGS);
}
template <typename T, typename P>
__device__ __forceinline__ Extent dv_extent(const P& p CUFLASH_SITE) {
  return extent_of<T>("dv", p.dv, p.batch, p.seqlen_k, p.heads_kv, p.head_dim, p.dv_batch_stride,
                      p.dv_row_stride, p.dv_head_stride CUFLASH_SITE_ARGS);
}
// delta (batch, heads_q, seqlen_q) and dq_accum (batch, heads_q, seqlen_q, head_dim_rounded):
// contiguous scratch.
template <typename A, typename P>
__device__ __forceinline__ Extent delta_extent(const P& p CUFLASH_SITE) {
  return extent_of<A>("delta", p.delta, 1, p.batch * p.heads_q, 1, p.seqlen_q, 0, p.seqlen_q,
                      0 CUFLASH_SITE_ARGS);
}
template <typename A, typename P>
__device__ __forceinline__ Extent dq_accum_extent(const P& p CUFLASH_SITE) {
  return extent_of<A>("dq_accum", p.dq_accum, 1, p.batch * p.heads_q * p.seqlen_q, 1,
                      p.head_dim_rounded, 0, p.head_dim_rounded, 0 CUFLASH_SITE_ARGS);
}

}  // namespace cuflash
