// Attention backward on tensor cores for fp16/bf16, sm_80 and newer: FlashAttention-2's algorithm
// on mma.sync m16n8k16 + ldmatrix + cp.async (the building blocks of fwd_sm80.cu). See
// NOTES_bwd_sm80.md for the design, the register report and the performance model.
//
//   bwd_preprocess_sm80  delta = rowsum(dout * out) in fp32; zeroes the dq_accum rows.
//   bwd_dkdv_sm80        one block per (key tile, kv head, batch) walks the group's query heads and
//                        their query tiles: S^T = K Q^T, P^T = exp(scale S^T - lse), dP^T = V dO^T,
//                        dS^T = P^T * (dP^T - delta), dV += P^T dO, dK += dS^T Q (registers),
//                        dq_accum += dS K (fp32 atomics; skipped when p.deterministic). The
//                        softmax scale rides on dS, so dK and dQ come out scaled.
//   bwd_dq_sm80          deterministic mode: one block per (query tile, head, batch) walks the key
//                        tiles in order and writes dq = sum dS K itself, no atomics.
//   bwd_convert_dq_sm80  dq = dq_accum in the storage type.
// All kernels take the same template parameters so one KernelSpec names any of them; the row-wise
// kernels ignore kBlockN, MaskKind and ScoreKind (rendered as NoMask, NoScore). With a score
// modification (score.cuh) S is modified before P is recomputed and dS is multiplied by its slope.
#include "../core/common.cuh"
#include "load_tile_sm80.cuh"
#include "../attention/mask.cuh"
#include "mma_sm80.cuh"
#include "../attention/score.cuh"
#include "bwd_tiles_sm80.cuh"
#include "bwd_rows_sm80.cuh"

namespace cuflash {

// ---- dK, dV (and atomic dQ) ---------------------------------------------------------------------

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_> struct BwdDkdvSm80Traits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per step of the main loop
  static constexpr int kBlockN = kBlockN_;  // keys per thread block (its dK, dV rows)
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * kWarpSize;

  // Warp layout. S^T = K Q^T is computed transposed (rows keys, columns queries) so that its fp32
  // accumulator, packed pairwise, is already the A operand of dV += P^T dO and dK += dS^T Q,
  // exactly as P feeds O += P V in the forward. Writing P and dS to shared memory and reading them
  // back with ldmatrix.trans (FA2's way) would cost two tile stores, their reads and a barrier per
  // step; the price here is that lse and delta, per query, run along the accumulator columns (two
  // float2 reads from shared memory per n8 tile).
  // Warps split S^T into kWarpsN key slices x kWarpsX query slices, and dK, dV into the same key
  // slices x kWarpsX head-dim slices. kWarpsX == 1 (head dim <= 128): a warp owns whole S^T rows
  // and everything above stays in registers. At head dim 256 one warp's dK + dV rows would need
  // 16 x 256 x 2 / 32 = 256 registers, so two warps share each key slice (one per half of D) and
  // P^T, dS^T go through shared memory to reach the other half's warp.
  static constexpr int kWarpsX = kHeadDim <= 128 ? 1 : 2;
  static constexpr bool kPInRegs = kWarpsX == 1;
  static constexpr int kWarpsN = kWarps / kWarpsX;
  static constexpr int kWarpKeys = kBlockN / kWarpsN;
  static constexpr int kKeyTiles = kWarpKeys / 16;        // m16 tiles of S^T, dK, dV per warp
  static constexpr int kWarpQueries = kBlockM / kWarpsX;  // S^T columns per warp and step
  static constexpr int kWarpDims = kHeadDim / kWarpsX;
  static constexpr int kDTiles = kWarpDims / 8;           // n8 tiles of dK, dV per warp
  static constexpr int kQKSteps = kHeadDim / 16;          // k16 steps of S^T and dP^T
  static constexpr int kMSteps = kBlockM / 16;            // k16 steps of dV, dK (a step's queries)
  static constexpr int kAccRegs = 2 * kKeyTiles * kDTiles * 4;  // dK + dV, per thread

  // A warp computes its S^T and dP^T columns kSubQueries at a time, kSubQTiles n8 tiles each: the
  // two fp32 tiles cost kSubQueries * kKeyTiles registers beside the kAccRegs of dK and dV. At
  // D = 128 (128 accumulator registers) 64 columns at once came out of ptxas at 255 registers with
  // spills; 32 leave room. Sub-tiles reload only this warp's K and V rows (A operands).
  static constexpr int kSubQueries = cmin(kWarpQueries, kAccRegs > 64 ? 32 : 64);
  static constexpr int kSubTiles = kWarpQueries / kSubQueries;
  static constexpr int kSubQTiles = kSubQueries / 8;      // n8 tiles of S^T per sub-tile
  static constexpr int kSubSteps = kSubQueries / 16;      // k16 steps of dV, dK per sub-tile

  // dQ = dS K (kBlockM x kHeadDim): kDqWarpsM x kDqWarpsD warps, each 32 rows (two m16 tiles) by
  // its head-dim slice, walked in chunks of 32 columns: 32 accumulator registers beside dK, dV, and
  // 2 + 2 ldmatrix per k16 step for 8 mma (16 rows x 64 columns would take 1 + 4).
  static constexpr int kDqWarpsM = cmin(kWarps, kBlockM / 32);
  static constexpr int kDqWarpsD = kWarps / kDqWarpsM;
  static constexpr int kDqMTiles = kBlockM / (16 * kDqWarpsM);
  static constexpr int kDqWarpDims = kHeadDim / kDqWarpsD;
  static constexpr int kDqChunkDims = cmin(32, kDqWarpDims);
  static constexpr int kDqChunks = kDqWarpDims / kDqChunkDims;
  static constexpr int kDqChunkTiles = kDqChunkDims / 8;  // n8 tiles of dQ per chunk
  static constexpr int kNSteps = kBlockN / 16;            // k16 steps of dQ (keys)

  // Shared memory. K, V stay for the whole block; Q, dO are double-buffered (cp.async of step i+1
  // overlaps step i) where that fits kSm80SmemBudget; dS^T (and P^T when kWarpsX > 1) is stored
  // [key][query]; lse (log2 units) and delta per query row, always double-buffered (tiny).
  typedef PaddedTile<kBlockM, kHeadDim> QTile;   // Q, dO: [query][d]
  typedef PaddedTile<kBlockN, kHeadDim> KVTile;  // K, V: [key][d]
  typedef PaddedTile<kBlockN, kBlockM> DsTile;   // dS^T, P^T: [key][query]
  static constexpr int kStatBytes = 2 * kBlockM * 4;  // lse or delta: 2 buffers of kBlockM floats
  static constexpr int kFixedBytes =
      2 * KVTile::kBytes + (kPInRegs ? 1 : 2) * DsTile::kBytes + 2 * kStatBytes;
  // Q, dO double-buffered where that fits A100's 163 KB, unless single buffering is what lets the
  // tile fit the 99 KB of the small-shared-memory GPUs.
  static constexpr int kOneStageBytes = kFixedBytes + 2 * QTile::kBytes;
  static constexpr int kTwoStageBytes = kFixedBytes + 4 * QTile::kBytes;
  static constexpr bool kSingleToFitSmall =
      kOneStageBytes <= kSmallSmemBudget && kTwoStageBytes > kSmallSmemBudget;
  static constexpr int kStages = kTwoStageBytes <= kSm80SmemBudget && !kSingleToFitSmall ? 2 : 1;
  static constexpr int kKOffset = 0;
  static constexpr int kVOffset = kKOffset + KVTile::kBytes;
  static constexpr int kQOffset = kVOffset + KVTile::kBytes;   // stage s at + s * QTile::kBytes
  static constexpr int kDoOffset = kQOffset + kStages * QTile::kBytes;
  static constexpr int kDsOffset = kDoOffset + kStages * QTile::kBytes;
  static constexpr int kPtOffset = kDsOffset + DsTile::kBytes;  // only when !kPInRegs
  static constexpr int kLseOffset = kPtOffset + (kPInRegs ? 0 : DsTile::kBytes);
  static constexpr int kDeltaOffset = kLseOffset + kStatBytes;
  // Mirrored in cuflash/_launch_bwd.py (see NOTES_bwd_sm80.md for the formula).
  static constexpr int kSmemBytes = kDeltaOffset + kStatBytes;

  static_assert(kWarps % kWarpsX == 0 && kBlockN % (16 * kWarpsN) == 0, "whole m16 key tiles");
  static_assert(kWarpQueries % kSubQueries == 0 && kSubQTiles % 2 == 0 && kDTiles % 2 == 0 &&
                kDqChunkTiles % 2 == 0, "ldmatrix.x4 loads n8 tiles in pairs");
  static_assert(kWarps % kDqWarpsM == 0 && kBlockM % (32 * kDqWarpsM) == 0 &&
                kHeadDim % (kDqWarpsD * kDqChunkDims) == 0, "dQ warp layout");
  static_assert(kBlockM <= kThreads, "one thread stages each query row's lse and delta");
  static_assert(load_tile_exact<QTile, kThreads>() && load_tile_exact<KVTile, kThreads>(),
                "load_tile covers whole tiles");
  static_assert(kSmemBytes <= kSm80SmemBudget, "tile does not fit sm_80 shared memory");
};

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, typename MaskKind,
          typename ScoreKind, bool kAligned>
__global__ void __launch_bounds__(kWarps * kWarpSize, 1)
bwd_dkdv_sm80(const __grid_constant__ BwdParams p) {
  typedef BwdDkdvSm80Traits<kHeadDim, kBlockM, kBlockN, kWarps> Tr;
  typedef typename Tr::QTile QTile;
  typedef typename Tr::KVTile KVTile;
  typedef typename Tr::DsTile DsTile;
  constexpr int kKeyTiles = Tr::kKeyTiles, kDTiles = Tr::kDTiles, kSubQTiles = Tr::kSubQTiles;
  extern __shared__ __align__(128) char smem[];

  // With a right edge and no left edge (causal) low key blocks see the most queries and run first.
  const int n_block = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int batch = blockIdx.z;
  const int tid = threadIdx.x;
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int n0 = n_block * kBlockN;

  // The query tiles [m_begin, m_end) that see some key of the block: bands move right with the
  // row, so the first sees key n0 and the last the block's last key. None (a key block no query
  // sees) leaves dK, dV zero, and the epilogue still writes them.
  const Mask<MaskKind> mask(p);
  const Score<ScoreKind, T> score(p);
  const int m_tiles = ceil_div(p.seqlen_q, kBlockM);
  int m_begin =
      Mask<MaskKind>::kRight ? min(m_tiles, max(0, mask.first_query(n0)) / kBlockM) : 0;
  int m_end =
      Mask<MaskKind>::kLeft
          ? max(m_begin, min(m_tiles, ceil_div(mask.end_query(min(n0 + kBlockN, p.seqlen_k) - 1),
                                               kBlockM)))
          : m_tiles;
  if constexpr (ScoreKind::kBlockMap) {  // a user mask_mod's block map narrows them
    narrow_by_map<kBlockM>(p, batch, kv_head, n0, min(n0 + kBlockN, p.seqlen_k), m_begin,
                           m_end);
  }
  const int n_steps = p.group * (m_end - m_begin);  // (query head, query tile) pairs
  const bool ragged_keys = n0 + kBlockN > p.seqlen_k;

  // Warp roles (see the traits).
  const int warp_n = warp % Tr::kWarpsN, warp_x = warp / Tr::kWarpsN;
  const int warp_key0 = warp_n * Tr::kWarpKeys;    // S^T, dK, dV rows
  const int warp_q0 = warp_x * Tr::kWarpQueries;   // S^T columns
  const int warp_d0 = warp_x * Tr::kWarpDims;      // dK, dV columns
  const int dq_m0 = (warp % Tr::kDqWarpsM) * Tr::kDqMTiles * 16;  // dQ rows
  const int dq_d0 = (warp / Tr::kDqWarpsM) * Tr::kDqWarpDims;     // dQ columns

  const float scale = static_cast<float>(p.scale);
  const uint32 smem_base = smem_addr(smem);
  float* const s_lse = reinterpret_cast<float*>(smem + Tr::kLseOffset);
  float* const s_delta = reinterpret_cast<float*>(smem + Tr::kDeltaOffset);

  // Q and dO rows [row0, row0 + kBlockM) of one query head into buffer `stage`.
  auto load_q_do = [&](int head, int row0, int stage) {
    const T* q = static_cast<const T*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride;
    const T* dout =
        static_cast<const T*>(p.dout) + batch * p.do_batch_stride + head * p.do_head_stride;
    const uint32 stage_off = stage * QTile::kBytes;
    load_tile<QTile, Tr::kThreads, kAligned>(smem_base + Tr::kQOffset + stage_off, q,
                                             p.q_row_stride, row0, p.seqlen_q, p.head_dim,
                                             q_extent<T>(p));
    load_tile<QTile, Tr::kThreads, kAligned>(smem_base + Tr::kDoOffset + stage_off, dout,
                                             p.do_row_stride, row0, p.seqlen_q, p.head_dim,
                                             dout_extent<T>(p));
  };
  // Thread tid < kBlockM fetches lse and delta of row row0 + tid, and stashes lse (log2 units) and
  // scale * delta in buffer `buf`. Rows past seqlen_q get lse = +inf and delta = 0: P = 0 and
  // dS = 0 there. The fetch is issued at the top of a step and the stash done at its end, so the
  // global load's latency hides behind the step's mma.
  auto fetch_stats = [&](int head, int row0, float& lse, float& dlt) {
    const int row = row0 + tid;
    lse = -neg_inf();
    dlt = 0.f;
    if (tid < kBlockM && row < p.seqlen_q) {
      CUFLASH_CHECK_ACCESS(lse_extent<float>(p), static_cast<const float*>(p.lse) +
                           batch * p.lse_batch_stride + head * p.lse_head_stride + row, 4);
      CUFLASH_CHECK_ACCESS(delta_extent<float>(p), static_cast<const float*>(p.delta) +
                           (static_cast<int64>(batch) * p.heads_q + head) * p.seqlen_q + row, 4);
      lse = static_cast<const float*>(
          p.lse)[batch * p.lse_batch_stride + head * p.lse_head_stride + row];
      dlt = static_cast<const float*>(
          p.delta)[(static_cast<int64>(batch) * p.heads_q + head) * p.seqlen_q + row];
    }
  };
  auto stash_stats = [&](int buf, float lse, float dlt) {
    if (tid < kBlockM) {
      s_lse[buf * kBlockM + tid] = lse_log2(lse);
      s_delta[buf * kBlockM + tid] = dlt * scale;
    }
  };

  // ldmatrix sources: this warp's K, V rows as A of S^T = K Q^T, dP^T = V dO^T; its Q, dO rows
  // (S^T columns) as B of the same; dO, Q transposed as B of dV += P^T dO, dK += dS^T Q (k = query
  // rows, n = this warp's head-dim slice). One Reader serves every tile of the same row pitch; the
  // tile's offset (and the stage of Q, dO) is added to each address.
  const auto key_frag = frag_reader<Frag::kA, KVTile>(smem_base, warp_key0, 0);
  const auto query_frag = frag_reader<Frag::kB, QTile>(smem_base, warp_q0, 0);
  const auto dim_frag = frag_reader<Frag::kBTrans, QTile>(smem_base, warp_q0, warp_d0 / 8);

  float acc_dk[kKeyTiles][kDTiles][4];
  float acc_dv[kKeyTiles][kDTiles][4];
  zero(acc_dk);
  zero(acc_dv);

  int head = kv_head * p.group;  // the current step's query head and query tile
  int m_tile = m_begin;
  if (n_steps > 0) {
    const T* k = static_cast<const T*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride;
    const T* v = static_cast<const T*>(p.v) + batch * p.v_batch_stride + kv_head * p.v_head_stride;
    load_tile<KVTile, Tr::kThreads, kAligned>(smem_base + Tr::kKOffset, k, p.k_row_stride, n0,
                                              p.seqlen_k, p.head_dim, k_extent<T>(p));
    load_tile<KVTile, Tr::kThreads, kAligned>(smem_base + Tr::kVOffset, v, p.v_row_stride, n0,
                                              p.seqlen_k, p.head_dim, v_extent<T>(p));
    load_q_do(head, m_tile * kBlockM, 0);
    cp_async_commit();
    float lse, dlt;
    fetch_stats(head, m_tile * kBlockM, lse, dlt);
    stash_stats(0, lse, dlt);
  }

  for (int step = 0; step < n_steps; ++step) {
    const int stage = Tr::kStages == 2 ? step % 2 : 0;
    const int buf = step % 2;  // lse / delta buffer
    const int m0 = m_tile * kBlockM;
    const uint32 q_off = Tr::kQOffset + stage * QTile::kBytes;
    const uint32 do_off = Tr::kDoOffset + stage * QTile::kBytes;
    // The next step: the next query tile, or the first one of the next query head.
    const bool has_next = step + 1 < n_steps;
    const bool head_done = m_tile + 1 == m_end;
    const int next_head = head_done ? head + 1 : head;
    const int next_m_tile = head_done ? m_begin : m_tile + 1;

    cp_async_wait<0>();
    __syncthreads();  // Q, dO, lse, delta of this step landed; the last step's dQ is done with dS^T
    float next_lse = 0.f, next_dlt = 0.f;
    if (has_next) fetch_stats(next_head, next_m_tile * kBlockM, next_lse, next_dlt);
    if (Tr::kStages == 2 && has_next) load_q_do(next_head, next_m_tile * kBlockM, stage ^ 1);
    cp_async_commit();

    const Score<ScoreKind, T> step_score =
        on_step<ScoreKind>(score.for_head(p, batch, head), m0, m0 + kBlockM, n0, n0 + kBlockN);
    // Per-element work unless the step is full (the same test in two forms: each kind's ptxas
    // allocation is best with its own).
    const bool masked = Mask<MaskKind>::kLeft
                            ? !mask.full(m0, m0 + kBlockM, n0, n0 + kBlockN)
                            : ragged_keys || mask.cuts(m0, m0 + kBlockM, n0, n0 + kBlockN);
#pragma unroll
    for (int sub = 0; sub < Tr::kSubTiles; ++sub) {
      const int col0 = sub * Tr::kSubQueries;  // this sub-tile's first S^T column, from warp_q0
      const uint32 sub_off = QTile::offset(col0, 0);

      // -- S^T = K Q^T, dP^T = V dO^T (rows: this warp's keys; columns: its queries) --
      float st[kKeyTiles][kSubQTiles][4];
      float dpt[kKeyTiles][kSubQTiles][4];
      zero(st);
      zero(dpt);
      gemm_ss<T, Frag::kA, Frag::kB, Tr::kQKSteps>(st, key_frag, Tr::kKOffset, query_frag,
                                                   q_off + sub_off);
      gemm_ss<T, Frag::kA, Frag::kB, Tr::kQKSteps>(dpt, key_frag, Tr::kVOffset, query_frag,
                                                   do_off + sub_off);

      // -- P^T = exp2(S^T * scale_log2 - lse_log2); with a score modification (score.cuh) the
      // modified S^T instead, and P^T with dS^T below (a register array of slopes would spill) --
      const float* lse2 = s_lse + buf * kBlockM + warp_q0 + col0 + 2 * t;
      const float* dlt = s_delta + buf * kBlockM + warp_q0 + col0 + 2 * t;
      if constexpr (ScoreKind::kModifies) {
#pragma unroll
        for (int kt = 0; kt < kKeyTiles; ++kt)
#pragma unroll
          for (int qt = 0; qt < kSubQTiles; ++qt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              // S^T's C fragment: keys g and g + 8 of the m16 tile, queries 2t and 2t + 1
              st[kt][qt][e] =
                  step_score(st[kt][qt][e], m0 + warp_q0 + col0 + qt * 8 + 2 * t + e % 2,
                             n0 + warp_key0 + kt * 16 + (e / 2) * 8 + g);
            }
      } else {
#pragma unroll
        for (int qt = 0; qt < kSubQTiles; ++qt) {
          const float2 l = *reinterpret_cast<const float2*>(lse2 + qt * 8);
#pragma unroll
          for (int kt = 0; kt < kKeyTiles; ++kt) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              st[kt][qt][2 * h] = exp2_ftz(fmaf(st[kt][qt][2 * h], p.scale_log2, -l.x));
              st[kt][qt][2 * h + 1] = exp2_ftz(fmaf(st[kt][qt][2 * h + 1], p.scale_log2, -l.y));
            }
          }
        }
      }
      // -- zero P^T (or hide the modified S^T) where the query does not see the key, on the steps
      // the mask or the ragged end cut: columns [first_col, end_col) of the step see the key,
      // none past seqlen_k --
      const float hidden = ScoreKind::kModifies ? neg_inf() : 0.f;
      if (masked) {
#pragma unroll
        for (int kt = 0; kt < kKeyTiles; ++kt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int key = n0 + warp_key0 + kt * 16 + h * 8 + g;
            const int first_col = key >= p.seqlen_k       ? kBlockM
                                  : Mask<MaskKind>::kRight ? mask.first_query(key) - m0
                                                           : 0;
            const int end_col = mask.end_query(key) - m0;  // used only with a left edge
            // relative to this thread's first column of the sub-tile
            const int col = warp_q0 + col0 + 2 * t;
            const int first = first_col - col, end = end_col - col;
#pragma unroll
            for (int qt = 0; qt < kSubQTiles; ++qt) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int c = qt * 8 + e;
                if (c < first || (Mask<MaskKind>::kLeft && c >= end)) {
                  st[kt][qt][2 * h + e] = hidden;
                }
              }
            }
          }
        }
      }
      // -- dS^T = scale * P^T * (dP^T - delta) (times the score's slope) --
      // The softmax scale is folded in here (delta was stashed scaled): dK = dS^T Q and
      // dQ = dS K then need no scaling of their own, in the epilogue and before the atomics.
#pragma unroll
      for (int qt = 0; qt < kSubQTiles; ++qt) {
        const float2 d = *reinterpret_cast<const float2*>(dlt + qt * 8);
#pragma unroll
        for (int kt = 0; kt < kKeyTiles; ++kt) {
          if constexpr (ScoreKind::kModifies) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float modified = st[kt][qt][e];
              st[kt][qt][e] = exp2_ftz(fmaf(modified, p.scale_log2, -lse2[qt * 8 + e % 2]));
              float& x = dpt[kt][qt][e];
              x = st[kt][qt][e] * fmaf(x, scale, -(e % 2 ? d.y : d.x)) *
                  step_score.slope(modified, m0 + warp_q0 + col0 + qt * 8 + 2 * t + e % 2,
                                   n0 + warp_key0 + kt * 16 + (e / 2) * 8 + g);
            }
          } else {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              float* x = dpt[kt][qt] + 2 * h;
              x[0] = st[kt][qt][2 * h] * fmaf(x[0], scale, -d.x);
              x[1] = st[kt][qt][2 * h + 1] * fmaf(x[1], scale, -d.y);
            }
          }
        }
      }
      uint32 p_pk[kKeyTiles][kSubQTiles][2];
      uint32 ds_pk[kKeyTiles][kSubQTiles][2];
      pack_frags<T>(p_pk, st);
      pack_frags<T>(ds_pk, dpt);

      const int chunk0 = (warp_q0 + col0) / 8;
      if constexpr (Tr::kPInRegs) {
        // -- dV += P^T dO, dK += dS^T Q over this sub-tile's queries --
        gemm_rs<T, Frag::kBTrans, Tr::kSubSteps>(acc_dv, p_pk, dim_frag, do_off + sub_off);
        gemm_rs<T, Frag::kBTrans, Tr::kSubSteps>(acc_dk, ds_pk, dim_frag, q_off + sub_off);
        if (!p.deterministic) {
          DsTile::store_frags(smem_base + Tr::kDsOffset, ds_pk, warp_key0, chunk0);
        }
      } else {
        // The other warp of this key slice needs these columns too: exchange them.
        DsTile::store_frags(smem_base + Tr::kPtOffset, p_pk, warp_key0, chunk0);
        DsTile::store_frags(smem_base + Tr::kDsOffset, ds_pk, warp_key0, chunk0);
      }
    }

    if constexpr (!Tr::kPInRegs) {
      __syncthreads();  // P^T, dS^T complete
      // -- dV += P^T dO, dK += dS^T Q over all the step's queries (rows: this warp's keys;
      // columns: its head-dim slice) --
      const auto pt_frag = frag_reader<Frag::kA, DsTile>(smem_base, warp_key0, 0);
      const auto all_dim_frag = frag_reader<Frag::kBTrans, QTile>(smem_base, 0, warp_d0 / 8);
      gemm_ss<T, Frag::kA, Frag::kBTrans, Tr::kMSteps>(acc_dv, pt_frag, Tr::kPtOffset,
                                                       all_dim_frag, do_off);
      gemm_ss<T, Frag::kA, Frag::kBTrans, Tr::kMSteps>(acc_dk, pt_frag, Tr::kDsOffset,
                                                       all_dim_frag, q_off);
    }
    if (Tr::kStages == 1) {
      __syncthreads();  // every warp is done with Q, dO: the next step's may overwrite them
      if (has_next) load_q_do(next_head, next_m_tile * kBlockM, 0);
      cp_async_commit();
    }

    // -- dq_accum += dS K (fp32 atomics; rows: this warp's dQ rows) --
    if (!p.deterministic) {
      if (Tr::kPInRegs) __syncthreads();  // dS^T complete
      const auto ds_frag = frag_reader<Frag::kATrans, DsTile>(smem_base, 0, dq_m0 / 8);
      const auto kdim_frag = frag_reader<Frag::kBTrans, KVTile>(smem_base, 0, dq_d0 / 8);
      // This thread's first element: row m0 + dq_m0 + g, column dq_d0 + 2t. Rows past seqlen_q
      // are not stored; columns past head_dim hold exact zeros (K's padding) and are skipped too.
      const int row0 = m0 + dq_m0 + g;
      const int rows_left = p.seqlen_q - row0;
      const int cols_left = p.head_dim - (dq_d0 + 2 * t);
      float* dq_accum = static_cast<float*>(p.dq_accum) +
                        ((static_cast<int64>(batch) * p.heads_q + head) * p.seqlen_q + row0) *
                            p.head_dim_rounded +
                        dq_d0 + 2 * t;
#pragma unroll
      for (int c = 0; c < Tr::kDqChunks; ++c) {
        float acc_dq[Tr::kDqMTiles][Tr::kDqChunkTiles][4];
        zero(acc_dq);
        gemm_ss<T, Frag::kATrans, Frag::kBTrans, Tr::kNSteps>(
            acc_dq, ds_frag, Tr::kDsOffset, kdim_frag,
            Tr::kKOffset + KVTile::offset(0, c * Tr::kDqChunkDims / 8));
#pragma unroll
        for (int mt = 0; mt < Tr::kDqMTiles; ++mt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = mt * 16 + h * 8;
            if (r >= rows_left) continue;
            float* dst = dq_accum + r * p.head_dim_rounded + c * Tr::kDqChunkDims;
#pragma unroll
            for (int dt = 0; dt < Tr::kDqChunkTiles; ++dt) {
              const int col = c * Tr::kDqChunkDims + dt * 8;
              if (col < cols_left) {
                CUFLASH_CHECK_ACCESS(dq_accum_extent<float>(p), dst + dt * 8, 8);
                atomic_add_pair(dst + dt * 8, acc_dq[mt][dt][2 * h], acc_dq[mt][dt][2 * h + 1]);
              }
            }
          }
        }
      }
    }
    if (has_next) stash_stats(buf ^ 1, next_lse, next_dlt);
    head = next_head;
    m_tile = next_m_tile;
  }
  cp_async_wait<0>();  // no copy may outlive the block

  // -- epilogue: dk, dv (dK already carries the scale); rows past seqlen_k, columns past head_dim
  // not stored --
  T* dk = static_cast<T*>(p.dk) + batch * p.dk_batch_stride + kv_head * p.dk_head_stride;
  T* dv = static_cast<T*>(p.dv) + batch * p.dv_batch_stride + kv_head * p.dv_head_stride;
#pragma unroll
  for (int kt = 0; kt < kKeyTiles; ++kt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = n0 + warp_key0 + kt * 16 + h * 8 + g;
      if (row >= p.seqlen_k) continue;
      T* dk_row = dk + row * p.dk_row_stride;
      T* dv_row = dv + row * p.dv_row_stride;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        const int col = warp_d0 + dt * 8 + 2 * t;
        store_pair<T, kAligned>(dk_row, col, p.head_dim, acc_dk[kt][dt][2 * h],
                                acc_dk[kt][dt][2 * h + 1], dk_extent<T>(p));
        store_pair<T, kAligned>(dv_row, col, p.head_dim, acc_dv[kt][dt][2 * h],
                                acc_dv[kt][dt][2 * h + 1], dv_extent<T>(p));
      }
    }
  }
}

// ---- deterministic dQ ---------------------------------------------------------------------------

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_> struct BwdDqSm80Traits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per thread block (its dQ rows)
  static constexpr int kBlockN = kBlockN_;  // keys per step of the main loop
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * kWarpSize;

  // Warps split along the queries, as in the forward: each owns whole rows of S, dP, dS and dQ,
  // lse and delta are two registers per m16 tile, and dS packed pairwise is the A operand of
  // dQ += dS K.
  static constexpr int kRowsPerWarp = kBlockM / kWarps;
  static constexpr int kMTiles = kRowsPerWarp / 16;  // m16 tiles per warp
  static constexpr int kNTiles = kBlockN / 8;         // n8 tiles of S, dP per m16 tile
  static constexpr int kDTiles = kHeadDim / 8;        // n8 tiles of dQ per m16 tile
  static constexpr int kQKSteps = kHeadDim / 16;      // k16 steps of S and dP
  static constexpr int kNSteps = kBlockN / 16;        // k16 steps of dQ (keys)

  // Q, dO stay for the whole block; K, V are double-buffered where that fits kSm80SmemBudget.
  typedef PaddedTile<kBlockM, kHeadDim> QTile;
  typedef PaddedTile<kBlockN, kHeadDim> KVTile;
  static constexpr int kStages =
      2 * QTile::kBytes + 4 * KVTile::kBytes <= kSm80SmemBudget ? 2 : 1;
  static constexpr int kQOffset = 0;
  static constexpr int kDoOffset = kQOffset + QTile::kBytes;
  static constexpr int kKOffset = kDoOffset + QTile::kBytes;    // stage s at + s * KVTile::kBytes
  static constexpr int kVOffset = kKOffset + kStages * KVTile::kBytes;
  // Mirrored in cuflash/_launch_bwd.py (see NOTES_bwd_sm80.md for the formula).
  static constexpr int kSmemBytes = kVOffset + kStages * KVTile::kBytes;

  static_assert(kRowsPerWarp % 16 == 0, "each warp owns whole m16 tiles");
  static_assert(kNTiles % 2 == 0 && kDTiles % 2 == 0, "ldmatrix.x4 loads n8 tiles in pairs");
  static_assert(load_tile_exact<QTile, kThreads>() && load_tile_exact<KVTile, kThreads>(),
                "load_tile covers whole tiles");
  static_assert(kSmemBytes <= kSm80SmemBudget, "tile does not fit sm_80 shared memory");
};

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, typename MaskKind,
          typename ScoreKind, bool kAligned>
// Blocks per SM: ptxas's choice (0), which for some tiles is two blocks of 128 registers; a
// positional score's index arithmetic does not fit that, so those kernels ask for one.
__global__ void __launch_bounds__(kWarps * kWarpSize, ScoreKind::kPositional ? 1 : 0)
bwd_dq_sm80(const __grid_constant__ BwdParams p) {
  typedef BwdDqSm80Traits<kHeadDim, kBlockM, kBlockN, kWarps> Tr;
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
  const int m0 = m_block * kBlockM;
  const int warp_row0 = warp * Tr::kRowsPerWarp;

  // The key tiles [n_begin, n_begin + n_tiles) some row of the block sees: bands move right with
  // the row, so the first row sees the lowest key and the last (up to seqlen_q) the highest. None
  // leaves dq zero.
  const Mask<MaskKind> mask(p);
  const Score<ScoreKind, T> score = Score<ScoreKind, T>(p).for_head(p, batch, head);
  int n_begin = mask.first_key(m0) / kBlockN;
  int n_tiles = ceil_div(mask.end_key(min(m0 + kBlockM, p.seqlen_q) - 1), kBlockN) - n_begin;
  if constexpr (ScoreKind::kBlockMap) {  // a user mask_mod's block map narrows them
    const Span tiles =
        score.template key_tiles<kBlockN>({n_begin, n_begin + n_tiles}, m0, m0 + kBlockM);
    n_begin = tiles.begin;
    n_tiles = tiles.end - tiles.begin;
  }

  const T* q = static_cast<const T*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride;
  const T* dout =
      static_cast<const T*>(p.dout) + batch * p.do_batch_stride + head * p.do_head_stride;
  const T* k = static_cast<const T*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + batch * p.v_batch_stride + kv_head * p.v_head_stride;

  // lse (log2 units) and scale * delta of this thread's rows: r = 2 * mt + h is row warp_row0 +
  // 16 mt + 8 h + g. Rows past seqlen_q get lse = +inf, delta = 0: P = 0 and dS = 0 there.
  const float scale = static_cast<float>(p.scale);
  const float unscale = static_cast<float>(1.0 / p.scale);  // dS back to the scaled score's
  float row_lse2[2 * kMTiles], row_delta[2 * kMTiles];
  {
    const float* lse =
        static_cast<const float*>(p.lse) + batch * p.lse_batch_stride + head * p.lse_head_stride;
    const float* delta = static_cast<const float*>(p.delta) +
                         (static_cast<int64>(batch) * p.heads_q + head) * p.seqlen_q;
#pragma unroll
    for (int r = 0; r < 2 * kMTiles; ++r) {
      const int row = m0 + warp_row0 + (r / 2) * 16 + (r % 2) * 8 + g;
      const bool valid = row < p.seqlen_q;
      if (valid) {
        CUFLASH_CHECK_ACCESS(lse_extent<float>(p), lse + row, 4);
        CUFLASH_CHECK_ACCESS(delta_extent<float>(p), delta + row, 4);
      }
      row_lse2[r] = valid ? lse_log2(lse[row]) : -neg_inf();
      row_delta[r] = valid ? delta[row] * scale : 0.f;
    }
  }

  const uint32 smem_base = smem_addr(smem);
  // ldmatrix sources: Q, dO rows of this warp as A (S = Q K^T, dP = dO V^T); K, V as B of the same;
  // K transposed as B of dQ += dS K.
  const auto row_frag = frag_reader<Frag::kA, QTile>(smem_base, warp_row0, 0);
  const auto key_frag = frag_reader<Frag::kB, KVTile>(smem_base, 0, 0);
  const auto dim_frag = frag_reader<Frag::kBTrans, KVTile>(smem_base, 0, 0);

  auto load_k_v = [&](int tile, int stage) {
    const uint32 stage_off = stage * KVTile::kBytes;
    load_tile<KVTile, Tr::kThreads, kAligned>(smem_base + Tr::kKOffset + stage_off, k,
                                              p.k_row_stride, tile * kBlockN, p.seqlen_k,
                                              p.head_dim, k_extent<T>(p));
    load_tile<KVTile, Tr::kThreads, kAligned>(smem_base + Tr::kVOffset + stage_off, v,
                                              p.v_row_stride, tile * kBlockN, p.seqlen_k,
                                              p.head_dim, v_extent<T>(p));
  };

  float acc_dq[kMTiles][kDTiles][4];
  zero(acc_dq);

  if (n_tiles > 0) {
    load_tile<QTile, Tr::kThreads, kAligned>(smem_base + Tr::kQOffset, q, p.q_row_stride, m0,
                                             p.seqlen_q, p.head_dim, q_extent<T>(p));
    load_tile<QTile, Tr::kThreads, kAligned>(smem_base + Tr::kDoOffset, dout, p.do_row_stride, m0,
                                             p.seqlen_q, p.head_dim, dout_extent<T>(p));
    load_k_v(n_begin, 0);
    cp_async_commit();
  }

  for (int i = 0; i < n_tiles; ++i) {  // a fixed order: dq is bit-identical run to run
    const int tile = n_begin + i;
    const int stage = Tr::kStages == 2 ? i % 2 : 0;
    const int n0 = tile * kBlockN;
    const uint32 k_off = Tr::kKOffset + stage * KVTile::kBytes;
    const uint32 v_off = Tr::kVOffset + stage * KVTile::kBytes;
    cp_async_wait<0>();
    __syncthreads();  // K, V (and Q, dO the first time) landed; every warp is done with tile - 1
    if (Tr::kStages == 2 && i + 1 < n_tiles) load_k_v(tile + 1, stage ^ 1);
    cp_async_commit();

    // -- S = Q K^T, dP = dO V^T (rows: this warp's queries; columns: keys) --
    float s[kMTiles][kNTiles][4];
    float dp[kMTiles][kNTiles][4];
    zero(s);
    zero(dp);
    gemm_ss<T, Frag::kA, Frag::kB, Tr::kQKSteps>(s, row_frag, Tr::kQOffset, key_frag, k_off);
    gemm_ss<T, Frag::kA, Frag::kB, Tr::kQKSteps>(dp, row_frag, Tr::kDoOffset, key_frag, v_off);

    // -- P = exp2(score(S) * scale_log2 - lse_log2), zero where the row does not see the key
    // (only on the tiles the mask or the ragged end cut); dS = scale * P * (dP - delta) * the
    // score's slope, the softmax scale folded in as in bwd_dkdv_sm80 --
    const bool masked = n0 + kBlockN > p.seqlen_k || mask.cuts(m0, m0 + kBlockM, n0, n0 + kBlockN);
    const Score<ScoreKind, T> tile_score =
        on_step<ScoreKind>(score, m0 + warp_row0, m0 + warp_row0 + Tr::kRowsPerWarp, n0,
                           n0 + kBlockN);
#pragma unroll
    for (int r = 0; r < 2 * kMTiles; ++r) {
      const int mt = r / 2, h = r % 2;
      const int row = m0 + warp_row0 + mt * 16 + h * 8 + g;
      // The row's keys [first, last], relative to this thread's first column of the tile (n0 + 2t).
      const int first = mask.first_key(row) - n0 - 2 * t;
      const int last = mask.last_key(row) - n0 - 2 * t;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[mt][nt][2 * h + e];
          const int c = nt * 8 + e;
          const int col = n0 + 2 * t + c;
          const float modified = tile_score(x, row, col);
          x = exp2_ftz(fmaf(modified, p.scale_log2, -row_lse2[r]));
          if (masked && (c > last || (Mask<MaskKind>::kLeft && c < first))) x = 0.f;
          dp[mt][nt][2 * h + e] = x * fmaf(dp[mt][nt][2 * h + e], scale, -row_delta[r]) *
                                  score.slope(modified, row, col);
          // a bias's gradient (score.cuh's Mods): here, not in bwd_dkdv_sm80, which has no
          // registers left for it, so a call that asks for dbias runs this kernel
          score.record(dp[mt][nt][2 * h + e] * unscale, row, col);
        }
      }
    }
    uint32 ds_pk[kMTiles][kNTiles][2];
    pack_frags<T>(ds_pk, dp);

    // -- dQ += dS K --
    gemm_rs<T, Frag::kBTrans, Tr::kNSteps>(acc_dq, ds_pk, dim_frag, k_off);

    if (Tr::kStages == 1) {
      __syncthreads();  // every warp is done with K, V: the next tile may overwrite them
      if (i + 1 < n_tiles) load_k_v(tile + 1, 0);
      cp_async_commit();
    }
  }
  cp_async_wait<0>();  // no copy may outlive the block

  // -- epilogue: dq (dS carried the scale); rows past seqlen_q, columns past head_dim not stored --
  T* dq = static_cast<T*>(p.dq) + batch * p.dq_batch_stride + head * p.dq_head_stride;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + warp_row0 + mt * 16 + h * 8 + g;
      if (row >= p.seqlen_q) continue;
      T* dq_row = dq + row * p.dq_row_stride;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        store_pair<T, kAligned>(dq_row, dt * 8 + 2 * t, p.head_dim, acc_dq[mt][dt][2 * h],
                                acc_dq[mt][dt][2 * h + 1], dq_extent<T>(p));
      }
    }
  }
}

}  // namespace cuflash
