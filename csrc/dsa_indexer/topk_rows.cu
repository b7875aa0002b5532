// Exact per-row top-k by radix select (one 512-thread CTA per row; few long rows are split over many CTAs, see
// topk_split_*), deterministic, output in column order.
//
// Scores become order-preserving 32-bit keys (NaN -> -inf, -0.0 -> +0.0, as the reference sorts them). Three
// histogram steps of 13, 10 and 9 bits narrow down the key of the k-th largest element ("threshold") and how
// many elements equal to it must still be taken ("need"); a step stops early once its threshold bin is taken
// whole. The emit pass then walks the row in column order with block-wide prefix sums, taking every element
// above the threshold and the first `need` equal to it, so ties go to lower columns and the output is sorted by
// column, identically on every run.
// Where the row lives:
//   rows up to `cap_keys` long are read from global memory once, into shared memory, and selected there;
//   rows of kSampleMinLength or more: a sample of the row (kSampleChunks contiguous chunks spread over it, 4096
//   elements) gives a first-digit bin that about 2 * topk elements of the row should reach; one pass collects
//   the elements at or above it, in column order, into shared memory as (key, column) pairs, and if at least
//   topk and at most the list's capacity were found, the exact selection runs on that list (one read of the
//   row). Otherwise (a sample that misled, or too many elements in that bin), and for rows between the two
//   lengths, the first histogram is taken over the whole row and the elements at or above its threshold bin are
//   collected (two reads); if even that list does not fit, every step reads the row from global memory (correct,
//   slower: many exact ties near the threshold).
// The first step's 13 bits (sign, exponent, 4 mantissa bits) matter: with v1's 11 bits the scores of a row crowd
// into a handful of quarter-octave bins (same-address atomics, and a threshold bin that can overflow the list;
// going to 14 bits cut the 128K layer from 74 to 43 ms, NOTES.md).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>

#include "common/check.h"
#include "common/device.h"
#include "dsa_indexer/dsa_checks.h"
#include "dsa_indexer/dsa_indexer.h"

namespace keye {
namespace {

constexpr int kThreads = 512;  // with <= 64 registers and ~113 KB of shared memory: two rows per SM at once
constexpr int kWarps = kThreads / 32;
constexpr int kFirstBits = 13;  // 1/16-octave bins (estimate for Gaussian-like scores: ~2K keys in the 128K bin)
constexpr int kBins = 1 << kFirstBits;
constexpr int kItems = 8;                 // consecutive elements per thread and pass
constexpr int kMaxSmemData = 80 * 1024;  // row cache / candidate list (with the 32 KB histogram: ~113 KB)
constexpr int kSampleChunks = 32;        // the sample of a long row: chunks of kSampleChunkLen elements
constexpr int kSampleChunkLen = kThreads * kItems / kSampleChunks;  // 128: one pass of the block
// Rows at least this long try the sample first. Measured on the H200 (prefill, every row over 20K columns trying
// it): 128K layer 33.8 -> 30.2 ms of top-k, but 32K 3.3 -> 3.9 ms and 64K 9.8 -> 10.6 ms.
constexpr int kSampleMinLength = 65536;

__device__ __forceinline__ uint32_t order_key(float x) {
  if (x != x) x = -INFINITY;
  if (x == 0.f) x = 0.f;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct Shared {
  uint32_t hist[kBins];
  int warp_sums[2][kWarps];
  int sel_bin, sel_above, sel_count, list_len;
};

// Exclusive prefix sums over the block (thread order) with one barrier per call: the warps' totals go to the two
// buffers of sh.warp_sums in turn and every warp scans them itself, so a buffer is written again only two calls
// later, after every thread has passed the barrier of the call between. The constructor's barrier keeps a new
// BlockScan from writing a buffer that an earlier one's threads may still read. All threads call together.
struct BlockScan {
  Shared& sh;
  int phase = 0;
  __device__ explicit BlockScan(Shared& s) : sh(s) { __syncthreads(); }
  // v's exclusive prefix; *total gets the block's sum.
  __device__ int exclusive(int v, int* total) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += y;
    }
    int* sums = sh.warp_sums[phase];
    phase ^= 1;
    if (lane == 31) sums[w] = x;
    __syncthreads();
    int s = lane < kWarps ? sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < kWarps; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += y;
    }
    const int before = __shfl_sync(0xffffffffu, s, (w + 31) & 31);  // inclusive sum of the warps before w
    *total = __shfl_sync(0xffffffffu, s, kWarps - 1);
    return x - v + (w > 0 ? before : 0);
  }
};

__device__ int block_exclusive_scan(int v, Shared& sh, int* total) { return BlockScan(sh).exclusive(v, total); }

// Element sources: a global fp32 row, the row's keys in shared memory, or a (key, column) list in shared memory.
// A pass reads kItems consecutive elements per thread in two steps, so that the loads of the next pass can be in
// flight while the current one is used: raw(i0, n) issues the loads of elements i0 .. i0+kItems-1 (i0 a multiple
// of 4; 16-byte vectors where all four are in range) and keys() turns them into order keys. Elements at or past
// n read as some key that callers mask by index.
struct GlobalRow {
  const float* row;
  struct Raw { float4 a, b; };
  __device__ uint32_t key(int i) const { return order_key(__ldg(row + i)); }
  __device__ float4 raw4(int i0, int n) const {
    if (i0 + 3 < n) return __ldg(reinterpret_cast<const float4*>(row + i0));
    float v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = i0 + e < n ? __ldg(row + i0 + e) : 0.f;
    return make_float4(v[0], v[1], v[2], v[3]);
  }
  __device__ Raw raw(int i0, int n) const { return {raw4(i0, n), raw4(i0 + 4, n)}; }
  __device__ static void keys(const Raw& r, uint32_t (&k)[kItems]) {
    k[0] = order_key(r.a.x), k[1] = order_key(r.a.y), k[2] = order_key(r.a.z), k[3] = order_key(r.a.w);
    k[4] = order_key(r.b.x), k[5] = order_key(r.b.y), k[6] = order_key(r.b.z), k[7] = order_key(r.b.w);
  }
  __device__ int col(int i) const { return i; }
};
struct SmemKeys {
  const uint32_t* keys_;
  struct Raw { uint4 a, b; };
  __device__ uint4 raw4(int i0, int n) const {
    if (i0 + 3 < n) return *reinterpret_cast<const uint4*>(keys_ + i0);
    uint32_t v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = i0 + e < n ? keys_[i0 + e] : 0u;
    return make_uint4(v[0], v[1], v[2], v[3]);
  }
  __device__ Raw raw(int i0, int n) const { return {raw4(i0, n), raw4(i0 + 4, n)}; }
  __device__ static void keys(const Raw& r, uint32_t (&k)[kItems]) {
    k[0] = r.a.x, k[1] = r.a.y, k[2] = r.a.z, k[3] = r.a.w, k[4] = r.b.x, k[5] = r.b.y, k[6] = r.b.z, k[7] = r.b.w;
  }
  __device__ int col(int i) const { return i; }
};
// The sample of a long row: element i is element (i / kSampleChunkLen) * stride + i % kSampleChunkLen of the row
// (stride a multiple of 4, and kItems divides kSampleChunkLen, so a thread's kItems sample elements are
// consecutive in the row).
struct RowSample : GlobalRow {
  int stride;
  __device__ Raw raw(int i0, int) const {  // every sample element lies inside the row
    const int pos = (i0 / kSampleChunkLen) * stride + i0 % kSampleChunkLen;
    return GlobalRow::raw(pos, pos + kItems);
  }
};
struct SmemList : SmemKeys {
  const int* cols;
  __device__ int col(int i) const { return cols[i]; }
};

// Calls body(i0, raw) for the passes over elements [begin, end) (i0 = this thread's first element, raw its
// kItems elements as loaded; the body masks elements at or past end) until it returns false. The whole block
// calls it together (the body may hold barriers). The loads of pass p + 1 are issued before pass p is used:
// with one pass in flight at a time a CTA waited out a load latency per pass (NOTES.md, top-k v5).
template <typename Src, typename Body>
__device__ __forceinline__ void for_each_pass(const Src& src, int begin, int end, Body&& body) {
  constexpr int kPass = kThreads * kItems;
  if (begin >= end) return;
  int i0 = begin + threadIdx.x * kItems;
  typename Src::Raw next = src.raw(i0, end);
  for (int base = begin; base < end; base += kPass, i0 += kPass) {
    const typename Src::Raw cur = next;
    if (base + kPass < end) next = src.raw(i0 + kPass, end);
    if (!body(i0, cur)) break;
  }
}

struct Threshold {
  uint32_t prefix = 0, mask = 0;
  int need;
  bool done = false;
};

// Narrows the threshold by one digit given the histogram of that digit in sh.hist (bins of the elements whose
// key matches the threshold so far): finds the bin where the count from the top reaches need.
__device__ void select_bin(int shift, int bits, Threshold& th, Shared& sh) {
  const int bins = 1 << bits;
  // Bins from the top: thread t owns bins bins-1-t*per ... ; find the bin where the count from above reaches need.
  const int per = (bins + kThreads - 1) / kThreads;
  int local = 0;
  for (int j = 0; j < per; ++j) {
    const int b = bins - 1 - (threadIdx.x * per + j);
    if (b >= 0) local += sh.hist[b];
  }
  int total;
  int running = block_exclusive_scan(local, sh, &total);
  for (int j = 0; j < per; ++j) {
    const int b = bins - 1 - (threadIdx.x * per + j);
    if (b < 0) break;
    const int c = sh.hist[b];
    if (running < th.need && running + c >= th.need) {
      sh.sel_bin = b;
      sh.sel_above = running;
      sh.sel_count = c;
    }
    running += c;
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
  const int bins = 1 << bits;
  for_each_pass(src, begin, end, [&](int i0, const typename Src::Raw& raw) {
    uint32_t k[kItems];
    Src::keys(raw, k);
#pragma unroll
    for (int e = 0; e < kItems; ++e)
      if (i0 + e < end && (k[e] & th.mask) == th.prefix) atomicAdd(&sh.hist[(k[e] >> shift) & (bins - 1)], 1u);
    return true;
  });
}

// One histogram step over bits [shift, shift + bits) of the elements whose key matches the threshold so far.
template <typename Src>
__device__ void radix_step(const Src& src, int n, int shift, int bits, Threshold& th, Shared& sh) {
  for (int b = threadIdx.x; b < (1 << bits); b += kThreads) sh.hist[b] = 0;
  __syncthreads();
  count_digits(src, 0, n, shift, bits, th, sh);
  __syncthreads();
  select_bin(shift, bits, th, sh);
}

template <typename Src>
__device__ void finish_threshold(const Src& src, int n, Threshold& th, Shared& sh) {
  if (!th.done) radix_step(src, n, 9, 10, th, sh);
  if (!th.done) radix_step(src, n, 0, 9, th, sh);
}

// Writes the selected elements in element order: all above the threshold, the first `need` equal to it.
template <typename Src>
__device__ void emit(const Src& src, int n, const Threshold& th, Shared& sh, int topk, int* out_idx,
                     float* out_scores, int offset) {
  int taken = 0, eq_seen = 0;
  BlockScan scan(sh);
  for_each_pass(src, 0, n, [&](int i0, const typename Src::Raw& raw) {
    uint32_t k[kItems];
    Src::keys(raw, k);
    int n_eq = 0;
#pragma unroll
    for (int e = 0; e < kItems; ++e) n_eq += (i0 + e < n) && (k[e] & th.mask) == th.prefix;
    int eq_total;
    int eq_rank = eq_seen + scan.exclusive(n_eq, &eq_total);
    bool sel[kItems];
    int n_sel = 0;
#pragma unroll
    for (int e = 0; e < kItems; ++e) {
      const bool live = i0 + e < n;
      const uint32_t m = k[e] & th.mask;
      sel[e] = live && (m > th.prefix || (m == th.prefix && eq_rank < th.need));
      eq_rank += live && m == th.prefix;
      n_sel += sel[e];
    }
    int sel_total;
    int pos = taken + scan.exclusive(n_sel, &sel_total);
#pragma unroll
    for (int e = 0; e < kItems; ++e) {
      if (!sel[e]) continue;
      out_idx[pos] = src.col(i0 + e) + offset;
      if (out_scores) out_scores[pos] = key_value(k[e]);
      ++pos;
    }
    taken += sel_total;
    eq_seen += eq_total;
    return taken < topk;  // block-uniform: every selected element written
  });
}

// The digits still open, then the selection: what every path does once its candidates are in `src`.
template <typename Src>
__device__ void finish_and_emit(const Src& src, int n, Threshold& th, Shared& sh, int topk, int* out_idx,
                                float* out_scores, int offset) {
  finish_threshold(src, n, th, sh);
  emit(src, n, th, sh, topk, out_idx, out_scores, offset);
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

// Passes the elements of [begin, end) at or above th's bin to store(position, key, column) in column order
// (positions from 0); returns how many there are. The caller bounds what it keeps.
// The test is on values, not keys: key(x) >= prefix (the bin's low bits are 0) exactly when x >= key_value(prefix)
// for x not NaN (-0 equal to +0, as in order_key), if the prefix is at least key(-FLT_MAX); a lower prefix (the bin
// of -inf and NaN) takes every element. So only the few collected elements are turned into keys.
template <typename Store>
__device__ int collect(const GlobalRow& src, int begin, int end, const Threshold& th, Shared& sh, Store&& store) {
  const bool all = th.prefix < 0x00800000u;
  const float lo = key_value(th.prefix);
  BlockScan scan(sh);
  int len = 0;
  for_each_pass(src, begin, end, [&](int i0, const GlobalRow::Raw& raw) {
    const float x[kItems] = {raw.a.x, raw.a.y, raw.a.z, raw.a.w, raw.b.x, raw.b.y, raw.b.z, raw.b.w};
    bool sel[kItems];
    int c = 0;
#pragma unroll
    for (int e = 0; e < kItems; ++e) {
      sel[e] = i0 + e < end && (all || x[e] >= lo);
      c += sel[e];
    }
    int total;
    int pos = len + scan.exclusive(c, &total);
#pragma unroll
    for (int e = 0; e < kItems; ++e)
      if (sel[e]) store(pos++, order_key(x[e]), i0 + e);
    len += total;
    return true;
  });
  __syncthreads();
  return len;
}

// The one-CTA kernel's candidate list: (key, column) pairs in shared memory, at most cap of them stored.
__device__ int collect_pairs(const GlobalRow& src, int n, const Threshold& th, int cap, Shared& sh, uint32_t* lkeys,
                             int* lcols) {
  return collect(src, 0, n, th, sh, [&](int pos, uint32_t key, int col) {
    if (pos < cap) lkeys[pos] = key, lcols[pos] = col;
  });
}

__global__ void __launch_bounds__(kThreads) topk_rows_kernel(const float* __restrict__ scores, int64_t ld, int cols,
                                                             const int* __restrict__ lengths, int topk,
                                                             int offset, int* __restrict__ indices,
                                                             float* __restrict__ out_scores, int cap_keys) {
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
  if (n <= cap_keys) {  // the row fits in shared memory: one global read
    uint32_t* keys = reinterpret_cast<uint32_t*>(data);
    const GlobalRow grow{row};
    for_each_pass(grow, 0, n, [&](int i0, const GlobalRow::Raw& raw) {
      uint32_t k[kItems];
      GlobalRow::keys(raw, k);
      if (i0 + kItems <= n) {
        *reinterpret_cast<uint4*>(keys + i0) = make_uint4(k[0], k[1], k[2], k[3]);
        *reinterpret_cast<uint4*>(keys + i0 + 4) = make_uint4(k[4], k[5], k[6], k[7]);
      } else {
        for (int e = 0; e < kItems && i0 + e < n; ++e) keys[i0 + e] = k[e];
      }
      return true;
    });
    __syncthreads();
    const SmemKeys src{keys};
    radix_step(src, n, 32 - kFirstBits, kFirstBits, th, sh);
    finish_and_emit(src, n, th, sh, topk, out_idx, out_sc, offset);
    return;
  }
  const GlobalRow grow{row};
  const int cap_pairs = cap_keys / 2;
  uint32_t* lkeys = reinterpret_cast<uint32_t*>(data);
  int* lcols = reinterpret_cast<int*>(data) + cap_pairs;
  // First try: the first-digit bin that ~2 * topk elements reach in a sample (rank scaled to the sample's size),
  // and one pass that collects every element at or above it.
  if (n >= kSampleMinLength) {
    constexpr int kSample = kSampleChunks * kSampleChunkLen;
    Threshold est;
    est.need = min(kSample, static_cast<int>((2LL * topk * kSample + n - 1) / n) + 32);
    radix_step(RowSample{{row}, (n / kSampleChunks) & ~3}, kSample, 32 - kFirstBits, kFirstBits, est, sh);
    const int len = collect_pairs(grow, n, est, cap_pairs, sh, lkeys, lcols);
    if (len >= topk && len <= cap_pairs) {
      const SmemList list{{lkeys}, lcols};
      radix_step(list, len, 32 - kFirstBits, kFirstBits, th, sh);
      finish_and_emit(list, len, th, sh, topk, out_idx, out_sc, offset);
      return;
    }
  }
  radix_step(grow, n, 32 - kFirstBits, kFirstBits, th, sh);
  if (th.done || topk - th.need + sh.hist[sh.sel_bin] > cap_pairs) {  // list would not fit: stay in global
    finish_and_emit(grow, n, th, sh, topk, out_idx, out_sc, offset);
    return;
  }
  const int len = collect_pairs(grow, n, th, cap_pairs, sh, lkeys, lcols);
  finish_and_emit(SmemList{{lkeys}, lcols}, len, th, sh, topk, out_idx, out_sc, offset);
}

// ---- Few long rows (decode): each row split over many CTAs, three kernels. ----
// One CTA per row leaves most SMs idle when there are fewer rows than SMs, and one CTA alone cannot keep enough
// loads in flight to read a 128K-element row fast (v4 of the one-CTA kernel: 0.09 ms for 64 such rows).
//   topk_split_histogram (segments x rows): each CTA counts the first digit of its segment in shared memory
//     and adds the non-zero bins to the row's histogram in global memory; the row's last CTA (atomic ticket,
//     after a fence) reads the whole histogram and records the row's threshold bin and how many of that bin
//     are still needed.
//   topk_split_collect (segments x rows): each CTA writes the columns at or above the threshold bin, in column
//     order, to its segment's slice of the candidate list.
//   topk_split_finish (rows): concatenates the slices (segment order = column order), fetches their keys, and
//     finishes exactly as the one-CTA kernel does on its candidate list; if the candidates do not fit in shared
//     memory, it falls back to that kernel's global path for the row.
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
  int cap_keys;
};


__global__ void __launch_bounds__(kThreads) topk_split_histogram(const SplitRows a) {
  __shared__ Shared sh;
  const int r = blockIdx.y;
  const int n = row_length(a.lengths, r, a.cols);
  if (n <= a.topk) return;  // topk_split_finish takes the whole row
  const int begin = min(static_cast<int>(blockIdx.x) * a.seg_len, n), end = min(begin + a.seg_len, n);
  for (int b = threadIdx.x; b < kBins; b += kThreads) sh.hist[b] = 0;
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
  select_bin(32 - kFirstBits, kFirstBits, th, sh);
  if (threadIdx.x == 0) a.row_info[r] = make_int4(static_cast<int>(th.prefix), th.need, th.done, 0);
}

__global__ void __launch_bounds__(kThreads) topk_split_collect(const SplitRows a) {
  __shared__ Shared sh;
  const int r = blockIdx.y, seg = blockIdx.x;
  const int n = row_length(a.lengths, r, a.cols);
  if (n <= a.topk) return;
  const int begin = min(seg * a.seg_len, n), end = min(begin + a.seg_len, n);
  Threshold th;
  th.prefix = static_cast<uint32_t>(a.row_info[r].x);
  th.mask = ~0u << (32 - kFirstBits);
  int* list = a.seg_cols + (static_cast<int64_t>(r) * a.segments + seg) * a.seg_len;
  const int len = collect(GlobalRow{a.scores + r * a.ld}, begin, end, th, sh,
                          [&](int pos, uint32_t, int col) { list[pos] = col; });
  if (threadIdx.x == 0) a.seg_count[r * a.segments + seg] = len;
}

__global__ void __launch_bounds__(kThreads) topk_split_finish(const SplitRows a) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  Shared& sh = *reinterpret_cast<Shared*>(smem_raw);
  uint8_t* data = smem_raw + ((sizeof(Shared) + 15) / 16) * 16;
  __shared__ int seg_off[kMaxSegments + 1];

  const int r = blockIdx.x;
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
  const int cap_pairs = a.cap_keys / 2;
  const GlobalRow grow{row};
  if (len > cap_pairs) {  // many exact ties around the threshold: the one-CTA kernel's global path
    return finish_and_emit(grow, n, th, sh, a.topk, out_idx, out_sc, a.offset);
  }
  uint32_t* lkeys = reinterpret_cast<uint32_t*>(data);
  int* lcols = reinterpret_cast<int*>(data) + cap_pairs;
  // One flat pass over the whole list (a loop over segments would wait out one load latency per segment).
  for (int j = threadIdx.x; j < len; j += kThreads) {
    int lo = 0, hi = a.segments - 1;  // the segment holding list entry j: last seg with seg_off[seg] <= j
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (seg_off[mid] <= j) lo = mid; else hi = mid - 1;
    }
    const int col = a.seg_cols[(static_cast<int64_t>(r) * a.segments + lo) * a.seg_len + (j - seg_off[lo])];
    lcols[j] = col;
    lkeys[j] = grow.key(col);
  }
  __syncthreads();
  finish_and_emit(SmemList{{lkeys}, lcols}, len, th, sh, a.topk, out_idx, out_sc, a.offset);
}

}  // namespace

void topk_rows_cuda(const at::Tensor& scores, const at::Tensor& lengths, int64_t topk, int64_t index_offset,
                    const at::Tensor& indices, const std::optional<at::Tensor>& out_scores) {
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
  check_index_range(lengths, 0, cols, op, "lengths");
  if (R == 0) return;
  const at::cuda::CUDAGuard guard(scores.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int cap_keys = static_cast<int>(std::min<int64_t>(std::max<int64_t>(cols, 1), kMaxSmemData / 4));
  const size_t smem = ((sizeof(Shared) + 15) / 16) * 16 + static_cast<size_t>(cap_keys) * 4;
  const int sms = sm_count(scores.get_device());
  // Few long rows: split each over several CTAs, about one wave of them (three 512-thread CTAs per SM), unless
  // the candidate workspace (one int per element) would pass 512 MB. Measured (NOTES.md): at 128K columns the
  // split path wins from 1 to 64 rows (0.031 vs 0.078 ms for one row, 0.068 vs 0.085 ms for 64) and loses at
  // 128 rows, and at 32K columns it loses already at 64 rows (three launches and a grid-wide handoff).
  constexpr int kPass = kThreads * kItems;
  if (2 * R <= sms && cols >= 16 * kPass && R * cols <= (int64_t{1} << 27)) {
    int64_t seg_len = std::max<int64_t>(kPass, (R * cols / (3 * sms) + kPass - 1) / kPass * kPass);
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
    a.cap_keys = cap_keys;
    const dim3 grid(segments, static_cast<unsigned>(R));
    topk_split_histogram<<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    topk_split_collect<<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    C10_CUDA_CHECK(cudaFuncSetAttribute(topk_split_finish, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    topk_split_finish<<<static_cast<unsigned>(R), kThreads, smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(topk_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  topk_rows_kernel<<<static_cast<unsigned>(R), kThreads, smem, stream>>>(
      scores.data_ptr<float>(), scores.stride(0), static_cast<int>(cols), lengths.data_ptr<int>(),
      static_cast<int>(topk), static_cast<int>(index_offset), indices.data_ptr<int>(), sc_ptr, cap_keys);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace keye
