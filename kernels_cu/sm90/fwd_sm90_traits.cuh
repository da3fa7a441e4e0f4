// The Hopper forward's compile-time layout (FwdSm90Traits: tiles, stages, shared-memory offsets,
// register budgets) and its persistent schedule (FwdSm90Schedule). Part of fwd_sm90.cu.
#pragma once

#include "../core/common.cuh"

namespace cuflash {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_> struct FwdSm90Traits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * kWarpSize;

  static constexpr int kWarpgroupThreads = 128;
  static constexpr int kWarpgroups = kThreads / kWarpgroupThreads;
  static constexpr int kConsumerWarpgroups = kWarpgroups - 1;  // warpgroup 0 is the producer
  static constexpr int kConsumerWarps = kConsumerWarpgroups * 4;
  static constexpr int kRowsPerConsumer = 64;                 // wgmma's M
  // Registers per thread after setmaxnreg: 24 for the producer, the rest split over consumers
  // (the sum stays within the SM's 64K registers at one block per SM).
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = kConsumerWarpgroups == 2 ? 240 : 160;
  // Softmax turns (two consumers; kernel_notes_sm90.md steps 17-18): a consumer waits for its
  // turn (named barrier 1 + c), takes its row maxes and first exponentials, then hands the turn
  // to the other; the wgmma are issued freely. At D = 128, 1.04-1.09x the speed of FA3's
  // ping-pong (turns around the wgmma issue), which this replaced; on D = 64's two-consumer tile
  // 1.00-1.05x free consumers. At D = 256 the consumers run free (turns ran 0.93-0.97x at long
  // causal S); around three consumers (D = 64's long tile) every kind of turn ran slower.
  static constexpr bool kSoftmaxTurns = kConsumerWarpgroups == 2 && kHeadDim <= 128;
  static constexpr int kTurnBarrier = 1;  // + consumer; 0 is __syncthreads
  static constexpr int kEpilogueBarrier = 3;  // + consumer: its warpgroup (kTmaStore)
  // Exponentials before the hand-over (of 64 per thread): ptxas then puts it after every row
  // max and 7-15 MUFU.EX2. Placements forced with a shared-memory read (after 0, 4, 8, 16 or all
  // 64) ran slower than this unforced one (kernel notes step 17).
  static constexpr int kHandOverAt = 8;
  // A mask with a right edge (causal, window): each consumer skips the key tiles wholly past its
  // own 64 rows' right edge (the tile's first ones walked, loaded for the other consumers). With
  // 80-key tiles at D = 256 that is one tile of most causal 128-row tiles for consumer 0; with
  // 128-key tiles (the 128 x 128 tiles) it happens only for Sq != Sk, and is left out where the
  // consumers take softmax turns (a skipped tile would have to pass its turn on, and that code
  // alone cost 1-2% at D = 64; kernel notes step 18).
  static constexpr bool kSkipMaskedTiles = !kSoftmaxTurns;
  // A right edge, D = 64 (the softmax bounds it): a consumer whose rows see none of its first key
  // tile's second half (causal: consumer 0 of every 128 x 128 tile at Sq == Sk) runs that tile's
  // softmax on the first half only: causal 1.02-1.07x at 1k-4k. At D = 128 it ran 0.96-1.01x,
  // and is left out.
  static constexpr bool kHalfDiagonal = kHeadDim <= 64 && kBlockN == 128;
  // A tile's wgmma descriptors as the first one's plus each k-step's offset: one 64-bit uniform
  // add per wgmma instead of a shift, mask and or. Rotated A/B (kernel notes step 21): D=256
  // 0.99-1.05x of whole descriptors, D=64's three-consumer tile 1.01-1.10x, D=128 unchanged; but
  // D=64's two-consumer kernel 0.94-0.95x at 4k (the same code but for the wgmma issue), so it
  // keeps building each descriptor whole.
  static constexpr bool kDescOffsets = !(kHeadDim <= 64 && kConsumerWarpgroups == 2);
  // Causal: the schedule is the host's table (FwdSm90Schedule), whose single-tile tail evens out
  // the last round: 1.02-1.06x at D = 64, 1k-4k (kernel notes step 23). At D = 128 its code moved
  // the softmax hand-over and cost 2-3% at 1k, and at D = 256 the single tiles ran 0.97-0.99x at
  // 1k: both keep the pairs' round robin. The kernel takes it only with pairs (causal): mirrored
  // by _launch_sm90.takes_table.
  static constexpr bool kScheduleTable = kHeadDim <= 64;

  // Shared tiles are 128-byte-swizzled chunks of 64 16-bit columns (one TMA box each): a tile of
  // R rows and kHeadDim columns is kChunks chunks of R * 128 bytes.
  static constexpr int kChunkCols = 64;
  static constexpr int kChunks = kHeadDim / kChunkCols;
  static constexpr int kQChunkBytes = kBlockM * 128;
  static constexpr int kKVChunkBytes = kBlockN * 128;
  static constexpr int kQBytes = kChunks * kQChunkBytes;
  static constexpr int kKVBytes = kChunks * kKVChunkBytes;
  static constexpr int kStages = 2;  // K/V slots; mirrored by _launch_sm90.STAGES

  // Q buffers: two where they fit in the H100's 227 KB per block (D <= 128), so the next tile's
  // Q lands while this tile still computes; one at D = 256, released after the tile's last S.
  static constexpr int kSmemLimit = 232448;  // == _launch_sm90.SMEM_LIMIT
  __host__ __device__ static constexpr int smem_bytes_for(int q_stages, int o_bytes) {
    // + 1024: the dynamic shared window is only 16-byte aligned; swizzle atoms need 1024.
    return q_stages * kQBytes + 2 * kStages * kKVBytes + o_bytes +
           8 * (2 * q_stages + 4 * kStages) + 1024;
  }
  static constexpr int kQStages = smem_bytes_for(2, 0) <= kSmemLimit ? 2 : 1;
  // The epilogue writes O into shared memory (the tile's layout: 128-byte-swizzled chunks) and
  // one TMA store per consumer and chunk sends it out, where that fits (not at D = 256): the
  // consumers then issue a few shared stores instead of a global store per 4 columns.
  static constexpr int kOBytes = kChunks * kBlockM * 128;
  static constexpr bool kTmaStore = smem_bytes_for(kQStages, kOBytes) <= kSmemLimit;
  // Causal, D = 64 (two consumers, TMA stores): a tile's result is stored during the next tile,
  // under its first S, rather than between the tiles, where the warpgroup's first product waits
  // for it: 1.03x at causal 1k (kernel notes step 27). After the first softmax instead ran
  // 0.97-1.01x; the non-causal tile ran 0.92-0.96x either way, and at D = 128 the result held in
  // registers spills. Causal only: a window's tiles are measured neither way.
  static constexpr bool kDeferCausalEpilogue = kTmaStore && kSoftmaxTurns && kHeadDim <= 64;
  // Where no O buffer fits (D = 256), each consumer stages its 64 rows for the TMA stores in a
  // slot of the tile's last key tile instead: consumer kKStager in K's, free of reads once both
  // consumers' last S is done, the other in V's, once both last P V are. Each withholds its
  // release of that slot until its stores have read it, and waits for that only once its next
  // tile's first S is issued (or before it waits on a load into that slot). Named barrier
  // kSlotBarrier + 2 * (tile parity) + c: the other consumer is done with the slot consumer c
  // stages in. A tile is staged only where the block's next tile has kStageMinNext key tiles or
  // more; the others (and the last) store from registers, as before. Rotated A/B against
  // stores from registers only (kernel notes step 31): causal 768-2k 1.01-1.07x, 512
  // 0.98-1.00x, full 0.99-1.04x (controls 0.99-1.04x). Staging every tile ran 0.94-0.96x at
  // causal 512: a short next tile needs the slot back before the stores have drained. Consumer
  // 0 stages in K: at Sq == Sk it skips the diagonal's last key tile, so its first S reads the K
  // slot it staged in and waits for its own stores, a key tile ahead of consumer 1 (consumer 1
  // in K ran about 1% lower at causal 512-2k). Waiting for the stores' reads right after issuing
  // them gained nothing (step 28).
  static constexpr bool kOInKV =
      !kTmaStore && kConsumerWarpgroups == 2 && kBlockN >= kRowsPerConsumer;
  static constexpr bool kStoreO = kTmaStore || kOInKV;  // O leaves through TMA stores (tma_o)
  static constexpr int kSlotBarrier = 5;  // + 2 * parity + consumer: 5-8
  static constexpr int kKStager = 0;
  static constexpr int kStageMinNext = 4;  // 8: 0.96-0.97x at causal 512
  // One Q buffer (D = 256): the next tile's Q is fetched into L2 as soon as the producer has
  // issued this tile's last K/V loads, and loaded from there once the buffer is free (with the
  // above, about +1% at causal 1k). Fetching the first K/V tiles of a tile the same way ran
  // 0.95-0.99x (2 tiles) and 0.86-0.97x (5 tiles): step 31.
  static constexpr bool kQPrefetch = kQStages == 1;

  static constexpr int kQOffset = 0;
  static constexpr int kKOffset = kQStages * kQBytes;
  static constexpr int kVOffset = kKOffset + kStages * kKVBytes;
  static constexpr int kOOffset = kVOffset + kStages * kKVBytes;
  static constexpr int kBarOffset = kOOffset + (kTmaStore ? kOBytes : 0);
  // q_full[], q_empty[], {k,v}_full[], {k,v}_empty[]
  static constexpr int kBarriers = 2 * kQStages + 4 * kStages;
  // == _launch_sm90.smem_bytes
  static constexpr int kSmemBytes = smem_bytes_for(kQStages, kTmaStore ? kOBytes : 0);

  // Q in registers where they fit (4 * kQKSteps per thread, 32 at D = 128): S = Q K^T then reads
  // only K from shared memory (wgmma RS), and Q's buffer is released as soon as the tile's
  // fragments are loaded. Not at D = 256, whose O accumulators alone take 128 registers, nor with
  // three consumers of 160 registers (ptxas spills).
  static constexpr bool kQInRegs = kHeadDim <= 128 && kConsumerWarpgroups == 2;

  static constexpr int kNTiles = kBlockN / 8;    // n8 column groups of S per thread
  static constexpr int kDTiles = kHeadDim / 8;   // n8 column groups of O per thread
  static constexpr int kQKSteps = kHeadDim / 16; // k16 steps of Q K^T
  static constexpr int kPVSteps = kBlockN / 16;  // k16 steps of P V

  static_assert(kWarps % 4 == 0 && kConsumerWarpgroups >= 1, "whole warpgroups, one producer");
  static_assert(kBlockM == kConsumerWarpgroups * kRowsPerConsumer, "64 query rows per consumer");
  static_assert(kHeadDim % kChunkCols == 0, "head dim widths are whole 128-byte chunks");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "TMA box rows and wgmma N (k16 steps of P V)");
  static_assert(kBarOffset + 8 * kBarriers + 1024 == kSmemBytes, "layout and size agree");
};

// The persistent schedule (mirrored by _launch_sm90.schedule): block b takes work units b,
// b + gridDim.x, ... A unit covers one (batch, head), with its query tiles fastest, so the units
// running at once share few heads and their K/V stays hot in L2. A unit is one query tile, but
// with kPairs: where a tile's cost grows with m_block (causal) a static round robin over such
// tiles is unbalanced, so a unit pairs tile m_blocks-1-j (long, first) with tile j (short): with
// Sq == Sk every pair costs m_blocks + 1 key tiles and the blocks finish together, but for the
// last round, which is partly empty (3% of the time with 1024 pairs on 132 SMs). With kTable
// (Tr::kScheduleTable), a paired schedule comes from the host instead: see below.
template <int kBlockM, bool kPairs, bool kTable> struct FwdSm90Schedule {
  static constexpr int kTilesPerUnit = kPairs ? 2 : 1;
  int m_blocks;        // query tiles per (batch, head)
  int units_per_head;  // work units per (batch, head)
  int units;
  int heads_q;

  __device__ FwdSm90Schedule(const FwdParams& p, const int* /* order: with a table only */)
      : m_blocks(ceil_div(p.seqlen_q, kBlockM)),
        units_per_head(ceil_div(m_blocks, kTilesPerUnit)),
        units(units_per_head * p.heads_q * p.batch),
        heads_q(p.heads_q) {}

  // Query tile `sub` of work unit `unit`; false when there is none (the middle tile of an odd
  // m_blocks is a unit of its own).
  __device__ bool tile(int unit, int sub, int& m_block, int& head, int& batch) const {
    const int j = unit % units_per_head;
    const int bh = unit / units_per_head;
    head = bh % heads_q;
    batch = bh / heads_q;
    m_block = kPairs && sub == 0 ? m_blocks - 1 - j : j;
    return sub == 0 || 2 * j + 1 != m_blocks;
  }

  // The m_block of the tile after (unit, sub) in this block's walk; -1 after its last.
  __device__ int next_m_block(int unit, int sub) const {
    int m_block, head, batch;
    if (sub + 1 < kTilesPerUnit && tile(unit, sub + 1, m_block, head, batch)) return m_block;
    if (unit + gridDim.x < units && tile(unit + gridDim.x, 0, m_block, head, batch)) {
      return m_block;
    }
    return -1;
  }

  // visit(m_block, head, batch, next_m_block) for each query tile of this block, in order (the
  // next tile's m_block, -1 after the last): the one walk that
  // the producer and the consumers both follow (their stage and parity counters depend on it).
  template <typename Visit> __device__ void for_each_tile(Visit visit) const {
    for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
#pragma unroll 1
      for (int sub = 0; sub < kTilesPerUnit; ++sub) {
        int m_block, head, batch;
        if (tile(unit, sub, m_block, head, batch)) {
          visit(m_block, head, batch, next_m_block(unit, sub));
        }
      }
    }
  }
};

// Pairs with a schedule table (causal, Tr::kScheduleTable): the host balances the tiles
// (_launch_sm90.causal_order) and hands each block its list: block b computes the units
// order[order[b]] .. order[order[b + 1] - 1], two entries each, a pair as above or a single tile
// and -1. The last rounds of pairs (_launch_sm90.TAIL_ROUNDS), where the round robin would
// leave the last round partly empty, come as single tiles, longest first onto the least loaded
// block. A tile is given as (batch * heads_q + head) * m_blocks + m_block. The walk keeps the
// shape of a loop over pairs: as one loop over tiles, it moved ptxas's softmax hand-over in
// D = 64's causal kernel from after ~12 exponentials to after all 64 (kernel notes step 23).
template <int kBlockM> struct FwdSm90Schedule<kBlockM, true, true> {
  const int* __restrict__ order;
  int m_blocks;
  int heads_q;

  __device__ FwdSm90Schedule(const FwdParams& p, const int* order_)
      : order(order_), m_blocks(ceil_div(p.seqlen_q, kBlockM)), heads_q(p.heads_q) {}

  template <typename Visit> __device__ void for_each_tile(Visit visit) const {
    const int end = __ldg(order + blockIdx.x + 1);
    for (int unit = __ldg(order + blockIdx.x); unit < end; unit += 2) {
#pragma unroll 1
      for (int sub = 0; sub < 2; ++sub) {
        const int tile = __ldg(order + unit + sub);
        if (tile < 0) continue;
        const int bh = tile / m_blocks;
        visit(tile - bh * m_blocks, bh % heads_q, bh / heads_q, -1);
      }
    }
  }
};

}  // namespace cuflash
