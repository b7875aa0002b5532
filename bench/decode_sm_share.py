"""How the decode score stream slows when N SMs are taken by other CTAs: a spin kernel (1024 threads and 227 KB of
shared memory per CTA, so one CTA holds an SM) runs on a second stream, resident before the score kernel (with group
maxima, H_I=16, D_I=64) starts on the first; median of 15 runs per N. The question it answers: could the top-k of
finished rows run on SMs beside the stream (an overlap design)? The twenty-second session's table (README.md,
NOTES.md) comes from it; the spin kernel is compiled with torch's load_inline (nvcc and ninja on the machine):
    python3 bench/decode_sm_share.py"""
import torch
from torch.utils.cpp_extension import load_inline
from keye import ops
from keye.bench.dsa_indexer import paged_cache, H_I, D_I, TOPK
src = r'''
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
__global__ void spin_kernel(long long cycles, int* out) {
  extern __shared__ int s[];
  long long t0 = clock64();
  int x = 0;
  while (clock64() - t0 < cycles) { x += s[threadIdx.x & 63]; }
  if (x == 12345) out[0] = x;
}
void spin(int64_t ctas, int64_t cycles, torch::Tensor out) {
  const int smem = 227 * 1024;  // the whole SM: no score CTA fits beside it
  cudaFuncSetAttribute(spin_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  spin_kernel<<<ctas, 1024, smem, c10::cuda::getCurrentCUDAStream()>>>(cycles, out.data_ptr<int>());
}
'''
m = load_inline("spin_ext", cpp_sources="void spin(int64_t ctas, int64_t cycles, torch::Tensor out);",
                cuda_sources=src, functions=["spin"], verbose=False, extra_cuda_cflags=["-gencode=arch=compute_90a,code=sm_90a"])
dev = torch.device("cuda")
K = torch.ops.keye
out = torch.zeros(1, dtype=torch.int32, device=dev)
side = torch.cuda.Stream()
for B, ctx in [(64, 131072), (32, 131072)]:
    k_cache, k_scale_cache, block_table = paged_cache(B, ctx, dev)
    q8, qs = ops.indexer_rotate_quantize(torch.randn(B, 1, H_I, D_I, device=dev, dtype=torch.bfloat16))
    w = torch.randn(B, 1, H_I, device=dev)
    seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    buf = torch.empty(B, ctx, device=dev)
    gm = torch.empty(B, ctx // 8, device=dev)
    with ops.index_checks(False):
        def score():
            K.indexer_logits_paged(q8, qs, w, k_cache, k_scale_cache, block_table, seq_lens, buf, gm)
        for _ in range(3):
            score()
        torch.cuda.synchronize()
        res = {}
        for n_busy in (0, 8, 16, 32, 48, 64):
            ts = []
            for rep in range(15):
                torch.cuda.synchronize()
                if n_busy:
                    with torch.cuda.stream(side):
                        m.spin(n_busy, 1_400_000, out)  # ~700 us at ~1.98 GHz
                torch.cuda._sleep(60_000)  # ~30 us: the spinning CTAs are resident first
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                score()
                e.record()
                torch.cuda.synchronize()
                ts.append(s.elapsed_time(e) * 1e3)
            ts.sort()
            res[n_busy] = ts[len(ts) // 2]
        print(f"B{B} ctx {ctx}: score kernel us with N SMs taken: " +
              " ".join(f"N={k}: {v:.1f}" for k, v in res.items()), flush=True)
