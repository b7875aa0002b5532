// Standalone timing prototype: the sparse-attention block forward's phase 2 (each query pair's own rows) as a
// transposed per-pair wgmma step, to decide whether that design is worth building (NOTES.md, issue 4, fifteenth
// session). Outputs are meaningless; only the time counts. Each warpgroup takes one pair at a time and walks
// STEPS steps of 64 keys over shared memory that is never refilled (no gathers: the arithmetic and synchronisation
// chain alone):
//   S^T = K Q^T           wgmma m64n16k16, K (64 keys x 128 dims) and Q^T (the pair's 16 query-head rows) from smem
//   column max            shuffles within a warp, then the warpgroup's 4 warps through shared memory (named barrier)
//   P = exp2(S - max)     written as P^T (16 x 64 keys, 128-byte swizzle) to shared memory, O^T and sums rescaled
//   O^T += V^T P^T        two wgmma m64n16k16 (64 dims each, V as the MN-major A operand), 4 k-steps of 16 keys
// The grid is the realistic 32K workload: 2048 blocks x 4 KV heads, 8 pairs per CTA, ~1024 keys per pair.
//
//   nvcc -std=c++20 -gencode=arch=compute_90a,code=sm_90a -O3 -I csrc bench/attn_phase2_chain.cu -o /tmp/p2 && /tmp/p2
//
// H200, 2026-11-30: 2.88 ms for 4 pairs per warpgroup (the whole workload), 1.52 ms for 2, against ~3.5 ms for
// the block kernel's phase 2 today with its gathers: ~1270 cycles per step and warpgroup, latency-bound.
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdint>
#include "common/wgmma.cuh"
#include "common/ptx.cuh"
#include "common/bulk_copy.cuh"
using namespace keye;

// d (+)= A (64 x 16, smem descriptor; kTransA = 1: MN-major) * B (16 x 16, K-major smem descriptor), bf16 -> fp32.
template <int kTransA>
__device__ __forceinline__ void wg_m64n16k16_ss(float (&d)[8], uint64_t da, uint64_t db, int acc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7}, %8, %9, p, 1, 1, %11, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(da), "l"(db), "r"(acc), "n"(kTransA));
}
__device__ __forceinline__ void named_bar(int id) { asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory"); }

constexpr int kKeys = 64, kHalf = kKeys * 128;  // K (or V) half: [64 keys][128 B] (64 dims)
constexpr int kKV = 4 * kHalf;                   // K halves then V halves: 32 KB
// Per warpgroup: 3 ring slots, Q^T [2][16][128 B], P^T [16][128 B], the max exchange.
constexpr int kWgBytes = 3 * kKV + 4096 + 2048 + 1024;
template <int STEPS>
__global__ void __launch_bounds__(256, 1) phase2_chain(float* out, float scale_log2, int pairs_per_wg) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 1023)) & 1023);
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, t = threadIdx.x % 128;
  uint8_t* base = smem + wg * kWgBytes;
  uint8_t* qt = base + 3 * kKV;
  uint8_t* pt = qt + 4096;
  float* red = reinterpret_cast<float*>(pt + 2048);  // [4 warps][16 columns]
  // Fill this warpgroup's shared memory with small bf16 values (so exp2 stays finite).
  for (int i = t; i < kWgBytes / 4; i += 128)
    reinterpret_cast<uint32_t*>(base)[i] = 0x3c003c00u ^ ((i * 2654435761u) & 0x00ff00ffu);
  __syncthreads();
  float total = 0.f;
  for (int pr = 0; pr < pairs_per_wg; ++pr) {
    float o[2][8] = {};                  // O^T: dims (two M halves) x 16 query-head columns
    float m[4], l[4];                    // this thread's 4 columns: (lane % 4) * 2 + {0, 1} + 8 j
#pragma unroll
    for (int c = 0; c < 4; ++c) m[c] = -INFINITY, l[c] = 0.f;  // running max and this thread's partial sums
    for (int st = 0; st < STEPS; ++st) {
      const uint8_t* kv = base + (st % 3) * kKV;
      float s[8];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 8; ++kk)
        wg_m64n16k16_ss<0>(s, smem_desc<128>(kv + (kk / 4) * kHalf) + 2 * (kk % 4),
                           smem_desc<128>(qt + (kk / 4) * 2048) + 2 * (kk % 4), kk);
      wgmma_commit();
      wgmma_wait<0>();  // S^T and the previous step's O^T product
      fence_operands(s);
      fence_operands(o);
      // s[4j + 0/1]: key row warp*16 + lane/4, columns 8j + (lane%4)*2 + 0/1; s[4j + 2/3]: key row + 8.
      float cm[4];
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) cm[2 * j + c] = fmaxf(s[4 * j + c], s[4 * j + 2 + c]) * scale_log2;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        cm[c] = fmaxf(cm[c], __shfl_xor_sync(0xffffffffu, cm[c], 4));
        cm[c] = fmaxf(cm[c], __shfl_xor_sync(0xffffffffu, cm[c], 8));
        cm[c] = fmaxf(cm[c], __shfl_xor_sync(0xffffffffu, cm[c], 16));
      }
      if (lane < 4) {
#pragma unroll
        for (int c = 0; c < 4; ++c) red[warp * 16 + (c / 2) * 8 + lane * 2 + c % 2] = cm[c];
      }
      named_bar(1 + wg);
      float a[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int col = (c / 2) * 8 + (lane % 4) * 2 + c % 2;
        const float mx = fmaxf(fmaxf(red[col], red[16 + col]), fmaxf(red[32 + col], red[48 + col]));
        const float mn = fmaxf(m[c], mx);
        a[c] = fast_exp2(m[c] - mn);
        m[c] = mn;
        l[c] *= a[c];
      }
      // P = exp2(s * scale - m), partial sums per thread, P^T (16 columns x 64 keys, K-major, 128-byte swizzle).
      const int kr0 = warp * 16 + lane / 4;
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float p = fast_exp2(fmaf(s[4 * j + 2 * h + c], scale_log2, -m[2 * j + c]));
            l[2 * j + c] += p;
            const int n = 8 * j + (lane % 4) * 2 + c, kr = kr0 + 8 * h;
            const int off = n * 128 + (((kr / 8) ^ (n % 8)) << 4) + (kr % 8) * 2;
            *reinterpret_cast<__nv_bfloat16*>(pt + off) = __float2bfloat16(p);
          }
      // Rescale O^T's columns (this thread's O^T accumulators are the same 4 columns).
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            o[h][4 * j + c] *= a[2 * j + c];
            o[h][4 * j + 2 + c] *= a[2 * j + c];
          }
      fence_async_shared();
      named_bar(1 + wg);
      wgmma_fence();
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
          wg_m64n16k16_ss<1>(o[h], smem_desc_mn128(kv + 2 * kHalf + h * kHalf + kk * 16 * 128, kHalf, 8 * 128),
                             smem_desc<128>(pt) + 2 * kk, 1);
      wgmma_commit();
    }
    wgmma_wait<0>();
    fence_operands(o);
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < 8; ++i) total += o[h][i];
#pragma unroll
    for (int c = 0; c < 4; ++c) total += l[c];
  }
  out[blockIdx.x * 256 + threadIdx.x] = total;
}

int main() {
  const int ctas = 8192;  // 2048 blocks x 4 KV heads at 32K
  float* out;
  cudaMalloc(&out, ctas * 256 * sizeof(float));
  const int smem = 2 * kWgBytes + 1024;
  cudaFuncSetAttribute(phase2_chain<16>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0); cudaEventCreate(&e1);
  for (int pairs : {4, 2}) {
    float best = 1e9;
    for (int r = 0; r < 7; ++r) {
      cudaEventRecord(e0);
      phase2_chain<16><<<ctas, 256, smem>>>(out, 0.1275f, pairs);
      cudaEventRecord(e1);
      cudaEventSynchronize(e1);
      float ms; cudaEventElapsedTime(&ms, e0, e1);
      if (r > 0 && ms < best) best = ms;
    }
    cudaError_t err = cudaGetLastError();
    printf("phase-2 chain: %d CTAs, %d pairs per warpgroup x 16 steps of 64 keys: best %.3f ms (%s); smem %d B\n",
           ctas, pairs, best, cudaGetErrorString(err), smem);
  }
  return 0;
}
