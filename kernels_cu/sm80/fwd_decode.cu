// Split-KV decoding (flash-decoding) on tensor cores, sm_80 and newer: a few query rows against a
// long KV cache, contiguous or paged, read where it lies.
//
// One thread block takes one KV head of one sequence, the query rows of every query head that
// shares it (GQA packing: packed row r is query step r / group of head kv_head * group +
// r % group, so K and V are read once per KV head), and one split of the sequence's visible keys.
// Its warps split each key tile (16 keys a warp), each with its own online softmax; at the end
// the warps' partial rows are merged in shared memory. With one split the block writes the output
// and lse; with several it writes float32 partial rows and their lse, and decode_merge combines
// them by their log-sum-exp (the sinks join there).
//
// Keys are numbered within the sequence: key j of sequence b sits at cache position
// leftpad[b] + j of cache row cache_rows[b] (contiguous), or at slot j % page_size of page
// block_table[b][j / page_size] (paged). Sequence b has seqlens_k[b] - leftpad[b] keys.
#include "../core/common.cuh"
#include "../attention/mask.cuh"
#include "mma_sm80.cuh"
#include "../attention/score.cuh"
#include "../attention/softmax.cuh"

namespace cuflash {

// Mirrored field for field by `_decode.DECODE_PARAMS` (checked through
// CUFLASH_DECODE_PARAMS_SIZE, as FwdParams). Strides in elements; q and out are addressed as
// (batch, query step, head, dim), the caches as (row or page, slot, kv head, dim).
struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  void* lse;          // float (batch, heads_q, seqlen_q); null: not requested
  const void* sinks;  // float (heads_q,); null: none
  const void* alibi;  // float (batch, heads_q); null: none
  void* o_partial;    // float (splits, batch, heads_q, seqlen_q, head_dim); null: one split
  void* lse_partial;  // float (splits, batch, heads_q, seqlen_q)
  const int* seqlens_k;    // (batch,): cache positions in use (after the append)
  const int* leftpad;      // (batch,): the first position of each sequence; null: 0
  const int* cache_rows;   // (batch,): the contiguous cache's row of each sequence; null: b
  const int* block_table;  // (batch, block_table_stride) pages; null: contiguous
  // decode_append's: new keys and values (batch, new_keys, heads_kv, head_dim), the rotary
  // tables float (rotary positions, rotary_dim / 2) (null: no rotary), and where q rotated goes
  const void* k_new;
  const void* v_new;
  const float* rotary_cos;
  const float* rotary_sin;
  const void* q_in;  // q as given (`q` is then the rotated copy the attention reads)

  int64 q_batch_stride, q_row_stride, q_head_stride;
  int64 k_batch_stride, k_row_stride, k_head_stride;
  int64 v_batch_stride, v_row_stride, v_head_stride;
  int64 o_batch_stride, o_row_stride, o_head_stride;
  int64 lse_batch_stride, lse_head_stride;
  int64 block_table_stride;
  int64 kn_batch_stride, kn_row_stride, kn_head_stride;  // k_new
  int64 vn_batch_stride, vn_row_stride, vn_head_stride;  // v_new
  int64 qi_batch_stride, qi_row_stride, qi_head_stride;  // q_in

  double scale;
  float scale_log2;
  int batch;
  int heads_q;
  int heads_kv;
  int group;          // heads_q / heads_kv
  int seqlen_q;
  int head_dim;
  int window_left;    // WindowMask's band (mask.cuh), unbounded sides as seqlen_q + capacity
  int window_right;
  int cache_batch;    // rows (contiguous) or pages (paged) of the caches
  int cache_len;      // positions per row, or the page size
  int page_shift;     // log2 of the page size (paged)
  int num_splits;
  int new_keys;       // keys appended by decode_append (seqlens_k counts them already)
  int rotary_dim;     // features rotated (even, <= head_dim); 0: no rotary
  int rotary_interleaved;  // 1: pairs (2j, 2j + 1); 0: (j, j + rotary_dim / 2)
  int rotary_per_row; // 1: query i at the sequence's first new position + i; 0: all at it
  double softcap;     // Softcap's cap (score.cuh)
};

#ifdef CUFLASH_DECODE_PARAMS_SIZE
static_assert(sizeof(DecodeParams) == CUFLASH_DECODE_PARAMS_SIZE,
              "DecodeParams layout differs from cuflash/_decode.py DECODE_PARAMS");
#endif

// One sequence as mask.cuh and score.cuh read a problem: its own key count.
struct DecodeView {
  int seqlen_q, seqlen_k, heads_q, window_left, window_right;
  double scale, softcap;
  const void* alibi;
};

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_> struct DecodeTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // packed query rows: one m16 tile
  static constexpr int kBlockN = kBlockN_;  // keys per tile, 16 a warp
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kStages = kHeadDim <= 128 ? 3 : 2;  // K/V tiles in flight
  static constexpr int kDTiles = kHeadDim / 8;
  static constexpr int kQKSteps = kHeadDim / 16;

  typedef SwizzledTile<kBlockM, kHeadDim> QTile;
  typedef SwizzledTile<kBlockN, kHeadDim> KVTile;
  static constexpr int kStageBytes = 2 * KVTile::kBytes;  // K then V
  static constexpr int kStagesOffset = QTile::kBytes;
  // The warps' merge reuses the stages: each warp's rows as float, then per-row statistics.
  static constexpr int kPitch = kHeadDim + 4;  // floats a merged row: fewer bank conflicts
  static constexpr int kMergeBytes = kWarps * kBlockM * kPitch * 4;
  static constexpr int kStatBytes = 3 * kWarps * kBlockM * 4;
  static constexpr int kSmemBytes = kStagesOffset + kStages * kStageBytes;  // _decode's formula

  static_assert(kBlockM == 16, "one m16 tile of packed rows");
  static_assert(kBlockN == 16 * kWarps, "16 keys a warp: one k16 step of P V");
  static_assert(kMergeBytes + kStatBytes <= kStages * kStageBytes, "the merge fits the stages");
};

__device__ __forceinline__ void check_decode_smem(uint32 needed) {
  uint32 have;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
  if (have < needed) __trap();
}

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, typename MaskKind,
          typename ScoreKind, bool kAligned>
__global__ void __launch_bounds__(kWarps * kWarpSize)
fwd_decode(const __grid_constant__ DecodeParams p) {
  static_assert(kAligned, "16-byte rows only: unaligned caches take the per-sequence path");
  static_assert(!ScoreKind::kHides, "no bias or mask arrays here");
  typedef DecodeTraits<kHeadDim, kBlockM, kBlockN, kWarps> Tr;
  typedef typename Tr::QTile QTile;
  typedef typename Tr::KVTile KVTile;
  constexpr int kDTiles = Tr::kDTiles;
  extern __shared__ __align__(128) char smem[];
  check_decode_smem(Tr::kSmemBytes);

  const int split = blockIdx.x;
  const int row_tiles = gridDim.y / p.heads_kv;
  const int kv_head = blockIdx.y / row_tiles;
  const int m0 = (blockIdx.y % row_tiles) * kBlockM;
  const int batch = blockIdx.z;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int rows = p.seqlen_q * p.group;  // packed rows of this KV head

  const int start = p.leftpad == nullptr ? 0 : p.leftpad[batch];
  const int seqlen_k = p.seqlens_k[batch] - start;
  const DecodeView view = {p.seqlen_q, seqlen_k, p.heads_q, p.window_left, p.window_right,
                           p.scale, p.softcap, p.alibi};
  const Mask<MaskKind> mask(view);

  // This block's keys: the visible keys of its query steps, cut into num_splits runs of whole
  // tiles; a split past the end has none (output 0, lse -inf).
  const int step_lo = m0 / p.group;
  const int step_hi = min(p.seqlen_q, (min(m0 + kBlockM, rows) - 1) / p.group + 1);
  const Span seen = mask.keys(step_lo, step_hi);
  const int tiles = seen.empty() ? 0 : ceil_div(seen.end - (seen.begin / kBlockN) * kBlockN,
                                                kBlockN);
  const int per_split = ceil_div(tiles, p.num_splits);
  const int tile_begin = seen.begin / kBlockN + split * per_split;
  const int tile_end = seen.begin / kBlockN + min(tiles, (split + 1) * per_split);
  const int key_lo = max(seen.begin, tile_begin * kBlockN);   // keys loaded: [key_lo, key_hi)
  const int key_hi = min(seen.end, tile_end * kBlockN);

  // The two packed rows of this thread (g, g + 8): their query step, head and visible keys.
  int step[2], head[2];
  Span keys[2];
  Score<ScoreKind, T> score[2] = {Score<ScoreKind, T>(view), Score<ScoreKind, T>(view)};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = min(m0 + g + 8 * h, rows - 1);
    step[h] = r / p.group;
    head[h] = kv_head * p.group + r % p.group;
    const Span row = mask.row_keys(step[h]);
    keys[h] = Span{max(row.begin, key_lo), min(row.end, key_hi)};
    score[h] = score[h].for_head(view, batch, head[h]);
  }

  const T* q = static_cast<const T*>(p.q) + batch * p.q_batch_stride;
  const T* k = static_cast<const T*>(p.k) + kv_head * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + kv_head * p.v_head_stride;
  const int* pages = nullptr;
  if (p.block_table != nullptr) {
    pages = p.block_table + batch * p.block_table_stride;
  } else {
    const int row = p.cache_rows == nullptr ? batch : p.cache_rows[batch];
    k += row * p.k_batch_stride + start * p.k_row_stride;
    v += row * p.v_batch_stride + start * p.v_row_stride;
  }

  const uint32 q_base = smem_addr(smem);
  const uint32 stages = smem_addr(smem + Tr::kStagesOffset);
  constexpr int kChunks = QTile::kChunksPerRow;

  // Q: the block's packed rows, zeros past them and past head_dim.
  for (int i = threadIdx.x; i < kBlockM * kChunks; i += Tr::kThreads) {
    const int row = i / kChunks, chunk = i % kChunks;
    const int r = m0 + row;
    const bool ok = r < rows && chunk * 8 < p.head_dim;
    const T* src = q + (r / p.group) * p.q_row_stride +
                   (kv_head * p.group + r % p.group) * p.q_head_stride + chunk * 8;
    cp_async_16(q_base + QTile::offset(row, chunk), ok ? src : q, ok ? 16 : 0);
  }

  // K and V of tile n into stage `slot`: keys outside [key_lo, key_hi), which no row of the
  // block sees, become zeros. (A key inside that some rows see and others do not, with several
  // query steps, is read: a NaN or inf in its V reaches the rows that do not see it as 0 * NaN.
  // fwd_sm80's nonfinite.cuh repair is not here.)
  constexpr int kRowStep = Tr::kThreads / kChunks;
  static_assert(Tr::kThreads % kChunks == 0 && kBlockN % kRowStep == 0, "whole rows a step");
  auto load_kv = [&](int n, int slot) {
    const int chunk = threadIdx.x % kChunks;
    const bool col_ok = chunk * 8 < p.head_dim;
    const uint32 k_dst = stages + slot * Tr::kStageBytes;
    const uint32 v_dst = k_dst + KVTile::kBytes;
#pragma unroll
    for (int i = 0; i < kBlockN / kRowStep; ++i) {
      const int row = threadIdx.x / kChunks + i * kRowStep;
      const int key = n * kBlockN + row;
      const bool ok = col_ok && key >= key_lo && key < key_hi;
      int64 k_at = 0, v_at = 0;
      if (ok) {
        if (pages != nullptr) {
          const int64 page = pages[key >> p.page_shift];
          const int slot_in_page = key & ((1 << p.page_shift) - 1);
          k_at = page * p.k_batch_stride + slot_in_page * p.k_row_stride;
          v_at = page * p.v_batch_stride + slot_in_page * p.v_row_stride;
        } else {
          k_at = key * p.k_row_stride;
          v_at = key * p.v_row_stride;
        }
      }
      const uint32 off = KVTile::offset(row, chunk);
      cp_async_16(k_dst + off, ok ? k + k_at + chunk * 8 : k, ok ? 16 : 0);
      cp_async_16(v_dst + off, ok ? v + v_at + chunk * 8 : v, ok ? 16 : 0);
    }
  };

  float acc_o[1][kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[0][dt][e] = 0.f;
  OnlineSoftmax<1> softmax;
  softmax.init();

  // The first kStages - 1 tiles start loading with Q (one commit group per stage, empty ones
  // too, so that the waits below count stages).
#pragma unroll
  for (int s = 0; s < Tr::kStages - 1; ++s) {
    if (tile_begin + s < tile_end) load_kv(tile_begin + s, s);
    cp_async_commit();
  }

  const typename QTile::Reader q_frag(q_base, lane & 15, lane / 16);
  const typename KVTile::Reader k_frag(stages, 16 * warp + (lane & 7) + (lane / 16) * 8,
                                       (lane / 8) % 2);
  const typename KVTile::Reader v_frag(stages + KVTile::kBytes,
                                       16 * warp + (lane & 7) + ((lane / 8) % 2) * 8, lane / 16);

  for (int n = tile_begin; n < tile_end; ++n) {
    const int slot = (n - tile_begin) % Tr::kStages;
    cp_async_wait<Tr::kStages - 2>();
    __syncthreads();  // tile n landed; every warp is done with the slot loaded next
    const int ahead = n + Tr::kStages - 1;
    if (ahead < tile_end) load_kv(ahead, (ahead - tile_begin) % Tr::kStages);
    cp_async_commit();
    const uint32 at = slot * Tr::kStageBytes;

    // -- S = Q K^T for this warp's 16 keys --
    float s[1][2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < Tr::kQKSteps; ++ks) {
      uint32 a[4], b[4];
      ldmatrix_x4(a, q_frag(0, 2 * ks));
      ldmatrix_x4(b, k_frag(0, 2 * ks) + at);
      Mma16816<T>::run(s[0][0], a, b[0], b[1]);
      Mma16816<T>::run(s[0][1], a, b[2], b[3]);
    }

    // -- the score modification, then each row's visible keys --
    const int col0 = n * kBlockN + 16 * warp + 2 * t;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e / 2, col = col0 + nt * 8 + e % 2;
        float x = s[0][nt][e];
        if constexpr (ScoreKind::kModifies) x = score[h](x, step[h], col);
        s[0][nt][e] = (col < keys[h].begin || col >= keys[h].end) ? neg_inf() : x;
      }

    float alpha[2];
    softmax.update(s, p.scale_log2, alpha);
    softmax.rescale(acc_o, alpha);

    // -- O += P V: one k16 step over the warp's keys --
    uint32 a[4];
    a[0] = pack2<T>(s[0][0][0], s[0][0][1]);
    a[1] = pack2<T>(s[0][0][2], s[0][0][3]);
    a[2] = pack2<T>(s[0][1][0], s[0][1][1]);
    a[3] = pack2<T>(s[0][1][2], s[0][1][3]);
#pragma unroll
    for (int dt = 0; dt < kDTiles; dt += 2) {
      uint32 b[4];
      ldmatrix_x4_trans(b, v_frag(0, dt) + at);
      Mma16816<T>::run(acc_o[0][dt], a, b[0], b[1]);
      Mma16816<T>::run(acc_o[0][dt + 1], a, b[2], b[3]);
    }
  }

  // -- merge the warps' rows: statistics first, then each warp's output rescaled to the
  // block's max, summed row by row --
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stages, which now hold the merge
  float* merged = reinterpret_cast<float*>(smem + Tr::kStagesOffset);
  float* stat_max = merged + kWarps * kBlockM * Tr::kPitch;  // [warp][row], raw score units
  float* stat_sum = stat_max + kWarps * kBlockM;           // [warp][row]
  float* stat_weight = stat_sum + kWarps * kBlockM;        // [warp][row]: factor to the block
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float sum = quad_sum(softmax.row_sum[h]);
    if (t == 0) {
      stat_max[warp * kBlockM + g + 8 * h] = softmax.row_max[h];
      stat_sum[warp * kBlockM + g + 8 * h] = sum;
    }
  }
  __syncthreads();
  if (threadIdx.x < kBlockM) {
    const int row = threadIdx.x;
    float top = neg_inf();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) top = fmaxf(top, stat_max[w * kBlockM + row]);
    const float top_scaled = top == neg_inf() ? 0.f : top * p.scale_log2;
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float weight = exp2_ftz(stat_max[w * kBlockM + row] * p.scale_log2 - top_scaled);
      stat_weight[w * kBlockM + row] = weight;
      total += stat_sum[w * kBlockM + row] * weight;
    }
    stat_max[row] = top;    // warp 0's slots now hold the block's row statistics
    stat_sum[row] = total;
  }
  __syncthreads();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float weight = stat_weight[warp * kBlockM + g + 8 * h];
    float* dst = merged + (warp * kBlockM + g + 8 * h) * Tr::kPitch;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      *reinterpret_cast<float2*>(dst + dt * 8 + 2 * t) =
          make_float2(acc_o[0][dt][2 * h] * weight, acc_o[0][dt][2 * h + 1] * weight);
    }
  }
  __syncthreads();

  // -- store: the output and lse (one split, sinks folded in), or the float partial rows --
  const bool partial = p.o_partial != nullptr;
  constexpr int kQuads = kHeadDim / 4;
  for (int i = threadIdx.x; i < kBlockM * kQuads; i += Tr::kThreads) {
    const int row = i / kQuads, col = (i % kQuads) * 4;
    const int r = m0 + row;
    if (r >= rows || col >= p.head_dim) continue;
    float4 x = *reinterpret_cast<const float4*>(merged + row * Tr::kPitch + col);
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      const float4 y = *reinterpret_cast<const float4*>(merged + (w * kBlockM + row) * Tr::kPitch +
                                                        col);
      x.x += y.x, x.y += y.y, x.z += y.z, x.w += y.w;
    }
    const int qstep = r / p.group, qhead = kv_head * p.group + r % p.group;
    float total = stat_sum[row], top = stat_max[row] * static_cast<float>(p.scale);
    const bool empty = total == 0.f;
    float lse = empty ? neg_inf() : top + logf(total), weight = 1.f;
    if (!partial && p.sinks != nullptr) {
      const float sink = static_cast<const float*>(p.sinks)[qhead];
      if (!empty) fold_sink(top, total, weight, sink);
      lse = empty ? sink : top + logf(total);
    }
    const float inv = empty ? 0.f : weight / total;
    x.x *= inv, x.y *= inv, x.z *= inv, x.w *= inv;
    const int64 at = (static_cast<int64>(batch) * p.heads_q + qhead) * p.seqlen_q + qstep;
    if (partial) {
      const int64 part = static_cast<int64>(split) * p.batch * p.heads_q * p.seqlen_q + at;
      *reinterpret_cast<float4*>(static_cast<float*>(p.o_partial) + part * p.head_dim + col) = x;
      if (col == 0) static_cast<float*>(p.lse_partial)[part] = lse;
    } else {
      T* o = static_cast<T*>(p.o) + batch * p.o_batch_stride + qstep * p.o_row_stride +
             qhead * p.o_head_stride + col;
      *reinterpret_cast<uint2*>(o) = make_uint2(pack2<T>(x.x, x.y), pack2<T>(x.z, x.w));
      if (col == 0 && p.lse != nullptr) {
        static_cast<float*>(p.lse)[batch * p.lse_batch_stride + qhead * p.lse_head_stride +
                                   qstep] = lse;
      }
    }
  }
}

// Rotary embedding of element `col` of a row `x` (float values at `at(col)`) at the position
// whose tables are `cos`, `sin` (rotary_dim / 2 each): features pair (j, j + rotary_dim / 2), or
// (2j, 2j + 1) interleaved; features past rotary_dim pass through.
template <typename At>
__device__ __forceinline__ float rotated(At at, int col, int rotary_dim, bool interleaved,
                                         const float* cos, const float* sin) {
  const float x = at(col);
  if (col >= rotary_dim) return x;
  const int half = rotary_dim / 2;
  if (interleaved) {
    const int j = col / 2;
    return col % 2 == 0 ? x * cos[j] - at(col + 1) * sin[j] : x * cos[j] + at(col - 1) * sin[j];
  }
  return col < half ? x * cos[col] - at(col + half) * sin[col]
                    : x * cos[col - half] + at(col - half) * sin[col - half];
}

// Before the attention: the new keys (rotated) and values written into the cache at each
// sequence's positions seqlens_k[b] - new_keys + i (contiguous row or page), and q rotated
// into `q` from `q_in`. One block per (token, sequence); threads over heads and features.
template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, typename MaskKind,
          typename ScoreKind, bool kAligned>
__global__ void __launch_bounds__(kWarps * kWarpSize)
decode_append(const __grid_constant__ DecodeParams p) {
  const int token = blockIdx.x, batch = blockIdx.y;
  const int start = p.leftpad == nullptr ? 0 : p.leftpad[batch];
  const int first_new = p.seqlens_k[batch] - p.new_keys;  // cache position of new key 0
  const int base = first_new - start;  // rotary position of new key 0 (and of query 0)
  const int half = p.rotary_dim / 2;
  const bool interleaved = p.rotary_interleaved != 0;
  if (token < p.new_keys) {
    const int pos = first_new + token;
    int64 k_at, v_at;
    if (p.block_table != nullptr) {
      const int64 page = p.block_table[batch * p.block_table_stride + (pos >> p.page_shift)];
      const int slot = pos & ((1 << p.page_shift) - 1);
      k_at = page * p.k_batch_stride + slot * p.k_row_stride;
      v_at = page * p.v_batch_stride + slot * p.v_row_stride;
    } else {
      const int row = p.cache_rows == nullptr ? batch : p.cache_rows[batch];
      k_at = row * p.k_batch_stride + static_cast<int64>(pos) * p.k_row_stride;
      v_at = row * p.v_batch_stride + static_cast<int64>(pos) * p.v_row_stride;
    }
    const float* cos = p.rotary_cos + static_cast<int64>(base + token) * half;
    const float* sin = p.rotary_sin + static_cast<int64>(base + token) * half;
    for (int i = threadIdx.x; i < p.heads_kv * p.head_dim; i += blockDim.x) {
      const int head = i / p.head_dim, col = i % p.head_dim;
      const T* kn = static_cast<const T*>(p.k_new) + batch * p.kn_batch_stride +
                    token * p.kn_row_stride + head * p.kn_head_stride;
      const T* vn = static_cast<const T*>(p.v_new) + batch * p.vn_batch_stride +
                    token * p.vn_row_stride + head * p.vn_head_stride;
      const float key = p.rotary_dim == 0 ? to_float(kn[col])
          : rotated([&](int c) { return to_float(kn[c]); }, col, p.rotary_dim, interleaved,
                    cos, sin);
      T* k = const_cast<T*>(static_cast<const T*>(p.k)) + k_at + head * p.k_head_stride;
      T* v = const_cast<T*>(static_cast<const T*>(p.v)) + v_at + head * p.v_head_stride;
      k[col] = from_float<T>(key);
      v[col] = vn[col];
    }
  }
  if (p.q_in != nullptr && token < p.seqlen_q) {
    const int pos = base + (p.rotary_per_row ? token : 0);
    const float* cos = p.rotary_cos + static_cast<int64>(pos) * half;
    const float* sin = p.rotary_sin + static_cast<int64>(pos) * half;
    for (int i = threadIdx.x; i < p.heads_q * p.head_dim; i += blockDim.x) {
      const int head = i / p.head_dim, col = i % p.head_dim;
      const T* qi = static_cast<const T*>(p.q_in) + batch * p.qi_batch_stride +
                    token * p.qi_row_stride + head * p.qi_head_stride;
      T* q = const_cast<T*>(static_cast<const T*>(p.q)) + batch * p.q_batch_stride +
             token * p.q_row_stride + head * p.q_head_stride;
      q[col] = from_float<T>(rotated([&](int c) { return to_float(qi[c]); }, col, p.rotary_dim,
                                     interleaved, cos, sin));
    }
  }
}

// The splits' partial rows merged by their lse (merge_attention's rule), the sinks folded in:
// one block per (batch, head, query step) row. Each thread holds one split's weight (num_splits
// <= the block's threads); then each thread sums a strided subset of the splits for 4 columns,
// the loads of several splits in flight, and the subsets are added in shared memory.
template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kWarps, typename MaskKind,
          typename ScoreKind, bool kAligned>
__global__ void __launch_bounds__(kWarps * kWarpSize)
decode_merge(const __grid_constant__ DecodeParams p) {
  constexpr int kThreads = kWarps * kWarpSize;
  constexpr int kQuads = kHeadDim / 4;           // float4 columns of a row
  constexpr int kGroups = kThreads / kQuads;     // splits summed side by side
  static_assert(kQuads <= kThreads && kThreads % kQuads == 0, "merge: head dim vs threads");
  __shared__ float weight_of[kThreads];
  __shared__ float reduce[kWarps];
  __shared__ float4 part[kThreads];

  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int64 row = blockIdx.x;
  const int64 n_rows = static_cast<int64>(p.batch) * p.heads_q * p.seqlen_q;
  const int splits = p.num_splits;
  const float* lse_part = static_cast<const float*>(p.lse_partial);
  const float* o_part = static_cast<const float*>(p.o_partial);

  const float mine = tid < splits ? lse_part[tid * n_rows + row] : neg_inf();
  float top = mine;
#pragma unroll
  for (int d = 16; d > 0; d /= 2) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, d));
  if (lane == 0) reduce[warp] = top;
  __syncthreads();
  top = reduce[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) top = fmaxf(top, reduce[w]);
  const float shift = top == neg_inf() ? 0.f : top;
  const float e = tid < splits ? expf(mine - shift) : 0.f;
  float total = e;
#pragma unroll
  for (int d = 16; d > 0; d /= 2) total += __shfl_xor_sync(0xffffffffu, total, d);
  __syncthreads();  // every thread has read reduce[] for the maximum
  if (lane == 0) reduce[warp] = total;
  __syncthreads();
  total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += reduce[w];

  const int qstep = static_cast<int>(row % p.seqlen_q);
  const int qhead = static_cast<int>((row / p.seqlen_q) % p.heads_q);
  const int batch = static_cast<int>(row / (static_cast<int64>(p.seqlen_q) * p.heads_q));
  const bool empty = total == 0.f;
  float m = shift, weight = 1.f;
  float lse = empty ? neg_inf() : m + logf(total);
  if (p.sinks != nullptr) {
    const float sink = static_cast<const float*>(p.sinks)[qhead];
    if (!empty) fold_sink(m, total, weight, sink);
    lse = empty ? sink : m + logf(total);
  }
  weight_of[tid] = empty ? 0.f : e * (weight / total);
  __syncthreads();

  const int quad = tid % kQuads, group = tid / kQuads, col = 4 * quad;
  float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
  if (col < p.head_dim) {
    const int64 split_stride = n_rows * p.head_dim;  // floats from one split's row to the next
    const float* src = o_part + row * p.head_dim + col;
#pragma unroll 8
    for (int s = group; s < splits; s += kGroups) {
      const float w = weight_of[s];
      const float4 y = *reinterpret_cast<const float4*>(src + s * split_stride);
      x.x += w * y.x, x.y += w * y.y, x.z += w * y.z, x.w += w * y.w;
    }
  }
  part[tid] = x;
  __syncthreads();
  if (group == 0 && col < p.head_dim) {
#pragma unroll
    for (int g = 1; g < kGroups; ++g) {
      const float4 y = part[g * kQuads + quad];
      x.x += y.x, x.y += y.y, x.z += y.z, x.w += y.w;
    }
    T* o = static_cast<T*>(p.o) + batch * p.o_batch_stride + qstep * p.o_row_stride +
           qhead * p.o_head_stride;
    *reinterpret_cast<uint2*>(o + col) = make_uint2(pack2<T>(x.x, x.y), pack2<T>(x.z, x.w));
  }
  if (tid == 0 && p.lse != nullptr) {
    static_cast<float*>(p.lse)[batch * p.lse_batch_stride + qhead * p.lse_head_stride + qstep] =
        lse;
  }
}

}  // namespace cuflash
