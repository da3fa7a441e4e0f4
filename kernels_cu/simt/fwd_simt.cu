// Attention forward for fp32 and fp64 on CUDA cores (no tensor cores, no tf32): real fp32 / fp64
// accuracy, FlashAttention-2's loop with SIMT-GEMM register tiling. See NOTES_simt.md.
//
// One block owns kBlockM query rows of one (batch, head) and walks the key tiles:
//   S = Q K^T (registers) -> score modification -> mask -> online softmax -> P (shared)
//   -> O += P V (registers).
// cp.async streams V under S = Q K^T and the next K under O += P V.
#include "../core/common.cuh"
#include "../attention/mask.cuh"
#include "../attention/nonfinite.cuh"
#include "../attention/score.cuh"
#include "simt_common.cuh"
#include "simt_softmax.cuh"

namespace cuflash {

template <typename T, int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_> struct FwdSimtTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per block
  static constexpr int kBlockN = kBlockN_;  // keys per tile
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kVec = Pack<T>::kSize;  // elements per 16-byte vector

  // Thread layout: 8 consecutive lanes ("columns") share a row group and a warp holds 4 row groups,
  // so a row's max and sum take 3 shuffles and the P rows a warp writes are the rows it reads back.
  // Thread (row, col) owns query rows row + i * kRowThreads, keys col + j * kColThreads of S and
  // output vectors at (col + c * kColThreads) * kVec of O.
  static constexpr int kColThreads = 8;
  static constexpr int kRowThreads = kThreads / kColThreads;
  static constexpr int kRowGroupsPerWarp = kWarpSize / kColThreads;
  static constexpr int kRows = kBlockM / kRowThreads;  // query rows per thread
  static constexpr int kKeys = kBlockN / kColThreads;  // S columns per thread
  static constexpr int kDimVecs = kHeadDim / (kVec * kColThreads);  // O vectors per row per thread
  static constexpr int kDims = kDimVecs * kVec;
  static constexpr int kDimStep = kVec * kColThreads;  // distance between a thread's O vectors

  // Shared memory, in elements. Q/K/V rows are padded by one vector (16 B): the 8 different rows a
  // warp reads at once then start in 8 different 4-bank groups, so 16-byte reads are conflict-free.
  // P rows are padded by 8 elements so the 4 rows a warp writes at once land in different banks.
  static constexpr int kLdQKV = kHeadDim + kVec;
  static constexpr int kLdP = kBlockN + kColThreads;
  static constexpr int kOffQ = 0;
  static constexpr int kOffK = kOffQ + kBlockM * kLdQKV;
  static constexpr int kOffV = kOffK + kBlockN * kLdQKV;
  static constexpr int kOffP = kOffV + kBlockN * kLdQKV;
  static constexpr int kSmemElems = kOffP + kBlockM * kLdP;
  static constexpr int kSmemBytes = kSmemElems * sizeof(T);  // mirrored in cuflash/_launch.py

  // Blocks per SM that this shared memory allows on an H100 (228 KB per SM, 1 KB reserved per
  // block), at most 3: __launch_bounds__ then gives ptxas the matching register budget (3 blocks of
  // 128 threads: <= 168 registers). Without it ptxas picks a budget of its own, sometimes spilling.
  static constexpr int kMinBlocksPerSm = min_int(3, max_int(1, (228 * 1024) / (kSmemBytes + 1024)));

  static_assert(kThreads % kWarpSize == 0 && kRowThreads * kColThreads == kThreads, "layout");
  static_assert(kBlockM % kRowThreads == 0, "kBlockM must be a multiple of the row threads");
  static_assert(kBlockN % kColThreads == 0, "kBlockN must be a multiple of 8");
  static_assert(kHeadDim % kDimStep == 0, "kHeadDim must be a multiple of 8 vectors");
  static_assert((kLdQKV / kVec) % 2 == 1, "Q/K/V row pitch must be an odd number of vectors");
};

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, typename MaskKind,
          typename ScoreKind, bool kAligned>
__global__ void __launch_bounds__(
    kWarps * kWarpSize, (FwdSimtTraits<T, kHeadDim, kBlockM, kBlockN, kWarps>::kMinBlocksPerSm))
    fwd_simt(const FwdParams p) {
  using Tr = FwdSimtTraits<T, kHeadDim, kBlockM, kBlockN, kWarps>;
  using Units = ScoreUnits<T>;
  extern __shared__ float4 smem_vec[];  // float4: 16-byte alignment for the Pack loads
  check_dynamic_smem(Tr::kSmemBytes);
  T* const smem = reinterpret_cast<T*>(smem_vec);
  T* const sQ = smem + Tr::kOffQ;
  T* const sK = smem + Tr::kOffK;
  T* const sV = smem + Tr::kOffV;
  T* const sP = smem + Tr::kOffP;

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int tcol = lane % Tr::kColThreads;
  const int trow = tid / kWarpSize * Tr::kRowGroupsPerWarp + lane / Tr::kColThreads;

  const int batch = blockIdx.z;
  const int head = blockIdx.y;
  const int kv_head = head / p.group;
  const int row0 = blockIdx.x * kBlockM;
  const int rows = min(kBlockM, p.seqlen_q - row0);  // valid query rows in this block (>= 1)

  const T* q = static_cast<const T*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride +
               row0 * p.q_row_stride;
  const T* k = static_cast<const T*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + batch * p.v_batch_stride + kv_head * p.v_head_stride;

  // Only the key tiles [n_begin, n_end) that some row of the block sees are loaded; none (every
  // row sees nothing, or seqlen_k == 0) skips the loop and leaves output 0, lse -inf. No left
  // edge: the walk starts at the constant 0, as before the mask kinds.
  const Mask<MaskKind> mask(p);
  const Score<ScoreKind, T> score = Score<ScoreKind, T>(p).for_head(p, batch, head);
  const Span block_keys = mask.keys(row0, row0 + rows);
  const int n_begin = Mask<MaskKind>::kLeft ? block_keys.begin / kBlockN : 0;
  const int n_end = ceil_div(block_keys.end, kBlockN);

  // -- prologue: Q and the first K tile --
  copy_tile<kBlockM, kHeadDim, Tr::kLdQKV, Tr::kThreads, kAligned>(sQ, q, p.q_row_stride, rows,
                                                                  p.head_dim, tid, q_extent<T>(p));
  if (n_begin < n_end) {
    const int first = n_begin * kBlockN;
    copy_tile<kBlockN, kHeadDim, Tr::kLdQKV, Tr::kThreads, kAligned>(
        sK, k + first * p.k_row_stride, p.k_row_stride, min(kBlockN, p.seqlen_k - first),
        p.head_dim, tid, k_extent<T>(p));
  }

  T acc_o[Tr::kRows][Tr::kDims];
  fill(acc_o, T(0));
  OnlineSoftmax<T, Tr::kRows, Tr::kKeys, Tr::kColThreads> softmax;
  softmax.init();
  const T scale = Units::scale(p);

  for (int tile = n_begin; tile < n_end; ++tile) {
    const int n0 = tile * kBlockN;
    const int keys = min(kBlockN, p.seqlen_k - n0);
    copy_async_wait_all();
    __syncthreads();  // K(tile) landed; every warp is done with V(tile - 1) and P(tile - 1)
    copy_tile<kBlockN, kHeadDim, Tr::kLdQKV, Tr::kThreads, kAligned>(
        sV, v + n0 * p.v_row_stride, p.v_row_stride, keys, p.head_dim, tid, v_extent<T>(p));

    // -- compute qk --
    T s[Tr::kRows][Tr::kKeys];
    fill(s, T(0));
    gemm_nt<Tr::kRows, Tr::kKeys, kHeadDim, Tr::kRowThreads, Tr::kColThreads, Tr::kLdQKV,
            Tr::kLdQKV>(s, sQ + trow * Tr::kLdQKV, sK + tcol * Tr::kLdQKV);

    // -- modify (score.cuh), scale and mask the keys a row does not see (keys past seqlen_k,
    // zero-filled rows of K, among them), on the tiles the mask's edges or the ragged end cut --
    const bool partial = keys < kBlockN || mask.cuts(row0, row0 + rows, n0, n0 + kBlockN);
    if constexpr (ScoreKind::kModifies) {
#pragma unroll
      for (int i = 0; i < Tr::kRows; ++i)
#pragma unroll
        for (int j = 0; j < Tr::kKeys; ++j) {
          s[i][j] =
              score(s[i][j], row0 + trow + i * Tr::kRowThreads, n0 + tcol + j * Tr::kColThreads);
        }
    }
#pragma unroll
    for (int i = 0; i < Tr::kRows; ++i) {
      const int row = row0 + trow + i * Tr::kRowThreads;
#pragma unroll
      for (int j = 0; j < Tr::kKeys; ++j) {
        const int key = n0 + tcol + j * Tr::kColThreads;
        s[i][j] *= scale;
        if (partial && (key >= p.seqlen_k || mask.band_hides(row, key))) s[i][j] = -infinity<T>();
      }
    }

    // -- online softmax: p = exp(s - m_new), rescale acc by exp(m_old - m_new) --
    T alpha[Tr::kRows];
    softmax.online_softmax(s, alpha);
    softmax.rescale_o(acc_o, alpha);
#pragma unroll
    for (int i = 0; i < Tr::kRows; ++i) {
#pragma unroll
      for (int j = 0; j < Tr::kKeys; ++j) {
        sP[(trow + i * Tr::kRowThreads) * Tr::kLdP + tcol + j * Tr::kColThreads] = s[i][j];
      }
    }

    copy_async_wait_all();
    __syncthreads();  // V(tile) and P landed; every warp is done with K(tile)
    if (tile + 1 < n_end) {
      const int next = n0 + kBlockN;
      copy_tile<kBlockN, kHeadDim, Tr::kLdQKV, Tr::kThreads, kAligned>(
          sK, k + next * p.k_row_stride, p.k_row_stride, min(kBlockN, p.seqlen_k - next),
          p.head_dim, tid, k_extent<T>(p));
    }

    // -- acc += p v --
    gemm_nn<Tr::kRows, Tr::kDimVecs, kBlockN, Tr::kRowThreads, Tr::kDimStep, Tr::kLdP,
            Tr::kLdQKV>(acc_o, sP + trow * Tr::kLdP, sV + tcol * Tr::kVec);
  }

  copy_async_wait_all();  // no copy may outlive the block (Q when no key is visible)

  // -- epilogue: o = acc / l, lse = m + log(l) --
  T lse[Tr::kRows];
  softmax.finalize(acc_o, lse, sink_at<T>(p, head));
  T* o = static_cast<T*>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride;
  T* lse_out = p.lse == nullptr || tcol != 0
                   ? nullptr
                   : static_cast<T*>(p.lse) + batch * p.lse_batch_stride + head * p.lse_head_stride;
#pragma unroll
  for (int i = 0; i < Tr::kRows; ++i) {
    const int row = row0 + trow + i * Tr::kRowThreads;
    if (row < p.seqlen_q) {
      store_row<Tr::kDimVecs, Tr::kDimStep, kAligned>(o + row * p.o_row_stride, acc_o[i],
                                                        tcol * Tr::kVec, p.head_dim,
                                                        o_extent<T>(p));
      if (lse_out != nullptr) {
        CUFLASH_CHECK_ACCESS(lse_extent<T>(p), lse_out + row, sizeof(T));
        lse_out[row] = lse[i];
      }
    }
  }

  // -- a NaN or inf of v that a mask hid, multiplied in by P V: repaired (nonfinite.cuh) --
  if constexpr (Mask<MaskKind>::kMasks || ScoreKind::kHides) {
    NonFinite nonfinite;
#pragma unroll
    for (int i = 0; i < Tr::kRows; ++i)
#pragma unroll
      for (int d = 0; d < Tr::kDims; ++d) nonfinite.see(acc_o[i][d], d);
    if (__syncthreads_or(nonfinite.any())) {  // the block's stores are visible after it
      // (all from p and the block index again: nothing more lives through the loop)
      const Mask<MaskKind> m(p);
      const Score<ScoreKind, T> modified =
          Score<ScoreKind, T>(p).for_head(p, blockIdx.z, blockIdx.y);
      const int first = blockIdx.x * kBlockM, last = min(first + kBlockM, p.seqlen_q);
      const Span keys = m.keys(first, first + kBlockM);
      const Span walked = {Mask<MaskKind>::kLeft ? keys.begin / kBlockN * kBlockN : 0,
                           min(p.seqlen_k, ceil_div(keys.end, kBlockN) * kBlockN)};
#pragma unroll 1
      for (int r = first + threadIdx.x / kWarpSize; r < last; r += kWarps) {
        repair_row<T, kHeadDim>(p, m, modified, blockIdx.z, blockIdx.y, r, walked,
                                threadIdx.x % kWarpSize, sink_at<T>(p, blockIdx.y));
      }
    }
  }
}

}  // namespace cuflash
