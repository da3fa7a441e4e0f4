// Forward attention on tensor cores, sm_80 and newer: mma.sync m16n8k16 + ldmatrix + cp.async.
//
// One thread block computes kBlockM query rows of one (batch, head). Its warps split the rows
// (each warp owns kRowsPerWarp whole rows, so softmax statistics need only quad shuffles) and
// walk the key/value tiles they see from the last to the first: the tiles that need masking
// (ragged end, causal diagonal, window edges) come first and, with a window's left edge, last;
// the rest run unmasked. Loads overlap compute FlashAttention-2 style: V(j) streams in while
// S = Q K(j)^T is computed, K(j-1) while O += P V(j) is.
// The fp32 accumulator of S, packed pairwise to 16 bits, is already the A fragment of P V.
#include "../core/common.cuh"
#include "load_tile_sm80.cuh"
#include "../attention/mask.cuh"
#include "mma_sm80.cuh"
#include "../attention/nonfinite.cuh"
#include "../attention/score.cuh"
#include "../attention/softmax.cuh"

namespace cuflash {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_> struct FwdSm80Traits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * kWarpSize;

  static constexpr int kRowsPerWarp = kBlockM / kWarps;
  static constexpr int kMTiles = kRowsPerWarp / 16;  // m16 tiles per warp
  static constexpr int kNTiles = kBlockN / 8;         // n8 tiles of S per m16 tile
  static constexpr int kDTiles = kHeadDim / 8;        // n8 tiles of O per m16 tile
  static constexpr int kQKSteps = kHeadDim / 16;      // k16 steps of Q K^T
  static constexpr int kPVSteps = kBlockN / 16;       // k16 steps of P V

  typedef SwizzledTile<kBlockM, kHeadDim> QTile;
  typedef SwizzledTile<kBlockN, kHeadDim> KVTile;
  static constexpr int kQOffset = 0;
  static constexpr int kKOffset = QTile::kBytes;
  static constexpr int kVOffset = kKOffset + KVTile::kBytes;
  static constexpr int kSmemBytes = kVOffset + KVTile::kBytes;  // == _launch.fwd_spec's formula

  static_assert(kRowsPerWarp % 16 == 0, "each warp owns whole m16 tiles");
  static_assert(kNTiles % 2 == 0 && kDTiles % 2 == 0, "ldmatrix.x4 loads n8 tiles in pairs");
};

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, typename MaskKind,
          typename ScoreKind, bool kAligned>
__global__ void __launch_bounds__(kWarps * kWarpSize)
fwd_sm80(const __grid_constant__ FwdParams p) {
  typedef FwdSm80Traits<kHeadDim, kBlockM, kBlockN, kWarps> Tr;
  typedef typename Tr::QTile QTile;
  typedef typename Tr::KVTile KVTile;
  constexpr int kMTiles = Tr::kMTiles, kNTiles = Tr::kNTiles, kDTiles = Tr::kDTiles;
  extern __shared__ __align__(128) char smem[];

  // With a right edge and no left edge (causal) high m_block sees the most keys: longest first.
  const int m_block =
      Mask<MaskKind>::kRight && !Mask<MaskKind>::kLeft ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int kv_head = head / p.group;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;

  // The key tiles [n_begin, n_end) some row of the block sees; none leaves output 0, lse -inf.
  // Without a left edge the walk ends at the constant 0, and n_end is keys_end(): dense and
  // causal code stays as it was before the mask kinds.
  const Mask<MaskKind> mask(p);
  const Score<ScoreKind, T> score = Score<ScoreKind, T>(p).for_head(p, batch, head);
  const int row0 = m_block * kBlockM;
  int n_begin = Mask<MaskKind>::kLeft ? mask.keys(row0, row0 + kBlockM).begin / kBlockN : 0;
  int n_end = ceil_div(mask.keys_end(row0 + kBlockM), kBlockN);
  if constexpr (ScoreKind::kBlockMap) {  // a user mask_mod's block map narrows them
    const Span tiles = score.template key_tiles<kBlockN>({n_begin, n_end}, row0, row0 + kBlockM);
    n_begin = tiles.begin;
    n_end = tiles.end;
  }

  const T* q = static_cast<const T*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + batch * p.v_batch_stride + kv_head * p.v_head_stride;
  T* o = static_cast<T*>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride;

  float acc_o[kMTiles][kDTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
  OnlineSoftmax<kMTiles> softmax;
  softmax.init();

  const uint32 q_base = smem_addr(smem + Tr::kQOffset);
  const uint32 k_base = smem_addr(smem + Tr::kKOffset);
  const uint32 v_base = smem_addr(smem + Tr::kVOffset);
  const int warp_row0 = warp * Tr::kRowsPerWarp;
  // ldmatrix sources (see SwizzledTile::Reader): Q as A fragments (rows lane % 16, chunk bit
  // lane / 16), K as B fragments of two n8 tiles (rows lane % 8 + 8 * (lane / 16), chunk bit
  // (lane / 8) % 2), V transposed (keys lane % 8 + 8 * ((lane / 8) % 2), chunk bit lane / 16).
  const typename QTile::Reader q_frag(q_base, warp_row0 + (lane & 15), lane / 16);
  const typename KVTile::Reader k_frag(k_base, (lane & 7) + (lane / 16) * 8, (lane / 8) % 2);
  const typename KVTile::Reader v_frag(v_base, (lane & 7) + ((lane / 8) % 2) * 8, lane / 16);

  if (n_begin < n_end) {
    load_tile<QTile, Tr::kThreads, kAligned>(q_base, q, p.q_row_stride, row0, p.seqlen_q,
                                             p.head_dim, q_extent<T>(p));
    load_tile<KVTile, Tr::kThreads, kAligned>(k_base, k, p.k_row_stride, (n_end - 1) * kBlockN,
                                              p.seqlen_k, p.head_dim, k_extent<T>(p));
    cp_async_commit();
  }

  for (int n_block = n_end - 1; n_block >= n_begin; --n_block) {
    const int col0 = n_block * kBlockN;
    cp_async_wait<0>();
    __syncthreads();  // K(n_block) landed; every warp is done with V(n_block + 1)
    load_tile<KVTile, Tr::kThreads, kAligned>(v_base, v, p.v_row_stride, col0, p.seqlen_k,
                                              p.head_dim, v_extent<T>(p));
    cp_async_commit();

    // -- S = Q K^T --
    float s[kMTiles][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < Tr::kQKSteps; ++ks) {
      uint32 a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        ldmatrix_x4(a[mt], q_frag(mt * 16, 2 * ks));
      }
#pragma unroll
      for (int nt = 0; nt < kNTiles; nt += 2) {
        uint32 b[4];
        ldmatrix_x4(b, k_frag(nt * 8, 2 * ks));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          Mma16816<T>::run(s[mt][nt], a[mt], b[0], b[1]);
          Mma16816<T>::run(s[mt][nt + 1], a[mt], b[2], b[3]);
        }
      }
    }

    // -- the score modification (score.cuh), then mask the keys a row does not see, on the
    // tiles the ragged end or the mask's edges cut --
    if constexpr (ScoreKind::kModifies) {
      // a tile whose rows see all its keys by the block map: no mask_mod per element
      Score<ScoreKind, T> tile_score = score;
      if constexpr (ScoreKind::kBlockMap) {
        tile_score = score.on_tile(row0 + warp_row0, row0 + warp_row0 + Tr::kRowsPerWarp, col0,
                                   col0 + kBlockN);
      }
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            // the mma's C fragment: rows g and g + 8 of the m16 tile, columns 2t and 2t + 1
            s[mt][nt][e] = tile_score(s[mt][nt][e], row0 + warp_row0 + mt * 16 + (e / 2) * 8 + g,
                                      col0 + nt * 8 + 2 * t + e % 2);
          }
    }
    if (col0 + kBlockN > p.seqlen_k || mask.cuts(row0, row0 + kBlockM, col0, col0 + kBlockN)) {
#pragma unroll
      for (int r = 0; r < 2 * kMTiles; ++r) {
        // The row's keys [first, end), relative to this thread's first column of the tile.
        const int row = row0 + warp_row0 + (r / 2) * 16 + (r % 2) * 8 + g;
        const Span seen = mask.row_keys(row);
        const int first = seen.begin - col0 - 2 * t;
        const int end = seen.end - col0 - 2 * t;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int c = nt * 8 + e;
            if (c >= end || (Mask<MaskKind>::kLeft && c < first)) {
              s[r / 2][nt][2 * (r % 2) + e] = neg_inf();
            }
          }
        }
      }
    }

    // -- online softmax: P = exp(scale * (S - m)), rescale what O holds so far --
    float alpha[2 * kMTiles];
    softmax.update(s, p.scale_log2, alpha);
    softmax.rescale(acc_o, alpha);

    cp_async_wait<0>();
    __syncthreads();  // V(n_block) landed; every warp is done reading K(n_block)
    if (n_block > n_begin) {
      load_tile<KVTile, Tr::kThreads, kAligned>(k_base, k, p.k_row_stride, col0 - kBlockN,
                                                p.seqlen_k, p.head_dim, k_extent<T>(p));
    }
    cp_async_commit();

    // -- O += P V, P straight from the S accumulators --
#pragma unroll
    for (int ks = 0; ks < Tr::kPVSteps; ++ks) {
      uint32 a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        a[mt][0] = pack2<T>(s[mt][2 * ks][0], s[mt][2 * ks][1]);
        a[mt][1] = pack2<T>(s[mt][2 * ks][2], s[mt][2 * ks][3]);
        a[mt][2] = pack2<T>(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1]);
        a[mt][3] = pack2<T>(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3]);
      }
#pragma unroll
      for (int dt = 0; dt < kDTiles; dt += 2) {
        uint32 b[4];
        ldmatrix_x4_trans(b, v_frag(ks * 16, dt));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          Mma16816<T>::run(acc_o[mt][dt], a[mt], b[0], b[1]);
          Mma16816<T>::run(acc_o[mt][dt + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }

  // -- epilogue: O / l, lse; rows >= seqlen_q and columns >= head_dim are not stored --
  float lse[2 * kMTiles];
  softmax.finalize(acc_o, static_cast<float>(p.scale), lse, sink_at<float>(p, head));
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + warp_row0 + mt * 16 + g + half * 8;
      T* o_row = o + row * p.o_row_stride;
      if (kAligned) {  // 8-byte, sector-filling stores (every lane takes part)
        store_row_sectors<T, kDTiles>(o_row, 0, p.head_dim, t, row < p.seqlen_q, o_extent<T>(p),
                                      [&](int dt, int e) { return acc_o[mt][dt][2 * half + e]; });
      }
      if (row >= p.seqlen_q) continue;
      if (!kAligned) {
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          const int col = dt * 8 + 2 * t;
          if (col < p.head_dim) {
            CUFLASH_CHECK_ACCESS(o_extent<T>(p), o_row + col, sizeof(T));
            o_row[col] = from_float<T>(acc_o[mt][dt][2 * half]);
          }
          if (col + 1 < p.head_dim) {
            CUFLASH_CHECK_ACCESS(o_extent<T>(p), o_row + col + 1, sizeof(T));
            o_row[col + 1] = from_float<T>(acc_o[mt][dt][2 * half + 1]);
          }
        }
      }
      if (p.lse != nullptr && t == 0) {
        float* lse_out = static_cast<float*>(p.lse);
        const int64 at = batch * p.lse_batch_stride + head * p.lse_head_stride + row;
        CUFLASH_CHECK_ACCESS(lse_extent<float>(p), lse_out + at, 4);
        lse_out[at] = lse[2 * mt + half];
      }
    }
  }

  // -- a NaN or inf of v that a mask hid, multiplied in by P V: repaired (nonfinite.cuh) --
  if constexpr (Mask<MaskKind>::kMasks || ScoreKind::kHides) {
    NonFinite nonfinite;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) nonfinite.see(acc_o[mt][dt][e], e);
    if (__syncthreads_or(nonfinite.any())) {  // the block's stores are visible after it
      const Span walked = {n_begin * kBlockN, min(p.seqlen_k, n_end * kBlockN)};
#pragma unroll 1
      for (int r = row0 + warp; r < min(row0 + kBlockM, p.seqlen_q); r += kWarps) {
        repair_row<T, kHeadDim>(p, mask, score, batch, head, r, walked, lane,
                                sink_at<float>(p, head));
      }
    }
  }
}

}  // namespace cuflash
