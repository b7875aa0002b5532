// How fast can a decode step stream its routed experts' gate_up weights, by access pattern? Keye shape: E = 128
// experts of [H = 2048, 2I = 1536] bf16 (6 MB each), 8 distinct experts per step (50 MB, as at T = 1), the routing
// rotated over 16 steps so the 50 MB L2 holds nothing of the next step. Every pattern uses 256 threads, 16-byte
// loads in batches of 8 with the next batch issued before the current one is used (the loop of decode_gemv.cu),
// and consumes each word with an XOR so nothing is optimised away. Patterns:
//   columns C : a CTA per (expert, C gate columns + the C matching up columns) reads all 2048 rows of its columns
//               (C = 32 is decode_gate_up_kernel's layout: 64 + 64 bytes of each 3 KB row)
//   rows R    : a CTA per (expert, R whole rows) reads R x 3 KB contiguous bytes
//   bulk S x B: the fused decode kernel's pattern (decode_fused.cu) over the whole layer, gate_up then down weights
//               (75.5 MB): one CTA per SM takes an equal contiguous share of the routed w1 rows, then of the w2 rows,
//               in bulk copies of at most B bytes of whole rows (never crossing an expert) through a ring of S stages
//               in shared memory; every thread reads its words of each stage before the stage is refilled. "bare":
//               the same with no reads (thread 0 waits and refills)
//   flat      : 75.5 MB read by every SM's 512 threads with 16-byte loads, 8 in flight (the reference rate)
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I csrc bench/decode_stream_ceiling.cu -o /tmp/dsc && /tmp/dsc
//
// H200, 2026-11-30 (per step, 8 steps back to back): columns 16 / 32 / 64 / 128: 18.2 / 15.5 / 17.4 / 23.6 us;
// rows 16 / 32 / 64 / 128 / 256: 14.5 / 14.5 / 14.8 / 16.0 / 20.3 us (3.46 TB/s best). decode_gate_up_kernel: 16.9 us.
// Twelfth session (75.5 MB layer): flat 21.0 us (3.59 TB/s, 84% of the copy rate); bulk 6 x 32 / 3 x 64 / 4 x 48 /
// 12 x 16 / 24 x 8 KB 23.1 / 22.4-22.6 / 22.5 / 28.9 / 57.9 us; bare 6 x 32 / 12 x 16 KB 21.8 / 22.1 us.
#include <cuda_runtime.h>

#include "common/bulk_copy.cuh"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

constexpr int E = 128, H = 2048, N = 1536, K = 8, STEPS = 16, THREADS = 256, DEPTH = 8;
constexpr int64_t EXPERT_BYTES = int64_t(H) * N * 2;

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e_)); return 1; } } while (0)

__device__ __forceinline__ uint32_t fold(const uint4& v) { return v.x ^ v.y ^ v.z ^ v.w; }

// The decode kernels' loop: load(b0, v) issues the batch at b0; the next batch is issued before the current one is
// consumed. Returns the XOR of every loaded word.
template <typename Load>
__device__ __forceinline__ uint32_t stream(const Load& load, int total, int step) {
  uint4 cur[DEPTH], nxt[DEPTH];
  uint32_t acc = 0;
  load(0, cur);
  for (int b0 = 0; b0 < total; b0 += step) {
    load(b0 + step, nxt);
#pragma unroll
    for (int u = 0; u < DEPTH; ++u) acc ^= fold(cur[u]);
#pragma unroll
    for (int u = 0; u < DEPTH; ++u) cur[u] = nxt[u];
  }
  return acc;
}

// Column blocks: lanes per row = 2C / 8 (half gate, half up), rows per round = THREADS / lanes.
template <int C>
__global__ void __launch_bounds__(THREADS) columns(const uint8_t* w, const int* ids, uint32_t* out) {
  constexpr int lanes = 2 * C / 8, rows_per_round = THREADS / lanes, batch_rows = rows_per_round * DEPTH;
  const int e = ids[blockIdx.y], col0 = blockIdx.x * C, vec = threadIdx.x % lanes, r0 = threadIdx.x / lanes;
  const int col = vec < lanes / 2 ? col0 + vec * 8 : N / 2 + col0 + (vec - lanes / 2) * 8;
  const uint8_t* base = w + e * EXPERT_BYTES + int64_t(col) * 2;
  auto load = [&](int b0, uint4 (&v)[DEPTH]) {
#pragma unroll
    for (int u = 0; u < DEPTH; ++u) {
      const int row = b0 + r0 + u * rows_per_round;
      v[u] = row < H ? __ldg(reinterpret_cast<const uint4*>(base + int64_t(row) * N * 2)) : make_uint4(0, 0, 0, 0);
    }
  };
  const uint32_t acc = stream(load, H, batch_rows);
  if (acc == 0x9e3779b9u) out[0] = acc;
}

// Row chunks: the CTA's R rows are R * N * 2 contiguous bytes; thread t reads 16-byte units t, t + THREADS, ...
template <int R>
__global__ void __launch_bounds__(THREADS) rows(const uint8_t* w, const int* ids, uint32_t* out) {
  constexpr int units = R * N * 2 / 16, batch_units = THREADS * DEPTH;
  const int e = ids[blockIdx.y];
  const uint4* base = reinterpret_cast<const uint4*>(w + e * EXPERT_BYTES + int64_t(blockIdx.x) * R * N * 2);
  auto load = [&](int b0, uint4 (&v)[DEPTH]) {
#pragma unroll
    for (int u = 0; u < DEPTH; ++u) {
      const int i = b0 + threadIdx.x + u * THREADS;
      v[u] = i < units ? __ldg(base + i) : make_uint4(0, 0, 0, 0);
    }
  };
  const uint32_t acc = stream(load, units, batch_units);
  if (acc == 0x9e3779b9u) out[0] = acc;
}

// The fused decode kernel's stream: flat rows j * rows_per_slot + r of the K routed experts' w1 ([H] rows of 3 KB),
// then of their w2 ([I] rows of 4 KB), each CTA an equal contiguous share of each phase.
constexpr int I_DOWN = N / 2;
constexpr int64_t DOWN_EXPERT_BYTES = int64_t(I_DOWN) * H * 2;
struct BulkPhase { const uint8_t* base; int64_t expert_bytes; int rows_per_slot, row_bytes; };

// Walks one CTA's stages: its share of phase 0's rows, then of phase 1's, in pieces of at most B bytes.
template <int B>
struct BulkCursor {
  const BulkPhase* ph;
  int g, G, phase, pos, end;
  __device__ void enter(int p) {
    for (phase = p; phase < 2; ++phase) {
      const int total = K * ph[phase].rows_per_slot;
      pos = int(int64_t(g) * total / G);
      end = int(int64_t(g + 1) * total / G);
      if (pos < end) break;
    }
  }
  __device__ int slot() const { return pos / ph[phase].rows_per_slot; }
  __device__ int row() const { return pos - slot() * ph[phase].rows_per_slot; }
  __device__ int rows() const { return min(min(B / ph[phase].row_bytes, ph[phase].rows_per_slot - row()), end - pos); }
  __device__ void advance() {
    pos += rows();
    if (pos == end) enter(phase + 1);
  }
};

template <int S, int B, bool kRead>
__global__ void __launch_bounds__(512, 1) bulk(const uint8_t* w1, const uint8_t* w2, const int* ids, uint32_t* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ uint64_t full[S];
  const int tid = threadIdx.x;
  const BulkPhase ph[2] = {{w1, EXPERT_BYTES, H, N * 2}, {w2, DOWN_EXPERT_BYTES, I_DOWN, H * 2}};
  BulkCursor<B> prod{ph, int(blockIdx.x), int(gridDim.x)};
  prod.enter(0);
  BulkCursor<B> cons = prod;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) keye::mbarrier_init(full + s, 1);
    keye::fence_mbarrier_init();
  }
  __syncthreads();
  const uint64_t policy = keye::l2_evict_first_policy();
  int issued = 0;
  const auto issue = [&] {  // thread 0: the next stage, if any
    if (prod.phase == 2) return;
    const BulkPhase& p = ph[prod.phase];
    const uint32_t bytes = uint32_t(prod.rows()) * p.row_bytes;
    uint64_t* bar = full + issued % S;
    keye::mbarrier_arrive_expect_tx(bar, bytes);
    keye::bulk_copy_g2s(smem + (issued % S) * B, p.base + ids[prod.slot()] * p.expert_bytes +
                        int64_t(prod.row()) * p.row_bytes, bytes, bar, policy);
    ++issued;
    prod.advance();
  };
  if (tid == 0)
    for (int s = 0; s < S; ++s) issue();
  if (!kRead && tid != 0) return;
  uint32_t acc = 0;
  for (int s = 0; cons.phase < 2; ++s) {
    const int bytes = cons.rows() * ph[cons.phase].row_bytes;
    keye::mbarrier_wait_parity(full + s % S, (s / S) & 1);
    if (kRead) {
      const uint4* st = reinterpret_cast<const uint4*>(smem + (s % S) * B);
      for (int i = tid; i < bytes / 16; i += 512) acc ^= fold(st[i]);
      keye::fence_async_shared();
      __syncthreads();
    }
    if (tid == 0) issue();
    cons.advance();
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}

// 75.5 MB (the routed w1 then w2 bytes) with 16-byte loads from every thread, 8 in flight: the rate without any
// pattern cost.
__global__ void __launch_bounds__(512, 1) flat(const uint8_t* w1, const uint8_t* w2, const int* ids, uint32_t* out) {
  // unit u of slot j: expert ids[j]'s w1 (EXPERT_BYTES / 16 units) then its w2 (DOWN_EXPERT_BYTES / 16)
  constexpr int64_t u1 = EXPERT_BYTES / 16, u2 = DOWN_EXPERT_BYTES / 16, per_slot = u1 + u2, total = K * per_slot;
  const int64_t stride = int64_t(gridDim.x) * 512;
  uint32_t acc = 0;
  for (int64_t b = blockIdx.x * 512 + threadIdx.x; b < total; b += 8 * stride) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int64_t i = b + u * stride;
      if (i < total) {
        const int j = int(i / per_slot);
        const int64_t r = i - j * per_slot;
        const uint8_t* src = r < u1 ? w1 + ids[j] * EXPERT_BYTES + r * 16 : w2 + ids[j] * DOWN_EXPERT_BYTES + (r - u1) * 16;
        v[u] = __ldg(reinterpret_cast<const uint4*>(src));
      } else {
        v[u] = make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) acc ^= fold(v[u]);
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}

template <typename F>
float median_us(F launch_step) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<float> t;
  for (int i = 0; i < 20; ++i) launch_step(i);  // warm-up
  for (int i = 0; i < 200; ++i) {  // 8 steps back to back (as layers in a graph), time per step
    cudaEventRecord(a);
    for (int j = 0; j < 8; ++j) launch_step(i * 8 + j);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms * 1e3f / 8);
  }
  std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
  return t[t.size() / 2];
}

int main() {
  uint8_t* w;
  int* ids;
  uint32_t* out;
  CK(cudaMalloc(&w, E * EXPERT_BYTES));
  CK(cudaMemset(w, 0x3c, E * EXPERT_BYTES));
  CK(cudaMalloc(&ids, STEPS * K * sizeof(int)));
  CK(cudaMalloc(&out, 4));
  std::mt19937 rng(7);
  std::vector<int> h(STEPS * K);
  for (int s = 0; s < STEPS; ++s) {  // 8 distinct experts per step, steps drawn so consecutive ones share none
    std::vector<int> all(E);
    for (int i = 0; i < E; ++i) all[i] = i;
    std::shuffle(all.begin(), all.end(), rng);
    std::copy(all.begin(), all.begin() + K, h.begin() + s * K);
  }
  CK(cudaMemcpy(ids, h.data(), h.size() * sizeof(int), cudaMemcpyHostToDevice));
  uint8_t* w2;
  CK(cudaMalloc(&w2, E * DOWN_EXPERT_BYTES));
  CK(cudaMemset(w2, 0x3c, E * DOWN_EXPERT_BYTES));
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const double layer_bytes = double(K) * (EXPERT_BYTES + DOWN_EXPERT_BYTES);
#define BULK(S, B, READ, NAME) { auto k = bulk<S, B, READ>; CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, S * B)); \
    float us = median_us([&](int i) { k<<<sms, 512, S * B>>>(w, w2, ids + (i % STEPS) * K, out); }); CK(cudaGetLastError()); \
    printf("bulk %2d x %2d KB %-5s %4d CTAs  %7.2f us  %6.0f GB/s (75.5 MB layer)\n", S, B / 1024, NAME, sms, us, layer_bytes / us / 1e3); }
  for (int round = 0; round < 2; ++round) {
    { float us = median_us([&](int i) { flat<<<sms, 512>>>(w, w2, ids + (i % STEPS) * K, out); }); CK(cudaGetLastError());
      printf("flat                %4d CTAs  %7.2f us  %6.0f GB/s (75.5 MB layer)\n", sms, us, layer_bytes / us / 1e3); }
    BULK(6, 32768, true, "read") BULK(6, 32768, false, "bare") BULK(12, 16384, true, "read") BULK(3, 65536, true, "read")
    BULK(4, 49152, true, "read") BULK(24, 8192, true, "read") BULK(12, 16384, false, "bare")
  }
  const double bytes = double(K) * EXPERT_BYTES;
  auto report = [&](const char* name, int ctas, float us) {
    printf("%-12s %4d CTAs  %7.2f us  %6.0f GB/s\n", name, ctas, us, bytes / us / 1e3);
  };
#define COLS(C) { dim3 g(N / 2 / C, K); float us = median_us([&](int i) { columns<C><<<g, THREADS>>>(w, ids + (i % STEPS) * K, out); }); CK(cudaGetLastError()); report("columns " #C, g.x * g.y, us); }
#define ROWS(R) { dim3 g(H / R, K); float us = median_us([&](int i) { rows<R><<<g, THREADS>>>(w, ids + (i % STEPS) * K, out); }); CK(cudaGetLastError()); report("rows " #R, g.x * g.y, us); }
  for (int round = 0; round < 2; ++round) {
    COLS(16) COLS(32) COLS(64) COLS(128)
    ROWS(16) ROWS(32) ROWS(64) ROWS(128) ROWS(256)
  }
  return 0;
}
