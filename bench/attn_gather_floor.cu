// Data-movement floors of top-k sparse attention (issue 4): kernels that only move the bytes a design must move.
//
// One CTA per (row list, group of KV heads) walks its list of K/V rows in 8 KB tiles (16 rows of one KV head, or 4
// whole token rows of all four) through a 4-stage shared-memory ring (per-thread 16-byte cp.async, as keye's
// gathers) and sums the 32-bit words it gathered, so nothing is optimised away and the driver can check every sum.
// With `scatter` it also adds each gathered element, as fp32, to row r of dk / dv (red.global.add.v4.f32): the
// dK / dV atomics of a query-major backward, 1 KB per (row, KV head), on top of its 512 B of K/V reads. No
// arithmetic of attention is done, so the time of a list set estimates the floor of any kernel that moves those
// bytes in that pattern (an estimate: a cleverer copy loop could be faster; the driver's report says how it compares
// with keye's own kernels).
//
// Plain C entry points (no torch headers): bench/attn_gather_floor.py compiles this file with nvcc and calls it
// through ctypes with the data pointers of torch tensors.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256, kStages = 4, kSlice = 256;  // kSlice: one KV head's 128 bf16

__device__ __forceinline__ void cp16(void* dst, const void* src, bool valid) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void red4(float* dst, float a, float b, float c, float d) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
}

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// HPC: KV heads per CTA (1: 256-byte slices of one head, as keye's kernels gather; 4: whole 1 KB token rows).
// Thread i moves the same 16-byte chunk of every tile (K chunk i, V chunk i: one row per thread and tile) and reads
// only what it copied itself, so its own cp.async.wait_group is all the synchronisation there is: no barriers. The
// row indices are loaded a tile ahead of their copies, so no copy waits for its address.
template <int HPC, bool kScatter>
__global__ void __launch_bounds__(kThreads) gather_lists(const uint8_t* __restrict__ k, const uint8_t* __restrict__ v,
                                                         const int* __restrict__ rows,
                                                         const int64_t* __restrict__ offsets, int kv_heads,
                                                         float* dk, float* dv, uint32_t* __restrict__ sums) {
  extern __shared__ __align__(128) uint8_t smem[];
  constexpr int kTile = 16 / HPC;                 // rows per tile: 4 KB of K and 4 KB of V either way
  constexpr int kChunksPerRow = HPC * kSlice / 16;
  constexpr int kHalf = kTile * kChunksPerRow * 16;  // bytes of the tile's K (= of its V) = kThreads * 16
  static_assert(kHalf == kThreads * 16, "one K chunk and one V chunk per thread and tile");
  const int64_t begin = offsets[blockIdx.x], n = offsets[blockIdx.x + 1] - begin;
  const int tiles = static_cast<int>((n + kTile - 1) / kTile);
  const int my_row = threadIdx.x / kChunksPerRow, my_col = threadIdx.x % kChunksPerRow;
  const int64_t stride = static_cast<int64_t>(kv_heads) * kSlice;  // bytes per token of k and of v
  const int64_t col_bytes = static_cast<int64_t>(blockIdx.y) * HPC * kSlice + my_col * 16;

  auto row_of = [&](int t) -> int {
    const int64_t i = static_cast<int64_t>(t) * kTile + my_row;
    return t < tiles && i < n ? rows[begin + i] : -1;
  };
  auto issue = [&](int t, int row) {
    uint8_t* dst = smem + (t % kStages) * 2 * kHalf + threadIdx.x * 16;
    const int64_t off = row >= 0 ? row * stride + col_bytes : 0;
    cp16(dst, k + off, row >= 0);  // rows past the list's end are zero-filled
    cp16(dst + kHalf, v + off, row >= 0);
  };
  static_assert(kStages == 4, "the row registers below follow a 4-stage ring");
  int r0 = row_of(0), r1 = row_of(1), r2 = row_of(2), r3 = row_of(3);
  issue(0, r0);
  asm volatile("cp.async.commit_group;\n");
  issue(1, r1);
  asm volatile("cp.async.commit_group;\n");
  issue(2, r2);
  asm volatile("cp.async.commit_group;\n");
  uint32_t acc = 0;
  for (int t = 0; t < tiles; ++t) {
    if (t + 3 < tiles) issue(t + 3, r3);
    asm volatile("cp.async.commit_group;\n");
    const int r4 = row_of(t + 4);
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kStages - 1) : "memory");
    const uint8_t* tile = smem + (t % kStages) * 2 * kHalf + threadIdx.x * 16;
    const uint4 wk = *reinterpret_cast<const uint4*>(tile), wv = *reinterpret_cast<const uint4*>(tile + kHalf);
    acc += wk.x + wk.y + wk.z + wk.w + wv.x + wv.y + wv.z + wv.w;
    if constexpr (kScatter) {
      if (r0 >= 0) {
        const int64_t e = (r0 * stride + col_bytes) / 2;  // element offset of the chunk: the fp32 twin's too
        red4(dk + e, bf16_lo(wk.x), bf16_hi(wk.x), bf16_lo(wk.y), bf16_hi(wk.y));
        red4(dk + e + 4, bf16_lo(wk.z), bf16_hi(wk.z), bf16_lo(wk.w), bf16_hi(wk.w));
        red4(dv + e, bf16_lo(wv.x), bf16_hi(wv.x), bf16_lo(wv.y), bf16_hi(wv.y));
        red4(dv + e + 4, bf16_lo(wv.z), bf16_hi(wv.z), bf16_lo(wv.w), bf16_hi(wv.w));
      }
    }
    r0 = r1, r1 = r2, r2 = r3, r3 = r4;
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  __shared__ uint32_t warp_sums[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t total = 0;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    sums[static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y] = total;
  }
}

template <int HPC, bool kScatter>
int launch(const void* k, const void* v, const int* rows, const int64_t* offsets, int lists, int kv_heads, float* dk,
           float* dv, uint32_t* sums, cudaStream_t stream) {
  constexpr int smem = kStages * 2 * kThreads * 16;  // 8 KB tiles
  auto kernel = gather_lists<HPC, kScatter>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return static_cast<int>(e);
  kernel<<<dim3(lists, kv_heads / HPC), kThreads, smem, stream>>>(static_cast<const uint8_t*>(k),
                                                                 static_cast<const uint8_t*>(v), rows, offsets,
                                                                 kv_heads, dk, dv, sums);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// k, v: [tokens, kv_heads, 128] bf16; rows: the lists' token rows end to end, offsets [lists + 1] (int64) into them;
// sums [lists, kv_heads / heads_per_cta] uint32 out. dk, dv [tokens, kv_heads, 128] fp32 when scatter, else unused.
// Returns a cudaError_t value (0 = launched); 1000 for an unsupported heads_per_cta / kv_heads combination.
extern "C" int keye_gather_floor(const void* k, const void* v, const int* rows, const int64_t* offsets, int lists,
                                 int kv_heads, int heads_per_cta, int scatter, float* dk, float* dv, uint32_t* sums,
                                 void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (lists <= 0 || kv_heads <= 0 || kv_heads % heads_per_cta != 0) return 1000;
  if (heads_per_cta == 1)
    return scatter ? launch<1, true>(k, v, rows, offsets, lists, kv_heads, dk, dv, sums, s)
                   : launch<1, false>(k, v, rows, offsets, lists, kv_heads, dk, dv, sums, s);
  if (heads_per_cta == 4 && !scatter) return launch<4, false>(k, v, rows, offsets, lists, kv_heads, dk, dv, sums, s);
  return 1000;
}
