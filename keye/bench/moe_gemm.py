"""MoE expert GEMMs and the whole routed-expert layer: keye's kernels against torch._grouped_mm in one run.

Shapes: Keye-VL-2.0 / Qwen3-30B-A3B (H 2048, I 768, 128 experts, top-8), DeepSeek-V3 (7168, 2048, 256, top-8),
and (2048, 1408, 64, top-8). Routing: softmax router over random logits (keye.ops.moe_router), so expert loads
vary as they do in a model. Per GEMM (rows already in expert order; T*8 rows):
  keye        keye.ops.moe_grouped_mm (CUTLASS, automatic tile config) / moe_grouped_mm_wgrad
  torch       torch._grouped_mm with the same offsets (PyTorch's CUTLASS grouped GEMM)
  loop        one torch.mm per expert (host offsets precomputed: no sync timed)
  dense       one cuBLAS GEMM with the same total rows and one expert's weights (the ceiling)
Layer (route -> permute -> gate_up -> SwiGLU -> down -> weighted combine), forward and forward + backward:
  keye        keye.ops.moe
  torch       the same keye routing/permutation ops with torch._grouped_mm and F.silu(g) * u (autograd backward)
FLOPs: GEMM 2*rows*K*N; layer forward 6*T*k*H*I, forward + backward 18*T*k*H*I. The forward is timed three ways from
4096 tokens: one call (the host's launch latency before the first kernels included) and queued (the GPU busy
until the host has launched the whole layer, as inside a model), and its kernels' own durations summed
(keye.bench.timing.kernel_ms). Decode (T <= 64): CUDA-graph replay of the layer (and its kernels alone), GB/s on the
weights of the experts actually routed to, against the measured copy rate.
Contenders are timed round-robin (keye.bench.timing.median_ms_interleaved). Each comparison is preceded by a self-check of keye's output against torch's (relative error < 1e-2). Index checks
are off for the timings (keye.ops.index_checks(False)), as in production.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keye import ops
from keye.bench.timing import capture_graph, kernel_ms, layers_that_fit, median_ms_interleaved, rel_err

SHAPES = {"keye": (2048, 768, 128, 8), "dsv3": (7168, 2048, 256, 8), "e64": (2048, 1408, 64, 8)}
TOKENS = {"keye": (1, 8, 16, 64, 4096, 16384, 65536), "dsv3": (1, 64, 4096, 16384),
          "e64": (1, 8, 64, 4096, 16384, 65536)}


def _setup(T, H, I, E, K, device):
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    r = ops.moe_router(torch.randn(T, E, device=device, dtype=torch.bfloat16), K)
    w1 = (torch.randn(E, H, 2 * I, device=device) * H ** -0.5).bfloat16()
    w2 = (torch.randn(E, I, H, device=device) * I ** -0.5).bfloat16()
    return x, r.weights, r.ids, w1, w2


def _torch_swiglu(h):
    g, u = h.chunk(2, dim=1)
    return F.silu(g) * u


def _torch_layer(x, weights, ids, w1, w2):
    dest, src, off = ops.moe_route(ids, w1.shape[0])
    xs = ops.moe_permute(x, dest, src)
    y = torch._grouped_mm(_torch_swiglu(torch._grouped_mm(xs, w1, offs=off[1:])), w2, offs=off[1:])
    return ops.moe_unpermute(y, dest, weights)


def _check(a, b) -> str:
    """Self-check on the leading slice (the full outputs reach tens of GB in float64 for DeepSeek-V3 wgrad)."""
    err = rel_err(a.flatten()[: 1 << 26].float(), b.flatten()[: 1 << 26].float())
    return "ok" if err < 1e-2 else f"err {err:.3g}"


def _gemm_rows(name, T, rows, K, N, fns, device, reps, sweep=None):
    """fns: keye, torch and optionally loop / dense; sweep: one keye call per compiled tile configuration.
    All are timed round-robin in one interleaved measurement."""
    rec = {"gemm": name, "tokens": T, "rows": rows, "K": K, "N": N, "check": _check(fns["keye"](), fns["torch"]())}
    timed = dict(fns)
    for c, fn in enumerate(sweep or []):
        timed[f"config{c}"] = fn
    ms = median_ms_interleaved(timed, device, reps)
    flops = 2 * rows * K * N
    for key in fns:
        rec[f"{key}_ms"], rec[f"{key}_TFLOPs"] = ms[key], flops / ms[key] / 1e9
    if sweep:
        rec["configs_ms"] = [ms[f"config{c}"] for c in range(len(sweep))]
    rec["x_torch"] = rec["torch_ms"] / rec["keye_ms"]
    return rec


def gemm_cases(shape, T, device, reps, sweep):
    H, I, E, K = SHAPES[shape]
    x, weights, ids, w1, w2 = _setup(T, H, I, E, K, device)
    dest, src, off = ops.moe_route(ids, E)
    ends, bounds = off[1:], off.tolist()
    xs = ops.moe_permute(x, dest, src)
    a = ops.moe_swiglu(ops.moe_grouped_mm(xs, w1, off))
    dh = torch.randn(xs.shape[0], 2 * I, device=device, dtype=torch.bfloat16)
    rows = xs.shape[0]
    out = []

    def loop(inp, w):
        res = inp.new_empty(inp.shape[0], w.shape[2])
        for e in range(E):
            if bounds[e + 1] > bounds[e]:
                torch.mm(inp[bounds[e]:bounds[e + 1]], w[e], out=res[bounds[e]:bounds[e + 1]])
        return res

    n_fwd, n_dgrad, n_wgrad = (len(ops.moe_grouped_gemm_configs(k)) for k in ("fwd", "dgrad", "wgrad"))
    for name, inp, w in (("gate_up", xs, w1), ("down", a, w2)):
        fns = {"keye": lambda: ops.moe_grouped_mm(inp, w, off), "torch": lambda: torch._grouped_mm(inp, w, offs=ends),
               "loop": lambda: loop(inp, w), "dense": lambda: inp @ w[0]}
        configs = [lambda c=c: ops.moe_grouped_mm(inp, w, off, config=c) for c in range(n_fwd)] if sweep else None
        out.append(_gemm_rows(name, T, rows, inp.shape[1], w.shape[2], fns, device, reps, configs))
    if 2 * I % 256 == 0:  # gate_up with SwiGLU in its epilogue over packed weights, against GEMM then SwiGLU
        packed, n_sw = ops.moe_pack_gate_up(w1), len(ops.moe_grouped_gemm_configs("fwd_swiglu"))
        fns = {"keye": lambda: ops.moe_grouped_mm_swiglu(xs, packed, off),
               "torch": lambda: _torch_swiglu(torch._grouped_mm(xs, w1, offs=ends)),
               "unfused": lambda: ops.moe_swiglu(ops.moe_grouped_mm(xs, w1, off))}
        configs = [lambda c=c: ops.moe_grouped_mm_swiglu(xs, packed, off, config=c) for c in range(n_sw)] if sweep else None
        out.append(_gemm_rows("gate_up+swiglu", T, rows, H, 2 * I, fns, device, reps, configs))
        del packed
    if T >= 4096:  # backward GEMMs of gate_up: data gradient (against W^T) and weight gradient (K-grouped)
        w1t = w1.transpose(1, 2)
        fns = {"keye": lambda: ops.moe_grouped_mm(dh, w1, off, trans_b=True),
               "torch": lambda: torch._grouped_mm(dh, w1t, offs=ends), "dense": lambda: dh @ w1t[0]}
        configs = ([lambda c=c: ops.moe_grouped_mm(dh, w1, off, trans_b=True, config=c) for c in range(n_dgrad)]
                   if sweep else None)
        out.append(_gemm_rows("gate_up dgrad", T, rows, 2 * I, H, fns, device, reps, configs))
        fns = {"keye": lambda: ops.moe_grouped_mm_wgrad(xs, dh, off), "torch": lambda: torch._grouped_mm(xs.t(), dh, offs=ends)}
        configs = [lambda c=c: ops.moe_grouped_mm_wgrad(xs, dh, off, config=c) for c in range(n_wgrad)] if sweep else None
        out.append(_gemm_rows("gate_up wgrad", T, rows, H, 2 * I, fns, device, reps, configs))
    return out


def layer_case(shape, T, device, reps, backward):
    H, I, E, K = SHAPES[shape]
    x, weights, ids, w1, w2 = _setup(T, H, I, E, K, device)
    rec = {"shape": shape, "tokens": T}
    with torch.no_grad():
        want = _torch_layer(x, weights, ids, w1, w2)
        rec["check"] = _check(ops.moe(x, weights, ids, w1, w2), want)
        fwd = {"keye": lambda: ops.moe(x, weights, ids, w1, w2), "torch": lambda: _torch_layer(x, weights, ids, w1, w2)}
        if T >= 4096:  # gate_up packed once (inference): SwiGLU in the gate_up GEMM's epilogue
            w1p = ops.moe_pack_gate_up(w1)
            fwd["keye_packed"] = lambda: ops.moe(x, weights, ids, w1p, w2, gate_up_packed=True)
            rec["check_packed"] = _check(fwd["keye_packed"](), want)
        del want
        ms = median_ms_interleaved(fwd, device, reps)
        for name, t in ms.items():
            rec[f"{name}_fwd_ms"] = t
        if T >= 4096:  # the same, with the host's launches ahead of the GPU (as inside a model)
            ms = median_ms_interleaved(fwd, device, reps, queue_ahead=True)
            for name, t in ms.items():
                rec[f"{name}_fwd_queued_ms"] = t
            # and the kernels' own durations, summed per call (profiler): no host latency, no gaps between kernels
            for name, fn in fwd.items():
                rec[f"{name}_fwd_kernels_ms"] = kernel_ms(fn, device, reps=max(3, reps // 2))
            del w1p, fwd
    flops = 6 * T * K * H * I
    for key in ("keye_fwd", "torch_fwd", "keye_fwd_queued", "torch_fwd_queued", "keye_fwd_kernels",
                "torch_fwd_kernels", "keye_packed_fwd", "keye_packed_fwd_queued", "keye_packed_fwd_kernels"):
        if key + "_ms" in rec:
            rec[key + "_TFLOPs"] = flops / rec[key + "_ms"] / 1e9
    if T <= 64:  # decode: CUDA-graph replay (how decode runs), bandwidth on the weights of the experts routed to
        active = int(torch.unique(ids[ids >= 0]).numel())
        rec["weight_bytes"] = active * 3 * H * I * 2
        # One layer per graph (as a single layer is replayed: includes the graph launch, ~4 us on the H200), and
        # per layer of a graph of L layers with their own weights and routings (as a decode step runs a model).
        L = layers_that_fit((w1.numel() + w2.numel()) * 2, 8, device)
        stack = [(x, weights, ids, w1, w2)] + [_setup(T, H, I, E, K, device) for _ in range(L - 1)]
        rec["graph_layers"] = L
        graphs = {}
        with torch.no_grad():
            for key, layer in (("keye", ops.moe), ("torch", _torch_layer)):
                for tag, args in (("graph", stack[:1]), ("graphL", stack)):
                    graphs[f"{key}_{tag}"] = capture_graph(*[lambda a=a: layer(*a) for a in args])
        ms = median_ms_interleaved({k: g.replay for k, g in graphs.items()}, device, reps)
        for key, t in ms.items():
            per_layer = t / (L if key.endswith("graphL") else 1)
            rec[f"{key}_ms"] = per_layer
            rec[f"{key}_GBps"] = rec["weight_bytes"] / per_layer / 1e6
        rec["keye_kernels_ms"] = kernel_ms(graphs["keye_graph"].replay, device, reps=reps)  # one layer, profiler
        rec["keye_kernels_GBps"] = rec["weight_bytes"] / rec["keye_kernels_ms"] / 1e6
        del graphs, stack
    if backward:
        leaves = [t.clone().requires_grad_() for t in (x, weights, w1, w2)]
        g = torch.randn(T, H, device=device, dtype=torch.bfloat16)

        # autograd.grad, not .backward(): repeated .backward() calls add into .grad, and that accumulation (2.4 GB
        # of bf16 adds for the expert weights at 16K tokens, ~0.9 ms) is not part of the layer.
        def step(layer):
            torch.autograd.grad(layer(leaves[0], leaves[1], ids, leaves[2], leaves[3]), leaves, g)

        ms = median_ms_interleaved({"keye": lambda: step(ops.moe), "torch": lambda: step(_torch_layer)}, device,
                                   max(3, reps // 2))
        rec["keye_fwdbwd_ms"], rec["torch_fwdbwd_ms"] = ms["keye"], ms["torch"]
        f3 = 3 * flops
        rec["keye_fwdbwd_TFLOPs"], rec["torch_fwdbwd_TFLOPs"] = f3 / rec["keye_fwdbwd_ms"] / 1e9, f3 / rec["torch_fwdbwd_ms"] / 1e9
    rec["x_torch_fwd"] = rec["torch_fwd_ms"] / rec["keye_fwd_ms"]
    if backward:
        rec["x_torch_fwdbwd"] = rec["torch_fwdbwd_ms"] / rec["keye_fwdbwd_ms"]
    return rec


def run(device, reps, tokens=None, shapes=("keye", "e64", "dsv3")) -> dict:
    # Index checks (a device->host sync per checked argument) are off, as in production and CUDA graphs: with
    # them on, a grouped GEMM call at 4K tokens paid ~0.1 ms of syncs (first H200 run).
    with ops.index_checks(False):
        return _run(device, reps, tokens, shapes)


def _run(device, reps, tokens, shapes) -> dict:
    report = {"gemm": [], "layer": [], "configs": {k: ops.moe_grouped_gemm_configs(k)
                                                  for k in ("fwd", "dgrad", "wgrad", "fwd_swiglu")}}
    for shape in shapes:
        for T in tokens or TOKENS[shape]:
            if T not in TOKENS[shape]:
                continue
            r = reps if T <= 16384 else max(5, reps // 4)
            if T >= 64:
                for rec in gemm_cases(shape, T, device, r, sweep=shape == "keye"):
                    rec["shape"] = shape
                    report["gemm"].append(rec)
                    print("  " + _gemm_line(rec), flush=True)  # progress (a crash later keeps what was measured)
            report["layer"].append(layer_case(shape, T, device, r, backward=T >= 4096))
            print("  " + _layer_line(report["layer"][-1], None), flush=True)
            torch.cuda.empty_cache()
    return report


def _gemm_line(r: dict) -> str:
    f = lambda k: f"{r[k]:7.0f}" if k in r else f"{'-':>7}"
    cfg = " ".join(f"{v:.3f}" for v in r.get("configs_ms", []))
    unfused = f"  keye GEMM then SwiGLU kernel {r['unfused_TFLOPs']:.0f} TF" if "unfused_TFLOPs" in r else ""
    return (f"{r['shape']:<6}{r['gemm']:<15}{r['tokens']:>7} {r['check']:>6} {f('keye_TFLOPs')} "
            f"{f('torch_TFLOPs')} {f('loop_TFLOPs')} {f('dense_TFLOPs')} {r['x_torch']:8.2f}  {cfg}{unfused}")


def _layer_line(r: dict, copy_gbps: float | None) -> str:
    fb = (f"{r['keye_fwdbwd_ms']:9.3f} {r['torch_fwdbwd_ms']:10.3f} {r['keye_fwdbwd_TFLOPs']:8.0f} "
          f"{r['torch_fwdbwd_TFLOPs']:9.0f} {r['x_torch_fwdbwd']:8.2f}" if "keye_fwdbwd_ms" in r else
          f"{'-':>9} {'-':>10} {'-':>8} {'-':>9} {'-':>8}")
    pct = lambda v: f"{100 * v / copy_gbps:.0f}%" if copy_gbps else "-"
    bw = (f"{r['keye_graph_GBps']:7.0f} {pct(r['keye_graph_GBps']):>7}  graph of 1 layer: keye "
          f"{r['keye_graph_ms'] * 1e3:.1f} us, torch {r['torch_graph_ms'] * 1e3:.1f} us ({r['torch_graph_GBps']:.0f} GB/s); "
          f"per layer in a graph of {r['graph_layers']}: keye {r['keye_graphL_ms'] * 1e3:.1f} us "
          f"({r['keye_graphL_GBps']:.0f} GB/s, {pct(r['keye_graphL_GBps'])}), torch {r['torch_graphL_ms'] * 1e3:.1f} us "
          f"({r['torch_graphL_GBps']:.0f} GB/s); keye's kernels alone (profiler) {r['keye_kernels_ms'] * 1e3:.1f} us "
          f"({pct(r['keye_kernels_GBps'])})" if "keye_graph_GBps" in r else f"{'-':>7} {'-':>7}")
    if "keye_fwd_queued_ms" in r:
        bw += (f"  queued (host ahead): keye {r['keye_fwd_queued_ms']:.4f} ms {r['keye_fwd_queued_TFLOPs']:.0f} TF, "
               f"torch {r['torch_fwd_queued_ms']:.4f} ms {r['torch_fwd_queued_TFLOPs']:.0f} TF")
    if "keye_fwd_kernels_ms" in r:
        bw += (f"  kernels alone (profiler): keye {r['keye_fwd_kernels_ms']:.4f} ms "
               f"{r['keye_fwd_kernels_TFLOPs']:.0f} TF, torch {r['torch_fwd_kernels_ms']:.4f} ms "
               f"{r['torch_fwd_kernels_TFLOPs']:.0f} TF")
    if "keye_packed_fwd_ms" in r:
        bw += (f"  gate_up packed (SwiGLU in its epilogue; {r['check_packed']}): one call {r['keye_packed_fwd_ms']:.4f} "
               f"ms {r['keye_packed_fwd_TFLOPs']:.0f} TF, queued {r['keye_packed_fwd_queued_ms']:.4f} ms "
               f"{r['keye_packed_fwd_queued_TFLOPs']:.0f} TF, kernels {r['keye_packed_fwd_kernels_ms']:.4f} ms "
               f"{r['keye_packed_fwd_kernels_TFLOPs']:.0f} TF")
    return (f"{r['shape']:<6}{r['tokens']:>7} {r['check']:>6} {r['keye_fwd_ms']:9.4f} {r['torch_fwd_ms']:10.4f} "
            f"{r['keye_fwd_TFLOPs']:8.0f} {r['torch_fwd_TFLOPs']:9.0f} {r['x_torch_fwd']:8.2f} {fb} {bw}")


def table(report: dict, copy_gbps: float) -> str:
    lines = ["MoE grouped GEMMs (TFLOP/s; x torch = torch._grouped_mm time / keye time)",
             f"{'shape':<6}{'gemm':<15}{'tokens':>7} {'check':>6} {'keye':>7} {'torch':>7} {'loop':>7} {'dense':>7} "
             f"{'x torch':>8}  configs ms"]
    lines += [_gemm_line(r) for r in report["gemm"]]
    for kind, names in report["configs"].items():
        lines.append(f"  {kind} configs: " + "; ".join(f"{i}: {n}" for i, n in enumerate(names)))
    lines.append("MoE layer (router output in, combined out): ms and TFLOP/s; decode rows: GB/s on routed weights")
    lines.append(f"{'shape':<6}{'tokens':>7} {'check':>6} {'keye fwd':>9} {'torch fwd':>10} {'TF keye':>8} {'TF torch':>9} "
                 f"{'x torch':>8} {'keye f+b':>9} {'torch f+b':>10} {'TF keye':>8} {'TF torch':>9} {'x torch':>8} "
                 f"{'GB/s':>7} {'% copy':>7}  (decode: graph replay)")
    lines += [_layer_line(r, copy_gbps) for r in report["layer"]]
    return "\n".join(lines)
