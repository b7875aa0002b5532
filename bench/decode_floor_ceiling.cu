// What a decode kernel pays before it moves a byte: the fixed costs under the T = 1 MoE layer's ~20 us floor
// (NOTES.md, issue 5, twelfth session). Every case is a CUDA graph of 8 kernel nodes replayed back to back; the figure is the
// median replay time / 8, i.e. per node, including the gap to the next node.
//   launch      : an empty kernel on one CTA per SM (512 threads), without and with ~200 KB of dynamic shared
//                 memory (one CTA per SM, as the fused decode kernel), plain and cooperative launches
//   grid sync   : the cooperative kernel with 1 / 2 / 4 grid-wide barriers (cooperative_groups::this_grid().sync())
//   L2 chain    : thread 0 of every CTA follows a chain of n dependent loads through random 128-byte lines of a
//                 16 MB buffer (L2-resident): the slope over n is one L2 round trip
//   cold chain  : the same through random lines of a 1 GB buffer, each chain node behind a kernel that writes
//                 256 MB (L2 and TLBs refilled with other data, as a decode step finds its weights): reported as
//                 the time with the flush minus the flush's own graph (n = 0)
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a bench/decode_floor_ceiling.cu -o /tmp/dfc && /tmp/dfc
//
// H200, 2026-11-30 (132 SMs): launch 0.96 us in all three forms; grid sync x1 / x2 / x4 1.98 / 3.15 / 5.15 us;
// L2 chain n = 1 / 4 / 8 / 16 / 32: 1.31 / 1.81 / 2.43 / 3.68 / 6.14 us (~0.16 us per round trip); cold chain
// +0.65 / 2.20 / 3.71 / 6.76 / 12.72 us (~0.4 us per round trip).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e_)); std::exit(1); } } while (0)

constexpr int kThreads = 512, kNodes = 8, kReplays = 200;

__global__ void __launch_bounds__(kThreads, 1) empty_kernel(int* sink) {
  if (sink != nullptr && threadIdx.x == 0 && blockIdx.x == 0) *sink = 1;
}

template <int kSyncs>
__global__ void __launch_bounds__(kThreads, 1) sync_kernel(int* sink) {
  for (int i = 0; i < kSyncs; ++i) cooperative_groups::this_grid().sync();
  if (sink != nullptr && threadIdx.x == 0 && blockIdx.x == 0) *sink = 1;
}

// Thread 0 of each CTA: n dependent loads, starting at chain[start + blockIdx.x] (one chain per CTA).
__global__ void __launch_bounds__(kThreads, 1) chain_kernel(const int64_t* chain, int64_t start, int n, int64_t* sink) {
  if (threadIdx.x != 0) return;
  int64_t i = start + blockIdx.x;
  for (int k = 0; k < n; ++k) i = __ldcg(chain + i);
  if (i == -12345) *sink = i;  // never true: keeps the chain
}

struct Node {
  const void* fn;
  void** args;
  size_t smem;
  bool cooperative;
  int grid = 0;  // 0: one CTA per SM
};

__global__ void fill_kernel(uint4* p, int64_t n) {  // the flush: writes n 16-byte words
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = make_uint4(unsigned(i), 0, 0, 0);
}

__global__ void scatter_kernel(int64_t* dst, const int64_t* where, const int64_t* what, int64_t n) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) dst[where[i]] = what[i];
}

// Median per-node time (us) of a graph of kNodes groups of launches, nodes(i) -> the group's launches.
template <typename MakeNodes>
float graph_us(int grid, MakeNodes nodes) {
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaGraph_t g;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < kNodes; ++i)
  for (const Node& n : nodes(i)) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = n.cooperative ? 1 : 0;
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(n.grid > 0 ? n.grid : grid);
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = n.smem;
    cfg.stream = s;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    CK(cudaLaunchKernelExC(&cfg, n.fn, n.args));
  }
  CK(cudaStreamEndCapture(s, &g));
  cudaGraphExec_t ge;
  CK(cudaGraphInstantiate(&ge, g, 0));
  for (int i = 0; i < 10; ++i) CK(cudaGraphLaunch(ge, s));
  std::vector<float> t;
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int r = 0; r < kReplays; ++r) {
    CK(cudaEventRecord(a, s));
    CK(cudaGraphLaunch(ge, s));
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1000.0f / kNodes);
  }
  std::sort(t.begin(), t.end());
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  CK(cudaStreamDestroy(s));
  return t[t.size() / 2];
}

using Nodes = std::vector<Node>;

// Device buffer of n_entries int64 holding kNodes * sms chains of hops_max hops through random lines (128 B apart)
// after the heads (entries 0 .. chains - 1).
int64_t* make_chains(int64_t n_entries, int chains, int hops_max, std::mt19937_64& rng) {
  const int64_t stride = 16, head_lines = (chains + stride - 1) / stride + 1, lines = n_entries / stride;
  std::uniform_int_distribution<int64_t> pick(head_lines, lines - 1);
  std::vector<int64_t> where, what;
  std::vector<char> taken(lines, 0);
  for (int c = 0; c < chains; ++c) {
    int64_t cur = c;
    for (int h = 0; h < hops_max; ++h) {
      int64_t line;
      do { line = pick(rng); } while (taken[line]);
      taken[line] = 1;
      where.push_back(cur);
      what.push_back(line * stride);
      cur = line * stride;
    }
    where.push_back(cur);
    what.push_back(0);
  }
  int64_t *buf, *dw, *dv;
  const int64_t n = static_cast<int64_t>(where.size());
  CK(cudaMalloc(&buf, n_entries * sizeof(int64_t)));
  CK(cudaMemset(buf, 0, n_entries * sizeof(int64_t)));
  CK(cudaMalloc(&dw, n * sizeof(int64_t)));
  CK(cudaMalloc(&dv, n * sizeof(int64_t)));
  CK(cudaMemcpy(dw, where.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dv, what.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice));
  scatter_kernel<<<(n + 255) / 256, 256>>>(buf, dw, dv, n);
  CK(cudaDeviceSynchronize());
  CK(cudaFree(dw));
  CK(cudaFree(dv));
  return buf;
}

int main() {
  int dev = 0, sms = 0, smem_optin = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const size_t big = 200 * 1024;
  CK(cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin));
  CK(cudaFuncSetAttribute(sync_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin));
  CK(cudaFuncSetAttribute(sync_kernel<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin));
  CK(cudaFuncSetAttribute(sync_kernel<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin));
  int* sink = nullptr;
  int64_t* sink64 = nullptr;
  void* args_sink[] = {&sink};
  printf("%d SMs, grid %d x %d threads; per node of a graph of %d, median of %d replays (us)\n", sms, sms, kThreads,
         kNodes, kReplays);
  const auto one = [&](const void* fn, size_t smem, bool coop) {
    return graph_us(sms, [&](int) { return Nodes{Node{fn, args_sink, smem, coop}}; });
  };
  printf("launch  empty, no smem              %6.2f\n", one((const void*)empty_kernel, 0, false));
  printf("launch  empty, 200 KB smem          %6.2f\n", one((const void*)empty_kernel, big, false));
  printf("launch  empty, 200 KB, cooperative  %6.2f\n", one((const void*)empty_kernel, big, true));
  printf("grid sync x1 (cooperative, 200 KB)  %6.2f\n", one((const void*)sync_kernel<1>, big, true));
  printf("grid sync x2                        %6.2f\n", one((const void*)sync_kernel<2>, big, true));
  printf("grid sync x4                        %6.2f\n", one((const void*)sync_kernel<4>, big, true));

  std::mt19937_64 rng(1);
  const int hops_max = 32, chains = kNodes * sms;
  int64_t starts[kNodes];
  for (int i = 0; i < kNodes; ++i) starts[i] = int64_t(i) * sms;
  // Per node: the chain kernel (n hops from each CTA's own chain start), after `before` if given.
  const auto chain_us = [&](int64_t* buf, int n, const Node* before) {
    void* args[kNodes][4];
    for (int i = 0; i < kNodes; ++i) {
      args[i][0] = &buf;
      args[i][1] = &starts[i];
      args[i][2] = &n;
      args[i][3] = &sink64;
    }
    return graph_us(sms, [&](int i) {
      Nodes nodes;
      if (before != nullptr) nodes.push_back(*before);
      nodes.push_back(Node{(const void*)chain_kernel, args[i], 0, false});
      return nodes;
    });
  };
  // L2: 16 MB of lines, chains of the kNodes nodes disjoint.
  int64_t* l2 = make_chains((int64_t(16) << 20) / 8, chains, hops_max, rng);
  for (int n : {0, 1, 2, 4, 8, 16, 32}) printf("L2 chain   n = %2d                   %6.2f\n", n, chain_us(l2, n, nullptr));
  CK(cudaFree(l2));
  // Cold: 1 GB of lines, a 256 MB write in front of every chain node.
  int64_t* cold = make_chains((int64_t(1) << 30) / 8, chains, hops_max, rng);
  uint4* flush;
  int64_t flush_words = (int64_t(256) << 20) / 16;
  CK(cudaMalloc(&flush, flush_words * 16));
  void* flush_args[] = {&flush, &flush_words};
  const Node flush_node{(const void*)fill_kernel, flush_args, 0, false, 4 * sms};
  float base = 0.0f;
  for (int n : {0, 1, 2, 4, 8, 16, 32}) {
    const float us = chain_us(cold, n, &flush_node);
    if (n == 0) base = us;
    printf("cold chain n = %2d  (flush + chain %6.2f)  %6.2f\n", n, us, us - base);
  }
  CK(cudaFree(cold));
  CK(cudaFree(flush));
  return 0;
}
