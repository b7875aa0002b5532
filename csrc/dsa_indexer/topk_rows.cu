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
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "common/check.h"
#include "common/device.h"
#include "common/pdl.cuh"
#include "dsa_indexer/dsa_checks.h"
#include "dsa_indexer/dsa_indexer.h"

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

__device__ __forceinline__ uint32_t order_key(float x) {
  if (x != x) x = -INFINITY;
  if (x == 0.f) x = 0.f;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
// Element e (0 .. kItems-1) of the thread whose pass elements start at i0.
__device__ __forceinline__ int item_index(int i0, int e) { return i0 + (e < 4 ? e : kHalf + e - 4); }

struct Shared {
  alignas(16) uint32_t hist[kBins];  // histograms; the emit step's column bitmap
  int warp_sums[kWarps];
  int sel_bin, sel_above, sel_count, list_len, cut;
};

// Exclusive prefix sum of v over the block (thread order); *total gets the block's sum. All threads call
// together. Two barriers: the first keeps this call's warp totals from overwriting those an earlier call's
// threads may still read, the second publishes them; every warp then scans the totals itself.
__device__ int block_exclusive_scan(int v, Shared& sh, int* total) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
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
    int incl = c;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
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

// kCtasPerSm: 2 (64 registers; the 80 KB data area) or 3 (40 registers, some spilled; the 40 KB one).
template <int kCtasPerSm>
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    topk_rows_kernel(const float* __restrict__ scores, int64_t ld, int cols, const int* __restrict__ lengths, int topk,
                     int offset, int* __restrict__ indices, float* __restrict__ out_scores, int cap_keys) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  Shared& sh = *reinterpret_cast<Shared*>(smem_raw);
  uint8_t* data = smem_raw + ((sizeof(Shared) + 15) / 16) * 16;

  const int64_t r = blockIdx.x;
  const float* row = scores + r * ld;
  int* out_idx = indices + r * topk;
  float* out_sc = out_scores ? out_scores + r * topk : nullptr;
  const int n = row_length(lengths, r, cols);

  if (n <= topk) return emit_all(row, n, topk, out_idx, out_sc, offset);
  Threshold th;
  th.need = topk;
  const GlobalRow grow{row};
  if (n <= cap_keys) {  // the row fits in shared memory: one global read
    uint32_t* keys = reinterpret_cast<uint32_t*>(data);
    for_each_pass(grow, 0, n, [&](int i0, const GlobalRow::Raw& raw, bool full) {
      uint32_t k[kItems];
      GlobalRow::keys(raw, k);
      if (full || i0 + 3 < n) *reinterpret_cast<uint4*>(keys + i0) = make_uint4(k[0], k[1], k[2], k[3]);
      else for (int e = 0; e < 4 && i0 + e < n; ++e) keys[i0 + e] = k[e];
      if (full || i0 + kHalf + 3 < n) *reinterpret_cast<uint4*>(keys + i0 + kHalf) = make_uint4(k[4], k[5], k[6], k[7]);
      else for (int e = 4; e < kItems && i0 + kHalf + e - 4 < n; ++e) keys[i0 + kHalf + e - 4] = k[e];
    });
    __syncthreads();
    const SmemKeys src{keys};
    radix_step<kFirstBits>(src, n, 32 - kFirstBits, th, sh);
    finish_and_emit(src, n, n, th, sh, row, topk, out_idx, out_sc, offset);
    return;
  }
  // Rows past cap_keys only get here, so cap_keys is the whole data area: cap_keys / 2 pairs.
  const int cap_pairs = cap_keys / 2;
  float* lvals = reinterpret_cast<float*>(data);
  int* lcols = reinterpret_cast<int*>(data) + cap_pairs;
  auto store = [&](int pos, float x, int col) { lvals[pos] = x, lcols[pos] = col; };
  const SmemList list{lvals, lcols};
  // First try: the first-digit bin that ~1.4 * topk elements reach in a sample (rank scaled to the sample's
  // size), and one pass that collects every element at or above it.
  if (n >= kSampleMinLength) {
    constexpr int kSample = kSampleChunks * kSampleChunkLen;
    Threshold est;
    est.need = min(kSample, static_cast<int>((kSampleTargetPct * topk * kSample + 100LL * n - 1) / (100LL * n)) + 32);
    radix_step<kFirstBits>(RowSample{{row}, (n / kSampleChunks) & ~3}, kSample, 32 - kFirstBits, est, sh);
    const int len = collect(grow, 0, n, est, cap_pairs, sh, store);
    if (len >= topk && len <= cap_pairs) {
      radix_step<kFirstBits>(list, len, 32 - kFirstBits, th, sh);
      finish_and_emit(list, len, n, th, sh, row, topk, out_idx, out_sc, offset);
      return;
    }
  }
  radix_step<kFirstBits>(grow, n, 32 - kFirstBits, th, sh);
  if (th.done || topk - th.need + sh.hist[sh.sel_bin] > cap_pairs) {  // list would not fit: stay in global
    finish_and_emit(grow, n, n, th, sh, row, topk, out_idx, out_sc, offset);
    return;
  }
  const int len = collect(grow, 0, n, th, cap_pairs, sh, store);
  finish_and_emit(list, len, n, th, sh, row, topk, out_idx, out_sc, offset);
}

// ---- Few long rows (decode): each row split over many CTAs, three kernels. ----
// One CTA per row leaves most SMs idle when there are fewer rows than SMs, and one CTA alone cannot keep enough
// loads in flight to read a 128K-element row fast (v4 of the one-CTA kernel: 0.09 ms for 64 such rows).
//   topk_split_histogram (segments x rows): each CTA counts the first digit of its segment in shared memory
//     and adds the non-zero bins to the row's histogram in global memory; the row's last CTA (atomic ticket,
//     after a fence) reads the whole histogram and records the row's threshold bin and how many of that bin
//     are still needed.
//   topk_split_collect (segments x rows): each CTA writes the columns at or above the threshold bin to its
//     segment's slice of the candidate list.
//   topk_split_finish (rows): concatenates the slices, fetches their values, and finishes exactly as the one-CTA
//     kernel does on its candidate list; if the candidates do not fit in shared memory, it falls back to that
//     kernel's global path for the row.
constexpr int kMaxSegments = kThreads - 1;  // one scan over the segment counts

struct SplitRows {
  const float* scores;
  int64_t ld;
  int cols;
  const int* lengths;
  int topk;
  int offset;
  int* indices;
  float* out_scores;
  int seg_len;       // a multiple of kThreads * kItems
  int segments;      // ceil(cols / seg_len) <= kMaxSegments
  uint32_t* hist;    // [R, kBins], zeroed
  int* ticket;       // [R], zeroed
  int4* row_info;    // [R]: threshold prefix (first digit), need, done
  int* seg_count;    // [R, segments]
  int* seg_cols;     // [R, segments, seg_len]
};


__global__ void __launch_bounds__(kThreads) topk_split_histogram(const SplitRows a) {
  __shared__ Shared sh;
  const int r = blockIdx.y;
  for (int b = threadIdx.x; b < kBins; b += kThreads) sh.hist[b] = 0;
  allow_dependent_launch();
  grid_dependency_wait();  // the split kernels are programmatic dependents (launch_dependent) of the one before
  const int n = row_length(a.lengths, r, a.cols);
  if (n <= a.topk) return;  // topk_split_finish takes the whole row
  const int begin = min(static_cast<int>(blockIdx.x) * a.seg_len, n), end = min(begin + a.seg_len, n);
  __syncthreads();
  Threshold th;
  th.need = a.topk;
  count_digits(GlobalRow{a.scores + r * a.ld}, begin, end, 32 - kFirstBits, kFirstBits, th, sh);
  __syncthreads();
  uint32_t* row_hist = a.hist + static_cast<int64_t>(r) * kBins;
  for (int b = threadIdx.x; b < kBins; b += kThreads)
    if (sh.hist[b]) atomicAdd(row_hist + b, sh.hist[b]);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) sh.list_len = atomicAdd(a.ticket + r, 1);
  __syncthreads();
  if (sh.list_len != a.segments - 1) return;
  __threadfence();  // the last CTA of the row: every other CTA's bins are in row_hist
  for (int b = threadIdx.x; b < kBins; b += kThreads) sh.hist[b] = __ldcg(row_hist + b);
  __syncthreads();
  select_bin<kFirstBits>(32 - kFirstBits, th, sh);
  if (threadIdx.x == 0) a.row_info[r] = make_int4(static_cast<int>(th.prefix), th.need, th.done, 0);
}

__global__ void __launch_bounds__(kThreads) topk_split_collect(const SplitRows a) {
  __shared__ Shared sh;
  const int r = blockIdx.y, seg = blockIdx.x;
  allow_dependent_launch();
  grid_dependency_wait();
  const int n = row_length(a.lengths, r, a.cols);
  if (n <= a.topk) return;
  const int begin = min(seg * a.seg_len, n), end = min(begin + a.seg_len, n);
  Threshold th;
  th.prefix = static_cast<uint32_t>(a.row_info[r].x);
  th.mask = ~0u << (32 - kFirstBits);
  int* list = a.seg_cols + (static_cast<int64_t>(r) * a.segments + seg) * a.seg_len;
  const int len = collect(GlobalRow{a.scores + r * a.ld}, begin, end, th, a.seg_len, sh,
                          [&](int pos, float, int col) { list[pos] = col; });
  if (threadIdx.x == 0) a.seg_count[r * a.segments + seg] = len;
}

__global__ void __launch_bounds__(kThreads) topk_split_finish(const SplitRows a) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  Shared& sh = *reinterpret_cast<Shared*>(smem_raw);
  uint8_t* data = smem_raw + ((sizeof(Shared) + 15) / 16) * 16;
  __shared__ int seg_off[kMaxSegments + 1];

  const int r = blockIdx.x;
  grid_dependency_wait();
  const float* row = a.scores + r * a.ld;
  int* out_idx = a.indices + static_cast<int64_t>(r) * a.topk;
  float* out_sc = a.out_scores ? a.out_scores + static_cast<int64_t>(r) * a.topk : nullptr;
  const int n = row_length(a.lengths, r, a.cols);
  if (n <= a.topk) return emit_all(row, n, a.topk, out_idx, out_sc, a.offset);

  const int4 info = a.row_info[r];
  Threshold th;
  th.prefix = static_cast<uint32_t>(info.x);
  th.mask = ~0u << (32 - kFirstBits);
  th.need = info.y;
  th.done = info.z != 0;
  int len;
  const int off = block_exclusive_scan(threadIdx.x < a.segments ? a.seg_count[r * a.segments + threadIdx.x] : 0, sh,
                                       &len);
  if (threadIdx.x <= a.segments) seg_off[threadIdx.x] = off;
  __syncthreads();
  const GlobalRow grow{row};
  // The data area holds kListCap pairs (launched with the whole kMaxSmemData). More candidates: many exact ties
  // around the threshold, the one-CTA kernel's global path.
  if (len > kListCap) {
    return finish_and_emit(grow, n, n, th, sh, row, a.topk, out_idx, out_sc, a.offset);
  }
  float* lvals = reinterpret_cast<float*>(data);
  int* lcols = reinterpret_cast<int*>(data) + kListCap;
  // One flat pass over the whole list (a loop over segments would wait out one load latency per segment).
  for (int j = threadIdx.x; j < len; j += kThreads) {
    int lo = 0, hi = a.segments - 1;  // the segment holding list entry j: last seg with seg_off[seg] <= j
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (seg_off[mid] <= j) lo = mid; else hi = mid - 1;
    }
    const int col = a.seg_cols[(static_cast<int64_t>(r) * a.segments + lo) * a.seg_len + (j - seg_off[lo])];
    lcols[j] = col;
    lvals[j] = __ldg(row + col);
  }
  __syncthreads();
  finish_and_emit(SmemList{lvals, lcols}, len, n, th, sh, row, a.topk, out_idx, out_sc, a.offset);
}

// ---- Rows with group maxima (decode): one CTA per row, the search bounded by the maxima. ----
// The score kernel also wrote the maximum of every kScoreGroupKeys (8) consecutive scores of the row. Those maxima
// are distinct elements of the row, and so are the maxima of pairs of groups, so the topk-th largest of either set
// is at most the row's topk-th largest element: the lower edge lb of the first-digit bin that holds it bounds the
// selection from below, and every selected element lies in a group whose maximum reaches lb. Per row (one 512-
// thread CTA): the maxima as order keys into shared memory (one coalesced read), lb from a histogram of the pair
// maxima (or of the group maxima where there are fewer than 4 * topk pairs), the groups reaching lb listed in column
// order (~topk plus the bin's excess), their scores read (about an eighth of the row for independent scores) and
// the elements at or above lb kept as (order key, column) in column order, three radix steps on that list, and the
// output written in order by one scan (no bitmap). Every ordered list comes from per-thread contiguous runs and one
// block scan. Rows with more groups than the staging area holds (past 256K columns), more groups at lb than the
// group list holds, or more candidates than the list holds (scores crowded into few groups, many ties) take the
// whole-row global path (exact, slower). Measured against the split chain: NOTES.md.
constexpr int kMaxGroups = 32768;              // staged maxima: rows up to 256K columns
constexpr int kGroupCap = 8192;                // groups whose maximum reaches lb
constexpr int kCandCap = 8192;                 // candidates (order key, column), in the staged maxima's place
constexpr int kGroupedData = kGroupCap * 4 + kMaxGroups * 4;
constexpr int kRoundGroups = 6;                // listed groups a thread loads at once (two 16-byte loads each)
static_assert(2 * kCandCap <= kMaxGroups, "the candidate list reuses the staged maxima's shared memory");
static_assert(kScoreGroupKeys == 8, "a group is two 16-byte vectors of scores");

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

__global__ void __launch_bounds__(kThreads, 1) topk_grouped_kernel(const GroupedRows a) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  Shared& sh = *reinterpret_cast<Shared*>(smem_raw);
  uint8_t* data = smem_raw + ((sizeof(Shared) + 15) / 16) * 16;
  int* glist = reinterpret_cast<int*>(data);
  uint32_t* gkeys = reinterpret_cast<uint32_t*>(data + kGroupCap * 4);  // the maxima; then the candidates:
  uint32_t* lkeys = gkeys;                                               // their keys
  int* lcols = reinterpret_cast<int*>(gkeys + kCandCap);                 // and columns

  grid_dependency_wait();  // launched as a programmatic dependent of the score kernel
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t r = blockIdx.x;
  const float* row = a.scores + r * a.ld;
  int* out_idx = a.indices + r * a.topk;
  float* out_sc = a.out_scores ? a.out_scores + r * a.topk : nullptr;
  const int n = row_length(a.lengths, r, a.cols);
  if (n <= a.topk) return emit_all(row, n, a.topk, out_idx, out_sc, a.offset);
  auto whole_row = [&] {  // exact from global memory, for the rows the lists cannot take
    const GlobalRow grow{row};
    Threshold th;
    th.need = a.topk;
    radix_step<kFirstBits>(grow, n, 32 - kFirstBits, th, sh);
    finish_and_emit(grow, n, n, th, sh, row, a.topk, out_idx, out_sc, a.offset);
  };
  const int full = n / kScoreGroupKeys, groups = (n + kScoreGroupKeys - 1) / kScoreGroupKeys;
  if (groups > kMaxGroups) return whole_row();

  // The maxima as order keys into shared memory, whole 16-byte vectors (four groups) with all loads in flight at
  // once, and per thread the maxima of the pairs of groups in its vectors; warp 0 the up to three whole groups past
  // the last vector and the last, partial group (its maximum over the columns this row sees: the stored one may
  // include columns past its length).
  const float* gm = a.group_max + r * a.gm_ld;
  const int vecs = full / 4;
  constexpr int kVecs = kMaxGroups / (4 * kThreads);
  uint32_t pmax[kVecs][2];
  {
    const float4* src = reinterpret_cast<const float4*>(gm) + tid;
    uint4* dst = reinterpret_cast<uint4*>(gkeys) + tid;
    float4 v[kVecs];
#pragma unroll
    for (int i = 0; i < kVecs; ++i)
      if (tid + i * kThreads < vecs) v[i] = __ldg(src + i * kThreads);
    for (int b = tid; b < kBins; b += kThreads) sh.hist[b] = 0;  // for the bound's histogram
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      pmax[i][0] = pmax[i][1] = 0;
      if (tid + i * kThreads < vecs) {
        const uint4 k = make_uint4(order_key(v[i].x), order_key(v[i].y), order_key(v[i].z), order_key(v[i].w));
        dst[i * kThreads] = k;
        pmax[i][0] = max(k.x, k.y);
        pmax[i][1] = max(k.z, k.w);
      }
    }
    if (warp == 0) {
      const int j = 4 * vecs + lane;  // lanes 0-2: whole groups past the vectors; lanes 8-15: the partial group
      if (lane < 3 && j < full) gkeys[j] = order_key(__ldg(gm + j));
      const int c = full * kScoreGroupKeys + lane - 8;
      float m = lane >= 8 && lane < 16 && c < n ? row[c] : -INFINITY;
#pragma unroll
      for (int o = 4; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));  // fmaxf skips NaN
      if (lane == 8 && full < groups) gkeys[full] = order_key(m);
    }
    __syncthreads();
  }

  // lb: the pair maxima when there are at least 4 * topk of them (a histogram from registers; for independent
  // scores about as tight as the group maxima: the topk-th largest of G / 2 maxima of 16 scores and of G maxima of 8
  // leave ~1.8% and ~1.7% of the row above them), else the group maxima; 0 (every element) with fewer than topk.
  uint32_t lb = 0;
  if (vecs >= 2 * a.topk || groups >= a.topk) {
    Threshold th;
    th.need = a.topk;
    if (vecs >= 2 * a.topk) {
#pragma unroll
      for (int i = 0; i < kVecs; ++i)
        if (tid + i * kThreads < vecs) {
          atomicAdd(&sh.hist[pmax[i][0] >> (32 - kFirstBits)], 1u);
          atomicAdd(&sh.hist[pmax[i][1] >> (32 - kFirstBits)], 1u);
        }
    } else {
      count_digits(SmemKeys{gkeys}, 0, groups, 32 - kFirstBits, kFirstBits, th, sh);
    }
    __syncthreads();
    select_bin<kFirstBits>(32 - kFirstBits, th, sh);
    lb = th.prefix;
  }

  // The groups reaching lb, in column order: thread t takes `per` consecutive groups (a multiple of 4, read as
  // 16-byte vectors starting at a lane-rotated vector so a quarter warp's reads fall in different banks), marks
  // them in a 64-bit mask, and one block scan gives each thread its place in the list.
  const int per = (groups + 4 * kThreads - 1) / (4 * kThreads) * 4, nv = per / 4, t0 = tid * per;
  uint64_t reach = 0;
  for (int v = 0, vr = lane % nv; v < nv; ++v, vr = vr + 1 == nv ? 0 : vr + 1) {
    const int j = t0 + 4 * vr;
    uint32_t f = 0;
    if (j + 3 < groups) {
      const uint4 k = *reinterpret_cast<const uint4*>(gkeys + j);
      f = (k.x >= lb) | (k.y >= lb) << 1 | (k.z >= lb) << 2 | (k.w >= lb) << 3;
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) f |= static_cast<uint32_t>(j + e < groups && gkeys[j + e] >= lb) << e;
    }
    reach |= static_cast<uint64_t>(f) << (4 * vr);
  }
  int total;
  int pos = block_exclusive_scan(__popcll(reach), sh, &total);
  const int listed = total;
  if (listed > kGroupCap) return whole_row();  // block-uniform
  for (uint64_t m = reach; m; m &= m - 1) glist[pos++] = t0 + __ffsll(static_cast<long long>(m)) - 1;
  __syncthreads();  // the group list is complete; the staged maxima are free

  // Their elements at or above lb, as (order key, column) in column order: thread t takes `per2` consecutive listed
  // groups, loads them kRoundGroups at a time (all loads of a round in flight), marks the kept elements in a mask
  // per round, and one block scan places every thread's candidates. The test is on values (x >= the value of lb is
  // key(x) >= lb for x not NaN; lb below key(-FLT_MAX) takes every element), as in collect().
  const bool all = lb < 0x00800000u;
  const float lb_value = key_value(lb);
  const int per2 = (listed + kThreads - 1) / kThreads, e0 = min(listed, tid * per2), e1 = min(listed, e0 + per2);
  auto load_round = [&](int e, float4 (&x)[kRoundGroups][2], int (&c0)[kRoundGroups]) {
#pragma unroll
    for (int g = 0; g < kRoundGroups; ++g) {
      c0[g] = e + g < e1 ? glist[e + g] * kScoreGroupKeys : n;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = c0[g] + 4 * h;
        if (c + 4 <= a.cols) {  // the whole vector lies in the row (columns past n are masked below)
          x[g][h] = c < n ? __ldg(reinterpret_cast<const float4*>(row + c)) : make_float4(0.f, 0.f, 0.f, 0.f);
        } else {
          x[g][h].x = c < n ? __ldg(row + c) : 0.f;
          x[g][h].y = c + 1 < n ? __ldg(row + c + 1) : 0.f;
          x[g][h].z = c + 2 < n ? __ldg(row + c + 2) : 0.f;
          x[g][h].w = c + 3 < n ? __ldg(row + c + 3) : 0.f;
        }
      }
    }
  };
  auto kept_mask = [&](const float4 (&x)[kRoundGroups][2], const int (&c0)[kRoundGroups]) {
    uint64_t m = 0;
#pragma unroll
    for (int g = 0; g < kRoundGroups; ++g)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float xs[4] = {x[g][h].x, x[g][h].y, x[g][h].z, x[g][h].w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = c0[g] + 4 * h + e;
          m |= static_cast<uint64_t>(c < n && (all || xs[e] >= lb_value)) << (8 * g + 4 * h + e);
        }
      }
    return m;
  };
  auto write = [&](const float4 (&x)[kRoundGroups][2], const int (&c0)[kRoundGroups], uint64_t kept, int& at) {
#pragma unroll
    for (int g = 0; g < kRoundGroups; ++g)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float xs[4] = {x[g][h].x, x[g][h].y, x[g][h].z, x[g][h].w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if ((kept >> (8 * g + 4 * h + i)) & 1u) {
            lkeys[at] = order_key(xs[i]);
            lcols[at] = c0[g] + 4 * h + i;
            ++at;
          }
      }
  };
  // Usually (up to kRoundGroups * kThreads listed groups) one round: its loads stay in registers across the scan.
  const bool one_round = per2 <= kRoundGroups;  // block-uniform
  float4 x[kRoundGroups][2];
  int c0[kRoundGroups];
  uint64_t kept = 0;
  int count = 0;
  if (one_round) {
    load_round(e0, x, c0);
    kept = kept_mask(x, c0);
    count = __popcll(kept);
  } else {
    for (int e = e0; e < e1; e += kRoundGroups) {
      load_round(e, x, c0);
      count += __popcll(kept_mask(x, c0));
    }
  }
  pos = block_exclusive_scan(count, sh, &total);
  const int m = total;
  if (m > kCandCap) return whole_row();  // block-uniform
  if (one_round) {
    write(x, c0, kept, pos);
  } else {
    for (int e = e0; e < e1; e += kRoundGroups) {  // the second read is mostly from L1
      load_round(e, x, c0);
      write(x, c0, kept_mask(x, c0), pos);
    }
  }
  __syncthreads();

  // The exact selection on the list: radix steps of 11, 11 and 10 bits (stopping once a bin is taken whole).
  Threshold th;
  th.need = a.topk;
  const SmemKeys list{lkeys};
  radix_step<11>(list, m, 21, th, sh);
  if (!th.done) radix_step<11>(list, m, 10, th, sh);
  if (!th.done) radix_step<10>(list, m, 0, th, sh);
  emit_ordered(lkeys, lcols, m, th, sh, out_idx, out_sc, a.offset);
}

}  // namespace

void topk_rows_cuda(const at::Tensor& scores, const at::Tensor& lengths, int64_t topk, int64_t index_offset,
                    const at::Tensor& indices, const std::optional<at::Tensor>& out_scores,
                    const std::optional<at::Tensor>& group_max) {
  const char* op = "topk_rows";
  check_cuda(scores, op, "scores");
  check_dtype(scores, {at::kFloat}, op, "scores");
  check_dim(scores, 2, op, "scores", "[rows, cols]");
  check_float4_rows(scores, op, "scores");
  const int64_t R = scores.size(0), cols = scores.size(1);
  KEYE_CHECK(topk >= 1 && topk <= 4096, "keye.", op, ": argument 'topk' must be an int in [1, 4096], got ", topk);
  KEYE_CHECK(cols < (int64_t{1} << 30) && index_offset >= 0 && index_offset + cols < (int64_t{1} << 31), "keye.", op,
             ": rows of ", cols, " columns with index_offset ", index_offset, " do not fit int32 indices");
  check_dense(lengths, scores, "scores", {at::kInt}, 1, op, "lengths", "[rows]");
  check_size(lengths, 0, R, op, "lengths", "the row count (scores.size(0))");
  check_dense(indices, scores, "scores", {at::kInt}, 2, op, "indices", "[rows, topk]");
  KEYE_CHECK(indices.size(0) == R && indices.size(1) == topk, "keye.", op, ": argument 'indices' must have shape [",
             R, ", ", topk, "], got ", dims_str(indices.sizes()));
  float* sc_ptr = nullptr;
  if (out_scores.has_value()) {
    const at::Tensor& s = *out_scores;
    check_dense(s, scores, "scores", {at::kFloat}, 2, op, "out_scores", "[rows, topk]");
    KEYE_CHECK(s.sizes() == indices.sizes(), "keye.", op, ": argument 'out_scores' must have shape ",
               dims_str(indices.sizes()), ", got ", dims_str(s.sizes()));
    sc_ptr = s.data_ptr<float>();
  }
  if (group_max.has_value()) {
    const at::Tensor& g = *group_max;
    const int64_t groups = (cols + kScoreGroupKeys - 1) / kScoreGroupKeys;
    check_dense(g, scores, "scores", {at::kFloat}, 2, op, "group_max", "[rows, groups]");
    KEYE_CHECK(g.size(0) == R && g.size(1) >= groups, "keye.", op, ": argument 'group_max' must have shape [", R,
               ", >= ", groups, "] (one maximum per ", kScoreGroupKeys, " columns of 'scores'), got ",
               dims_str(g.sizes()));
    check_float4_rows(g, op, "group_max");
  }
  check_index_range(lengths, 0, cols, op, "lengths");
  if (R == 0) return;
  const at::cuda::CUDAGuard guard(scores.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const size_t shared_head = ((sizeof(Shared) + 15) / 16) * 16;  // Shared, then the data area
  if (group_max.has_value()) {
    const GroupedRows a{scores.data_ptr<float>(), scores.stride(0),        static_cast<int>(cols),
                        lengths.data_ptr<int>(),  group_max->data_ptr<float>(), group_max->stride(0),
                        static_cast<int>(topk),   static_cast<int>(index_offset), indices.data_ptr<int>(),
                        sc_ptr};
    const size_t smem = shared_head + kGroupedData;
    C10_CUDA_CHECK(cudaFuncSetAttribute(topk_grouped_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    launch_dependent(topk_grouped_kernel, dim3(static_cast<unsigned>(R)), dim3(kThreads), smem, stream, a);
    return;
  }
  // Rows of 32K+ columns: three CTAs per SM (a 40 KB data area, 40 registers), so one CTA's list selection runs
  // while the others read their rows; shorter calls keep the 80 KB row cache at two CTAs per SM (NOTES.md).
  const bool three_per_sm = cols >= kSampleMinLength;
  const int data_bytes = three_per_sm ? kLeanSmemData : kMaxSmemData;
  const int cap_keys = static_cast<int>(std::min<int64_t>(std::max<int64_t>(cols, 1), data_bytes / 4));
  const size_t smem = shared_head + static_cast<size_t>(cap_keys) * 4;
  const int sms = sm_count(scores.get_device());
  // Few long rows (32K+ columns): split each over several CTAs, segments of whole passes sized for about two
  // 512-thread CTAs per SM in all, unless the candidate workspace (one int per element) would pass 512 MB.
  // Measured (NOTES.md): at 128K columns the split path wins from 1 to 64 rows and loses at 128; decode op from a
  // graph with 1 / 8 / 32 / 64 rows of 32K columns 38.0 / 42.3 / 58.9 / 76.7 us on one CTA per row, 29-31 / 33-35
  // / 55-56 / 74-76 split; of 16K columns the split path lost at every row count (25.6 -> 27.8 us for one row).
  // Segments for two CTAs per SM instead of three: 64 rows of 128K 196.4-197.0 -> 191.4-191.8 us, 32 rows of 128K
  // and 64 of 64K ~-3.5 us, the rest within 1 us (one CTA per SM: 194.3-194.9 at 64 x 128K; four: 194.2-195.3).
  constexpr int kPass = kThreads * kItems;
  if (2 * R <= sms && cols >= 8 * kPass && R * cols <= (int64_t{1} << 27)) {
    int64_t seg_len = std::max<int64_t>(kPass, (R * cols / (2 * sms) + kPass - 1) / kPass * kPass);
    if ((cols + seg_len - 1) / seg_len > kMaxSegments)
      seg_len = ((cols + kMaxSegments - 1) / kMaxSegments + kPass - 1) / kPass * kPass;
    const int segments = static_cast<int>((cols + seg_len - 1) / seg_len);
    const auto opts = scores.options().dtype(at::kInt);
    const at::Tensor zeroed = at::zeros({R * (kBins + 1)}, opts);  // histograms, then tickets
    const at::Tensor row_info = at::empty({R, 4}, opts);
    const at::Tensor seg_count = at::empty({R, segments}, opts);
    const at::Tensor seg_cols = at::empty({R * segments * seg_len}, opts);
    SplitRows a{};
    a.scores = scores.data_ptr<float>();
    a.ld = scores.stride(0);
    a.cols = static_cast<int>(cols);
    a.lengths = lengths.data_ptr<int>();
    a.topk = static_cast<int>(topk);
    a.offset = static_cast<int>(index_offset);
    a.indices = indices.data_ptr<int>();
    a.out_scores = sc_ptr;
    a.seg_len = static_cast<int>(seg_len);
    a.segments = segments;
    a.hist = reinterpret_cast<uint32_t*>(zeroed.data_ptr<int>());
    a.ticket = zeroed.data_ptr<int>() + R * kBins;
    a.row_info = reinterpret_cast<int4*>(row_info.data_ptr<int>());
    a.seg_count = seg_count.data_ptr<int>();
    a.seg_cols = seg_cols.data_ptr<int>();
    const dim3 grid(segments, static_cast<unsigned>(R));
    // Each kernel may start as the one before finishes (programmatic dependent launch; measured in NOTES.md).
    launch_dependent(topk_split_histogram, grid, dim3(kThreads), 0, stream, a);
    launch_dependent(topk_split_collect, grid, dim3(kThreads), 0, stream, a);
    const size_t finish_smem = shared_head + kMaxSmemData;  // kListCap pairs
    C10_CUDA_CHECK(cudaFuncSetAttribute(topk_split_finish, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(finish_smem)));
    launch_dependent(topk_split_finish, dim3(static_cast<unsigned>(R)), dim3(kThreads), finish_smem, stream, a);
    return;
  }
  auto kernel = three_per_sm ? topk_rows_kernel<3> : topk_rows_kernel<2>;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<static_cast<unsigned>(R), kThreads, smem, stream>>>(
      scores.data_ptr<float>(), scores.stride(0), static_cast<int>(cols), lengths.data_ptr<int>(),
      static_cast<int>(topk), static_cast<int>(index_offset), indices.data_ptr<int>(), sc_ptr, cap_keys);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace keye
