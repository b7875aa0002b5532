// Shared pieces of the exact per-row top-k kernels (topk_rows.cu: whole rows and split rows; topk_grouped.cu:
// rows bounded by group maxima).
//
// Exact per-row top-k by radix select (one 512-thread CTA per row; few long rows are split over many CTAs, see
// topk_split_*; rows whose score kernel also wrote group maxima are bounded by them, see topk_grouped_kernel),
// deterministic, output in column order.
//
// Scores become order-preserving 32-bit keys (NaN -> -inf, -0.0 -> +0.0, as the reference sorts them). Three
// histogram steps of 13, 10 and 9 bits narrow down the key of the k-th largest element ("threshold") and how
// many elements equal to it must still be taken ("need"); a step stops early once its threshold bin is taken
// whole. The emit step marks the selected columns in a bitmap (every element above the threshold, and of those
// equal to it the `need` of lowest column) and reads the bitmap back in column order, so ties go to lower
// columns, the output is sorted by column, identically on every run, and no pass depends on the order in which
// it meets the elements: candidate lists are filled in any order (one shared-memory atomic per warp and pass,
// no block-wide scan), and a pass gives each thread the columns that make its loads coalesced.
// Where the row lives:
//   rows up to `cap_keys` long (20,480; 10,240 in calls with rows of 32K+ columns) are read from global memory
//   once, into shared memory, and selected there;
//   rows of kSampleMinLength or more: a sample of the row (kSampleChunks contiguous chunks spread over it, 4096
//   elements) gives a first-digit bin that about 1.4 * topk elements of the row should reach; one pass collects
//   the elements at or above it into shared memory as (value, column) pairs, and if at least topk and at most
//   the list's capacity were found, the exact selection runs on that list (one read of the row). Otherwise (a
//   sample that misled, or too many elements in that bin), and for rows between the two lengths, the first
//   histogram is taken over the whole row and the elements at or above its threshold bin are collected (two
//   reads); if even that list does not fit, every step reads the row from global memory (correct, slower: many
//   exact ties near the threshold).
// The first step's 13 bits (sign, exponent, 4 mantissa bits) matter: with v1's 11 bits the scores of a row crowd
// into a handful of quarter-octave bins (same-address atomics, and a threshold bin that can overflow the list;
// going to 14 bits cut the 128K layer from 74 to 43 ms, NOTES.md).
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "common/warp.cuh"
#include "dsa_indexer/dsa_indexer.h"
#include "dsa_indexer/order_key.cuh"

namespace keye {
namespace {


// 512 threads per row: with <= 64 registers and ~113 KB of shared memory two rows per SM at once; in calls with rows
// of 32K+ columns (<= 40 registers, ~73 KB) three, so that one CTA's list selection runs while the others read.
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kFirstBits = 13;  // 1/16-octave bins (estimate for Gaussian-like scores: ~2K keys in the 128K bin)
constexpr int kBins = 1 << kFirstBits;
// A pass gives each thread kItems elements in two runs of four: elements i0 .. i0+3 and i0+kHalf .. i0+kHalf+3
// with i0 = pass start + 4 * thread, so a warp's 16-byte loads cover 512 contiguous bytes (v6 gave each thread 8
// consecutive elements: two loads per 32-byte sector, 51% excess sectors in ncu).
constexpr int kItems = 8;
constexpr int kHalf = kThreads * 4;
constexpr int kPass = kThreads * kItems;
constexpr int kMaxSmemData = 80 * 1024;  // row cache / candidate list (with the 32 KB histogram: ~113 KB)
constexpr int kListCap = kMaxSmemData / 8;  // (value, column) pairs of a candidate list
// The data area of calls with rows of kSampleMinLength+ columns: ~73 KB per CTA in all, three CTAs per SM.
constexpr int kLeanSmemData = 40 * 1024;
constexpr int kBitmapCols = kBins * 32;  // columns one bitmap window covers (the histogram's 32 KB as bits)
constexpr int kSampleChunks = 32;        // the sample of a long row: chunks of kSampleChunkLen elements
constexpr int kSampleChunkLen = kPass / kSampleChunks;  // 128: one pass of the block
// Rows at least this long try the sample first. Measured on the H200 with this kernel (ms of top-k in a prefill
// layer of 32K / 64K / 128K tokens): from 65536 columns on 3.3 / 8.0 / 19.2, from 32768 3.1 / 7.1 / 18.1, from
// 20481 3.3 / 7.4 / 18.9 (with v4's ordered candidate pass the sample lost below 64K: NOTES.md).
constexpr int kSampleMinLength = 32768;
// The sampled bin is the one ~kSampleTargetPct / 100 * topk elements of the row should reach (the 5120 pairs of
// the 40 KB data area hold that list; 2 * topk lists of ~5.5K overflowed it; 1.25 measured the same as 1.4).
constexpr long long kSampleTargetPct = 140;

// Element e (0 .. kItems-1) of the thread whose pass elements start at i0.
__device__ __forceinline__ int item_index(int i0, int e) { return i0 + (e < 4 ? e : kHalf + e - 4); }

struct Shared {
  alignas(16) uint32_t hist[kBins];  // histograms; the emit step's column bitmap
  int warp_sums[kWarps];
  int sel_bin, sel_above, sel_count, list_len, cut;
  uint32_t list_max;
};

// Exclusive prefix sum of v over the block (thread order); *total gets the block's sum. All threads call
// together. Two barriers: the first keeps this call's warp totals from overwriting those an earlier call's
// threads may still read, the second publishes them; every warp then scans the totals itself.
__device__ int block_exclusive_scan(int v, Shared& sh, int* total) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int x = warp_inclusive_sum(v);
  __syncthreads();
  if (lane == 31) sh.warp_sums[w] = x;
  __syncthreads();
  int s = lane < kWarps ? sh.warp_sums[lane] : 0;
#pragma unroll
  for (int o = 1; o < kWarps; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, s, o);
    if (lane >= o) s += y;
  }
  const int before = __shfl_sync(0xffffffffu, s, (w + 31) & 31);  // inclusive sum of the warps before w
  *total = __shfl_sync(0xffffffffu, s, kWarps - 1);
  return x - v + (w > 0 ? before : 0);
}

// Element sources: a global fp32 row, the row's keys in shared memory, or a (value, column) list in shared
// memory. raw(i0, n) issues the loads of a thread's kItems elements of the pass at i0 (16-byte vectors where all
// four are in range; elements at or past n read as something callers mask by index), raw_full(i0) the same when
// the whole pass lies in range, and keys() turns them into order keys: a pass loads first and converts at use,
// so that the loads of the next pass can be in flight while the current one is used.
struct GlobalRow {
  const float* row;
  struct Raw { float4 a, b; };
  __device__ float4 raw4(int i, int n) const {
    if (i + 3 < n) return __ldg(reinterpret_cast<const float4*>(row + i));
    float v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = i + e < n ? __ldg(row + i + e) : 0.f;
    return make_float4(v[0], v[1], v[2], v[3]);
  }
  __device__ Raw raw(int i0, int n) const { return {raw4(i0, n), raw4(i0 + kHalf, n)}; }
  __device__ Raw raw_full(int i0) const {
    return {__ldg(reinterpret_cast<const float4*>(row + i0)), __ldg(reinterpret_cast<const float4*>(row + i0 + kHalf))};
  }
  __device__ static void keys(const Raw& r, uint32_t (&k)[kItems]) {
    k[0] = order_key(r.a.x), k[1] = order_key(r.a.y), k[2] = order_key(r.a.z), k[3] = order_key(r.a.w);
    k[4] = order_key(r.b.x), k[5] = order_key(r.b.y), k[6] = order_key(r.b.z), k[7] = order_key(r.b.w);
  }
  __device__ int col(int i) const { return i; }
};
struct SmemKeys {
  const uint32_t* keys_;
  struct Raw { uint4 a, b; };
  __device__ uint4 raw4(int i, int n) const {
    if (i + 3 < n) return *reinterpret_cast<const uint4*>(keys_ + i);
    uint32_t v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = i + e < n ? keys_[i + e] : 0u;
    return make_uint4(v[0], v[1], v[2], v[3]);
  }
  __device__ Raw raw(int i0, int n) const { return {raw4(i0, n), raw4(i0 + kHalf, n)}; }
  __device__ Raw raw_full(int i0) const {
    return {*reinterpret_cast<const uint4*>(keys_ + i0), *reinterpret_cast<const uint4*>(keys_ + i0 + kHalf)};
  }
  __device__ static void keys(const Raw& r, uint32_t (&k)[kItems]) {
    k[0] = r.a.x, k[1] = r.a.y, k[2] = r.a.z, k[3] = r.a.w, k[4] = r.b.x, k[5] = r.b.y, k[6] = r.b.z, k[7] = r.b.w;
  }
  __device__ int col(int i) const { return i; }
};
// The sample of a long row: element i is element (i / kSampleChunkLen) * stride + i % kSampleChunkLen of the row
// (stride a multiple of 4; a thread's runs of four never straddle a chunk). Exactly one pass, all in range.
struct RowSample : GlobalRow {
  int stride;
  __device__ int pos(int i) const { return (i / kSampleChunkLen) * stride + i % kSampleChunkLen; }
  __device__ Raw raw_full(int i0) const {
    return {__ldg(reinterpret_cast<const float4*>(row + pos(i0))),
            __ldg(reinterpret_cast<const float4*>(row + pos(i0 + kHalf)))};
  }
  __device__ Raw raw(int i0, int) const { return raw_full(i0); }
};
// A candidate list: values (as read from the row) and their columns, in no particular order.
struct SmemList {
  const float* vals;
  const int* cols;
  using Raw = GlobalRow::Raw;
  __device__ float4 raw4(int i, int n) const {
    if (i + 3 < n) return *reinterpret_cast<const float4*>(vals + i);
    float v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = i + e < n ? vals[i + e] : 0.f;
    return make_float4(v[0], v[1], v[2], v[3]);
  }
  __device__ Raw raw(int i0, int n) const { return {raw4(i0, n), raw4(i0 + kHalf, n)}; }
  __device__ Raw raw_full(int i0) const {
    return {*reinterpret_cast<const float4*>(vals + i0), *reinterpret_cast<const float4*>(vals + i0 + kHalf)};
  }
  __device__ static void keys(const Raw& r, uint32_t (&k)[kItems]) { GlobalRow::keys(r, k); }
  __device__ int col(int i) const { return cols[i]; }
};

// Calls body(i0, raw, full) for the passes over elements [begin, end) (begin a multiple of 4; i0 = this thread's
// first element, raw its kItems elements as loaded, full whether the whole pass lies below end: otherwise the
// body masks elements at or past end by item_index). The whole block calls it together (the body may hold
// barriers). The loads of pass p + 1 are issued before pass p is used: with one pass in flight at a time a CTA
// waited out a load latency per pass (NOTES.md, top-k v5).
template <typename Src, typename Body>
__device__ __forceinline__ void for_each_pass(const Src& src, int begin, int end, Body&& body) {
  if (begin >= end) return;
  auto load = [&](int base, int i0) { return base + kPass <= end ? src.raw_full(i0) : src.raw(i0, end); };
  int i0 = begin + threadIdx.x * 4;
  typename Src::Raw next = load(begin, i0);
  for (int base = begin; base < end; base += kPass, i0 += kPass) {
    const typename Src::Raw cur = next;
    if (base + kPass < end) next = load(base + kPass, i0 + kPass);
    body(i0, cur, base + kPass <= end);
  }
}

struct Threshold {
  uint32_t prefix = 0, mask = 0;
  int need;
  bool done = false;
};

// Narrows the threshold by one digit of Bits bits given the histogram of that digit in sh.hist (bins of the
// elements whose key matches the threshold so far): finds the bin where the count from the top reaches need.
// Thread t owns the `per` bins below bins - per * t and reads them as 16-byte vectors where it can (v6 read them
// one word at a time at a 16-word stride between lanes: 16-way bank conflicts).
template <int Bits>
__device__ void select_bin(int shift, Threshold& th, Shared& sh) {
  constexpr int bins = 1 << Bits, per = bins / kThreads;
  static_assert(per >= 1 && bins % kThreads == 0, "whole bins per thread");
  const int lo = bins - per * (threadIdx.x + 1);
  uint32_t c[per];
  if constexpr (per % 4 == 0) {
#pragma unroll
    for (int v = 0; v < per / 4; ++v) {
      const uint4 x = reinterpret_cast<const uint4*>(sh.hist + lo)[v];
      c[4 * v] = x.x, c[4 * v + 1] = x.y, c[4 * v + 2] = x.z, c[4 * v + 3] = x.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < per; ++j) c[j] = sh.hist[lo + j];
  }
  int local = 0;
#pragma unroll
  for (int j = 0; j < per; ++j) local += c[j];
  int total;
  int running = block_exclusive_scan(local, sh, &total);
#pragma unroll
  for (int j = per - 1; j >= 0; --j) {  // from the top
    const int n = static_cast<int>(c[j]);
    if (running < th.need && running + n >= th.need) {
      sh.sel_bin = lo + j;
      sh.sel_above = running;
      sh.sel_count = n;
    }
    running += n;
  }
  __syncthreads();
  th.need -= sh.sel_above;
  th.prefix |= static_cast<uint32_t>(sh.sel_bin) << shift;
  th.mask |= static_cast<uint32_t>(bins - 1) << shift;
  th.done = sh.sel_count == th.need;  // the whole bin is taken: no finer digit needed
  __syncthreads();
}

// Adds to sh.hist (zeroed by the caller) bits [shift, shift + bits) of the elements [begin, end) whose key
// matches the threshold so far.
template <typename Src>
__device__ void count_digits(const Src& src, int begin, int end, int shift, int bits, const Threshold& th,
                             Shared& sh) {
  const uint32_t digit = (1u << bits) - 1;
  for_each_pass(src, begin, end, [&](int i0, const typename Src::Raw& raw, bool full) {
    uint32_t k[kItems];
    Src::keys(raw, k);
#pragma unroll
    for (int e = 0; e < kItems; ++e)
      if ((full || item_index(i0, e) < end) && (k[e] & th.mask) == th.prefix)
        atomicAdd(&sh.hist[(k[e] >> shift) & digit], 1u);
  });
}

// One histogram step over bits [shift, shift + Bits) of the elements whose key matches the threshold so far.
template <int Bits, typename Src>
__device__ void radix_step(const Src& src, int n, int shift, Threshold& th, Shared& sh) {
  for (int b = threadIdx.x; b < (1 << Bits); b += kThreads) sh.hist[b] = 0;
  __syncthreads();
  count_digits(src, 0, n, shift, Bits, th, sh);
  __syncthreads();
  select_bin<Bits>(shift, th, sh);
}

template <typename Src>
__device__ void finish_threshold(const Src& src, int n, Threshold& th, Shared& sh) {
  if (!th.done) radix_step<10>(src, n, 9, th, sh);
  if (!th.done) radix_step<9>(src, n, 0, th, sh);
}

// Bitmap words of the window of columns [w0, min(w0 + kBitmapCols, cols)), rounded up to whole 16-byte vectors.
__device__ __forceinline__ int window_words(int w0, int cols) { return (min(cols - w0, kBitmapCols) + 127) / 128 * 4; }

// Sets in sh.hist (as a bitmap of the kBitmapCols columns from w0) the columns of the elements of src that
// belong to the selection: keys above the threshold, and keys equal to it up to column `cut` (equal_only: only
// those equal to it).
template <typename Src>
__device__ void mark_columns(const Src& src, int n, int w0, int cols, const Threshold& th, int cut, bool equal_only,
                             Shared& sh) {
  for (int i = threadIdx.x; i < window_words(w0, cols); i += kThreads) sh.hist[i] = 0;
  __syncthreads();
  for_each_pass(src, 0, n, [&](int i0, const typename Src::Raw& raw, bool full) {
    uint32_t k[kItems];
    Src::keys(raw, k);
#pragma unroll
    for (int e = 0; e < kItems; ++e) {
      const int i = item_index(i0, e);
      const uint32_t m = k[e] & th.mask;
      if (!(full || i < n) || m < th.prefix || (equal_only && m != th.prefix)) continue;
      const int c = src.col(i);
      if ((m == th.prefix && c > cut) || c < w0 || c - w0 >= kBitmapCols) continue;
      atomicOr(&sh.hist[(c - w0) >> 5], 1u << ((c - w0) & 31));
    }
  });
  __syncthreads();
}

// The marked columns of the window at w0: thread t's `per` consecutive bitmap words, how many are set, and their
// block-wide exclusive prefix. `per` (a power of two up to 16) is the fewest words per thread that cover the
// window, so a short row's marks are read and written out by many threads: with 16 words (512 columns) per
// thread always, a 4K-column row left 8 threads writing ~256 indices each (v7: 8K-token layers 0.50 -> 0.8 ms).
struct MarkedWords {
  static constexpr int kMaxWords = kBins / kThreads;
  uint32_t w[kMaxWords];
  int per, count = 0, before, total;
  __device__ MarkedWords(Shared& sh, int w0, int cols) {
    const int words = window_words(w0, cols);
    per = 1;
    while (per * kThreads < words) per *= 2;
    const int first = per * threadIdx.x;
    if (per >= 4) {  // 16-byte reads (a lane stride of `per` words would be a per-way bank conflict)
#pragma unroll
      for (int v = 0; v < kMaxWords / 4; ++v) {
        const uint4 x = 4 * v < per && first + 4 * v < words ? reinterpret_cast<const uint4*>(sh.hist + first)[v]
                                                             : make_uint4(0, 0, 0, 0);
        w[4 * v] = x.x, w[4 * v + 1] = x.y, w[4 * v + 2] = x.z, w[4 * v + 3] = x.w;
      }
    } else {
#pragma unroll
      for (int j = 0; j < kMaxWords; ++j) w[j] = j < per && first + j < words ? sh.hist[first + j] : 0u;
    }
#pragma unroll
    for (int j = 0; j < kMaxWords; ++j) count += __popc(w[j]);
    before = block_exclusive_scan(count, sh, &total);
  }
  __device__ int column(int w0, int j, int bit) const { return w0 + 32 * (per * threadIdx.x + j) + bit; }
};

// Ties at the threshold: the column of the need-th lowest-column element equal to it.
template <typename Src>
__device__ int tie_cut(const Src& src, int n, int cols, const Threshold& th, Shared& sh) {
  int left = th.need;
  for (int w0 = 0; w0 < cols; w0 += kBitmapCols) {
    mark_columns(src, n, w0, cols, th, INT_MAX, true, sh);
    const MarkedWords mw(sh, w0, cols);
    if (mw.before < left && mw.before + mw.count >= left) {
      int r = left - mw.before;  // the r-th set bit of this thread's words
#pragma unroll
      for (int j = 0; j < MarkedWords::kMaxWords; ++j) {
        uint32_t b = mw.w[j];
        const int pc = __popc(b);
        if (r > 0 && r <= pc) {
          for (int s = 1; s < r; ++s) b &= b - 1;
          sh.cut = mw.column(w0, j, __ffs(b) - 1);
        }
        r -= pc;
      }
    }
    __syncthreads();
    if (mw.total >= left) return sh.cut;
    left -= mw.total;
  }
  return INT_MAX;  // unreachable: the elements equal to the threshold number at least need
}

// Writes the selected elements in ascending column order: all above the threshold, the `need` of lowest column
// equal to it; the scores (optional) from the row in global memory. Every source holds the selection whole.
template <typename Src>
__device__ void emit(const Src& src, int n, int cols, const Threshold& th, Shared& sh, const float* row, int topk,
                     int* out_idx, float* out_scores, int offset) {
  const int cut = th.done ? INT_MAX : tie_cut(src, n, cols, th, sh);
  int written = 0;
  for (int w0 = 0; w0 < cols && written < topk; w0 += kBitmapCols) {
    mark_columns(src, n, w0, cols, th, cut, false, sh);
    const MarkedWords mw(sh, w0, cols);
    int pos = written + mw.before;
#pragma unroll
    for (int j = 0; j < MarkedWords::kMaxWords; ++j)
      for (uint32_t b = mw.w[j]; b; b &= b - 1, ++pos) {
        const int c = mw.column(w0, j, __ffs(b) - 1);
        if (pos >= topk) continue;
        out_idx[pos] = c + offset;
        if (out_scores) out_scores[pos] = key_value(order_key(__ldg(row + c)));
      }
    written += mw.total;
    __syncthreads();  // the bitmap is cleared for the next window
  }
}

// The digits still open, then the selection: what every path does once its candidates are in `src`.
template <typename Src>
__device__ void finish_and_emit(const Src& src, int n, int cols, Threshold& th, Shared& sh, const float* row,
                                int topk, int* out_idx, float* out_scores, int offset) {
  finish_threshold(src, n, th, sh);
  emit(src, n, cols, th, sh, row, topk, out_idx, out_scores, offset);
}

// Visible elements of row r: its length clamped to [0, cols].
__device__ __forceinline__ int row_length(const int* lengths, int64_t r, int cols) {
  return min(max(lengths[r], 0), cols);
}

// A row with at most topk visible elements: all of them, then -1.
__device__ void emit_all(const float* row, int n, int topk, int* out_idx, float* out_sc, int offset) {
  for (int i = threadIdx.x; i < topk; i += kThreads) {
    out_idx[i] = i < n ? i + offset : -1;
    if (out_sc) out_sc[i] = i < n ? key_value(order_key(row[i])) : -INFINITY;
  }
}

// Passes the elements of [begin, end) at or above th's bin to store(position, value, column), positions from 0
// in no particular order (each warp takes a run of positions per pass with one shared-memory atomic), and only
// while the positions stay below cap; returns how many elements there are (more than cap: the list is
// incomplete). The test is on values, not keys: key(x) >= prefix (the bin's low bits are 0) exactly when
// x >= key_value(prefix) for x not NaN (-0 equal to +0, as in order_key), if the prefix is at least
// key(-FLT_MAX); a lower prefix (the bin of -inf and NaN) takes every element.
template <typename Store>
__device__ int collect(const GlobalRow& src, int begin, int end, const Threshold& th, int cap, Shared& sh,
                       Store&& store) {
  const bool all = th.prefix < 0x00800000u;
  const float lo = key_value(th.prefix);
  const int lane = threadIdx.x & 31;
  if (threadIdx.x == 0) sh.list_len = 0;
  __syncthreads();
  for_each_pass(src, begin, end, [&](int i0, const GlobalRow::Raw& raw, bool full) {
    const float x[kItems] = {raw.a.x, raw.a.y, raw.a.z, raw.a.w, raw.b.x, raw.b.y, raw.b.z, raw.b.w};
    uint32_t sel = 0;
#pragma unroll
    for (int e = 0; e < kItems; ++e)
      if ((full || item_index(i0, e) < end) && (all || x[e] >= lo)) sel |= 1u << e;
    const int c = __popc(sel);
    const int incl = warp_inclusive_sum(c);
    int base = 0;
    if (lane == 31) base = atomicAdd(&sh.list_len, incl);
    base = __shfl_sync(0xffffffffu, base, 31);
    if (base + __shfl_sync(0xffffffffu, incl, 31) > cap) return;  // warp-uniform: the list is full
    int pos = base + incl - c;
#pragma unroll
    for (int e = 0; e < kItems; ++e)
      if (sel & (1u << e)) store(pos++, x[e], item_index(i0, e));
  });
  __syncthreads();
  return sh.list_len;
}

// The exact selection of a row from global memory (every radix step reads the row): the fallback of the kernels
// that search a bounded list first, for the rows their lists cannot take.
__device__ void select_whole_row(const float* row, int n, int topk, Shared& sh, int* out_idx, float* out_sc,
                                 int offset) {
  const GlobalRow grow{row};
  Threshold th;
  th.need = topk;
  radix_step<kFirstBits>(grow, n, 32 - kFirstBits, th, sh);
  finish_and_emit(grow, n, n, th, sh, row, topk, out_idx, out_sc, offset);
}

// Writes the selection from a candidate list in ascending column order (list order): every key above the
// threshold, and of those equal to it the `need` first ones (ties to the lower column), or all of them if done.
__device__ void emit_ordered(const uint32_t* keys, const int* cols, int m, const Threshold& th, Shared& sh,
                             int* out_idx, float* out_sc, int offset) {
  const int per = (m + kThreads - 1) / kThreads, first = min(m, per * static_cast<int>(threadIdx.x));
  const int last = min(m, first + per);
  int above = 0, equal = 0;
  for (int i = first; i < last; ++i) {
    const uint32_t k = keys[i] & th.mask;
    above += k > th.prefix;
    equal += k == th.prefix;
  }
  // One scan of both counts (m < 2^16): this thread's first output follows the earlier threads' keys above the
  // threshold and the first `need` of their keys equal to it.
  int total;
  const int before = block_exclusive_scan(equal << 16 | above, sh, &total);
  const int eq_before = before >> 16;
  int pos = (before & 0xffff) + (th.done ? eq_before : min(eq_before, th.need));
  int eq_seen = eq_before;
  for (int i = first; i < last; ++i) {
    const uint32_t key = keys[i], k = key & th.mask;
    bool take = k > th.prefix;
    if (k == th.prefix) take = th.done || eq_seen++ < th.need;
    if (!take) continue;
    out_idx[pos] = cols[i] + offset;
    if (out_sc) out_sc[pos] = key_value(key);
    ++pos;
  }
}

// The threshold of the top th.need keys of a candidate list whose keys all lie in [lo, hi]. Each step histograms
// the keys in the current range into 2^kRangeBits bins spread over that range (not over fixed bits of the key) and
// narrows the range to the bin that holds the need-th largest key, until that bin holds at most kRankMax keys; those
// are then ranked against each other (ties to the lower list position, i.e. the lower column). Fixed 11/11/10-bit
// digits took three steps on these lists: every candidate lies within a binade or two of lb, so the top 11 bits put
// them all in a few bins. Over [lb, max] a 2048-bin step should leave only a few keys in the bin for independent
// scores (estimated, not counted). H200, twenty-third session: 0.3-3.7 us faster than the three fixed-digit steps
// for the kernel alone and up to 1.6 us for the decode op, never slower, identical indices (NOTES.md).
// Returns the threshold in emit_ordered's form: keys above th.prefix, and the first th.need keys equal to it (all of
// them when th.done).
constexpr int kRangeBits = 11;
constexpr int kRankMax = 128;
__device__ void list_threshold(const uint32_t* keys, int m, uint32_t lo, uint32_t hi, Threshold& th, Shared& sh) {
  const int tid = threadIdx.x;
  uint32_t span = hi - lo;
  for (;;) {
    const int shift = max(0, 32 - __clz(static_cast<int>(span)) - kRangeBits);  // span >> shift < 2^kRangeBits
    for (int b = tid; b < (1 << kRangeBits); b += kThreads) sh.hist[b] = 0;
    __syncthreads();
    for (int i = tid; i < m; i += kThreads) {
      const uint32_t d = keys[i] - lo;  // keys below lo wrap past span
      if (d <= span) atomicAdd(&sh.hist[d >> shift], 1u);
    }
    __syncthreads();
    Threshold bin;
    bin.need = th.need;
    select_bin<kRangeBits>(0, bin, sh);
    const uint32_t bin_lo = lo + (bin.prefix << shift);
    const int count = sh.sel_count;  // keys in the bin (select_bin's last barrier is behind every reader)
    th.need = bin.need;
    th.prefix = bin_lo;
    th.mask = ~0u;
    if (bin.done) {  // the whole bin is taken: every key >= bin_lo
      th.done = true;
      return;
    }
    if (shift == 0) return;  // one key value: the first th.need of its keys
    if (count <= kRankMax) {
      // The bin's keys in list order into shared memory (the histogram's first words), then each ranked.
      uint32_t* small = sh.hist;
      const int per = (m + kThreads - 1) / kThreads, first = min(m, per * tid), last = min(m, first + per);
      int c = 0;
      for (int i = first; i < last; ++i) c += keys[i] - bin_lo < (1u << shift);
      int total;
      int pos = block_exclusive_scan(c, sh, &total);
      for (int i = first; i < last; ++i)
        if (keys[i] - bin_lo < (1u << shift)) small[pos++] = keys[i];
      __syncthreads();
      if (tid < count) {
        const uint32_t k = small[tid];
        int above = 0, equal_before = 0;
        for (int j = 0; j < count; ++j) {
          const uint32_t x = small[j];
          above += x > k;
          equal_before += x == k && j < tid;
        }
        if (above + equal_before == th.need - 1) {  // the last key taken (exactly one thread)
          sh.sel_bin = static_cast<int>(k);
          sh.sel_above = above;
        }
      }
      __syncthreads();
      th.prefix = static_cast<uint32_t>(sh.sel_bin);
      th.need -= sh.sel_above;
      __syncthreads();  // sh.sel_* are read before any later writer
      return;
    }
    lo = bin_lo;
    span = (1u << shift) - 1;
  }
}

}  // namespace

// The group-maximum top-k (topk_grouped.cu) for rows whose score kernel also wrote group maxima; topk_rows_cuda
// checks the arguments.
struct GroupedRows {
  const float* scores;
  int64_t ld;
  int cols;
  const int* lengths;
  const float* group_max;  // [R, >= ceil(cols / kScoreGroupKeys)]
  int64_t gm_ld;
  int topk;
  int offset;
  int* indices;
  float* out_scores;
};

// Launches it on `stream` for `rows` rows (one CTA each).
void launch_topk_grouped(const GroupedRows& a, int64_t rows, cudaStream_t stream);

}  // namespace keye
