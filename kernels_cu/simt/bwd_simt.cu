// Attention backward for fp32 and fp64 on CUDA cores (no tensor cores, no tf32): FlashAttention-2's
// algorithm with the SIMT register tiling of fwd_simt.cu. See NOTES_simt.md.
//
//   bwd_preprocess  delta = rowsum(dout * out); zeroes the dq_accum scratch (row-wise, any dtype).
//   bwd_dkdv_simt   one block per (key tile, kv head, batch) walks the group's query heads and
//                   their query tiles: P = exp(scale * S - lse), dP = dO V^T,
//                   dS = P * (dP - delta), dV += P^T dO, dK += dS^T Q (registers),
//                   dQ += dS K (atomics into dq_accum).
//   bwd_dq_simt     deterministic mode: one block per (query tile, head, batch) walks the key tiles
//                   in order and writes dq itself, with no atomics.
//   bwd_convert_dq  dq = scale * dq_accum in the storage type (row-wise, any dtype).
// Every kernel takes the same template parameters so one KernelSpec names any of them; the row-wise
// kernels ignore the tile ones and MaskKind (rendered as NoMask).
#include "../core/common.cuh"
#include "../attention/mask.cuh"
#include "../attention/score.cuh"
#include "simt_common.cuh"
#include "simt_softmax.cuh"

namespace cuflash {

template <typename T, int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_> struct BwdSimtTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per step
  static constexpr int kBlockN = kBlockN_;  // keys per dK/dV block (per step in bwd_dq_simt)
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kVec = Pack<T>::kSize;  // elements per 16-byte vector

  // Thread layout as in FwdSimtTraits: 8 consecutive lanes (tcol) share a row group (trow).
  //   S, dP, P, dS  (kBlockM x kBlockN): query rows trow + i * kRowThreads, keys tcol + j * 8.
  //   dK, dV        (kBlockN x kHeadDim): key rows trow + i * kRowThreads, vectors tcol + c * 8.
  //   dQ            (kBlockM x kHeadDim): query rows as S, vectors as dK.
  static constexpr int kColThreads = 8;
  static constexpr int kRowThreads = kThreads / kColThreads;
  static constexpr int kRowGroupsPerWarp = kWarpSize / kColThreads;
  static constexpr int kRows = kBlockM / kRowThreads;     // query rows per thread
  static constexpr int kKeys = kBlockN / kColThreads;     // S columns per thread
  static constexpr int kKeyRows = kBlockN / kRowThreads;  // dK/dV rows per thread
  static constexpr int kDimVecs = kHeadDim / (kVec * kColThreads);
  static constexpr int kDims = kDimVecs * kVec;
  static constexpr int kDimStep = kVec * kColThreads;

  // Shared memory, in elements.
  // Q, dO, K, V rows: padded by one vector so 16-byte reads of 8 different rows are conflict-free.
  static constexpr int kLdQKV = kHeadDim + kVec;
  // P^T, dS^T rows (the A operand of dV += P^T dO, dK += dS^T Q): padded by one vector, so the 8
  // keys x 4 queries a warp writes transposed hit 32 different banks and vector reads stay clean.
  static constexpr int kLdT = kBlockM + kVec;
  // dS rows (the A operand of dQ += dS K): padded by 8 so the 4 rows a warp writes differ in bank.
  static constexpr int kLdS = kBlockN + kColThreads;
  static constexpr int kOffQ = 0;
  static constexpr int kOffDo = kOffQ + kBlockM * kLdQKV;
  static constexpr int kOffK = kOffDo + kBlockM * kLdQKV;
  static constexpr int kOffV = kOffK + kBlockN * kLdQKV;
  static constexpr int kOffDs = kOffV + kBlockN * kLdQKV;
  static constexpr int kOffLse = kOffDs + kBlockM * kLdS;
  static constexpr int kOffDelta = kOffLse + kBlockM;
  static constexpr int kDqSmemElems = kOffDelta + kBlockM;  // bwd_dq_simt uses this much
  static constexpr int kOffPt = kDqSmemElems;
  static constexpr int kOffDst = kOffPt + kBlockN * kLdT;
  static constexpr int kDkdvSmemElems = kOffDst + kBlockN * kLdT;
  // Mirrored in cuflash/_launch_bwd.py.
  static constexpr int kDqSmemBytes = kDqSmemElems * sizeof(T);
  static constexpr int kDkdvSmemBytes = kDkdvSmemElems * sizeof(T);

  // Register budget for __launch_bounds__: the blocks per SM that the shared memory allows on an
  // H100, at most 3 (see FwdSimtTraits).
  static constexpr int kDkdvMinBlocksPerSm =
      min_int(3, max_int(1, (228 * 1024) / (kDkdvSmemBytes + 1024)));
  static constexpr int kDqMinBlocksPerSm =
      min_int(3, max_int(1, (228 * 1024) / (kDqSmemBytes + 1024)));

  static_assert(kRowThreads * kColThreads == kThreads, "layout");
  static_assert(kBlockM % kRowThreads == 0 && kBlockN % kRowThreads == 0, "tile vs row threads");
  static_assert(kBlockN % kColThreads == 0 && kBlockM % kVec == 0, "tile vs column threads");
  static_assert(kHeadDim % kDimStep == 0, "kHeadDim must be a multiple of 8 vectors");
  static_assert((kLdQKV / kVec) % 2 == 1, "Q/K/V row pitch must be an odd number of vectors");
  static_assert(kOffPt % kVec == 0, "P^T must start 16-byte aligned");
};

// Recomputes this thread's part of one (query tile, key tile) pair from the staged Q, dO, K, V,
// lse (score units) and delta: on return `p` holds P = exp(scale * S - lse) and `ds` holds
// dS = P * (dP - delta), both zero where the mask hides the key. (batch, head): the query head's.
template <typename Tr, typename MaskKind, typename ScoreKind, typename T>
__device__ __forceinline__ void recompute_p_ds(T (&p)[Tr::kRows][Tr::kKeys],
                                               T (&ds)[Tr::kRows][Tr::kKeys], const T* sQ,
                                               const T* sDo, const T* sK, const T* sV,
                                               const T* sLse, const T* sDelta, int m0, int n0,
                                               int trow, int tcol, int batch, int head,
                                               const BwdParams& params) {
  fill(p, T(0));
  fill(ds, T(0));
  // -- s = q k^T, dp = do v^T --
  gemm_nt<Tr::kRows, Tr::kKeys, Tr::kHeadDim, Tr::kRowThreads, Tr::kColThreads, Tr::kLdQKV,
          Tr::kLdQKV>(p, sQ + trow * Tr::kLdQKV, sK + tcol * Tr::kLdQKV);
  gemm_nt<Tr::kRows, Tr::kKeys, Tr::kHeadDim, Tr::kRowThreads, Tr::kColThreads, Tr::kLdQKV,
          Tr::kLdQKV>(ds, sDo + trow * Tr::kLdQKV, sV + tcol * Tr::kLdQKV);

  // -- p = exp(scale * score(s) - lse), ds = p * (dp - delta) * the score's slope (score.cuh);
  // zero where the row does not see the key (keys past seqlen_k among them), on the tiles the
  // mask's edges or the ragged end cut --
  const T scale = ScoreUnits<T>::scale(params);
  const Mask<MaskKind> mask(params);
  const Score<ScoreKind, T> score = Score<ScoreKind, T>(params).for_head(params, batch, head);
  const bool partial = !mask.full(m0, m0 + Tr::kBlockM, n0, n0 + Tr::kBlockN);
  if constexpr (ScoreKind::kModifies) {  // a pass of its own: fewer live values than in the loop
#pragma unroll
    for (int i = 0; i < Tr::kRows; ++i)
#pragma unroll
      for (int j = 0; j < Tr::kKeys; ++j) {
        p[i][j] =
            score(p[i][j], m0 + trow + i * Tr::kRowThreads, n0 + tcol + j * Tr::kColThreads);
      }
  }
#pragma unroll
  for (int i = 0; i < Tr::kRows; ++i) {
    const int r = trow + i * Tr::kRowThreads;
    const int row = m0 + r;
    const T lse = sLse[r];
    const T delta = sDelta[r];
#pragma unroll
    for (int j = 0; j < Tr::kKeys; ++j) {
      const int key = n0 + tcol + j * Tr::kColThreads;
      const bool masked = partial && (key >= params.seqlen_k || mask.band_hides(row, key));
      const T prob = masked ? T(0) : ScoreUnits<T>::exp(madd(p[i][j], scale, -lse));
      ds[i][j] = prob * (ds[i][j] - delta) * score.slope(p[i][j], row, key);
      p[i][j] = prob;
    }
  }
}

// Stages lse (in score units) and delta of query rows [m0, m0 + kBlockM) in shared memory. Rows
// past seqlen_q get lse = +inf, so P = exp(s - inf) = 0 there. A row that saw no key has
// lse = -inf; its keys are all masked, and +inf keeps exp(s - lse) from ever being exp(+inf).
template <typename Tr, typename T>
__device__ __forceinline__ void stage_lse_delta(T* sLse, T* sDelta, const T* lse, const T* delta,
                                                int m0, int seqlen_q, int tid,
                                                const Extent& lse_ext, const Extent& delta_ext) {
  for (int r = tid; r < Tr::kBlockM; r += Tr::kThreads) {
    const int row = m0 + r;
    T l = infinity<T>();
    T d = T(0);
    if (row < seqlen_q) {
      CUFLASH_CHECK_ACCESS(lse_ext, lse + row, sizeof(T));
      CUFLASH_CHECK_ACCESS(delta_ext, delta + row, sizeof(T));
      const T x = lse[row];
      if (x != -infinity<T>()) l = ScoreUnits<T>::from_natural(x);
      d = delta[row];
    }
    sLse[r] = l;
    sDelta[r] = d;
  }
}

// row[col] += x for this thread's columns (< cols) of one dq_accum row.
template <int kC, int kColStep, typename T>
__device__ __forceinline__ void atomic_add_row(T* row, const T (&x)[kC * Pack<T>::kSize], int col0,
                                               int cols, const Extent& ext) {
  constexpr int kVec = Pack<T>::kSize;
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    const int col = col0 + c * kColStep;
    if (col >= cols) continue;
#if __CUDA_ARCH__ >= 900
    if constexpr (sizeof(T) == 4) {
      CUFLASH_CHECK_ACCESS(ext, row + col, 16);
      // One 16-byte reduction instead of four. Columns past head_dim add exact zeros (K's padded
      // columns are zero) to a scratch row that is kHeadDim wide, so the whole vector is safe.
      asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(row + col),
                   "f"(x[c * kVec]), "f"(x[c * kVec + 1]), "f"(x[c * kVec + 2]),
                   "f"(x[c * kVec + 3])
                   : "memory");
      continue;
    }
#endif
#pragma unroll
    for (int f = 0; f < kVec; ++f) {
      if (col + f >= cols) continue;
      CUFLASH_CHECK_ACCESS(ext, row + col + f, sizeof(T));
      atomicAdd(row + col + f, x[c * kVec + f]);
    }
  }
}

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, typename MaskKind,
          typename ScoreKind, bool kAligned>
__global__ void __launch_bounds__(
    kWarps * kWarpSize,  // a score modification needs more registers than the budget allows
    (ScoreKind::kModifies ? 1
                          : BwdSimtTraits<T, kHeadDim, kBlockM, kBlockN, kWarps>::kDkdvMinBlocksPerSm))
    bwd_dkdv_simt(const BwdParams p) {
  using Tr = BwdSimtTraits<T, kHeadDim, kBlockM, kBlockN, kWarps>;
  extern __shared__ float4 smem_vec[];  // float4: 16-byte alignment for the Pack loads
  check_dynamic_smem(Tr::kDkdvSmemBytes);
  T* const smem = reinterpret_cast<T*>(smem_vec);
  T* const sQ = smem + Tr::kOffQ;
  T* const sDo = smem + Tr::kOffDo;
  T* const sK = smem + Tr::kOffK;
  T* const sV = smem + Tr::kOffV;
  T* const sDs = smem + Tr::kOffDs;
  T* const sLse = smem + Tr::kOffLse;
  T* const sDelta = smem + Tr::kOffDelta;
  T* const sPt = smem + Tr::kOffPt;
  T* const sDst = smem + Tr::kOffDst;

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int tcol = lane % Tr::kColThreads;
  const int trow = tid / kWarpSize * Tr::kRowGroupsPerWarp + lane / Tr::kColThreads;

  const int batch = blockIdx.z;
  const int kv_head = blockIdx.y;
  const int n0 = blockIdx.x * kBlockN;
  const int keys = min(kBlockN, p.seqlen_k - n0);  // valid keys in this block (>= 1)

  copy_tile<kBlockN, kHeadDim, Tr::kLdQKV, Tr::kThreads, kAligned>(
      sK,
      static_cast<const T*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride +
          n0 * p.k_row_stride,
      p.k_row_stride, keys, p.head_dim, tid, k_extent<T>(p));
  copy_tile<kBlockN, kHeadDim, Tr::kLdQKV, Tr::kThreads, kAligned>(
      sV,
      static_cast<const T*>(p.v) + batch * p.v_batch_stride + kv_head * p.v_head_stride +
          n0 * p.v_row_stride,
      p.v_row_stride, keys, p.head_dim, tid, v_extent<T>(p));

  // The query tiles [m_begin, m_end) that see some key of this block: from the first query of its
  // first key (always < seqlen_q) to the last of its last key; none (m_end <= m_begin: a key block
  // no query sees) leaves dK, dV zero and the epilogue still writes them.
  const Mask<MaskKind> mask(p);
  const int m_begin = max(0, mask.first_query(n0)) / kBlockM;
  const int m_end = ceil_div(min(p.seqlen_q, mask.end_query(n0 + keys - 1)), kBlockM);

  T acc_dk[Tr::kKeyRows][Tr::kDims];
  T acc_dv[Tr::kKeyRows][Tr::kDims];
  fill(acc_dk, T(0));
  fill(acc_dv, T(0));

  for (int g = 0; g < p.group; ++g) {
    const int head = kv_head * p.group + g;
    const int64 head_rows = (static_cast<int64>(batch) * p.heads_q + head) * p.seqlen_q;
    const T* q = static_cast<const T*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride;
    const T* dout =
        static_cast<const T*>(p.dout) + batch * p.do_batch_stride + head * p.do_head_stride;
    const T* lse =
        static_cast<const T*>(p.lse) + batch * p.lse_batch_stride + head * p.lse_head_stride;
    const T* delta = static_cast<const T*>(p.delta) + head_rows;
    const Score<ScoreKind, T> head_score = Score<ScoreKind, T>(p).for_head(p, batch, head);

    for (int m_tile = m_begin; m_tile < m_end; ++m_tile) {
      const int m0 = m_tile * kBlockM;
      const int rows = min(kBlockM, p.seqlen_q - m0);
      copy_tile<kBlockM, kHeadDim, Tr::kLdQKV, Tr::kThreads, kAligned>(
          sQ, q + m0 * p.q_row_stride, p.q_row_stride, rows, p.head_dim, tid, q_extent<T>(p));
      copy_tile<kBlockM, kHeadDim, Tr::kLdQKV, Tr::kThreads, kAligned>(
          sDo, dout + m0 * p.do_row_stride, p.do_row_stride, rows, p.head_dim, tid,
          dout_extent<T>(p));
      stage_lse_delta<Tr>(sLse, sDelta, lse, delta, m0, p.seqlen_q, tid, lse_extent<T>(p),
                          delta_extent<T>(p));
      copy_async_wait_all();
      __syncthreads();  // Q, dO, lse, delta (and K, V the first time) staged

      T prob[Tr::kRows][Tr::kKeys];
      T ds[Tr::kRows][Tr::kKeys];
      recompute_p_ds<Tr, MaskKind, ScoreKind>(prob, ds, sQ, sDo, sK, sV, sLse, sDelta, m0, n0,
                                              trow, tcol, batch, head, p);
#pragma unroll
      for (int i = 0; i < Tr::kRows; ++i) {
        const int r = trow + i * Tr::kRowThreads;
#pragma unroll
        for (int j = 0; j < Tr::kKeys; ++j) {
          const int n = tcol + j * Tr::kColThreads;
          head_score.record(ds[i][j], m0 + r, n0 + n);  // a bias's gradient (score.cuh's Mods)
          sPt[n * Tr::kLdT + r] = prob[i][j];
          sDst[n * Tr::kLdT + r] = ds[i][j];
          sDs[r * Tr::kLdS + n] = ds[i][j];
        }
      }
      __syncthreads();  // P^T, dS^T, dS staged

      // -- dv += p^T do, dk += ds^T q --
      gemm_nn<Tr::kKeyRows, Tr::kDimVecs, kBlockM, Tr::kRowThreads, Tr::kDimStep, Tr::kLdT,
              Tr::kLdQKV>(acc_dv, sPt + trow * Tr::kLdT, sDo + tcol * Tr::kVec);
      gemm_nn<Tr::kKeyRows, Tr::kDimVecs, kBlockM, Tr::kRowThreads, Tr::kDimStep, Tr::kLdT,
              Tr::kLdQKV>(acc_dk, sDst + trow * Tr::kLdT, sQ + tcol * Tr::kVec);

      // -- dq_accum += ds k (scaled in bwd_convert_dq) --
      if (!p.deterministic) {
        T acc_dq[Tr::kRows][Tr::kDims];
        fill(acc_dq, T(0));
        gemm_nn<Tr::kRows, Tr::kDimVecs, kBlockN, Tr::kRowThreads, Tr::kDimStep, Tr::kLdS,
                Tr::kLdQKV>(acc_dq, sDs + trow * Tr::kLdS, sK + tcol * Tr::kVec);
        T* dq_accum = static_cast<T*>(p.dq_accum) + head_rows * p.head_dim_rounded;
#pragma unroll
        for (int i = 0; i < Tr::kRows; ++i) {
          const int row = m0 + trow + i * Tr::kRowThreads;
          if (row < p.seqlen_q) {
            atomic_add_row<Tr::kDimVecs, Tr::kDimStep>(dq_accum + row * int64(p.head_dim_rounded),
                                                       acc_dq[i], tcol * Tr::kVec, p.head_dim,
                                                       dq_accum_extent<T>(p));
          }
        }
      }
      __syncthreads();  // every warp is done with Q, dO, P^T, dS^T, dS before the next step
    }
  }
  copy_async_wait_all();  // no copy may outlive the block (K, V when no query sees this block)

  // -- epilogue: dk = scale * dk, dv; rows past seqlen_k, columns past head_dim not stored --
  const T scale = T(p.scale);
  T* dk = static_cast<T*>(p.dk) + batch * p.dk_batch_stride + kv_head * p.dk_head_stride;
  T* dv = static_cast<T*>(p.dv) + batch * p.dv_batch_stride + kv_head * p.dv_head_stride;
#pragma unroll
  for (int i = 0; i < Tr::kKeyRows; ++i) {
    const int row = n0 + trow + i * Tr::kRowThreads;
    if (row < p.seqlen_k) {
#pragma unroll
      for (int d = 0; d < Tr::kDims; ++d) acc_dk[i][d] *= scale;
      store_row<Tr::kDimVecs, Tr::kDimStep, kAligned>(dk + row * p.dk_row_stride, acc_dk[i],
                                                        tcol * Tr::kVec, p.head_dim,
                                                        dk_extent<T>(p));
      store_row<Tr::kDimVecs, Tr::kDimStep, kAligned>(dv + row * p.dv_row_stride, acc_dv[i],
                                                        tcol * Tr::kVec, p.head_dim,
                                                        dv_extent<T>(p));
    }
  }
}

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, typename MaskKind,
          typename ScoreKind, bool kAligned>
__global__ void __launch_bounds__(
    kWarps * kWarpSize,  // a score modification needs more registers than the budget allows
    (ScoreKind::kModifies ? 1
                          : BwdSimtTraits<T, kHeadDim, kBlockM, kBlockN, kWarps>::kDqMinBlocksPerSm))
    bwd_dq_simt(const BwdParams p) {
  using Tr = BwdSimtTraits<T, kHeadDim, kBlockM, kBlockN, kWarps>;
  extern __shared__ float4 smem_vec[];
  check_dynamic_smem(Tr::kDqSmemBytes);
  T* const smem = reinterpret_cast<T*>(smem_vec);
  T* const sQ = smem + Tr::kOffQ;
  T* const sDo = smem + Tr::kOffDo;
  T* const sK = smem + Tr::kOffK;
  T* const sV = smem + Tr::kOffV;
  T* const sDs = smem + Tr::kOffDs;
  T* const sLse = smem + Tr::kOffLse;
  T* const sDelta = smem + Tr::kOffDelta;

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int tcol = lane % Tr::kColThreads;
  const int trow = tid / kWarpSize * Tr::kRowGroupsPerWarp + lane / Tr::kColThreads;

  const int batch = blockIdx.z;
  const int head = blockIdx.y;
  const int kv_head = head / p.group;
  const int m0 = blockIdx.x * kBlockM;
  const int rows = min(kBlockM, p.seqlen_q - m0);  // valid query rows in this block (>= 1)
  const int64 head_rows = (static_cast<int64>(batch) * p.heads_q + head) * p.seqlen_q;

  copy_tile<kBlockM, kHeadDim, Tr::kLdQKV, Tr::kThreads, kAligned>(
      sQ,
      static_cast<const T*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride +
          m0 * p.q_row_stride,
      p.q_row_stride, rows, p.head_dim, tid, q_extent<T>(p));
  copy_tile<kBlockM, kHeadDim, Tr::kLdQKV, Tr::kThreads, kAligned>(
      sDo,
      static_cast<const T*>(p.dout) + batch * p.do_batch_stride + head * p.do_head_stride +
          m0 * p.do_row_stride,
      p.do_row_stride, rows, p.head_dim, tid, dout_extent<T>(p));
  stage_lse_delta<Tr>(
      sLse, sDelta,
      static_cast<const T*>(p.lse) + batch * p.lse_batch_stride + head * p.lse_head_stride,
      static_cast<const T*>(p.delta) + head_rows, m0, p.seqlen_q, tid, lse_extent<T>(p),
      delta_extent<T>(p));

  const T* k = static_cast<const T*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + batch * p.v_batch_stride + kv_head * p.v_head_stride;
  // The key tiles [n_begin, n_end) some row of the block sees, as in the forward; none leaves
  // dq zero. No left edge: the walk starts at the constant 0, as before the mask kinds.
  const Mask<MaskKind> mask(p);
  const Span block_keys = mask.keys(m0, m0 + rows);
  const int n_begin = Mask<MaskKind>::kLeft ? block_keys.begin / kBlockN : 0;
  const int n_end = ceil_div(block_keys.end, kBlockN);

  T acc_dq[Tr::kRows][Tr::kDims];
  fill(acc_dq, T(0));
  for (int tile = n_begin; tile < n_end; ++tile) {  // fixed order: dq is bit-identical run to run
    const int n0 = tile * kBlockN;
    const int keys = min(kBlockN, p.seqlen_k - n0);
    copy_tile<kBlockN, kHeadDim, Tr::kLdQKV, Tr::kThreads, kAligned>(
        sK, k + n0 * p.k_row_stride, p.k_row_stride, keys, p.head_dim, tid, k_extent<T>(p));
    copy_tile<kBlockN, kHeadDim, Tr::kLdQKV, Tr::kThreads, kAligned>(
        sV, v + n0 * p.v_row_stride, p.v_row_stride, keys, p.head_dim, tid, v_extent<T>(p));
    copy_async_wait_all();
    __syncthreads();  // K, V (and Q, dO, lse, delta the first time) staged

    T prob[Tr::kRows][Tr::kKeys];
    T ds[Tr::kRows][Tr::kKeys];
    recompute_p_ds<Tr, MaskKind, ScoreKind>(prob, ds, sQ, sDo, sK, sV, sLse, sDelta, m0, n0,
                                            trow, tcol, batch, head, p);
#pragma unroll
    for (int i = 0; i < Tr::kRows; ++i) {
#pragma unroll
      for (int j = 0; j < Tr::kKeys; ++j) {
        sDs[(trow + i * Tr::kRowThreads) * Tr::kLdS + tcol + j * Tr::kColThreads] = ds[i][j];
      }
    }
    __syncthreads();  // dS staged

    // -- dq += ds k --
    gemm_nn<Tr::kRows, Tr::kDimVecs, kBlockN, Tr::kRowThreads, Tr::kDimStep, Tr::kLdS,
            Tr::kLdQKV>(acc_dq, sDs + trow * Tr::kLdS, sK + tcol * Tr::kVec);
    __syncthreads();  // every warp is done with K, V, dS before the next tile
  }
  copy_async_wait_all();  // no copy may outlive the block (Q, dO when no key is visible)

  const T scale = T(p.scale);
  T* dq = static_cast<T*>(p.dq) + batch * p.dq_batch_stride + head * p.dq_head_stride;
#pragma unroll
  for (int i = 0; i < Tr::kRows; ++i) {
    const int row = m0 + trow + i * Tr::kRowThreads;
    if (row < p.seqlen_q) {
#pragma unroll
      for (int d = 0; d < Tr::kDims; ++d) acc_dq[i][d] *= scale;
      store_row<Tr::kDimVecs, Tr::kDimStep, kAligned>(dq + row * p.dq_row_stride, acc_dq[i],
                                                        tcol * Tr::kVec, p.head_dim,
                                                        dq_extent<T>(p));
    }
  }
}

// ---- row-wise kernels: one warp per row, lanes across the head dim; grid (ceil(Sq / kBlockM),
// heads_q, batch). Memory-bound; generic in T (to_accum / from_accum) so every dtype can use them.

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, typename MaskKind,
          typename ScoreKind, bool kAligned>
__global__ void __launch_bounds__(kWarps * kWarpSize) bwd_preprocess(const BwdParams p) {
  using Accum = typename AccumOf<T>::type;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int batch = blockIdx.z;
  const int head = blockIdx.y;
  const int m0 = blockIdx.x * kBlockM;
  const int64 head_rows = (static_cast<int64>(batch) * p.heads_q + head) * p.seqlen_q;
  const T* dout =
      static_cast<const T*>(p.dout) + batch * p.do_batch_stride + head * p.do_head_stride;
  const T* out = static_cast<const T*>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride;
  Accum* delta = static_cast<Accum*>(p.delta) + head_rows;
  Accum* dq_accum = static_cast<Accum*>(p.dq_accum);  // null in deterministic mode

  for (int r = warp; r < kBlockM; r += kWarps) {
    const int row = m0 + r;
    if (row >= p.seqlen_q) break;  // warp-uniform
    const T* dout_row = dout + row * p.do_row_stride;
    const T* out_row = out + row * p.o_row_stride;
    Accum sum = 0;
    for (int d = lane; d < p.head_dim; d += kWarpSize) {
      CUFLASH_CHECK_ACCESS(dout_extent<T>(p), dout_row + d, sizeof(T));
      CUFLASH_CHECK_ACCESS(o_extent<T>(p), out_row + d, sizeof(T));
      sum = madd(to_accum(dout_row[d]), to_accum(out_row[d]), sum);
    }
    sum = group_sum<kWarpSize>(sum);
    if (lane == 0) {
      CUFLASH_CHECK_ACCESS(delta_extent<Accum>(p), delta + row, sizeof(Accum));
      delta[row] = sum;
    }
    if (dq_accum != nullptr) {
      Accum* dq_row = dq_accum + (head_rows + row) * p.head_dim_rounded;
      for (int d = lane; d < p.head_dim_rounded; d += kWarpSize) {
        CUFLASH_CHECK_ACCESS(dq_accum_extent<Accum>(p), dq_row + d, sizeof(Accum));
        dq_row[d] = Accum(0);
      }
    }
  }
}

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, typename MaskKind,
          typename ScoreKind, bool kAligned>
__global__ void __launch_bounds__(kWarps * kWarpSize) bwd_convert_dq(const BwdParams p) {
  using Accum = typename AccumOf<T>::type;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int batch = blockIdx.z;
  const int head = blockIdx.y;
  const int m0 = blockIdx.x * kBlockM;
  const int64 head_rows = (static_cast<int64>(batch) * p.heads_q + head) * p.seqlen_q;
  const Accum* dq_accum = static_cast<const Accum*>(p.dq_accum) + head_rows * p.head_dim_rounded;
  T* dq = static_cast<T*>(p.dq) + batch * p.dq_batch_stride + head * p.dq_head_stride;
  const Accum scale = Accum(p.scale);

  for (int r = warp; r < kBlockM; r += kWarps) {
    const int row = m0 + r;
    if (row >= p.seqlen_q) break;
    const Accum* src = dq_accum + row * int64(p.head_dim_rounded);
    T* dst = dq + row * p.dq_row_stride;
    for (int d = lane; d < p.head_dim; d += kWarpSize) {
      CUFLASH_CHECK_ACCESS(dq_accum_extent<Accum>(p), src + d, sizeof(Accum));
      CUFLASH_CHECK_ACCESS(dq_extent<T>(p), dst + d, sizeof(T));
      dst[d] = from_accum<T>(src[d] * scale);
    }
  }
}

}  // namespace cuflash
