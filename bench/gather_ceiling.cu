// The gather ceiling of top-k sparse attention: random 256-byte K and V rows ([S, 4, 128] bf16 each, one KV head
// per CTA, 2048 rows per CTA, 8192 CTAs) into a 4-stage shared-memory ring, consumed by a trivial XOR so nothing
// is optimised away. Two ways to gather: per-thread 16-byte cp.async (keye's gather_tile) and one
// cp.async.bulk per row with mbarrier completion (with and without 16 bytes of row padding).
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a bench/gather_ceiling.cu -o /tmp/gather_ceiling
//   /tmp/gather_ceiling
//
// H200, 2026-11-30: cp.async 6.6 TB/s (ncu: L2 throughput 65%), bulk per row 4.0 TB/s, padded 3.5 TB/s.
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <random>
#include <cuda_runtime.h>

constexpr int S = 32768, H = 4, D = 128, ROWB = D * 2, TILE = 16, N = 2048, STAGES = 4, THREADS = 256;
constexpr int TILEB = 2 * TILE * ROWB;  // K then V

__device__ __forceinline__ void cp16(void* dst, const void* src) {
  uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ uint32_t sa(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

template <int ROWS_PER_CTA>
__global__ void __launch_bounds__(THREADS) gather_cp(const uint8_t* k, const uint8_t* v, const int* idx,
                                                     uint32_t* out) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int g = blockIdx.y;
  const int* rows = idx + blockIdx.x * ROWS_PER_CTA;
  constexpr int tiles = ROWS_PER_CTA / TILE;
  auto issue = [&](int t) {
    uint8_t* dst = smem + (t % STAGES) * TILEB;
    for (int i = threadIdx.x; i < 2 * TILE * 16; i += THREADS) {
      const int which = i / (TILE * 16), r = (i / 16) % TILE, c = i % 16;
      const uint8_t* src = (which ? v : k) + (static_cast<int64_t>(rows[t * TILE + r]) * H + g) * ROWB + c * 16;
      cp16(dst + which * TILE * ROWB + r * ROWB + ((c ^ (r % 8)) * 16), src);
    }
  };
  uint32_t acc = 0;
  for (int s = 0; s < STAGES - 1; ++s) { issue(s); asm volatile("cp.async.commit_group;\n"); }
  for (int t = 0; t < tiles; ++t) {
    if (t + STAGES - 1 < tiles) issue(t + STAGES - 1);
    asm volatile("cp.async.commit_group;\n");
    asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 1) : "memory");
    __syncthreads();
    const uint32_t* b = reinterpret_cast<const uint32_t*>(smem + (t % STAGES) * TILEB);
    for (int i = threadIdx.x; i < TILEB / 4; i += THREADS) acc ^= b[i];
    __syncthreads();
  }
  if (acc == 0x12345678u) out[0] = acc;
}

template <int ROWS_PER_CTA, int PAD>
__global__ void __launch_bounds__(THREADS) gather_bulk(const uint8_t* k, const uint8_t* v, const int* idx,
                                                       uint32_t* out) {
  extern __shared__ __align__(128) uint8_t smem[];
  constexpr int RS = ROWB + PAD, STB = 2 * TILE * RS;
  __shared__ __align__(8) uint64_t bar[STAGES];
  const int g = blockIdx.y;
  const int* rows = idx + blockIdx.x * ROWS_PER_CTA;
  constexpr int tiles = ROWS_PER_CTA / TILE;
  if (threadIdx.x < STAGES) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(sa(&bar[threadIdx.x])));
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncthreads();
  auto issue = [&](int t) {
    const int st = t % STAGES;
    if (threadIdx.x < 2 * TILE) {
      if (threadIdx.x == 0)
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(sa(&bar[st])),
                     "r"(2 * TILE * ROWB) : "memory");
      __syncwarp(0xffffffffu);
      const int which = threadIdx.x / TILE, r = threadIdx.x % TILE;
      const uint8_t* src = (which ? v : k) + (static_cast<int64_t>(rows[t * TILE + r]) * H + g) * ROWB;
      uint8_t* dst = smem + st * STB + (which * TILE + r) * RS;
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                   ::"r"(sa(dst)), "l"(src), "r"(ROWB), "r"(sa(&bar[st])) : "memory");
    }
  };
  uint32_t acc = 0;
  for (int s = 0; s < STAGES - 1; ++s) issue(s);
  for (int t = 0; t < tiles; ++t) {
    if (t + STAGES - 1 < tiles) issue(t + STAGES - 1);
    const int st = t % STAGES;
    const uint32_t parity = (t / STAGES) & 1;
    uint32_t done = 0;
    while (!done)
      asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }\n"
                   : "=r"(done) : "r"(sa(&bar[st])), "r"(parity) : "memory");
    const uint32_t* b = reinterpret_cast<const uint32_t*>(smem + st * STB);
    for (int i = threadIdx.x; i < 2 * TILE * (ROWB / 4); i += THREADS)
      acc ^= b[(i / (ROWB / 4)) * (RS / 4) + i % (ROWB / 4)];
    __syncthreads();
  }
  if (acc == 0x12345678u) out[0] = acc;
}

template <typename F>
float time_ms(F f) {
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) f();
  std::vector<float> ts;
  for (int i = 0; i < 15; ++i) {
    cudaEventRecord(a);
    f();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    ts.push_back(ms);
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

int main() {
  const int ctas = 2048;
  size_t tb = size_t(S) * H * ROWB;
  uint8_t *k, *v; int* idx; uint32_t* out;
  cudaMalloc(&k, tb); cudaMalloc(&v, tb); cudaMalloc(&idx, sizeof(int) * ctas * N); cudaMalloc(&out, 16);
  cudaMemset(k, 1, tb); cudaMemset(v, 2, tb);
  std::mt19937 rng(1); std::vector<int> h(size_t(ctas) * N);
  for (auto& x : h) x = rng() % S;
  cudaMemcpy(idx, h.data(), sizeof(int) * h.size(), cudaMemcpyHostToDevice);
  const double bytes = double(ctas) * H * N * 2 * ROWB;
  dim3 grid(ctas, H);
  int smem_cp = STAGES * TILEB, smem_b0 = STAGES * 2 * TILE * ROWB, smem_b16 = STAGES * 2 * TILE * (ROWB + 16);
  cudaFuncSetAttribute(gather_cp<N>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_cp);
  cudaFuncSetAttribute(gather_bulk<N, 0>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_b0);
  cudaFuncSetAttribute(gather_bulk<N, 16>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_b16);
  for (int rep = 0; rep < 2; ++rep) {
    float a = time_ms([&] { gather_cp<N><<<grid, THREADS, smem_cp>>>(k, v, idx, out); });
    float b = time_ms([&] { gather_bulk<N, 0><<<grid, THREADS, smem_b0>>>(k, v, idx, out); });
    float c = time_ms([&] { gather_bulk<N, 16><<<grid, THREADS, smem_b16>>>(k, v, idx, out); });
    printf("random 256-B rows from 2 x %.0f MB: cp.async 16B/thread %.3f ms %.0f GB/s | bulk/row %.3f ms %.0f GB/s"
           " | bulk/row padded %.3f ms %.0f GB/s\n",
           tb / 1e6, a, bytes / a / 1e6, b, bytes / b / 1e6, c, bytes / c / 1e6);
  }
  cudaError_t e = cudaDeviceSynchronize();
  printf("status: %s\n", cudaGetErrorString(e));
  return 0;
}
