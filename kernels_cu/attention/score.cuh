// What happens to each score between S = Q K^T and the mask: the score modifications.
//
// A score kind, a template type argument of every attention kernel beside its mask kind, fixes
// the modification at compile time, so that a kernel without one carries no code for it:
//     NoScore   scores as they are
//     Softcap   scale * s becomes cap * tanh(scale * s / cap) (flash-attn's order: scale, then
//               cap); cap from the parameter block (`softcap`, > 0)
//     Alibi     ALiBi alone (flash-attn's convention): -slope * the key's distance from the
//               row's bottom-right aligned diagonal (mask.cuh's Diagonal); the slopes are Accum
//               (batch, heads_q) at `alibi`
//     Mods      an additive bias (`bias`: float16/32/64, any strides, 0 where broadcast) and/or
//               a boolean mask array (`mask`: 0 hides the key), with ALiBi where `alibi` is set:
//               one kind for every combination, each present where its pointer is set (a
//               run-time test; a branch-free form, always reading both, spilled the Hopper
//               forward at D 128 and 256)
//     a user kind  generated from a `cuflash.ScoreMod` / `cuflash.MaskMod` (cuflash/_user_mods.py)
//               and compiled after the kernel's source: the same interface, reading the
//               caller's auxiliary arrays through Aux below; with ALiBi, a bias or a mask
//               array it holds a Score<Mods> and adds its terms before the score_mod
//     Neither Mods nor a user kind takes a softcap: its derivative needs the capped score
//     again, the bias re-read with it, which spilled the dK/dV kernels.
// A kernel builds its Score once from the parameter block and binds it to each (batch, query head)
// it computes (`for_head`); each call passes the score's query row and key column. The kinds that
// read neither return themselves and ignore the position, and the compiler drops the index math.
#pragma once

#include "block_map.cuh"
#include "../core/common.cuh"
#include "mask.cuh"
#include "sink.cuh"

namespace cuflash {

// kModifies: the scores change; kPositional: how depends on the row and key; kHides: a score
// may become -inf (hidden as the mask hides it); kAdditive: the modification adds a term, so its
// derivative by the raw score is 1 and a backward can form P at once, as without one;
// kBlockMap: the kind reads a block map (block_map.cuh) and has the Score methods that use it.
struct NoScore {
  static constexpr bool kModifies = false, kPositional = false, kHides = false, kAdditive = true,
                        kBlockMap = false;
};
struct Softcap {
  static constexpr bool kModifies = true, kPositional = false, kHides = false, kAdditive = false,
                        kBlockMap = false;
};
struct Alibi {
  static constexpr bool kModifies = true, kPositional = true, kHides = false, kAdditive = true,
                        kBlockMap = false;
};
struct Mods {
  static constexpr bool kModifies = true, kPositional = true, kHides = true, kAdditive = true,
                        kBlockMap = false;
};

// tanh in the precision a kernel's inputs need: the MUFU approximation (relative error ~2^-11,
// finer than a 16-bit score's rounding) for fp16/bf16 inputs, libdevice's tanhf and tanh for
// fp32 and fp64, whose tests hold them to 1e-5 and 1e-12.
template <typename T> __device__ __forceinline__ float tanh_for(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
template <> __device__ __forceinline__ float tanh_for<float>(float x) { return tanhf(x); }
template <typename T> __device__ __forceinline__ double tanh_for(double x) { return tanh(x); }

// The modification of kind `Kind` for inputs of type T, on scores of type A (float, or double for
// fp64 inputs). `score(s, row, col)` modifies the raw score of query row `row` and key `col`;
// `slope(modified, row, col)` is its derivative by the raw score.
template <typename Kind, typename T, typename A = typename AccumOf<T>::type> struct Score;

template <typename T, typename A> struct Score<NoScore, T, A> {
  template <typename Params> __device__ __forceinline__ explicit Score(const Params&) {}
  template <typename Params>
  __device__ __forceinline__ Score for_head(const Params&, int, int) const {
    return *this;
  }
  __device__ __forceinline__ A operator()(A s, int, int) const { return s; }
  __device__ __forceinline__ A slope(A, int, int) const { return A(1); }
  __device__ __forceinline__ bool hides(int, int) const { return false; }
  __device__ __forceinline__ void record(A, int, int) const {}
};

// 1 - tanh^2 for tanh = t, the derivative of a capped score; 0 for a hidden (-inf) score, whose
// P is 0, so that its dS is 0 and not 0 * inf.
template <typename A> __device__ __forceinline__ A tanh_slope(A t) {
  const A d = A(1) - t * t;
  return d > A(0) ? d : A(0);
}

template <typename T, typename A> struct Score<Softcap, T, A> {
  A inner;  // scale / cap: the raw score's argument of tanh
  A outer;  // cap / scale: tanh back in raw units
  template <typename Params>
  __device__ __forceinline__ explicit Score(const Params& p)
      : inner(static_cast<A>(p.scale / p.softcap)), outer(static_cast<A>(p.softcap / p.scale)) {}
  template <typename Params>
  __device__ __forceinline__ Score for_head(const Params&, int, int) const {
    return *this;
  }
  __device__ __forceinline__ A operator()(A s, int, int) const {
    return outer * tanh_for<T>(s * inner);
  }
  __device__ __forceinline__ A slope(A modified, int, int) const {
    return tanh_slope(modified * inner);  // tanh = modified * inner
  }
  __device__ __forceinline__ bool hides(int, int) const { return false; }
  __device__ __forceinline__ void record(A, int, int) const {}
};

// Loads element `i` of a bias stored as `dtype` (its itemsize: 2 float16, 4 float32, 8 float64).
template <typename A> __device__ __forceinline__ A load_bias(const void* base, int dtype, int64 i) {
  if (dtype == 2) return static_cast<A>(to_float(static_cast<const f16*>(base)[i]));
  if (dtype == 4) return static_cast<A>(static_cast<const float*>(base)[i]);
  return static_cast<A>(static_cast<const double*>(base)[i]);
}

template <typename T, typename A> struct Score<Alibi, T, A> {
  A decay;  // the head's slope / scale: the bias of one position, in raw units
  Diagonal diagonal;
  template <typename Params>
  __device__ __forceinline__ explicit Score(const Params& p) : decay(A(0)), diagonal(p) {}
  template <typename Params>
  __device__ __forceinline__ Score for_head(const Params& p, int batch, int head) const {
    Score bound = *this;
    const A slope = static_cast<const A*>(p.alibi)[batch * p.heads_q + head];
    bound.decay = static_cast<A>(static_cast<double>(slope) / p.scale);
    return bound;
  }
  __device__ __forceinline__ A operator()(A s, int row, int col) const {
    return s - decay * static_cast<A>(diagonal.distance(row, col));
  }
  __device__ __forceinline__ A slope(A, int, int) const { return A(1); }
  __device__ __forceinline__ bool hides(int, int) const { return false; }
  __device__ __forceinline__ void record(A, int, int) const {}
};

// Where a backward writes the bias's gradient (BwdParams::dbias); a forward has none.
template <typename Params> __device__ __forceinline__ void* dbias_of(const Params&) {
  return nullptr;
}
template <> __device__ __forceinline__ void* dbias_of<BwdParams>(const BwdParams& p) {
  return p.dbias;
}

template <typename T, typename A> struct Score<Mods, T, A> {
  A decay;          // ALiBi: the head's slope / scale, the bias of one position in raw units
  A unscale;        // 1 / scale: a bias in raw units
  Diagonal diagonal;
  int seqlen_q, seqlen_k;
  const void* bias;  // the (batch, head) plane of the bias; null: none
  const unsigned char* mask;  // the (batch, head) plane of the mask (1: attend); null: none
  A* dbias;  // the backward's (batch, head) plane of dbias, [key][query]; null: none
  int64 bias_row, bias_col, mask_row, mask_col;  // strides in elements (0: broadcast)
  int bias_dtype;
  template <typename Params>
  __device__ __forceinline__ explicit Score(const Params& p)
      : decay(A(0)),
        unscale(static_cast<A>(1.0 / p.scale)),
        diagonal(p),
        seqlen_q(p.seqlen_q),
        seqlen_k(p.seqlen_k),
        bias(nullptr),
        mask(nullptr),
        dbias(nullptr),
        bias_row(p.bias_row_stride),
        bias_col(p.bias_col_stride),
        mask_row(p.mask_row_stride),
        mask_col(p.mask_col_stride),
        bias_dtype(p.bias_dtype) {}
  template <typename Params>
  __device__ __forceinline__ Score for_head(const Params& p, int batch, int head) const {
    Score bound = *this;
    if (p.alibi != nullptr) {
      const A slope = static_cast<const A*>(p.alibi)[batch * p.heads_q + head];
      bound.decay = static_cast<A>(static_cast<double>(slope) / p.scale);
    }
    if (p.bias != nullptr) {
      bound.bias = static_cast<const char*>(p.bias) +
                   (batch * p.bias_batch_stride + head * p.bias_head_stride) * bias_dtype;
    }
    if (p.mask != nullptr) {
      bound.mask = static_cast<const unsigned char*>(p.mask) + batch * p.mask_batch_stride +
                   head * p.mask_head_stride;
    }
    if (dbias_of(p) != nullptr) {
      bound.dbias = static_cast<A*>(dbias_of(p)) +
                    (static_cast<int64>(batch) * p.heads_q + head) * seqlen_q * seqlen_k;
    }
    return bound;
  }
  __device__ __forceinline__ bool inside(int row, int col) const {
    return row < seqlen_q && col < seqlen_k;
  }
  // Whether the mask array hides key `col` from row `row`.
  __device__ __forceinline__ bool hides(int row, int col) const {
    return mask != nullptr && inside(row, col) && mask[row * mask_row + col * mask_col] == 0;
  }
  // The added terms alone: ALiBi's and the bias's (a user kind adds them before its score_mod).
  __device__ __forceinline__ A add(A s, int row, int col) const {
    s -= decay * static_cast<A>(diagonal.distance(row, col));  // decay 0: no ALiBi
    if (bias != nullptr && inside(row, col)) {
      s += load_bias<A>(bias, bias_dtype, row * bias_row + col * bias_col) * unscale;
    }
    return s;
  }
  __device__ __forceinline__ A operator()(A s, int row, int col) const {
    s = add(s, row, col);
    A hidden;
    minus_infinity(hidden);
    return hides(row, col) ? hidden : s;
  }
  // Added terms: the derivative is 1 (a hidden score's P is 0, so its dS is 0 anyway).
  __device__ __forceinline__ A slope(A, int, int) const { return A(1); }
  // The backward's dS of row `row`, key `col` (the loss's derivative by the scaled score, which
  // is the bias's), written where dbias is asked for.
  __device__ __forceinline__ void record(A ds, int row, int col) const {
    if (dbias != nullptr && inside(row, col)) {
      dbias[static_cast<int64>(col) * seqlen_q + row] = ds;
    }
  }
};

// One auxiliary array of a user modification (`aux=` of cuflash.attention): slot `slot` of the
// parameter block, of storage type S, read as V (float for float16/bfloat16, bool for bool), with
// N axes; `name(i, j, ...)` reads element (i, j, ...) by the caller's strides.
template <typename S> __device__ __forceinline__ S aux_value(S x) { return x; }
__device__ __forceinline__ float aux_value(f16 x) { return to_float(x); }
__device__ __forceinline__ float aux_value(bf16 x) { return to_float(x); }
__device__ __forceinline__ bool aux_value(unsigned char x) { return x != 0; }

template <typename S, int N> struct Aux {
  static_assert(N >= 0 && N <= kMaxAuxDims, "an auxiliary array has at most kMaxAuxDims axes");
  const S* base;
  int64 stride[N > 0 ? N : 1];
  template <typename Params>
  __device__ __forceinline__ Aux(const Params& p, int slot)
      : base(static_cast<const S*>(p.aux[slot])) {
#pragma unroll
    for (int a = 0; a < (N > 0 ? N : 1); ++a) stride[a] = p.aux_strides[slot][a];
  }
  template <typename... I> __device__ __forceinline__ auto operator()(I... index) const {
    static_assert(sizeof...(I) == N, "index an auxiliary array with one index per axis");
    int64 at = 0;
    int axis = 0;
    ((at += static_cast<int64>(index) * stride[axis++]), ...);
    return aux_value(base[at]);
  }
};

// The Score of kind `Kind` for one tile of rows [row_begin, row_end) and keys [col_begin,
// col_end): a kind with a block map (a user mask_mod) leaves its per-element test out where the
// map shows the tile whole; the others are as they are.
template <typename Kind, typename S>
__device__ __forceinline__ S on_step(const S& score, int row_begin, int row_end, int col_begin,
                                     int col_end) {
  if constexpr (Kind::kBlockMap) {
    return score.on_tile(row_begin, row_end, col_begin, col_end);
  } else {
    return score;
  }
}

// A backward key block's query tiles [m_begin, m_end) (keys [col_begin, col_end) of kv head
// `kv_head`), narrowed by a block map: the union over the group's query heads of the tiles
// each head's map shows; empty where none does.
template <int kBlockM, typename Params>
__device__ __forceinline__ void narrow_by_map(const Params& p, int batch,
                                              int kv_head, int col_begin, int col_end,
                                              int& m_begin, int& m_end) {
  int begin = m_end, end = m_begin;
  const BlockMap map(p);
  for (int i = 0; i < p.group; ++i) {
    const Span tiles = map.for_head(p, batch, kv_head * p.group + i)
                           .template query_tiles<kBlockM>({m_begin, m_end}, col_begin, col_end);
    if (tiles.end > tiles.begin) {
      begin = min(begin, tiles.begin);
      end = max(end, tiles.end);
    }
  }
  if (end > begin) {
    m_begin = begin;
    m_end = end;
  } else {
    m_end = m_begin;
  }
}

}  // namespace cuflash
