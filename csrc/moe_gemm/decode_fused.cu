// The whole routed-expert block of one decode token in one kernel: gate_up, SwiGLU, down and the weighted combine.
//
//   out = sum_k weights[k] * (swiglu(x @ w1[ids[k]]) @ w2[ids[k]])      x [1, H] -> out [1, H]
//
// fp32 from the products to the sum (the activations are not rounded to bf16), rounded once at the end.
//
// Every weight byte is read once, in whole rows, by bulk copies (TMA without a tensor map) into a ring of 3 x 64 KB
// per CTA (one 512-thread CTA per SM, cooperative launch):
// - thread 0 reads the routing, walks its CTA's share and requests the first three stages before anything else
//   (the weights are the long wait); the other threads meanwhile stage x;
// - gate_up phase: the routed slots' w1 rows (H per slot, 2I columns each) are cut into G equal contiguous ranges,
//   one per CTA; a CTA sums x[h] * w1[e][h, :] over its rows, per routed slot it touches, into fp32 vectors of 2I
//   (to global memory, row j + g of partial_h: unique per (slot j, CTA g) pair).
// - grid barrier; each CTA then forms the activations of its own range of down rows (I per routed slot) from the
//   gate_up sums of the CTAs that covered that slot (in CTA order), times the routing weight, all rows' loads in
//   flight at once;
// - down phase: its w2 rows (already in flight: the ring runs on from gate_up rows into down rows, which depend on
//   nothing) times their activations, summed into an fp32 vector of H per CTA;
// - grid barrier; CTA g sums the G vectors in CTA order for its 16-column chunks of out.
// Static ranges and fixed summation orders: the bits do not depend on timing; no atomics.
//
// Measured (H200, per layer in CUDA graphs of 8 layers, H = 2048, 64 experts, top-8; NOTES.md, twelfth session),
// this kernel / the two-kernel path (decode_gemv.cu): 6.3 MB of routed weights 19.8 / 21.1 us, 25 MB 24.6 / 22.6,
// 75 MB 31.3 / 30.1, 138 MB 45.1 / 52.9 (eleventh-session design, 6 x 32 KB stages and a serial prologue and
// gather: 20.4, 26.2, 34.6, 47.5). keye.ops.moe picks it by routed weight bytes (reference/moe_gemm.py,
// DECODE_FUSED_MIN_WEIGHT_BYTES). Where the time goes (%globaltimer stamps per CTA, 75 MB): the first stage lands
// ~5 us after the first request (every SM's 192 KB are requested at once and served interleaved; anything else
// read then, x included, waits as long), the stream then runs at ~4 TB/s, and the grid barrier plus the
// activations' gathers take ~4.5 us because they queue behind the down weights in flight. For scale: a plain read
// of the same 75.5 MB by every SM takes 21.0 us per step (bench/decode_stream_ceiling.cu).
// Measured slower: 6 x 32 KB stages (+3.2 us at 75 MB: a block-wide barrier per stage), 4 x 48 KB (+0.9 us),
// 2 x 64 KB (+0.8 us at 138 MB, -1.7 us at 25 MB); one thread-block cluster of 16 CTAs per routed slot, gate_up
// sums exchanged through distributed shared memory (49.9 us: the H200 runs at most 7 such clusters at once, so the
// 8th slot waits for a second wave; clusters of 8 use only 64 SMs, 40.7 us); (slot, 16 intermediate columns) work
// units streaming w1 columns through registers (33.2 us; more shared memory for down blocks made it slower still:
// 34.8, 51.4 us, as the L1 that the register loads need shrank) or through 2-D tensor-map boxes (30.3-31.4 us).
//
// Unrouted slots (id -1) and ids >= E (which only the index checks report) add nothing.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <algorithm>

#include "common/bulk_copy.cuh"
#include "common/check.h"
#include "common/device.h"
#include "moe_gemm/decode_common.cuh"
#include "moe_gemm/grouped_gemm.h"
#include "moe_gemm/packed_gate_up.cuh"

namespace keye {
namespace {

constexpr int kThreads = 512;
constexpr int kStageBytes = 65536;            // one ring slot: whole weight rows of one routed slot
constexpr int kStages = 3;                    // ring depth: up to 3 x 64 KB in flight per SM
constexpr int kMaxHidden = 4096;              // x in fp32 beside the ring
constexpr int kMaxInter = 2048;
constexpr int kQuadsUp = 2 * kMaxInter / 4 / kThreads;   // 4-column groups of a gate_up row per thread
constexpr int kQuadsDown = kMaxHidden / 4 / kThreads;    // 4-column groups of a down row (of out) per thread
constexpr int kMaxTopK = 64;
constexpr int kMaxGrid = 256;                 // CTAs (one per SM)
constexpr int kMaxDownRows = 2048;            // down rows per CTA (their activations sit in shared memory)
constexpr int kChunk = 16;                    // columns of out per chunk of the final sum
constexpr int kGroups = kThreads / kChunk;    // threads per column in the final sum

struct FusedParams {
  const __nv_bfloat16* x;   // [H]
  const int* ids;           // [K]
  const float* weights;     // [K]
  const __nv_bfloat16* w1;  // [E, H, 2I]
  const __nv_bfloat16* w2;  // [E, I, H]
  float* partial_h;         // [K + G, 2I]: the gate_up sums of (routed slot j, CTA g) at row j + g
  float* partial_out;       // [G, H]: each CTA's down sums
  __nv_bfloat16* out;       // [H]
  int hidden, inter, top_k, num_experts;
  bool packed;              // w1 in moe_pack_gate_up's column order (packed_gate_up.cuh)
};

// Dynamic shared memory: the ring (bulk-copy targets, first), x in fp32, the activations of this CTA's down rows,
// the gathers' and the final sum's scratch, the routed slots, the tables of CTA ranges, the barriers.
struct Layout {
  int hidden;
  __host__ __device__ size_t x_offset() const { return size_t{kStages} * kStageBytes; }
  __host__ __device__ size_t act_offset() const { return x_offset() + size_t{4} * hidden; }
  __host__ __device__ size_t sums_offset() const { return act_offset() + 4 * kMaxDownRows; }
  __host__ __device__ size_t routed_offset() const { return sums_offset() + 4 * 2 * kThreads; }
  __host__ __device__ size_t begins_offset() const { return routed_offset() + 4 * 2 * kMaxTopK + 16; }
  __host__ __device__ size_t bars_offset() const { return begins_offset() + 2 * 4 * (kMaxGrid + 1) + 8; }
  __host__ __device__ size_t bytes() const { return bars_offset() + 8 * kStages; }
};

// The rows of one phase (gate_up: w1 rows, H per routed slot; down: w2 rows, I per routed slot) over the routed
// slots j = 0 .. routed - 1, flattened (j * per_slot + row) and cut into G contiguous ranges, CTA g's starting at
// g * total / G (totals fit in 32 bits; the products are taken in 64 bits).
struct Phase {
  int total, per_slot, per_stage;  // rows in all; rows per routed slot; rows per stage
  __host__ __device__ int begin(int g, int G) const { return static_cast<int>(static_cast<int64_t>(g) * total / G); }
};

// Walks one CTA's stages in order: its gate_up rows, then its down rows, in pieces of at most per_stage rows that
// never cross a routed slot.
struct Cursor {
  Phase up, down;
  int cta, ctas;
  int phase;         // 0 gate_up, 1 down, 2 done
  int pos, end;      // flat rows of the current phase
  int slot, row;     // pos as (routed slot, row within it)
  __device__ const Phase& cur() const { return phase == 0 ? up : down; }
  __device__ void enter(int ph) {
    for (phase = ph; phase < 2; ++phase) {
      pos = cur().begin(cta, ctas);
      end = cur().begin(cta + 1, ctas);
      if (pos < end) break;
    }
    if (phase < 2) {
      slot = pos / cur().per_slot;
      row = pos - slot * cur().per_slot;
    }
  }
  __device__ int rows() const { return min(min(cur().per_stage, cur().per_slot - row), end - pos); }
  __device__ void advance() {
    const int n = rows();
    pos += n;
    row += n;
    if (row == cur().per_slot) {
      ++slot;
      row = 0;
    }
    if (pos == end) enter(phase + 1);
  }
};

__device__ __forceinline__ void fma_quad(float (&acc)[4], float a, const __nv_bfloat16* w) {
  const uint2 raw = *reinterpret_cast<const uint2*>(w);
  const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  acc[0] = fmaf(a, lo.x, acc[0]);
  acc[1] = fmaf(a, lo.y, acc[1]);
  acc[2] = fmaf(a, hi.x, acc[2]);
  acc[3] = fmaf(a, hi.y, acc[3]);
}

// acc += coef[r] * rows[r, :] over the n weight rows of one ring stage (rows of len bf16; thread tid owns the
// 4-column groups tid, tid + kThreads, ...): the step of both phases.
template <int kQuads>
__device__ __forceinline__ void add_rows(float (&acc)[kQuads][4], const __nv_bfloat16* rows, int n, int len,
                                         const float* coef, int tid) {
#pragma unroll 4
  for (int r = 0; r < n; ++r) {
    const float a = coef[r];
#pragma unroll
    for (int q = 0; q < kQuads; ++q) {
      const int col = 4 * (tid + q * kThreads);
      if (col < len) fma_quad(acc[q], a, rows + static_cast<size_t>(r) * len + col);
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1) moe_decode_fused_kernel(const FusedParams p) {
  extern __shared__ __align__(1024) unsigned char smem[];
  const Layout L{p.hidden};
  float* x_s = reinterpret_cast<float*>(smem + L.x_offset());
  float* act_s = reinterpret_cast<float*>(smem + L.act_offset());
  float* sums = reinterpret_cast<float*>(smem + L.sums_offset());
  int* slot_e = reinterpret_cast<int*>(smem + L.routed_offset());   // [kMaxTopK] expert of routed slot j
  float* slot_w = reinterpret_cast<float*>(slot_e + kMaxTopK);        // [kMaxTopK] its routing weight
  int* routed_count = slot_e + 2 * kMaxTopK;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L.bars_offset());
  const int H = p.hidden, I = p.inter, G = gridDim.x, g = blockIdx.x, tid = threadIdx.x;

  // Thread 0 reads the routing (the slots in slot order; unrouted ones, and ids >= E, which only index checks
  // report, are skipped), walks this CTA's share and requests its first stages before anything else: the weights are
  // the long wait. The other threads meanwhile stage x. Each stage is one contiguous block of whole rows.
  const uint64_t policy = l2_evict_first_policy();  // every weight byte is read once
  Cursor producer{};
  const auto issue = [&](int s) {
    if (producer.phase == 2) return;
    const int e = slot_e[producer.slot], n = producer.rows();
    uint64_t* bar = full + s % kStages;
    unsigned char* dst = smem + static_cast<size_t>(s % kStages) * kStageBytes;
    const __nv_bfloat16* src;
    uint32_t bytes;
    if (producer.phase == 0) {
      src = p.w1 + (static_cast<int64_t>(e) * H + producer.row) * 2 * I;
      bytes = static_cast<uint32_t>(n) * 4 * I;
    } else {
      src = p.w2 + (static_cast<int64_t>(e) * I + producer.row) * H;
      bytes = static_cast<uint32_t>(n) * 2 * H;
    }
    mbarrier_arrive_expect_tx(bar, bytes);
    bulk_copy_g2s(dst, src, bytes, bar, policy);
    producer.advance();
  };
  const auto phases = [&](int routed, Cursor& cur) {
    cur.up = Phase{routed * H, H, kStageBytes / (4 * I)};      // a w1 row: 2I bf16
    cur.down = Phase{routed * I, I, kStageBytes / (2 * H)};    // a w2 row: H bf16
    cur.cta = g;
    cur.ctas = G;
    cur.enter(0);
  };
  if (tid == 0) {
    for (int st = 0; st < kStages; ++st) mbarrier_init(full + st, 1);
    fence_mbarrier_init();
    int n = 0;
    for (int k0 = 0; k0 < p.top_k; k0 += 8) {  // eight loads in flight at a time
      int e[8];
      float w[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        e[i] = k0 + i < p.top_k ? __ldg(p.ids + k0 + i) : -1;
        w[i] = k0 + i < p.top_k ? __ldg(p.weights + k0 + i) : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (e[i] >= 0 && e[i] < p.num_experts) {
          slot_e[n] = e[i];
          slot_w[n++] = w[i];
        }
    }
    *routed_count = n;
    phases(n, producer);
    for (int s = 0; s < kStages; ++s) issue(s);
  }
  for (int i = tid; i < H; i += kThreads) x_s[i] = __bfloat162float(p.x[i]);
  __syncthreads();
  const int routed = *routed_count;
  int* begin_up = reinterpret_cast<int*>(smem + L.begins_offset());  // [G + 1] each, for the activations' gathers
  int* begin_down = begin_up + kMaxGrid + 1;
  Cursor start;
  phases(routed, start);
  for (int i = tid; i <= G; i += kThreads) {
    begin_up[i] = start.up.begin(i, G);
    begin_down[i] = start.down.begin(i, G);
  }
  __syncthreads();
  const auto wait_rows = [&](int s) {  // stage s's rows, once they have landed
    mbarrier_wait_parity(full + s % kStages, (s / kStages) & 1);
    return reinterpret_cast<const __nv_bfloat16*>(smem + static_cast<size_t>(s % kStages) * kStageBytes);
  };
  const auto release = [&](int s) {  // every thread: slot s % kStages may be refilled
    fence_async_shared();  // this thread's reads of the slot are done before the refill (async proxy)
    __syncthreads();
    if (tid == 0) issue(s + kStages);
  };

  // gate_up phase: this CTA's sums over its w1 rows for each routed slot it touches, all 2I columns.
  Cursor c = start;
  int s = 0;
  float acc[kQuadsUp][4] = {};
  const auto flush_h = [&](int j) {
    float* dst = p.partial_h + static_cast<int64_t>(j + g) * 2 * I;  // j + g: unique per (slot, CTA) overlap
#pragma unroll
    for (int q = 0; q < kQuadsUp; ++q) {
      const int col = 4 * (tid + q * kThreads);
      if (col < 2 * I) *reinterpret_cast<float4*>(dst + col) = make_float4(acc[q][0], acc[q][1], acc[q][2], acc[q][3]);
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[q][i] = 0.0f;
    }
  };
  for (int j_prev = -1; c.phase == 0; ++s) {
    const int j = c.slot, h0 = c.row, n = c.rows();
    if (j != j_prev && j_prev >= 0) flush_h(j_prev);
    j_prev = j;
    add_rows(acc, wait_rows(s), n, 2 * I, x_s + h0, tid);
    release(s);
    c.advance();
    if (c.phase != 0) flush_h(j);
  }
  cooperative_groups::this_grid().sync();

  // down phase: the activations of this CTA's w2 rows from every CTA's gate_up sums (CTAs in order), then the
  // rows (already in flight: the ring ran on into them) times their activations.
  const int down0 = begin_down[g], down1 = begin_down[g + 1];
  {
    // All of this CTA's down rows at once where they fit: rows_per_pass (a power of two, 32 .. kThreads) rows, a row
    // per thread of each of the kThreads / rows_per_pass groups; group q adds the gate_up sums of covering CTAs
    // first + q, first + q + groups, ... (eight loads in flight per thread; the CTAs whose gate_up rows meet the
    // row's slot j, from the owner of its first row to the owner of its last; an empty range in between wrote
    // nothing); then the first rows_per_pass threads add the groups in order.
    const int rows = down1 - down0;
    int rows_per_pass = 32;
    while (rows_per_pass < rows && rows_per_pass < kThreads) rows_per_pass *= 2;
    const int groups = kThreads / rows_per_pass, q = tid / rows_per_pass, lr = tid % rows_per_pass;
    float* red_gate = sums;           // [groups][rows_per_pass]
    float* red_up = sums + kThreads;  // [groups][rows_per_pass]
    for (int f0 = down0; f0 < down1; f0 += rows_per_pass) {
      const int f = f0 + lr;
      float gate = 0.0f, up = 0.0f;
      if (f < down1) {
        const int j = f / I, r = f - j * I;
        const int first = ((j * H + 1) * G - 1) / (routed * H);  // the last CTA whose range starts at or before j * H
        const int gate_col = p.packed ? packed_gate_column(r) : r;  // where row r's gate and up sums are in partial_h
        const int up_col = p.packed ? gate_col + kPackedUpOffset : I + r;
        for (int base = first + q; base < G && begin_up[base] < (j + 1) * H; base += 8 * groups) {
          float gv[8], uv[8];
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const int gg = base + i * groups;
            const bool meets = gg < G && begin_up[gg] < (j + 1) * H && begin_up[gg] < begin_up[gg + 1];
            const float* h = p.partial_h + static_cast<int64_t>(j + gg) * 2 * I;
            gv[i] = meets ? __ldcg(h + gate_col) : 0.0f;
            uv[i] = meets ? __ldcg(h + up_col) : 0.0f;
          }
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            gate += gv[i];
            up += uv[i];
          }
        }
      }
      red_gate[q * rows_per_pass + lr] = gate;
      red_up[q * rows_per_pass + lr] = up;
      __syncthreads();
      if (tid < rows_per_pass && f0 + tid < down1) {
        float gs = 0.0f, us = 0.0f;
        for (int w = 0; w < groups; ++w) {
          gs += red_gate[w * rows_per_pass + tid];
          us += red_up[w * rows_per_pass + tid];
        }
        act_s[f0 + tid - down0] = slot_w[(f0 + tid) / I] * (gs / (1.0f + expf(-gs))) * us;
      }
      __syncthreads();
    }
  }
  float out_acc[kQuadsDown][4] = {};
  for (; c.phase == 1; ++s) {
    const int local = c.pos - down0;
    const int n = c.rows();
    add_rows(out_acc, wait_rows(s), n, H, act_s + local, tid);
    release(s);
    c.advance();
  }
  float* mine = p.partial_out + static_cast<int64_t>(g) * H;
#pragma unroll
  for (int q = 0; q < kQuadsDown; ++q) {
    const int col = 4 * (tid + q * kThreads);
    if (col < H)
      *reinterpret_cast<float4*>(mine + col) = make_float4(out_acc[q][0], out_acc[q][1], out_acc[q][2], out_acc[q][3]);
  }
  cooperative_groups::this_grid().sync();

  // out[c] = sum over CTAs in order: thread (group, col) adds CTAs group, group + kGroups, ...; then the groups in
  // order.
  const int col = tid % kChunk, group = tid / kChunk;
  for (int chunk = g; chunk < H / kChunk; chunk += G) {
    const int cc = chunk * kChunk + col;
    float v[kMaxGrid / kGroups];  // all loads in flight at once
#pragma unroll
    for (int i = 0; i < kMaxGrid / kGroups; ++i) {
      const int gg = group + i * kGroups;
      v[i] = gg < G ? __ldcg(p.partial_out + static_cast<int64_t>(gg) * H + cc) : 0.0f;
    }
    float t = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxGrid / kGroups; ++i) t += v[i];
    sums[group * kChunk + col] = t;
    __syncthreads();
    if (tid < kChunk) {
      float o = 0.0f;
      for (int i = 0; i < kGroups; ++i) o += sums[i * kChunk + tid];
      p.out[chunk * kChunk + tid] = __float2bfloat16(o);
    }
    __syncthreads();
  }
}

}  // namespace

at::Tensor moe_decode_cuda(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                           const at::Tensor& gate_up, const at::Tensor& down, bool gate_up_packed) {
  const char* op = "moe_decode";
  decode::check_rows_input(x, op, "x", "[1, H]");
  KEYE_CHECK(x.size(0) == 1, "keye.", op, ": argument 'x' must hold one token [1, H], got shape ", dims_str(x.sizes()),
             "; batches take keye.ops.moe_decode_gate_up and moe_decode_down (keye.ops.moe picks them)");
  const int64_t H = x.size(1);
  decode::check_weights(gate_up, "gate_up", x, "x", H, op, "[E, H, 2I]");
  const int64_t E = gate_up.size(0), I = gate_up.size(2) / 2;
  KEYE_CHECK(gate_up.size(2) % 16 == 0 && I > 0 && I <= kMaxInter, "keye.", op,
             ": argument 'gate_up' must have 2I columns with I a positive multiple of 8 up to ", kMaxInter,
             ", got shape ", dims_str(gate_up.sizes()));
  KEYE_CHECK(!gate_up_packed || gate_up.size(2) % kPackedGateUpTile == 0, "keye.", op, ": argument 'gate_up' packed ",
             "(moe_pack_gate_up) must have 2I a multiple of ", kPackedGateUpTile, ", got shape ",
             dims_str(gate_up.sizes()));
  KEYE_CHECK(H % kChunk == 0 && H > 0 && H <= kMaxHidden, "keye.", op, ": the hidden size H must be a positive ",
             "multiple of ", kChunk, " up to ", kMaxHidden, " (x sits in shared memory beside the weight ring), got ",
             H, "; larger ones take keye.ops.moe_decode_gate_up and moe_decode_down");
  decode::check_weights(down, "down", x, "x", I, op, "[E, I, H]");
  check_size(down, 0, E, op, "down", "the expert count (gate_up.size(0))");
  check_size(down, 2, H, op, "down", "the hidden size (x.size(1))");
  decode::check_decode_ids(ids, x, "x", E, op);
  check_size(ids, 0, 1, op, "ids", "the token count (x.size(0))");
  const int64_t K = ids.size(1);
  KEYE_CHECK(K <= kMaxTopK, "keye.", op, ": top_k must be at most ", kMaxTopK, ", got ", K);
  decode::check_routing_weights(weights, ids, x, "x", op);

  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  const int grid = std::min(sm_count(device), kMaxGrid);  // one 512-thread CTA per SM (its shared memory sees to that)
  KEYE_CHECK((K * I + grid - 1) / grid <= kMaxDownRows, "keye.", op, ": top_k * I must be at most ",
             kMaxDownRows * grid, " on this GPU, got ", K, " * ", I);
  const int smem_limit = max_smem_optin(device);
  const Layout layout{static_cast<int>(H)};
  KEYE_CHECK(layout.bytes() <= static_cast<size_t>(smem_limit), "keye.", op, ": needs ", layout.bytes(),
             " bytes of shared memory per CTA, the device allows ", smem_limit);

  at::Tensor out = at::empty({1, H}, x.options());
  at::Tensor partial_h = at::empty({K + grid, 2 * I}, x.options().dtype(at::kFloat));
  at::Tensor partial_out = at::empty({grid, H}, x.options().dtype(at::kFloat));
  FusedParams p{reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), ids.data_ptr<int>(), weights.data_ptr<float>(),
                reinterpret_cast<const __nv_bfloat16*>(gate_up.data_ptr()),
                reinterpret_cast<const __nv_bfloat16*>(down.data_ptr()), partial_h.data_ptr<float>(),
                partial_out.data_ptr<float>(), reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), static_cast<int>(H),
                static_cast<int>(I), static_cast<int>(K), static_cast<int>(E), gate_up_packed};
  static int smem_set[64] = {0};  // per device: the kernel's dynamic shared-memory limit, raised once
  if (smem_set[device & 63] < smem_limit) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(moe_decode_fused_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        smem_limit));
    smem_set[device & 63] = smem_limit;
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;  // the grid-wide barrier needs every CTA resident
  attr[0].val.cooperative = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = layout.bytes();
  cfg.stream = c10::cuda::getCurrentCUDAStream();
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, moe_decode_fused_kernel, p));
  return out;
}

}  // namespace keye
