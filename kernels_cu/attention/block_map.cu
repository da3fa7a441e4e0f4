// Builds a user mask_mod's block map (block_map.cuh): one thread block per entry of one
// (batch, head), grid (row blocks + key blocks, heads of the map, batches of the map).
//
// A row block's entry: each thread takes one key of the band's range (mask.cuh) at a time and
// tests it against the block's kRows rows (the band, the ragged end, then the user's mask_mod),
// so that a warp's ballots say which of its 32 keys some row sees and which every row sees;
// thread 0 folds them, in key order, into the first and last seen key and the longest run of
// keys every row sees. A ballot per row gives each row's first and last seen key and their
// count (an interval when the count fills the span), which the block's warps join in shared
// memory. A key block's entry, and its keys' bounds, are the same with rows and keys
// exchanged. The template's shape is a KernelSpec's: T the Score's input type, kBlockM = kBlockN =
// kRows, the head dim and kAligned unused.
#include "block_map.cuh"
#include "../core/common.cuh"
#include "mask.cuh"
#include "score.cuh"

namespace cuflash {

// One row's seen keys so far (a lane's share of a warp's chunks).
struct RowFold {
  int first = 0x7fffffff, last = -1, count = 0;
  __device__ __forceinline__ void add(int at, uint32 bits) {
    if (bits == 0) return;
    first = min(first, at + __ffs(bits) - 1);
    last = max(last, at + 31 - __clz(bits));
    count += __popc(bits);
  }
};

// The running fold of one entry over positions in order.
struct EntryFold {
  int first, last;            // the first and last position some row (key) sees; first < 0: none
  int run_begin;              // the current run of positions every one sees (-1: none)
  int best_begin, best_end;   // the longest such run so far

  __device__ __forceinline__ void init() {
    first = -1;
    last = -1;
    run_begin = -1;
    best_begin = best_end = 0;
  }
  __device__ __forceinline__ void close_run(int end) {
    if (run_begin >= 0 && end - run_begin > best_end - best_begin) {
      best_begin = run_begin;
      best_end = end;
    }
    run_begin = -1;
  }
  // 32 positions from `at`: bit i of `any` / `all` for position at + i.
  __device__ __forceinline__ void add(int at, uint32 any, uint32 all) {
    if (any != 0) {
      if (first < 0) first = at + __ffs(any) - 1;
      last = at + 31 - __clz(any);
    }
    if (all == 0xffffffffu) {
      if (run_begin < 0) run_begin = at;
      return;
    }
    for (int i = 0; i < 32; ++i) {
      if ((all >> i) & 1u) {
        if (run_begin < 0) run_begin = at + i;
      } else {
        close_run(at + i);
      }
    }
  }
};

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, typename MaskKind,
          typename ScoreKind, bool kAligned>
__global__ void __launch_bounds__(kWarps * kWarpSize)
build_block_map(const __grid_constant__ FwdParams p, int* __restrict__ map) {
  static_assert(kBlockM == BlockMap::kRows && kBlockN == BlockMap::kRows,
                "one entry covers BlockMap::kRows rows or keys");
  static_assert(ScoreKind::kHides, "a block map is built from a mask_mod");
  constexpr int kThreads = kWarps * kWarpSize;
  __shared__ uint32 s_any[kWarps], s_all[kWarps];
  __shared__ int s_first[BlockMap::kRows], s_last[BlockMap::kRows], s_count[BlockMap::kRows];

  const int entry = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const Mask<MaskKind> mask(p);
  const Score<ScoreKind, T> score = Score<ScoreKind, T>(p).for_head(p, batch, head);
  const bool by_rows = entry < p.block_map_rows;
  // The entry's block (rows, or keys) and the positions it is tested against (keys, or rows).
  const int block0 = (by_rows ? entry : entry - p.block_map_rows) * BlockMap::kRows;
  const int block_end = min(block0 + BlockMap::kRows, by_rows ? p.seqlen_q : p.seqlen_k);
  const Span range = by_rows ? mask.keys(block0, block_end) : mask.queries(block0, block_end);
  auto sees = [&](int row, int col) {
    return col < p.seqlen_k && !mask.hides(row, col) && !score.mask_mod_hides(row, col);
  };

  EntryFold fold;
  fold.init();
  RowFold rows_lo, rows_hi;  // the block's rows (keys) lane and 32 + lane
  if (threadIdx.x < BlockMap::kRows) {
    s_first[threadIdx.x] = 0x7fffffff;
    s_last[threadIdx.x] = -1;
    s_count[threadIdx.x] = 0;
  }
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  // Chunks of kThreads positions from a multiple of 32 below range.begin, so that bit i of a
  // warp's ballot is position at + i.
  const int start = range.begin & ~31;
  for (int at = start; at < range.end; at += kThreads) {
    const int pos = at + threadIdx.x;
    const bool in = pos >= range.begin && pos < range.end;
    bool any = false, all = in && block0 < block_end;
    // a ballot per member of the block (every lane takes part)
    auto members_from = [&](int r0, RowFold& lane_member) {
      for (int r = 0; r < kWarpSize; ++r) {
        const int i = block0 + r0 + r;
        const bool seen = in && i < block_end && (by_rows ? sees(i, pos) : sees(pos, i));
        any |= seen;
        all &= seen || i >= block_end;
        const uint32 bits = __ballot_sync(0xffffffffu, seen);
        if (lane == r) lane_member.add(at + warp * kWarpSize, bits);
      }
    };
    members_from(0, rows_lo);
    members_from(kWarpSize, rows_hi);
    const uint32 any_bits = __ballot_sync(0xffffffffu, any);
    const uint32 all_bits = __ballot_sync(0xffffffffu, all);
    if (lane == 0) {
      s_any[warp] = any_bits;
      s_all[warp] = all_bits;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 0; w < kWarps; ++w) fold.add(at + w * kWarpSize, s_any[w], s_all[w]);
    }
    __syncthreads();
  }
  const int per_head = p.block_map_rows + ceil_div(p.seqlen_k, BlockMap::kRows);
  const int64 plane = (static_cast<int64>(batch) * gridDim.y + head) *
                      (4 * per_head + 2 * BlockMap::kRows * per_head);
  {  // each row's (key's) bounds: an interval when its count fills [first, last]
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const RowFold& f = half == 0 ? rows_lo : rows_hi;
      const int r = half * kWarpSize + lane;
      if (f.count > 0) {
        atomicMin(&s_first[r], f.first);
        atomicMax(&s_last[r], f.last);
        atomicAdd(&s_count[r], f.count);
      }
    }
    __syncthreads();
    if (threadIdx.x < BlockMap::kRows) {
      const int r = threadIdx.x, first = s_first[r], last = s_last[r], count = s_count[r];
      int2 bounds = make_int2(0, 0);
      if (count > 0) bounds = count == last - first + 1 ? make_int2(first, last + 1)
                                                        : make_int2(-1, -1);
      const int at = by_rows ? block0 + r : BlockMap::kRows * p.block_map_rows + block0 + r;
      reinterpret_cast<int2*>(map + plane + 4 * per_head)[at] = bounds;
    }
  }
  if (threadIdx.x == 0) {
    fold.close_run(range.end);
    int4 out = make_int4(0, 0, fold.best_begin, fold.best_end);
    if (fold.first >= 0) {
      out.x = fold.first;
      out.y = fold.last + 1;
    }
    reinterpret_cast<int4*>(map + plane)[entry] = out;
  }
}

}  // namespace cuflash
