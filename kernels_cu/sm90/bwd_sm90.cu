// Attention backward, dK/dV (and atomic dQ) for Hopper (sm_90a): TMA loads, an mbarrier pipeline,
// wgmma, warp specialisation. The preprocess, the dQ conversion and the deterministic dQ kernel
// are bwd_sm80.cu's (same parameter block, same dq_accum and delta layouts).
//
// One thread block owns kBlockN keys of one (batch, kv head) and walks the GQA group's query heads
// and their query tiles of kBlockM rows that see those keys (a band of them with a window), as
// bwd_dkdv_sm80 does. Warpgroup 0 is the producer: its thread 0 loads K and V once and then Q and
// dO of every step through kStages shared-memory slots with TMA (128-byte swizzle, out-of-bounds
// rows and columns read as zeros); its warp 1 stages the step's lse (log2 units) and scale * delta
// beside them. Head dims up to 128: kBlockN = 128 and consumer warpgroup c owns keys
// [64c, 64c + 64) of the block:
//
//   S^T  = K_c Q^T                wgmma SS (both K-major), 64 x kBlockM
//   dP^T = V_c dO^T               wgmma SS
//   P^T  = exp2(score(S^T) * scale_log2 - lse_log2), masked (score.cuh: the modification)
//   dS^T = P^T * (scale dP^T - scale delta) * the score's slope
//   dV_c += P^T dO                wgmma RS: P^T from the S^T accumulators, dO MN-major
//   dK_c += dS^T Q                wgmma RS: the same with dS^T and Q
//   dQ   += dS K                  (atomic mode) dS^T of both consumers goes to shared memory; each
//                                 consumer computes half of dQ with wgmma SS, both operands
//                                 MN-major, and writes it to an fp32 tile in shared memory, which
//                                 the producer's warp 2 adds to dq_accum with TMA reductions
//                                 (cp.reduce.async.bulk.tensor): thread-issued red.global of the
//                                 same values cost 28-60% of the kernel's speed (kernel notes).
//
// Computing S^T (keys as rows) rather than S is what lets P^T and dS^T feed the dV and dK products
// straight from registers: the m64 accumulator, packed pairwise, is the register A operand.
//
// Head dim 256 ("split D"): one consumer's dK + dV rows would need 256 fp32 registers per thread,
// so kBlockN = 64 keys are shared and consumer c owns dK, dV columns [128c, 128c + 128). It
// computes S^T and dP^T for query columns [32c, 32c + 32) only, and P^T and dS^T of both halves
// meet in shared memory, from where dV += P^T dO and dK += dS^T Q read them as K-major A operands
// (wgmma SS). dQ is split by columns as above; its fp32 tile (64 KB) has no room of its own, so
// each consumer writes its half into the step's Q or dO slot (32 KB each) once both consumers
// are done with them, and the producer's warp 2 frees the slot when the reduction has read it.
#include "../core/common.cuh"
#include "../attention/mask.cuh"
#include "../attention/score.cuh"
#include "tma_sm90.cuh"
#include "wgmma_sm90.cuh"

namespace cuflash {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_> struct BwdSm90Traits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per step
  static constexpr int kBlockN = kBlockN_;  // keys per thread block (its dK, dV rows)
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * kWarpSize;

  static constexpr int kWarpgroupThreads = 128;
  static constexpr int kConsumers = kThreads / kWarpgroupThreads - 1;  // warpgroup 0 produces
  static constexpr int kConsumerWarps = 4 * kConsumers;
  static constexpr bool kSplitD = kHeadDim > 128;
  // S^T, dK, dV rows per consumer (wgmma's M); consumers share the keys when the D is split.
  static constexpr int kKeysPerConsumer = 64;
  static constexpr int kConsumerKeyStride = kSplitD ? 0 : kKeysPerConsumer;
  static constexpr int kConsumerQueries = kSplitD ? kBlockM / kConsumers : kBlockM;  // S^T cols
  static constexpr int kConsumerDims = kSplitD ? kHeadDim / kConsumers : kHeadDim;   // dK, dV cols
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;

  // Shared tiles are 128-byte-swizzled chunks of 64 16-bit columns, as in fwd_sm90.cu.
  static constexpr int kChunks = kHeadDim / 64;
  static constexpr int kQChunkBytes = kBlockM * 128;
  static constexpr int kKVChunkBytes = kBlockN * 128;
  static constexpr int kQBytes = kChunks * kQChunkBytes;    // Q or dO of one step
  static constexpr int kKVBytes = kChunks * kKVChunkBytes;  // K or V of the block
  // dS^T is stored [key][query]: chunks of 64 queries, kBlockN rows of 128 B each. It is the
  // MN-major A operand of dQ = dS K (and with split D, like P^T after it, the K-major A operand
  // of dK += dS^T Q). Two buffers: one consumer may still read step i's while the other writes
  // step i + 1's.
  static constexpr int kDsChunkBytes = kBlockN * 128;
  static constexpr int kDsBytes = (kBlockM / 64) * kDsChunkBytes;
  static constexpr int kPtOffsetInBuf = kDsBytes;  // P^T after dS^T (split D only)
  static constexpr int kXBytes = (kSplitD ? 2 : 1) * kDsBytes;
  static constexpr int kStages = 2;

  static constexpr int kKOffset = 0;
  static constexpr int kVOffset = kKOffset + kKVBytes;
  static constexpr int kQOffset = kVOffset + kKVBytes;  // stage s at + s * kQBytes
  static constexpr int kDoOffset = kQOffset + kStages * kQBytes;
  static constexpr int kDsOffset = kDoOffset + kStages * kQBytes;  // buffer b at + b * kDsBytes
  // dQ of one step, fp32, as the TMA reduction reads it: boxes of 32 columns (128 B) x kBlockM
  // rows, 128-byte swizzled. With split D it lives in the step's Q (columns 0-127) and dO
  // (128-255) slots instead, each exactly the size of a 64 x 128 fp32 half.
  static constexpr int kDqBoxBytes = kBlockM * 128;
  static constexpr int kDqBoxesPerHalf = kHeadDim / 2 / 32;
  static constexpr int kDqOffset = kDsOffset + 2 * kXBytes;
  static constexpr int kDqBytes = kSplitD ? 0 : kBlockM * kHeadDim * 4;
  static constexpr int kLseOffset = kDqOffset + kDqBytes;  // [kStages][kBlockM] floats
  static constexpr int kDeltaOffset = kLseOffset + kStages * kBlockM * 4;
  static constexpr int kBarOffset = kDeltaOffset + kStages * kBlockM * 4;
  static constexpr int kBarriers = 3 + 2 * kStages;  // kv_full, full[], empty[], dq_full, dq_empty
  // + 1024: the dynamic shared window is only 16-byte aligned; swizzle atoms need 1024.
  static constexpr int kSmemBytes = kBarOffset + 8 * kBarriers + 1024;  // == _launch_bwd mirror

  static constexpr int kQTiles = kConsumerQueries / 8;  // n8 column groups of S^T, dP^T
  static constexpr int kDTiles = kConsumerDims / 8;     // n8 column groups of dK, dV
  static constexpr int kQKSteps = kHeadDim / 16;
  static constexpr int kPSteps = kConsumerQueries / 16;  // k16 steps of P^T, dS^T held
  static constexpr int kMSteps = kBlockM / 16;           // k16 steps of dV, dK (queries)
  static constexpr int kNSteps = kBlockN / 16;  // k16 steps of dQ (keys)
  // dQ (kBlockM x kHeadDim) split over the consumers: by 64-row tiles when there is one per
  // consumer, else (kBlockM == 64) by head-dim columns.
  static constexpr bool kDqSplitRows = kBlockM == 64 * kConsumers;
  static constexpr int kDqCols = kDqSplitRows ? kHeadDim : kHeadDim / kConsumers;

  static_assert(kConsumers == 2, "one producer and two consumer warpgroups");
  static_assert(kBlockN == (kSplitD ? kKeysPerConsumer : kConsumers * kKeysPerConsumer),
                "64 keys per consumer, or 64 shared ones with split D");
  static_assert(kHeadDim % 64 == 0 && kHeadDim <= 256, "whole 128-byte chunks");
  static_assert(kBlockM % 64 == 0 && kBlockM <= 128, "TMA boxes and wgmma N");
  static_assert(!kSplitD || kBlockM == 64, "split D: P^T and dS^T are one 64-query chunk");
  static_assert(!kSplitD || kQBytes == kBlockM * kHeadDim / 2 * 4, "split D: a dQ half fills a slot");
  static_assert(kDqSplitRows || kBlockM == 64, "dQ split");
  static_assert(kDqCols % 64 == 0, "dQ columns are whole chunks");
};

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, typename MaskKind,
          typename ScoreKind, bool kAligned>
__global__ void __launch_bounds__(kWarps * kWarpSize, 1)
bwd_dkdv_sm90(const __grid_constant__ BwdParams p, const __grid_constant__ TmaMap tma_q,
              const __grid_constant__ TmaMap tma_k, const __grid_constant__ TmaMap tma_v,
              const __grid_constant__ TmaMap tma_do, const __grid_constant__ TmaMap tma_dq) {
  typedef BwdSm90Traits<kHeadDim, kBlockM, kBlockN, kWarps> Tr;
  constexpr int kStages = Tr::kStages;
  // dS needs the modified score's slope (a softcap): P waits for it, past dP
  constexpr bool kSlopeLater = ScoreKind::kModifies && !ScoreKind::kAdditive;
  static_assert(kAligned, "TMA needs 16-byte strides; unaligned inputs take the sm80 kernel");
  extern __shared__ __align__(1024) char smem_raw[];

  const uint32 base = smem_base_1024<Tr::kSmemBytes>(smem_raw);
  char* const base_ptr = smem_raw + (base - smem_u32(smem_raw));
  const uint32 k_smem = base + Tr::kKOffset;
  const uint32 v_smem = base + Tr::kVOffset;
  auto q_smem = [&](int stage) { return base + Tr::kQOffset + stage * Tr::kQBytes; };
  auto do_smem = [&](int stage) { return base + Tr::kDoOffset + stage * Tr::kQBytes; };
  auto ds_smem = [&](int buf) { return base + Tr::kDsOffset + buf * Tr::kDsBytes; };
  float* const s_lse = reinterpret_cast<float*>(base_ptr + Tr::kLseOffset);
  float* const s_delta = reinterpret_cast<float*>(base_ptr + Tr::kDeltaOffset);
  const uint32 bar = base + Tr::kBarOffset;
  const uint32 kv_full = bar;
  auto full = [&](int stage) { return bar + 8 * (1 + stage); };
  auto empty = [&](int stage) { return bar + 8 * (1 + kStages + stage); };
  // dq_full: the consumers' dQ tile is in (one arrive per consumer thread); dq_empty: the TMA
  // reduction has read it.
  const uint32 dq_full = bar + 8 * (1 + 2 * kStages);
  const uint32 dq_empty = dq_full + 8;
  const uint32 dq_smem = base + Tr::kDqOffset;

  const int n_block = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int batch = blockIdx.z;
  const int n0 = n_block * kBlockN;
  // The query tiles [m_begin, m_end) that see some key of the block: bands move right with the
  // row, so they run from the first query whose band reaches key n0 to the last that sees the
  // block's last key. None (the block lies left of every band): no step, and the epilogue writes
  // dK = dV = 0. (query_tiles() gives the same range; its code made the producer warps spill.)
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
  if constexpr (ScoreKind::kBlockMap) {
    narrow_by_map<kBlockM>(p, batch, kv_head, n0, min(n0 + kBlockN, p.seqlen_k), m_begin,
                           m_end);
  }
  const int m_count = m_end - m_begin;
  const int n_steps = p.group * m_count;  // (query head, query tile) pairs
  auto step_head = [&](int step) { return kv_head * p.group + step / m_count; };
  auto step_row0 = [&](int step) { return (m_begin + step % m_count) * kBlockM; };

  const int warpgroup = threadIdx.x / Tr::kWarpgroupThreads;
  const int lane = threadIdx.x % kWarpSize;
  if (threadIdx.x == 0) {
    mbar_init(kv_full, 1);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), 1 + kWarpSize);  // the TMA thread's expect_tx + warp 1's statistics
      // With split D (atomic mode) the slot also holds the dQ tile: warp 2 frees it.
      mbar_init(empty(s), Tr::kSplitD && !p.deterministic ? 1 : Tr::kConsumerWarps);
    }
    mbar_init(dq_full, Tr::kConsumers * Tr::kWarpgroupThreads);
    mbar_init(dq_empty, 1);
    mbar_init_fence();
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ---- producer ----
    regs_dealloc<Tr::kProducerRegs>();
    const int warp = threadIdx.x / kWarpSize;
    if (threadIdx.x == 0 && n_steps > 0) {
      tma_prefetch(tma_q);
      tma_prefetch(tma_k);
      tma_prefetch(tma_v);
      tma_prefetch(tma_do);
      mbar_arrive_expect_tx(kv_full, 2 * Tr::kKVBytes);
#pragma unroll
      for (int c = 0; c < Tr::kChunks; ++c) {
        tma_load_4d(k_smem + c * Tr::kKVChunkBytes, tma_k, kv_full, c * 64, n0, kv_head, batch);
        tma_load_4d(v_smem + c * Tr::kKVChunkBytes, tma_v, kv_full, c * 64, n0, kv_head, batch);
      }
      for (int step = 0; step < n_steps; ++step) {
        const int stage = step % kStages;
        const int head = step_head(step), row0 = step_row0(step);
        mbar_wait(empty(stage), ((step / kStages) & 1) ^ 1);  // first pass: returns at once
        mbar_arrive_expect_tx(full(stage), 2 * Tr::kQBytes);
#pragma unroll
        for (int c = 0; c < Tr::kChunks; ++c) {
          tma_load_4d(q_smem(stage) + c * Tr::kQChunkBytes, tma_q, full(stage), c * 64, row0,
                      head, batch);
          tma_load_4d(do_smem(stage) + c * Tr::kQChunkBytes, tma_do, full(stage), c * 64, row0,
                      head, batch);
        }
      }
    } else if (warp == 1) {
      // lse in log2 units (+inf where a row saw no key or is past seqlen_q: P = 0 there, never
      // NaN) and scale * delta (0 past seqlen_q), per query row of the step.
      const float scale = static_cast<float>(p.scale);
      for (int step = 0; step < n_steps; ++step) {
        const int stage = step % kStages;
        const int head = step_head(step), row0 = step_row0(step);
        const float* lse = static_cast<const float*>(p.lse) + batch * p.lse_batch_stride +
                           head * p.lse_head_stride;
        const float* delta = static_cast<const float*>(p.delta) +
                             (static_cast<int64>(batch) * p.heads_q + head) * p.seqlen_q;
        mbar_wait(empty(stage), ((step / kStages) & 1) ^ 1);
        for (int r = lane; r < kBlockM; r += kWarpSize) {
          const int row = row0 + r;
          float lse2 = -neg_inf(), dlt = 0.f;
          if (row < p.seqlen_q) {
            CUFLASH_CHECK_ACCESS(lse_extent<float>(p), lse + row, 4);
            CUFLASH_CHECK_ACCESS(delta_extent<float>(p), delta + row, 4);
            lse2 = lse_log2(lse[row]);
            dlt = delta[row] * scale;
          }
          s_lse[stage * kBlockM + r] = lse2;
          s_delta[stage * kBlockM + r] = dlt;
        }
        mbar_arrive(full(stage));  // release: the stores above are visible to the waiters
      }
    } else if (warp == 2 && lane == 0 && !p.deterministic) {
      // dq_accum (B, Hq, Sq, width) += the step's dQ tile, box by box; rows past seqlen_q fall
      // outside the tensor map and are dropped.
      for (int step = 0; step < n_steps; ++step) {
        const int stage = step % kStages;
        mbar_wait(dq_full, step & 1);
#pragma unroll
        for (int b = 0; b < kHeadDim / 32; ++b) {
          uint32 src = dq_smem + b * Tr::kDqBoxBytes;
          if (Tr::kSplitD) {
            src = (b < Tr::kDqBoxesPerHalf ? q_smem(stage) : do_smem(stage)) +
                  (b % Tr::kDqBoxesPerHalf) * Tr::kDqBoxBytes;
          }
          tma_reduce_add_4d(tma_dq, src, b * 32, step_row0(step), step_head(step), batch);
        }
        bulk_commit_group();
        bulk_wait_group_read<0>();  // the tile may be overwritten
        mbar_arrive(dq_empty);
        if (Tr::kSplitD) mbar_arrive(empty(stage));  // the slot is free for the next Q, dO
      }
      bulk_wait_group<0>();  // every reduction done before the block retires
    }
  } else {
    // ---- consumers: keys [64c, 64c + 64) of the block (with split D: all 64 keys, half of D) ----
    regs_alloc<Tr::kConsumerRegs>();
    constexpr int kQTiles = Tr::kQTiles, kDTiles = Tr::kDTiles, kMSteps = Tr::kMSteps;
    constexpr int kPSteps = Tr::kPSteps;
    const int consumer = warpgroup - 1;
    const int warp = (threadIdx.x / kWarpSize) % 4;
    const int g = lane / 4, t = lane % 4;
    const int key_base = consumer * Tr::kConsumerKeyStride + warp * 16;  // + g + 8h: its keys
    const int q_col0 = Tr::kSplitD ? consumer * Tr::kConsumerQueries : 0;  // its S^T columns
    const int d_col0 = Tr::kSplitD ? consumer * Tr::kConsumerDims : 0;     // its dK, dV columns
    const float scale = static_cast<float>(p.scale);
    const float unscale = static_cast<float>(1.0 / p.scale);  // dS back to the scaled score's
    const bool ragged_keys = n0 + kBlockN > p.seqlen_k;

    float acc_dk[kDTiles][4], acc_dv[kDTiles][4];
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[dt][e] = acc_dv[dt][e] = 0.f;

    // This consumer's rows of K and V (A of S^T, dP^T) start 64 * 128 B into each chunk, and its
    // columns of Q and dO (B of S^T, dP^T) 32 * 128 B with split D (1024-byte aligned both).
    const uint32 k_rows = k_smem + consumer * Tr::kConsumerKeyStride * 128;
    const uint32 v_rows = v_smem + consumer * Tr::kConsumerKeyStride * 128;
    const uint32 q_cols = q_col0 * 128;
    // dQ: this consumer's 64 rows x kDqCols columns (see the traits).
    const int dq_row0 = Tr::kDqSplitRows ? consumer * 64 : 0;
    const int dq_col0 = Tr::kDqSplitRows ? 0 : consumer * Tr::kDqCols;

    // acc = A B^T over the head dim, both K-major (a k16 step is 32 B inside a chunk): A this
    // consumer's key rows of K or V, B its query columns of the step's Q or dO. One wgmma group.
    auto issue_keys_by_queries = [&](float (&acc)[kQTiles][4], uint32 a_rows, uint32 b_tile) {
#pragma unroll
      for (int ks = 0; ks < Tr::kQKSteps; ++ks) {
        const uint32 a_off = (ks / 4) * Tr::kKVChunkBytes + (ks % 4) * 32;
        const uint32 b_off = (ks / 4) * Tr::kQChunkBytes + (ks % 4) * 32;
        Wgmma<T, Tr::kConsumerQueries>::ss(acc, make_desc(a_rows + a_off, 16, 1024),
                                           make_desc(b_tile + q_cols + b_off, 16, 1024), ks > 0);
      }
      wgmma_commit();
    };

    if (n_steps > 0) mbar_wait(kv_full, 0);
    for (int step = 0; step < n_steps; ++step) {
      const int stage = step % kStages;
      const int head = step_head(step), row0 = step_row0(step);
      const Score<ScoreKind, T> step_score = score.for_head(p, batch, head);
      mbar_wait(full(stage), (step / kStages) & 1);

      // -- S^T = K_c Q^T and dP^T = V_c dO^T, two wgmma groups --
      float st[kQTiles][4], dpt[kQTiles][4];
      wgmma_fence();
      issue_keys_by_queries(st, k_rows, q_smem(stage));
      issue_keys_by_queries(dpt, v_rows, do_smem(stage));

      // -- P^T = exp2(S^T * scale_log2 - lse_log2) while dP^T runs, S^T modified first by an
      // additive score kind (score.cuh); a softcap keeps the modified S^T for its slope, and
      // forms P^T with dS^T below --
      wgmma_wait<1>();
      fence_operand(st);
      const float* lse2 = s_lse + stage * kBlockM + q_col0 + 2 * t;
      const float* dlt = s_delta + stage * kBlockM + q_col0 + 2 * t;
      auto row_of = [&](int j, int e) { return row0 + q_col0 + j * 8 + 2 * t + e % 2; };
      auto key_of = [&](int e) { return n0 + key_base + (e / 2) * 8 + g; };
      auto modify = [&](auto&& modified) {
        if constexpr (kSlopeLater) {
#pragma unroll
          for (int j = 0; j < kQTiles; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[j][e] = modified(st[j][e], row_of(j, e), key_of(e));
        } else {
#pragma unroll
          for (int j = 0; j < kQTiles; ++j) {
            const float2 l = *reinterpret_cast<const float2*>(lse2 + j * 8);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              // S^T's C fragment: keys g and g + 8, queries 2t and 2t + 1 of each n8 tile
              const float s = modified(st[j][e], row_of(j, e), key_of(e));
              st[j][e] = exp2_ftz(fmaf(s, p.scale_log2, -(e % 2 ? l.y : l.x)));
            }
          }
        }
      };
      const float hidden = kSlopeLater ? neg_inf() : 0.f;
      // By the block map, where the queries that see each of the warp's keys are one interval:
      // the score_mod alone, then the keys' bounds hide the rest (band included); else, where
      // the step's queries see all the warp's keys, the score_mod alone; elsewhere the mask_mod
      // per element.
      bool bounded = false;
      if constexpr (ScoreKind::kBlockMap) {
        const int q0 = row0 + q_col0, k0 = n0 + key_base;
        const int2 a = step_score.col_bounds(k0 + g), b = step_score.col_bounds(k0 + g + 8);
        bounded = __all_sync(0xffffffffu, a.x >= 0 && b.x >= 0);
        if (bounded) {
          modify([&](float x, int row, int col) { return step_score.unmasked(x, row, col); });
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            // the key's queries relative to this thread's first column
            const int first = (h ? b.x : a.x) - q0 - 2 * t, end = (h ? b.y : a.y) - q0 - 2 * t;
#pragma unroll
            for (int j = 0; j < kQTiles; ++j)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int c = j * 8 + e;
                if (c < first || c >= end) st[j][2 * h + e] = hidden;
              }
          }
        } else if (Tr::kConsumerQueries <= BlockMap::kRows
                       ? step_score.whole_in_block(q0, k0, k0 + 16)
                       : step_score.whole(q0, q0 + Tr::kConsumerQueries, k0, k0 + 16)) {
          modify([&](float x, int row, int col) { return step_score.unmasked(x, row, col); });
        } else {
          modify(step_score);
        }
      } else {
        modify(step_score);
      }
      // Zero P^T (or hide the modified S^T) where the query does not see the key: key j
      // (< seqlen_k) is seen by columns [first_query(j), end_query(j)) - row0, none past
      // seqlen_k. Only steps the band's edges or the ragged end cut pay.
      if (!bounded && (ragged_keys || mask.cuts(row0, row0 + kBlockM, n0, n0 + kBlockN))) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int key = n0 + key_base + h * 8 + g;
          const int first_col = key >= p.seqlen_k       ? kBlockM
                                : Mask<MaskKind>::kRight ? mask.first_query(key) - row0
                                                         : 0;
          const int end_col = mask.end_query(key) - row0;  // used only with a left edge
          // from this thread's first column
          const int first = first_col - q_col0 - 2 * t, end = end_col - q_col0 - 2 * t;
#pragma unroll
          for (int j = 0; j < kQTiles; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int c = j * 8 + e;
              if (c < first || (Mask<MaskKind>::kLeft && c >= end)) st[j][2 * h + e] = hidden;
            }
        }
      }
      // -- dS^T = P^T * (scale dP^T - scale delta) (times the score's slope): the softmax scale
      // rides on dS, so dK and dQ come out scaled --
      wgmma_wait<0>();
      fence_operand(dpt);
#pragma unroll
      for (int j = 0; j < kQTiles; ++j) {
        const float2 d = *reinterpret_cast<const float2*>(dlt + j * 8);
        if constexpr (kSlopeLater) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float x = st[j][e], l = lse2[j * 8 + e % 2];
            st[j][e] = exp2_ftz(fmaf(x, p.scale_log2, -l));
            dpt[j][e] = st[j][e] * fmaf(dpt[j][e], scale, -(e % 2 ? d.y : d.x)) *
                        step_score.slope(x, row_of(j, e), key_of(e));
          }
        } else {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            dpt[j][2 * h] = st[j][2 * h] * fmaf(dpt[j][2 * h], scale, -d.x);
            dpt[j][2 * h + 1] = st[j][2 * h + 1] * fmaf(dpt[j][2 * h + 1], scale, -d.y);
          }
          // dS unscaled: a bias's gradient (score.cuh's Mods); at D 64 the store spills, and
          // _launch_bwd sends a call that asks for dbias to the sm80 kernels
          if constexpr (kHeadDim > 64) {
#pragma unroll
            for (int e = 0; e < 4; ++e)
              step_score.record(dpt[j][e] * unscale, row_of(j, e), key_of(e));
          }
        }
      }
      // P^T and dS^T packed: the register A operands (k16 step ks = queries 16ks..16ks+15).
      uint32 pa[kPSteps][4], dsa[kPSteps][4];
#pragma unroll
      for (int ks = 0; ks < kPSteps; ++ks) {
        pa[ks][0] = pack2<T>(st[2 * ks][0], st[2 * ks][1]);
        pa[ks][1] = pack2<T>(st[2 * ks][2], st[2 * ks][3]);
        pa[ks][2] = pack2<T>(st[2 * ks + 1][0], st[2 * ks + 1][1]);
        pa[ks][3] = pack2<T>(st[2 * ks + 1][2], st[2 * ks + 1][3]);
        dsa[ks][0] = pack2<T>(dpt[2 * ks][0], dpt[2 * ks][1]);
        dsa[ks][1] = pack2<T>(dpt[2 * ks][2], dpt[2 * ks][3]);
        dsa[ks][2] = pack2<T>(dpt[2 * ks + 1][0], dpt[2 * ks + 1][1]);
        dsa[ks][3] = pack2<T>(dpt[2 * ks + 1][2], dpt[2 * ks + 1][3]);
      }

      // Packed pairs to shared memory, [key][query] in swizzled 128-byte rows: the pair (key r,
      // queries q, q + 1) at chunk q / 64, row r, 16-byte unit (q % 64 / 8) ^ (r % 8).
      auto store_pairs = [&](uint32 tile, const uint32 (&x)[kPSteps][4]) {
#pragma unroll
        for (int ks = 0; ks < kPSteps; ++ks) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int r = key_base + g + 8 * (i % 2);
            const int q = q_col0 + 16 * ks + 8 * (i / 2) + 2 * t;
            st_shared_b32(tile + (q / 64) * Tr::kDsChunkBytes + r * 128 +
                              ((((q % 64) / 8) ^ (r % 8)) << 4) + (q % 8) * 2,
                          x[ks][i]);
          }
        }
      };
      const uint32 ds = ds_smem(step % 2);
      // dO, Q columns [d_col0, d_col0 + kConsumerDims) as the MN-major B of dV, dK: 16 queries =
      // 2048 B a step.
      const uint32 do_cols = do_smem(stage) + (d_col0 / 64) * Tr::kQChunkBytes;
      const uint32 q_dims = q_smem(stage) + (d_col0 / 64) * Tr::kQChunkBytes;
      if constexpr (!Tr::kSplitD) {
        // -- dV_c += P^T dO, dK_c += dS^T Q with P^T, dS^T from registers --
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kMSteps; ++ks) {
          Wgmma<T, Tr::kConsumerDims>::template rs<1>(
              acc_dv, pa[ks], make_desc(do_cols + ks * 2048, Tr::kQChunkBytes, 1024), 1);
        }
#pragma unroll
        for (int ks = 0; ks < kMSteps; ++ks) {
          Wgmma<T, Tr::kConsumerDims>::template rs<1>(
              acc_dk, dsa[ks], make_desc(q_dims + ks * 2048, Tr::kQChunkBytes, 1024), 1);
        }
        wgmma_commit();
        if (!p.deterministic) {
          store_pairs(ds, dsa);  // while dV, dK run
          fence_proxy_async_smem();
        }
        wgmma_wait<0>();
        fence_operand(acc_dv);
        fence_operand(acc_dk);
        fence_operand(pa);
        fence_operand(dsa);
        if (lane == 0) mbar_arrive(empty(stage));  // this warp is done with Q, dO and the stats
        // Both consumers' dS^T rows must be in before dQ reads them.
        if (!p.deterministic) named_bar_sync(1, 2 * Tr::kWarpgroupThreads);
      } else {
        // -- P^T, dS^T of both consumers' query columns meet in shared memory; then dV_c += P^T
        // dO, dK_c += dS^T Q over all kBlockM queries, A K-major (a k16 step is 32 B) --
        store_pairs(ds + Tr::kPtOffsetInBuf, pa);
        store_pairs(ds, dsa);
        fence_proxy_async_smem();
        named_bar_sync(1, 2 * Tr::kWarpgroupThreads);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kMSteps; ++ks) {
          Wgmma<T, Tr::kConsumerDims>::template ss<0, 1>(
              acc_dv, make_desc(ds + Tr::kPtOffsetInBuf + ks * 32, 16, 1024),
              make_desc(do_cols + ks * 2048, Tr::kQChunkBytes, 1024), 1);
        }
#pragma unroll
        for (int ks = 0; ks < kMSteps; ++ks) {
          Wgmma<T, Tr::kConsumerDims>::template ss<0, 1>(
              acc_dk, make_desc(ds + ks * 32, 16, 1024),
              make_desc(q_dims + ks * 2048, Tr::kQChunkBytes, 1024), 1);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_operand(acc_dv);
        fence_operand(acc_dk);
        if (lane == 0 && p.deterministic) mbar_arrive(empty(stage));  // else warp 2 does
      }

      if (!p.deterministic) {
        // -- dQ (this consumer's part) = dS K: dS^T as MN-major A, K as MN-major B; 16 keys =
        // 2048 B a step --
        const uint32 ds_rows = ds + (dq_row0 / 64) * Tr::kDsChunkBytes;
        const uint32 k_cols = k_smem + (dq_col0 / 64) * Tr::kKVChunkBytes;
        float acc_dq[Tr::kDqCols / 8][4];
#pragma unroll
        for (int ks = 0; ks < Tr::kNSteps; ++ks) {
          Wgmma<T, Tr::kDqCols>::template ss<1, 1>(
              acc_dq, make_desc(ds_rows + ks * 2048, Tr::kDsChunkBytes, 1024),
              make_desc(k_cols + ks * 2048, Tr::kKVChunkBytes, 1024), ks > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_operand(acc_dq);
        // -- the dQ tile to shared memory for the producer's TMA reduction: (row, col) at box
        // col / 32, row, 16-byte unit (col % 32 / 4) ^ (row % 8). With split D this consumer's
        // half goes to the step's Q or dO slot, once neither consumer reads them any more. --
        uint32 tile = dq_smem;
        int tile_col0 = 0;  // the column of the tile's first box
        if (Tr::kSplitD) {
          named_bar_sync(2, 2 * Tr::kWarpgroupThreads);  // both consumers' dV, dK are done
          tile = consumer == 0 ? q_smem(stage) : do_smem(stage);
          tile_col0 = dq_col0;
        }
        mbar_wait(dq_empty, (step & 1) ^ 1);  // the previous step's tile has been read
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = dq_row0 + warp * 16 + h * 8 + g;
#pragma unroll
          for (int dt = 0; dt < Tr::kDqCols / 8; ++dt) {
            const int col = dq_col0 - tile_col0 + dt * 8 + 2 * t;
            st_shared_v2_f32(tile + (col / 32) * Tr::kDqBoxBytes + row * 128 +
                                 ((((col % 32) / 4) ^ (row % 8)) << 4) + (col % 4) * 4,
                             acc_dq[dt][2 * h], acc_dq[dt][2 * h + 1]);
          }
        }
        fence_proxy_async_smem();
        mbar_arrive(dq_full);
      }
    }

    // -- epilogue: dk, dv; rows past seqlen_k and columns past head_dim are not stored --
    T* dk = static_cast<T*>(p.dk) + batch * p.dk_batch_stride + kv_head * p.dk_head_stride;
    T* dv = static_cast<T*>(p.dv) + batch * p.dv_batch_stride + kv_head * p.dv_head_stride;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = n0 + key_base + h * 8 + g;
      const bool in_range = row < p.seqlen_k;
      store_row_sectors<T, kDTiles>(dk + row * p.dk_row_stride, d_col0, p.head_dim, t, in_range,
                                    dk_extent<T>(p),
                                    [&](int dt, int e) { return acc_dk[dt][2 * h + e]; });
      store_row_sectors<T, kDTiles>(dv + row * p.dv_row_stride, d_col0, p.head_dim, t, in_range,
                                    dv_extent<T>(p),
                                    [&](int dt, int e) { return acc_dv[dt][2 * h + e]; });
    }
  }
}

}  // namespace cuflash
