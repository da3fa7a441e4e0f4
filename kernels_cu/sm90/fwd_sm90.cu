// Forward attention for Hopper (sm_90a): TMA loads, an mbarrier pipeline, wgmma, warp specialisation.
//
// Persistent: one thread block per SM (grid = min(work units, SMs)) loops over query tiles
// (kBlockM rows of one (batch, head)) as its schedule gives them (FwdSm90Schedule), so the next
// tile's Q and K/V loads run under this tile's last products and epilogue instead of being
// exposed once per block. Each block has 1 + kConsumerWarpgroups warpgroups. The producer
// warpgroup gives most of its registers away (setmaxnreg) and one of its threads streams, tile
// after tile, Q into kQStages buffers and K/V tiles through kStages shared-memory slots with TMA
// (128-byte swizzle; out-of-bounds rows and head-dim columns arrive as zeros). Each consumer
// warpgroup owns 64 query rows of the tile: S = Q K^T (Q from registers with two consumers up to
// D = 128, wgmma RS; else from shared memory, wgmma SS), the online softmax in registers
// (softmax.cuh, the sm80 semantics), then O += P V with P straight from the S accumulators as
// the register A operand and V as a transposed (MN-major) B operand (wgmma RS). A query tile
// visits the key tiles its rows see (mask.cuh; a window bounds them at both ends), from the last
// to the first: the tiles the right edge cuts come first, those a window's left edge cuts last.
//
// Barriers: q_full[] / k_full[] / v_full[] (the producer's expect_tx, completed by TMA bytes) and
// q_empty[] / k_empty[] / v_empty[] (one arrive per consumer warp once its warpgroup's wgmma has
// read the buffer). K and V are released separately: K(i) is free once S(i) is done, a whole P V
// earlier than V(i), so with two slots the load of K(i+2) is not stuck behind O += P(i) V(i).
// Q is released once loaded into registers (kQInRegs), else after the tile's last S. Stages and
// parities come from running counters (K/V tiles and non-empty work tiles loaded so far), which
// producer and consumers advance alike.
#include "../core/common.cuh"
#include "../attention/mask.cuh"
#include "../attention/nonfinite.cuh"
#include "../attention/score.cuh"
#include "../sm80/mma_sm80.cuh"
#include "../attention/softmax.cuh"
#include "tma_sm90.cuh"
#include "wgmma_sm90.cuh"
#include "fwd_sm90_traits.cuh"

namespace cuflash {

// kSinks: whether the call has attention sinks (sink.cuh); a template argument so that kernels
// without them carry none of it.
template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, typename MaskKind,
          typename ScoreKind, bool kAligned, bool kSinks>
__global__ void __launch_bounds__(kWarps * kWarpSize, 1)
fwd_sm90(const __grid_constant__ FwdParams p, const __grid_constant__ TmaMap tma_q,
         const __grid_constant__ TmaMap tma_k, const __grid_constant__ TmaMap tma_v,
         const __grid_constant__ TmaMap tma_o /* 64-row boxes; with Tr::kStoreO */,
         const int* __restrict__ order /* kPairs with Tr::kScheduleTable, else null */) {
  typedef FwdSm90Traits<kHeadDim, kBlockM, kBlockN, kWarps> Tr;
  constexpr int kStages = Tr::kStages, kQStages = Tr::kQStages;
  static_assert(kAligned, "TMA needs 16-byte strides; unaligned inputs take the sm80 kernel");
  extern __shared__ __align__(1024) char smem_raw[];

  const uint32 base = smem_base_1024<Tr::kSmemBytes>(smem_raw);
  const uint32 bar = base + Tr::kBarOffset;
  auto q_smem = [&](int stage) { return base + Tr::kQOffset + stage * Tr::kQBytes; };
  auto k_smem = [&](int stage) { return base + Tr::kKOffset + stage * Tr::kKVBytes; };
  auto v_smem = [&](int stage) { return base + Tr::kVOffset + stage * Tr::kKVBytes; };
  auto q_full = [&](int stage) { return bar + 8 * stage; };
  auto q_empty = [&](int stage) { return bar + 8 * (kQStages + stage); };
  auto k_full = [&](int stage) { return bar + 8 * (2 * kQStages + stage); };
  auto v_full = [&](int stage) { return bar + 8 * (2 * kQStages + kStages + stage); };
  auto k_empty = [&](int stage) { return bar + 8 * (2 * kQStages + 2 * kStages + stage); };
  auto v_empty = [&](int stage) { return bar + 8 * (2 * kQStages + 3 * kStages + stage); };

  typedef Mask<MaskKind> M;
  const M mask(p);
  const Score<ScoreKind, T> score(p);  // bound to each tile's head (for_head) where it is used
  // A right edge without a left one (causal): a query tile's cost grows with m_block, and the
  // schedule pairs long tiles with short ones (_launch_sm90.pairs_tiles).
  constexpr bool kPairs = M::kRight && !M::kLeft;
  const FwdSm90Schedule<kBlockM, kPairs, kPairs && Tr::kScheduleTable> schedule(p, order);
  // The key tiles [begin, end) that the query rows [row0, row0 + rows) see (empty: none);
  // without a left edge from tile 0, a constant. (Without any edge, seqlen_k is read from p, as
  // in the ragged-end tests: ptxas then gives NoMask the code it had before the mask kinds.)
  // A kind with a block map (a user mask_mod) narrows them to the tiles its map shows.
  auto band_tiles = [&](int row0, int rows) -> Span {
    if (M::kLeft) return mask.template key_tiles<kBlockN>(row0, row0 + rows);
    return {0, ceil_div(M::kRight ? mask.keys_end(row0 + rows) : p.seqlen_k, kBlockN)};
  };
  auto key_tiles = [&](int row0, int rows, int head, int batch) -> Span {
    if constexpr (ScoreKind::kBlockMap) {
      return score.for_head(p, batch, head)
          .template key_tiles<kBlockN>(band_tiles(row0, rows), row0, row0 + rows);
    } else {
      return band_tiles(row0, rows);
    }
  };
  auto size = [](Span tiles) { return tiles.end - tiles.begin; };

  constexpr bool kDeferEpilogue = kPairs && Tr::kDeferCausalEpilogue;
  const int warpgroup = threadIdx.x / Tr::kWarpgroupThreads;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kQStages; ++s) {
      mbar_init(q_full(s), 1);
      mbar_init(q_empty(s), Tr::kConsumerWarps);
    }
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbar_init(k_full(s), 1);
      mbar_init(v_full(s), 1);
      mbar_init(k_empty(s), Tr::kConsumerWarps);
      mbar_init(v_empty(s), Tr::kConsumerWarps);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ---- producer: one thread issues every TMA load, tile after tile ----
    regs_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x == 0) {
      tma_prefetch(tma_q);
      tma_prefetch(tma_k);
      tma_prefetch(tma_v);
      int q_iter = 0, kv_iter = 0;  // Q tiles and K/V tiles loaded so far
      // One tile (rows from `row0`, kChunks chunks of `chunk_bytes`) into `dst`, once its
      // buffer is free (`empty` has completed the phase of parity `free_parity`): its bytes
      // expected on `full`, one TMA box per chunk.
      auto load_tile = [&](const TmaMap& map, uint32 dst, uint32 full, uint32 empty,
                           uint32 free_parity, int chunk_bytes, int row0, int head, int batch,
                           uint64 policy) {
        mbar_wait(empty, free_parity);
        mbar_arrive_expect_tx(full, Tr::kChunks * chunk_bytes);
#pragma unroll
        for (int c = 0; c < Tr::kChunks; ++c) {
          tma_load_4d(dst + c * chunk_bytes, map, full, c * Tr::kChunkCols, row0, head, batch,
                      policy);
        }
      };
      // L2 policies: Q is read once, K/V by every query tile of the head. With K/V kept and Q
      // evicted first, D = 256 causal ran 1.02-1.06x at 1k-2k, the rest unchanged (kernel notes
      // step 24).
      const uint64 q_policy = l2_policy<L2Evict::kFirst>();
      const uint64 kv_policy = l2_policy<L2Evict::kLast>();
      schedule.for_each_tile([&](int m_block, int head, int batch, int) {
        const int row0 = m_block * kBlockM;
        const Span tiles = key_tiles(row0, kBlockM, head, batch);
        const int n_blocks = size(tiles);
        if (n_blocks == 0) return;  // nothing to load: the consumers write zeros
        const int kv_head = head / p.group;
        // -- Q, once its buffer's previous tile has done its last S (first use: at once) --
        const int q_stage = q_iter % kQStages;
        if constexpr (Tr::kQPrefetch) {
#pragma unroll
          for (int c = 0; c < Tr::kChunks; ++c) {
            tma_prefetch_l2_4d(tma_q, c * Tr::kChunkCols, row0, head, batch);
          }
        }
        load_tile(tma_q, q_smem(q_stage), q_full(q_stage), q_empty(q_stage),
                  ((q_iter / kQStages) & 1) ^ 1, Tr::kQChunkBytes, row0, head, batch, q_policy);
        ++q_iter;
        // -- K and V, last key tile first --
        for (int i = 0; i < n_blocks; ++i, ++kv_iter) {
          const int n_row0 = (tiles.end - 1 - i) * kBlockN;
          const int stage = kv_iter % kStages;
          const uint32 free_parity = ((kv_iter / kStages) & 1) ^ 1;  // first pass: at once
          load_tile(tma_k, k_smem(stage), k_full(stage), k_empty(stage), free_parity,
                    Tr::kKVChunkBytes, n_row0, kv_head, batch, kv_policy);
          load_tile(tma_v, v_smem(stage), v_full(stage), v_empty(stage), free_parity,
                    Tr::kKVChunkBytes, n_row0, kv_head, batch, kv_policy);
        }
      });
    }
  } else {
    // ---- consumers: 64 query rows of each tile per warpgroup ----
    regs_alloc<Tr::kConsumerRegs>();
    constexpr int kNTiles = Tr::kNTiles, kDTiles = Tr::kDTiles;
    const int consumer = warpgroup - 1;
    const int warp = (threadIdx.x / kWarpSize) % 4;  // warp inside the warpgroup: 16 rows
    const int lane = threadIdx.x % kWarpSize;
    const int g = lane / 4, t = lane % 4;
    const int rows_before = consumer * Tr::kRowsPerConsumer + warp * 16;  // in the tile

    float acc_o[1][kDTiles][4];
    OnlineSoftmax<1> softmax;

    // Softmax turns. ptxas schedules register work across bar.arrive; the hand-over lands after
    // the row maxes and about 8 exponentials (checked in the SASS, kernel notes step 17) when its
    // thread count depends on them (zero_after) in masked instantiations, and when it does not
    // in the others (with the dependency, ptxas moves it behind ~57 of the 64 exponentials).
    auto wait_softmax_turn = [&]() { named_bar_sync(Tr::kTurnBarrier + consumer, 256); };
    auto pass_softmax_turn = [&](float dep) {
      named_bar_arrive(Tr::kTurnBarrier + (consumer ^ 1),
                       256 + (M::kMasks ? zero_after(dep) : 0));
    };
    auto softmax_update = [&](auto& s, float (&alpha)[2]) {  // s: float[1][n][4]
      if (Tr::kSoftmaxTurns) {
        softmax.template update_in_turn<Tr::kHandOverAt>(s, p.scale_log2, alpha,
                                                         wait_softmax_turn, pass_softmax_turn);
      } else {
        softmax.update(s, p.scale_log2, alpha);
      }
    };

    // This warp's 16 rows of Q as wgmma A fragments (kQInRegs), one ldmatrix.x4 per k16 step:
    // lane L reads row (L / 8 % 2) * 8 + L % 8 of the warp's rows, 16-byte unit 2 * (ks % 4) +
    // L / 16 of chunk ks / 4, at its 128-byte-swizzled place (unit ^ row % 8).
    uint32 qa[Tr::kQInRegs ? Tr::kQKSteps : 1][4];
    auto load_q = [&](uint32 q_rows) {
      const int row = warp * 16 + (lane / 8) % 2 * 8 + lane % 8;
#pragma unroll
      for (int ks = 0; ks < (Tr::kQInRegs ? Tr::kQKSteps : 0); ++ks) {
        const int unit = 2 * (ks % 4) + lane / 16;
        ldmatrix_x4(qa[ks], q_rows + (ks / 4) * Tr::kQChunkBytes + row * 128 +
                                ((unit ^ (lane % 8)) << 4));
      }
    };
    // The descriptor of the operand at `base + offset` (Tr::kDescOffsets: the address field is
    // bits 0-13 of address >> 4 and shared addresses stay below 256 KB, so adding offset >> 4 to
    // the base's descriptor cannot carry out of it).
    auto desc_at = [&](uint64 base_desc, uint32 base, uint32 offset, uint32 leading_bytes) {
      return Tr::kDescOffsets ? base_desc + (offset >> 4)
                              : make_desc(base + offset, leading_bytes, 1024);
    };
    // S = Q K^T of the tile in `stage` (both K-major; a k16 step is 32 B inside a chunk). Issued
    // and committed as one wgmma group; the caller waits. `q_rows`: this warpgroup's 64 rows of
    // Q, 64 * 128 B into each Q chunk (a multiple of 1024 B); unused when Q is in registers.
    auto issue_qk = [&](float (&s)[1][kNTiles][4], uint32 q_rows, int stage) {
      const uint64 desc_k0 = make_desc(k_smem(stage), 16, 1024);
      const uint64 desc_q0 = make_desc(q_rows, 16, 1024);
#pragma unroll
      for (int ks = 0; ks < Tr::kQKSteps; ++ks) {
        const int chunk = ks / 4, step = ks % 4;
        const uint64 desc_k =
            desc_at(desc_k0, k_smem(stage), chunk * Tr::kKVChunkBytes + step * 32, 16);
        if constexpr (Tr::kQInRegs) {
          Wgmma<T, kBlockN>::template rs<0>(s[0], qa[ks], desc_k, ks > 0);
        } else {
          const uint64 desc_q = desc_at(desc_q0, q_rows, chunk * Tr::kQChunkBytes + step * 32, 16);
          Wgmma<T, kBlockN>::ss(s[0], desc_q, desc_k, ks > 0);
        }
      }
      wgmma_commit();
    };
    // O += P V of the tile in `stage` (P from registers; V is MN-major, the transposed B operand:
    // 16 keys = 2048 B a step). One wgmma group.
    auto issue_pv = [&](const uint32 (&pa)[Tr::kPVSteps][4], int stage) {
      const uint64 desc_v0 = make_desc(v_smem(stage), Tr::kKVChunkBytes, 1024);
#pragma unroll
      for (int ks = 0; ks < Tr::kPVSteps; ++ks) {
        const uint64 desc_v = desc_at(desc_v0, v_smem(stage), ks * 2048, Tr::kKVChunkBytes);
        Wgmma<T, kHeadDim>::template rs<1>(acc_o[0], pa[ks], desc_v, 1);
      }
      wgmma_commit();
    };
    // Applies the score modification `mod` (score.cuh, bound to the tile's head) to key tile
    // `n_block`, then hides the keys that this warp's rows of the query tile at row0 do not see
    // (the mask's edges, the ragged end), on the tiles where some row misses some key.
    auto apply_mask = [&](float (&s)[1][kNTiles][4], int row0, int n_block,
                          const Score<ScoreKind, T>& mod) {
      const int col0 = n_block * kBlockN;
      bool bounded = false;  // masked by the rows' bounds from the block map (band included)
      if constexpr (ScoreKind::kModifies) {
        auto modify = [&](auto&& f) {
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              // the wgmma C fragment: rows g and g + 8 of the warp's 16, columns 2t and 2t + 1
              s[0][nt][e] = f(s[0][nt][e], row0 + rows_before + (e / 2) * 8 + g,
                              col0 + nt * 8 + 2 * t + e % 2);
            }
        };
        // By the block map, where the warp's 16 rows (one map block) see all the tile's keys, or
        // each row's keys are one interval: the score_mod alone, then its row's bounds hide the
        // rest (one compare a score, as the band's edges); elsewhere the mask_mod per element.
        if constexpr (ScoreKind::kBlockMap) {
          const int row_a = row0 + rows_before + g;
          int2 a = mod.row_bounds(row_a), b = mod.row_bounds(row_a + 8);
          if (mod.whole_in_block(row0 + rows_before, col0, col0 + kBlockN)) {
            a = b = make_int2(col0, min(col0 + kBlockN, p.seqlen_k));
          }
          bounded = __all_sync(0xffffffffu, a.x >= 0 && b.x >= 0);
          if (bounded) {
            modify([&](float x, int row, int col) { return mod.unmasked(x, row, col); });
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              // the row's bounds relative to this thread's first column
              const int first = (half ? b.x : a.x) - col0 - 2 * t;
              const int end = (half ? b.y : a.y) - col0 - 2 * t;
#pragma unroll
              for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                  const int c = nt * 8 + e;
                  if (c < first || c >= end) s[0][nt][2 * half + e] = neg_inf();
                }
            }
          } else {
            modify(mod);
          }
        } else {
          modify(mod);
        }
      }
      const bool ragged = col0 + kBlockN > p.seqlen_k;
      const bool cut = mask.cuts(row0 + rows_before, row0 + rows_before + 16, col0, col0 + kBlockN);
      if (!bounded && (ragged || cut)) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = row0 + rows_before + half * 8 + g;
          // The row's first and last visible keys, relative to this thread's first column (no
          // edge: the ragged end, seqlen_k from p as in key_tiles).
          const int first = mask.first_key(row) - col0 - 2 * t;
          const int last = (M::kRight ? mask.last_key(row) : p.seqlen_k - 1) - col0 - 2 * t;
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int c = nt * 8 + e;
              if (c > last || (M::kLeft && c < first)) s[0][nt][2 * half + e] = neg_inf();
            }
          }
        }
      }
    };
    // P, the A operand of P V: the S accumulators packed pairwise to 16 bits.
    auto pack_p = [&](uint32 (&pa)[Tr::kPVSteps][4], const float (&s)[1][kNTiles][4]) {
#pragma unroll
      for (int ks = 0; ks < Tr::kPVSteps; ++ks) {
        pa[ks][0] = pack2<T>(s[0][2 * ks][0], s[0][2 * ks][1]);
        pa[ks][1] = pack2<T>(s[0][2 * ks][2], s[0][2 * ks][3]);
        pa[ks][2] = pack2<T>(s[0][2 * ks + 1][0], s[0][2 * ks + 1][1]);
        pa[ks][3] = pack2<T>(s[0][2 * ks + 1][2], s[0][2 * ks + 1][3]);
      }
    };

    // The epilogue through TMA stores (Tr::kTmaStore), in two parts. finish_tile(): O / l (with
    // kDeferEpilogue packed as T into fin_out) and the lse. store_finished(): this warpgroup's 64
    // rows into its part of the O buffer, as TMA reads a 128-byte-swizzled box (16-byte unit u of
    // row r at u ^ r % 8), once the previous tile's stores have read it; then one TMA store per
    // chunk, issued by the warpgroup's first thread, and the lse. With kDeferEpilogue the second
    // part runs under the next tile's first S (or at the end), whether or not a tile is pending,
    // so that no branch surrounds it. One row (g + 8 * half of each warp) into the buffer:
    // A staged 64-row chunk of O sits every kOChunkBytes: packed in the O buffer, or the first
    // 64 rows of each chunk of a K or V slot (Tr::kOInKV).
    constexpr int kOChunkBytes = Tr::kTmaStore ? 64 * 128 : Tr::kKVChunkBytes;
    auto stage_o_row = [&](uint32 o_rows, int half, const uint2 (&out)[kDTiles / 2]) {
      const int row = warp * 16 + g + half * 8;
#pragma unroll
      for (int j = 0; j < kDTiles / 2; ++j) {
        const int col = row_sector_col(j, t);
        const int unit = (col % Tr::kChunkCols) / 8;
        st_shared_v2_b32(o_rows + (col / Tr::kChunkCols) * kOChunkBytes + row * 128 +
                             ((unit ^ (row % 8)) << 4) + (col % 8) * 2,
                         out[j].x, out[j].y);
      }
    };
    auto tma_store_o = [&](uint32 o_rows, int row0, int head, int batch) {
#pragma unroll
      for (int c = 0; c < Tr::kChunks; ++c) {
        tma_store_4d(tma_o, o_rows + c * kOChunkBytes, c * Tr::kChunkCols,
                     row0 + consumer * Tr::kRowsPerConsumer, head, batch);
      }
      bulk_commit_group();
    };
    // This warpgroup's O (acc_o, already divided by l) packed and written into the box at o_rows.
    auto stage_acc_o = [&](uint32 o_rows) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        uint2 out[kDTiles / 2];
        row_sectors<T, kDTiles>(out, t,
                                [&](int dt, int e) { return acc_o[0][dt][2 * half + e]; });
        stage_o_row(o_rows, half, out);
      }
    };
    // The lse of this thread's two rows of the tile at row0 (its quad's first thread writes).
    auto write_lse = [&](int row0, int head, int batch, const float (&lse)[2]) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row0 + rows_before + g + half * 8;
        if (row < p.seqlen_q && p.lse != nullptr && t == 0) {
          float* lse_out = static_cast<float*>(p.lse) + batch * p.lse_batch_stride +
                           head * p.lse_head_stride + row;
          CUFLASH_CHECK_ACCESS(lse_extent<float>(p), lse_out, 4);
          *lse_out = lse[half];
        }
      }
    };
    // O / l and the lse of this thread's rows, the head's sink joining them where the call has
    // sinks (kernels without them keep the plain finaliser).
    auto finalize = [&](float (&lse)[2], int head) {
      if constexpr (kSinks) {
        softmax.finalize(acc_o, static_cast<float>(p.scale), lse, sink_of<true>(p, head));
      } else {
        softmax.finalize(acc_o, static_cast<float>(p.scale), lse);
      }
    };
    uint2 fin_out[2][kDTiles / 2] = {};
    float fin_lse[2] = {0.f, 0.f};
    int fin_row0 = 0, fin_head = 0, fin_batch = 0;
    bool fin_pending = false;
    auto finish_tile = [&](int row0, int head, int batch) {
      finalize(fin_lse, head);
      if constexpr (kDeferEpilogue) {  // held in registers past the acc_o of the next tile
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          row_sectors<T, kDTiles>(fin_out[half], t,
                                  [&](int dt, int e) { return acc_o[0][dt][2 * half + e]; });
        }
      }
      fin_row0 = row0;
      fin_head = head;
      fin_batch = batch;
      fin_pending = true;
    };
    auto store_finished = [&]() {
      const uint32 o_rows = base + Tr::kOOffset + consumer * Tr::kChunks * 64 * 128;
      const bool leader = threadIdx.x % Tr::kWarpgroupThreads == 0;
      if (leader) bulk_wait_group_read<0>();
      named_bar_sync(Tr::kEpilogueBarrier + consumer, Tr::kWarpgroupThreads);
      if constexpr (kDeferEpilogue) {
#pragma unroll
        for (int half = 0; half < 2; ++half) stage_o_row(o_rows, half, fin_out[half]);
      } else {  // not held over: packed here
        stage_acc_o(o_rows);
      }
      fence_proxy_async_smem();
      named_bar_sync(Tr::kEpilogueBarrier + consumer, Tr::kWarpgroupThreads);
      if (leader && fin_pending) tma_store_o(o_rows, fin_row0, fin_head, fin_batch);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = fin_row0 + rows_before + g + half * 8;
        if (!fin_pending || row >= p.seqlen_q) continue;
        if (p.lse != nullptr && t == 0) {
          float* lse_out = static_cast<float*>(p.lse) + fin_batch * p.lse_batch_stride +
                           fin_head * p.lse_head_stride + row;
          CUFLASH_CHECK_ACCESS(lse_extent<float>(p), lse_out, 4);
          *lse_out = fin_lse[half];
        }
      }
      fin_pending = false;
    };

    // The softmax turns run on across tiles: both consumers take one per key tile (none for a
    // tile without keys), so they keep alternating. Consumer 1 gives consumer 0 the first turn
    // here; consumer 0 takes the last hand-over after its final tile.
    if (Tr::kSoftmaxTurns && consumer == 1) named_bar_arrive(Tr::kTurnBarrier, 256);
    int q_iter = 0, kv_iter = 0;  // Q tiles and K/V tiles consumed so far (as the producer counts)
    // Tr::kOInKV: the empty barrier of the slot this warpgroup's last O was staged in (0: none
    // pending). Its leader waits for the TMA stores' reads and releases it for the four warps
    // only after the next tile's first S is issued, so the stores drain under that S.
    // A wait on a load into that slot (the skipped tiles, the first S) releases it first.
    uint32 staged_slot = 0;
    int staged_stage = -1;
    auto release_staged = [&]() {
      if (!Tr::kOInKV) return;
      if (staged_slot != 0 && threadIdx.x % Tr::kWarpgroupThreads == 0) {
        bulk_wait_group_read<0>();
#pragma unroll
        for (int w = 0; w < 4; ++w) mbar_arrive(staged_slot);
      }
      staged_slot = 0;
      staged_stage = -1;
    };
    auto release_staged_if = [&](int stage) {
      if (Tr::kOInKV && staged_stage == stage) release_staged();
    };
    auto slot_barrier = [&](int parity, int c) { return Tr::kSlotBarrier + 2 * parity + c; };
    NonFinite nonfinite;  // over every tile's O (with a mask edge): nonfinite.cuh
    schedule.for_each_tile([&](int m_block, int head, int batch, int next_m) {
      const int row0 = m_block * kBlockM;
      const Score<ScoreKind, T> tile_score = score.for_head(p, batch, head);
      // Loaded by the producer, from tile n_begin + n_loaded - 1 down to tile n_begin.
      const Span tiles = key_tiles(row0, kBlockM, head, batch);
      const int n_begin = tiles.begin, n_loaded = size(tiles);
      // Tr::kOInKV: this tile's O is staged in its last key tile's slots where the next tile
      // has the key tiles to drain it under (both consumers decide alike); else stored directly.
      // (Not with a block map, whose next tile's count would need that tile's map entries.)
      const bool stage_o = Tr::kOInKV && !ScoreKind::kBlockMap && n_loaded > 0 && next_m >= 0 &&
                           size(band_tiles(next_m * kBlockM, kBlockM)) >= Tr::kStageMinNext;
      // This warpgroup's own rows may see fewer at the top (Tr::kSkipMaskedTiles: it walks tiles
      // n_begin + n_blocks - 1 down to n_begin; the last ones, before a window's left edge for its
      // rows, it walks masked: the staged O's slot is the tile's last). Its first row is read from
      // lane 0 so that ptxas knows it is warp-uniform: the count, and the stage and parity
      // counters that follow from it, then stay in uniform registers (from `consumer` itself they
      // were per-thread, and spilled at D = 256).
      const int wg_row0 =
          M::kRight ? __shfl_sync(0xffffffff, row0 + consumer * Tr::kRowsPerConsumer, 0) : 0;
      int n_blocks = M::kRight && Tr::kSkipMaskedTiles
                         ? ceil_div(mask.keys_end(wg_row0 + Tr::kRowsPerConsumer), kBlockN) -
                               n_begin
                         : n_loaded;
      if constexpr (ScoreKind::kBlockMap) n_blocks = max(0, min(n_blocks, n_loaded));
      const int q_stage = q_iter % kQStages;
      const int slot_parity = q_iter & 1;  // both consumers count the tiles with keys loaded
      // The tiles loaded first that this warpgroup does not need: released unread, once loaded
      // (an empty barrier's arrivals count towards the slot's current use).
#pragma unroll 1
      for (int i = n_blocks; i < n_loaded; ++i, ++kv_iter) {
        const int stage = kv_iter % kStages;
        const uint32 parity = (kv_iter / kStages) & 1;
        release_staged_if(stage);
        mbar_wait(k_full(stage), parity);
        mbar_wait(v_full(stage), parity);
        if (lane == 0) {
          mbar_arrive(k_empty(stage));
          mbar_arrive(v_empty(stage));
        }
      }
      if (n_blocks == 0 && n_loaded > 0) {  // no key for these rows: Q released unread
        mbar_wait(q_full(q_stage), (q_iter / kQStages) & 1);
        if (lane == 0) mbar_arrive(q_empty(q_stage));
        ++q_iter;
      }

#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_o[0][dt][e] = 0.f;
      softmax.init();

      // Software pipeline inside the warpgroup (FA3's intra-warpgroup overlap): while the
      // tensor cores run O += P(i-1) V(i-1), the softmax of tile i runs on S(i), issued just
      // before it.
      if (n_blocks > 0) {
        // With Q in shared memory, its descriptors are built from q_rows at every S: the
        // consumer index read from lane 0 keeps them in uniform registers (from threadIdx, ptxas
        // kept 16 descriptors in 32 ordinary registers and moved them over per wgmma).
        const int q_consumer = Tr::kQInRegs ? consumer : __shfl_sync(0xffffffff, consumer, 0);
        const uint32 q_rows = q_smem(q_stage) + q_consumer * Tr::kRowsPerConsumer * 128;
        float s[1][kNTiles][4];
        uint32 pa[Tr::kPVSteps][4];
        float alpha[2];
        // After S of the K slot `stage`: K slots are released as soon as S is done, and Q (from
        // shared memory) after the tile's last S; where O is staged (stage_o), consumer kKStager
        // keeps the last K slot for it and the other tells it that its own reads are done.
        auto release_k = [&](int stage, bool last_s) {
          if (lane == 0) {
            if (!(stage_o && last_s && q_consumer == Tr::kKStager)) mbar_arrive(k_empty(stage));
            if (!Tr::kQInRegs && last_s) mbar_arrive(q_empty(q_stage));
          }
          if (stage_o && last_s && q_consumer != Tr::kKStager) {
            named_bar_arrive(slot_barrier(slot_parity, Tr::kKStager), 2 * Tr::kWarpgroupThreads);
          }
        };
        // -- key tile 0: S, softmax (O is still zero: nothing to rescale) --
        const int first = kv_iter % kStages;
        mbar_wait(q_full(q_stage), (q_iter / kQStages) & 1);
        if (Tr::kQInRegs) {
          load_q(q_rows);
          __syncwarp();  // every lane's reads are done before lane 0 releases the buffer
          if (lane == 0) mbar_arrive(q_empty(q_stage));
        }
        // its previous O may be staged in this K slot
        if (Tr::kOInKV && q_consumer == Tr::kKStager) release_staged_if(first);
        mbar_wait(k_full(first), (kv_iter / kStages) & 1);
        wgmma_fence();
        issue_qk(s, q_rows, first);
        if constexpr (kDeferEpilogue) store_finished();  // the previous tile's, under this S
        release_staged();  // Tr::kOInKV: the previous tile's slot, its stores' reads under this S
        wgmma_wait<0>();
        fence_operand(s[0]);
        release_k(first, n_blocks == 1);
        apply_mask(s, row0, n_begin + (n_blocks - 1), tile_score);  // the first key tile walked
        // Tr::kHalfDiagonal: no row of this warpgroup sees the second half of its first key
        // tile; P's second half is zero. (This tile's turn ends after all its exponentials, as
        // ptxas places it; handing over earlier ran 0.90-0.98x: kernel notes step 19.)
        const int last_key = mask.last_key(wg_row0 + Tr::kRowsPerConsumer - 1);
        if (M::kRight && Tr::kHalfDiagonal &&
            last_key < (n_begin + (n_blocks - 1)) * kBlockN + kBlockN / 2) {
          softmax_update(*reinterpret_cast<float(*)[1][kNTiles / 2][4]>(&s), alpha);
#pragma unroll
          for (int nt = kNTiles / 2; nt < kNTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[0][nt][e] = 0.f;
        } else {
          softmax_update(s, alpha);
        }
        pack_p(pa, s);

        for (int i = 1; i < n_blocks; ++i) {
          const int it = kv_iter + i;
          const int stage = it % kStages, prev = (it - 1) % kStages;
          // -- issue S(i) = Q K(i)^T, then O += P(i-1) V(i-1) --
          mbar_wait(k_full(stage), (it / kStages) & 1);
          mbar_wait(v_full(prev), ((it - 1) / kStages) & 1);
          wgmma_fence();
          issue_qk(s, q_rows, stage);
          issue_pv(pa, prev);
          // -- softmax of tile i while P V runs (groups complete in order: S(i) first) --
          wgmma_wait<1>();
          fence_operand(s[0]);
          release_k(stage, i == n_blocks - 1);
          apply_mask(s, row0, n_begin + (n_blocks - 1 - i), tile_score);
          softmax_update(s, alpha);
          wgmma_wait<0>();
          fence_operand(acc_o[0]);
          fence_operand(pa);
          if (lane == 0) mbar_arrive(v_empty(prev));  // this warp is done with V(i-1)
          // -- O held sums relative to the old max: rescale, then P(i) replaces P(i-1) --
          softmax.rescale(acc_o, alpha);
          pack_p(pa, s);
        }

        // -- last key tile: O += P V --
        const int it_last = kv_iter + n_blocks - 1;
        const int last = it_last % kStages;
        mbar_wait(v_full(last), (it_last / kStages) & 1);
        wgmma_fence();
        issue_pv(pa, last);
        wgmma_wait<0>();
        fence_operand(acc_o[0]);
        fence_operand(pa);
        // The slot goes to the next tile's loads; where O is staged, the consumer that is not
        // kKStager keeps it for its O and kKStager tells it that its own reads are done.
        if (lane == 0 && !(stage_o && q_consumer != Tr::kKStager)) mbar_arrive(v_empty(last));
        if (stage_o && q_consumer == Tr::kKStager) {
          named_bar_arrive(slot_barrier(slot_parity, 1 - Tr::kKStager), 2 * Tr::kWarpgroupThreads);
        }
        kv_iter += n_blocks;
        ++q_iter;
      }

      if constexpr (M::kMasks || ScoreKind::kHides) {
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
          for (int e = 0; e < 4; ++e) nonfinite.see(acc_o[0][dt][e], e);
      }

      // -- epilogue: O / l, lse; rows >= seqlen_q and columns >= head_dim are not stored. It
      // runs while the producer already streams the next tile's Q and K/V (kDeferEpilogue: its
      // stores under the next tile's first S). --
      if (Tr::kTmaStore) {
        if (kDeferEpilogue && n_blocks == 0) store_finished();  // no first S to store it under
        finish_tile(row0, head, batch);
        if (!kDeferEpilogue) store_finished();
        return;
      }
      if (stage_o) {  // O staged in the last key tile's K or V slot
        const int c = __shfl_sync(0xffffffff, consumer, 0);
        const int last = (kv_iter - 1) % kStages;  // the last key tile, as both consumers count
        if (n_blocks == 0) {  // a consumer without keys only keeps the barriers' phases
          named_bar_sync(slot_barrier(slot_parity, c), 2 * Tr::kWarpgroupThreads);
          named_bar_arrive(slot_barrier(slot_parity, c ^ 1), 2 * Tr::kWarpgroupThreads);
        } else {
          float lse[2];
          finalize(lse, head);
          const uint32 slot_empty = c == Tr::kKStager ? k_empty(last) : v_empty(last);
          const uint32 o_rows = c == Tr::kKStager ? k_smem(last) : v_smem(last);
          named_bar_sync(slot_barrier(slot_parity, c), 2 * Tr::kWarpgroupThreads);
          stage_acc_o(o_rows);
          fence_proxy_async_smem();
          named_bar_sync(Tr::kEpilogueBarrier + consumer, Tr::kWarpgroupThreads);
          if (threadIdx.x % Tr::kWarpgroupThreads == 0) tma_store_o(o_rows, row0, head, batch);
          staged_slot = slot_empty;  // released once the stores have read it (release_staged)
          staged_stage = last;
          write_lse(row0, head, batch, lse);
          return;
        }
      }
      float lse[2];
      finalize(lse, head);
      T* o = static_cast<T*>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row0 + rows_before + g + half * 8;
        store_row_sectors<T, kDTiles>(o + row * p.o_row_stride, 0, p.head_dim, t,
                                      row < p.seqlen_q, o_extent<T>(p),
                                      [&](int dt, int e) { return acc_o[0][dt][2 * half + e]; });
        if (row < p.seqlen_q && p.lse != nullptr && t == 0) {
          float* lse_out = static_cast<float*>(p.lse) + batch * p.lse_batch_stride +
                           head * p.lse_head_stride + row;
          CUFLASH_CHECK_ACCESS(lse_extent<float>(p), lse_out, 4);
          *lse_out = lse[half];
        }
      }
    });
    // Consumer 1's last hand-over (its opening one when this block had no key tiles) has no
    // turn after it: consumer 0 takes it so every arrive on a named barrier is matched by exit.
    if constexpr (kDeferEpilogue) store_finished();  // the last tile's result
    release_staged();
    if (Tr::kSoftmaxTurns && consumer == 0) wait_softmax_turn();
    // The O stores have read shared memory (and are done) before the block exits.
    if (Tr::kStoreO && threadIdx.x % Tr::kWarpgroupThreads == 0) bulk_wait_group<0>();

    // -- a NaN or inf of v that a mask hid, multiplied in by P V: each warp repairs its 16 rows
    // of the tiles it computed (nonfinite.cuh), after the warpgroup's stores are done --
    if constexpr (M::kMasks || ScoreKind::kHides) {
      named_bar_sync(Tr::kEpilogueBarrier + consumer, Tr::kWarpgroupThreads);
      if (__any_sync(0xffffffffu, nonfinite.any())) {
        schedule.for_each_tile([&](int m_block, int head, int batch, int) {
          const int row0 = m_block * kBlockM;
          const Span tiles = key_tiles(row0, kBlockM, head, batch);
          const Span walked = {tiles.begin * kBlockN, min(p.seqlen_k, tiles.end * kBlockN)};
#pragma unroll 1
          for (int r = row0 + rows_before; r < min(row0 + rows_before + 16, p.seqlen_q); ++r) {
            repair_row<T, kHeadDim>(p, mask, score.for_head(p, batch, head), batch, head, r,
                                    walked, lane, sink_of<kSinks>(p, head));
          }
        });
      }
    }
  }
}

}  // namespace cuflash
