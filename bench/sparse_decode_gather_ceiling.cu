// Decode gather ceiling for sparse attention (issue 4's decode target shape: B = 32 sequences x 128K slots, KV cache
// [slot][4 heads][128] bf16, 2048 random slots per sequence, 134 MB of K and V rows gathered). The same bytes read
// (a) per (sequence, KV head) CTA as 256-byte rows, the decode kernels' layout, and (b) per (sequence, quarter of
// the slots) CTA as whole 1 KB slots (all four KV heads of a slot together); 128 CTAs either way (one per SM),
// 16-byte loads into registers, U in flight per thread, XOR-folded so nothing is optimised away; L2 flushed before
// each call, plain launches timed by events (median of 40).
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a bench/sparse_decode_gather_ceiling.cu -o /tmp/sdgc && /tmp/sdgc
//
// H200, 2026-12-01 (twenty-fourth session; this file as committed, copy 4273 GB/s; us, second round): per head,
// 256 / 512 / 1024 threads, 8 loads each: 92.9 / 59.1 / 47.5 (66.1% of copy); 1024 x 16: 51.3; per slot 69.5 /
// 54.6 / 49.8; 1024 x 16: 54.6. (The first run, two separate kernels: the same within 1 us except per head at 256
// threads, 101.4.)
// Whole slots are no faster; the keye decode kernel (own-heads, 8 warps) takes 48.0 us for the same shape in one
// CUDA graph call, about this naive ceiling (NOTES.md, issue 4).
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdint>
#include <vector>
#include <random>
#include <algorithm>
constexpr int B = 32, CTX = 131072, K = 2048, H = 4;
__device__ __forceinline__ uint32_t fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }
// CTA (seq, h): kWholeSlots false: KV head h's 256-byte rows of all 2048 slots (16 chunks per row), K then V;
// true: whole 1 KB slots (64 chunks) of the h-th quarter of the slots. Thread t takes chunks t, t + T, ...
template <int T, int U, bool kWholeSlots>
__global__ void __launch_bounds__(T) gather(const uint8_t* k, const uint8_t* v, const int* slots, uint32_t* out) {
  const int seq = blockIdx.x / H, h = blockIdx.x % H;
  constexpr int rows = kWholeSlots ? K / H : K, row_chunks = kWholeSlots ? 64 : 16, chunks = rows * 2 * row_chunks;
  const int* sl = slots + seq * K + (kWholeSlots ? h * rows : 0);
  const int offset = kWholeSlots ? 0 : h * 256;
  uint32_t acc = 0;
  for (int c0 = threadIdx.x; c0 < chunks; c0 += T * U) {
    uint4 x[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * T;
      const int kv = c / (rows * row_chunks), r = (c / row_chunks) % rows, ch = c % row_chunks;
      const uint8_t* base = (kv ? v : k) + (int64_t(seq) * CTX + sl[r]) * 1024 + offset;
      x[u] = c < chunks ? __ldg(reinterpret_cast<const uint4*>(base) + ch) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= fold(x[u]);
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}
int main() {
  const size_t bytes = size_t(B) * CTX * 1024;
  uint8_t *k, *v, *flush; int* slots; uint32_t* out;
  cudaMalloc(&k, bytes); cudaMalloc(&v, bytes); cudaMalloc(&flush, 256 << 20); cudaMalloc(&out, 4);
  cudaMemset(k, 1, bytes); cudaMemset(v, 2, bytes);
  std::vector<int> h(size_t(B) * K);
  std::mt19937 rng(5);
  for (auto& x : h) x = rng() % CTX;
  cudaMalloc(&slots, h.size() * 4);
  cudaMemcpy(slots, h.data(), h.size() * 4, cudaMemcpyHostToDevice);
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  auto med = [&](auto launch) {
    std::vector<float> ts;
    for (int r = 0; r < 43; ++r) {
      cudaMemsetAsync(flush, r, 256 << 20);
      cudaEventRecord(e0); launch(); cudaEventRecord(e1); cudaEventSynchronize(e1);
      float ms; cudaEventElapsedTime(&ms, e0, e1); if (r >= 3) ts.push_back(ms * 1e3f);
    }
    std::nth_element(ts.begin(), ts.begin() + ts.size() / 2, ts.end()); return ts[ts.size() / 2];
  };
  uint8_t *src, *dst; const size_t cb = size_t(2) << 30; cudaMalloc(&src, cb); cudaMalloc(&dst, cb); cudaMemset(src, 1, cb);
  const float cu = med([&] { cudaMemcpyAsync(dst, src, cb, cudaMemcpyDeviceToDevice); });
  const double copy = 2.0 * cb / cu / 1e3;
  const double moved = double(B) * K * H * 256 * 2;
  printf("copy %.0f GB/s, %.0f MB gathered, 70%% of copy = %.1f us\n", copy, moved / 1e6, moved / copy / 1e3 / 0.7);
  auto rep = [&](const char* n, float us) { printf("%-28s %6.1f us %5.1f%% of copy\n", n, us, moved / us / 1e3 / copy * 100); };
  for (int round = 0; round < 2; ++round) {
    printf("-- round %d\n", round);
    rep("per head T256 U8", med([&] { gather<256, 8, false><<<B * H, 256>>>(k, v, slots, out); }));
    rep("per head T512 U8", med([&] { gather<512, 8, false><<<B * H, 512>>>(k, v, slots, out); }));
    rep("per head T1024 U8", med([&] { gather<1024, 8, false><<<B * H, 1024>>>(k, v, slots, out); }));
    rep("per head T1024 U16", med([&] { gather<1024, 16, false><<<B * H, 1024>>>(k, v, slots, out); }));
    rep("per slot T256 U8", med([&] { gather<256, 8, true><<<B * H, 256>>>(k, v, slots, out); }));
    rep("per slot T512 U8", med([&] { gather<512, 8, true><<<B * H, 512>>>(k, v, slots, out); }));
    rep("per slot T1024 U8", med([&] { gather<1024, 8, true><<<B * H, 1024>>>(k, v, slots, out); }));
    rep("per slot T1024 U16", med([&] { gather<1024, 16, true><<<B * H, 1024>>>(k, v, slots, out); }));
  }
  printf("%s\n", cudaGetErrorString(cudaGetLastError()));
  return 0;
}
