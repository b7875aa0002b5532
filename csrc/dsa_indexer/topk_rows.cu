// Exact per-row top-k for the indexer's score rows: one CTA per row (rows of prefill chunks), or few long rows split
// over many CTAs (decode); the rows of a decode score kernel that also wrote group maxima go to topk_grouped.cu. The
// algorithm and what the two paths share: topk_select.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/check.h"
#include "common/device.h"
#include "common/pdl.cuh"
#include "dsa_indexer/dsa_checks.h"
#include "dsa_indexer/topk_select.cuh"

namespace keye {
namespace {

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
  float* sc_ptr = check_selection_out(indices, out_scores, R, topk, scores, "scores", op, "[rows, topk]");
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
    launch_topk_grouped(a, R, stream);
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
