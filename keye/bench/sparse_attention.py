"""Microbenchmark of top-k sparse GQA attention on Keye shapes (32 query / 4 KV heads, d = 128, k = 2048, bf16).

Index patterns (every query t < k selects all of 0..t; beyond that, k positions of its own past):
  realistic  the k/4 most recent tokens (512 at k = 2048), k/2 "anchor" positions shared by every query of a
             256-query region (even positions), and k/4 random older positions (odd positions); stratified
             draws, so positions repeat only just past k; sorted; adjacent queries share ~75% of their sets
  indexer    keye.ops.indexer_topk_prefill's own selection on random FP8 queries and keys (H_I=16, D_I=64)
  uniform    k uniformly random past positions (with replacement): no sharing, the worst case
Each case first checks sampled query rows against the fp32 reference. Reported: forward time (and that of the pair
kernel alone, without the 16-query block plan), TFLOP/s counted as
4 * Hq * D FLOPs per valid (query, key) pair, gathered K/V GB/s (Hkv * D * 2 bytes of K and of V per pair);
cuDNN dense causal SDPA forward, flash dense backward and flex_attention (block mask 128, exact token mask) where
they fit, in the same run. Decode: batch x context against dense SDPA decode over the whole cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keye import ops
from keye.bench.timing import capture_graph, kernel_ms, layers_that_fit, median_ms, rel_err
from keye.ops.reference import sparse_attention as ref

Q_HEADS, KV_HEADS, HEAD_DIM, TOPK = 32, 4, 128, 2048
REGION = 256


def _dense_prefix(T: int, K: int, device) -> torch.Tensor:
    pos = torch.arange(K, device=device).expand(min(T, K), K)
    return torch.where(pos <= torch.arange(min(T, K), device=device)[:, None], pos, -1).int()


def realistic_indices(T: int, K: int, device) -> torch.Tensor:
    head = _dense_prefix(T, K, device)
    if T <= K:  # every query selects its whole past
        return head
    n_window, n_anchors = K // 4, K // 2
    t = torch.arange(K, T, device=device)
    window = t[:, None] - torch.arange(n_window, device=device)[None, :]
    older = (t - n_window).clamp(min=1)  # positions [0, older) are not in the window
    region_start = (t // REGION) * REGION
    anchor_span = ((region_start - n_window).clamp(min=2) // 2)  # even positions below every query of the region
    # Stratified draws: draw j lies in [floor(j * n / m), floor(j * n / m) + floor(n / m)) of a range of n values, so
    # the m draws are distinct wherever n >= m (everywhere but the first few hundred queries past k).
    def stratified(m: int, n: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        j = torch.arange(m, device=device)
        return j * n[:, None] // m + (u * (n[:, None] // m)).long()

    region_draws = torch.rand(T // REGION + 1, n_anchors, device=device)[t // REGION]
    anchors = 2 * stratified(n_anchors, anchor_span, region_draws)
    tail_n = K - n_window - n_anchors
    tail = 2 * stratified(tail_n, older // 2, torch.rand(t.numel(), tail_n, device=device)) + 1
    tail = torch.minimum(tail, older[:, None] - 1)
    rows = torch.cat([anchors, tail, window], 1).sort(dim=1).values.int()
    return torch.cat([head, rows])


def uniform_indices(T: int, K: int, device) -> torch.Tensor:
    head = _dense_prefix(T, K, device)
    if T <= K:
        return head
    t = torch.arange(K, T, device=device)
    rows = (torch.rand(t.numel(), K, device=device) * (t[:, None] + 1)).long().sort(dim=1).values.int()
    return torch.cat([head, rows])


def indexer_indices(T: int, K: int, device) -> torch.Tensor:
    q8, qs = ops.indexer_rotate_quantize(torch.randn(T, 16, 64, device=device, dtype=torch.bfloat16))
    k8, ks = ops.indexer_rotate_quantize(torch.randn(T, 64, device=device, dtype=torch.bfloat16))
    cu = torch.tensor([0, T], dtype=torch.int32, device=device)
    return ops.indexer_topk_prefill(q8, qs, torch.randn(T, 16, device=device), k8, ks, cu, K)


PATTERNS = {"realistic": realistic_indices, "indexer": indexer_indices, "uniform": uniform_indices}


def _check(q, k, v, idx, o, lse, rows: int = 48) -> str:
    sel = torch.randint(0, q.shape[0], (rows,), device=q.device)
    o_ref, lse_ref = ref.attend(q[sel].float(), k.float(), v.float(), idx[sel], HEAD_DIM ** -0.5)
    ok = rel_err(o[sel], o_ref) < 1e-2 and float((lse[sel] - lse_ref).abs().max()) < 2e-3
    return "ok" if ok else "FAIL"


def _pair_share(idx: torch.Tensor, samples: int = 256) -> float:
    """Mean fraction of a query's set also selected by the next query (sampled)."""
    t = torch.randint(TOPK, idx.shape[0] - 1, (samples,), device=idx.device) if idx.shape[0] > TOPK + 1 else None
    if t is None:
        return 1.0
    a, b = idx[t].long(), idx[t + 1].long()
    shared = (a[:, :, None] == b[:, None, :]).any(-1).float().mean()
    return float(shared)


def sdpa_forward_ms(q, k, v, device, reps):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))
    kh, vh = (x.repeat_interleave(Q_HEADS // KV_HEADS, 1) for x in (kh, vh))
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return median_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True), device, reps, 2)
    except RuntimeError:
        return None


def flash_backward_ms(q, k, v, device, reps):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qh, kh, vh = (x.transpose(0, 1)[None].detach().requires_grad_() for x in (q, k, v))
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
            do = torch.randn_like(o)
            return median_ms(lambda: torch.autograd.grad(o, (qh, kh, vh), do, retain_graph=True), device, reps, 2)
    except RuntimeError:
        return None


_flex = None  # flex_attention compiled once per process


def flex_forward_ms(q, k, v, idx, device, reps):
    """flex_attention over the exact token mask (dense bool [T, T] lookup), block size 128; None if unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    T = q.shape[0]
    dense = torch.zeros(T, T, dtype=torch.bool, device=device)
    valid = idx >= 0
    rows = torch.arange(T, device=device)[:, None].expand_as(idx)
    dense[rows[valid], idx[valid].long()] = True

    def mask_mod(b, h, qi, ki):
        return dense[qi, ki]

    global _flex
    try:
        bm = create_block_mask(mask_mod, None, None, T, T, device=device, BLOCK_SIZE=128)
        _flex = _flex or torch.compile(flex_attention)
        qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))
        ms = median_ms(lambda: _flex(qh, kh, vh, block_mask=bm, enable_gqa=True), device, reps, 2)
    except Exception:  # noqa: BLE001 - compile/memory failures make the baseline unavailable, not the bench
        return None
    return ms


def _pair_backward_ms(q, k, v, idx, o, lse, do, device) -> float:
    """The pair backward kernel alone (no 16-query block plan), fp32 gradient buffers zeroed inside the timing as
    the op does: what the block backward changes."""
    delta = (do.float() * o.float()).sum(-1)
    grads = (torch.zeros(q.shape, dtype=torch.float32, device=device),
             *(torch.zeros(k.shape, dtype=torch.float32, device=device) for _ in range(2)))

    def step():
        for g in grads:
            g.zero_()
        torch.ops.keye.sparse_attention_bwd(q, k, v, do, idx, None, lse, delta, HEAD_DIM ** -0.5, 1, *grads, False)
    return median_ms(step, device, 5, 1)


def _deterministic_ms(fn, device) -> float:
    """fn timed under torch.use_deterministic_algorithms(True): the backward's int64 fixed-point mode."""
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return median_ms(fn, device, 5, 1)
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


def prefill_cases(tokens, device, reps, patterns=tuple(PATTERNS), backward_tokens=(16384, 32768),
                  flex_tokens=(16384, 32768)) -> list[dict]:
    records = []
    for T in tokens:
        q = torch.randn(T, Q_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(T, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(2))
        cu = torch.tensor([0, T], dtype=torch.int32, device=device)
        r_reps = max(3, reps // 5) if T >= 65536 else reps
        sdpa = sdpa_forward_ms(q, k, v, device, r_reps)
        flash_bwd = flash_backward_ms(q, k, v, device, r_reps) if T in backward_tokens else None
        for name in patterns:
            idx = PATTERNS[name](T, TOPK, device)
            pairs = int((idx >= 0).sum())
            with ops.index_checks(False):
                o, lse = ops.sparse_attention(q, k, v, idx, cu)
                ms = median_ms(lambda: ops.sparse_attention(q, k, v, idx, cu), device, r_reps, 2)
                # The pair kernel alone (no block plan), same inputs: what the 16-query blocks change.
                pair_ms = median_ms(lambda: torch.ops.keye.sparse_attention_fwd(q, k, v, idx, None, HEAD_DIM ** -0.5,
                                                                                1, True, False), device, r_reps, 2)
            rec = {"op": "sparse_attention", "pattern": name, "tokens": T, "check": _check(q, k, v, idx, o, lse),
                   "fwd_ms": ms, "TFLOPs": 4 * Q_HEADS * HEAD_DIM * pairs / ms / 1e9,
                   "gather_GBps": pairs * KV_HEADS * HEAD_DIM * 4 / ms / 1e6, "next_query_share": _pair_share(idx),
                   "pair_kernel_fwd_ms": pair_ms}
            if sdpa:
                rec["sdpa_fwd_ms"] = sdpa
                rec["speedup_vs_sdpa"] = sdpa / ms
            if flash_bwd is not None:
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
                with ops.index_checks(False):
                    out, lse_g = ops.sparse_attention(qg, kg, vg, idx, cu)
                    do = torch.randn_like(out)
                    grads = lambda: torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True)  # noqa: E731
                    rec["bwd_ms"] = median_ms(grads, device, 5, 1)
                    rec["det_bwd_ms"] = _deterministic_ms(grads, device)
                    rec["pair_kernel_bwd_ms"] = _pair_backward_ms(q, k, v, idx, out.detach(), lse_g.detach(), do,
                                                                  device)
                rec["flash_bwd_ms"] = flash_bwd
                rec["bwd_speedup_vs_flash"] = flash_bwd / rec["bwd_ms"]
            if T in flex_tokens and name == "realistic":
                flex = flex_forward_ms(q, k, v, idx, device, r_reps)
                if flex:
                    rec["flex_fwd_ms"] = flex
            records.append(rec)
        torch.cuda.empty_cache()
    return records


def decode_cases(batches, contexts, device, reps) -> list[dict]:
    records = []
    for ctx in contexts:
        for B in batches:
            def layer_inputs():
                cache = [torch.randn(B * ctx // 64, 64, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
                         for _ in range(2)]
                q = torch.randn(B, 1, Q_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
                base = (torch.arange(B, device=device) * ctx)[:, None, None]
                return q, cache, ((torch.rand(B, 1, TOPK, device=device) * ctx).long() + base).int()

            q, cache, slots = layer_inputs()
            # One call per graph (includes the graph launch, ~4 us), and per layer of a graph of L layers with their
            # own caches and selections (as a decode step runs a model).
            L = layers_that_fit(2 * cache[0].numel() * 2, 4, device)
            stack = [(q, cache, slots)] + [layer_inputs() for _ in range(L - 1)]
            with ops.index_checks(False):
                o, lse = ops.sparse_attention_decode(q, *cache, slots)
                graph = capture_graph(lambda: ops.sparse_attention_decode(q, *cache, slots))
                graph_l = capture_graph(*[lambda qq=qq, cc=cc, ss=ss: ops.sparse_attention_decode(qq, *cc, ss)
                                          for qq, cc, ss in stack])
            ms = median_ms(graph.replay, device, reps)
            ms_l = median_ms(graph_l.replay, device, reps) / L
            ms_k = kernel_ms(graph.replay, device, reps=reps)
            del stack, graph_l
            flat = [c.view(-1, KV_HEADS, HEAD_DIM) for c in cache]
            o_ref, lse_ref = ref.attend(q[:2, 0].float(), flat[0].float(), flat[1].float(), slots[:2, 0], HEAD_DIM ** -0.5)
            ok = rel_err(o[:2, 0], o_ref) < 1e-2 and float((lse[:2, 0] - lse_ref).abs().max()) < 2e-3
            kd, vd = (c.view(B, ctx, KV_HEADS, HEAD_DIM).transpose(1, 2) for c in cache)
            qd = q.transpose(1, 2)
            dense = median_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True), device, reps)
            gathered = B * TOPK * KV_HEADS * HEAD_DIM * 2 * 2
            records.append({"op": "sparse_attention_decode", "batch": B, "context": ctx, "check": "ok" if ok else "FAIL",
                            "graph_ms": ms, "gather_GBps": gathered / ms / 1e6, "graph_layers": L,
                            "per_layer_ms": ms_l, "per_layer_GBps": gathered / ms_l / 1e6,
                            "kernels_ms": ms_k, "kernels_GBps": gathered / ms_k / 1e6, "dense_sdpa_ms": dense,
                            "speedup_vs_dense": dense / ms})
        torch.cuda.empty_cache()
    return records


def run(device: torch.device, reps: int, tokens=None, batches=(1, 32, 128), contexts=(32768, 131072)) -> dict:
    tokens = tokens or (16384, 32768, 65536, 131072)
    return {"results": prefill_cases(list(tokens), device, reps) + decode_cases(list(batches), list(contexts), device, reps)}


def table(report: dict, copy_gbps: float) -> str:
    lines = [f"Sparse GQA attention ({Q_HEADS}/{KV_HEADS} heads, d={HEAD_DIM}, top-{TOPK}, bf16); copy {copy_gbps:.0f} GB/s",
             f"{'pattern':>10} {'tokens':>7} {'check':>5} {'share':>6} {'fwd ms':>9} {'pair ms':>8} {'TFLOP/s':>8} "
             f"{'gather GB/s':>11} "
             f"{'SDPA ms':>9} {'x SDPA':>7} {'flex ms':>8} {'bwd ms':>9} {'pair bwd':>9} {'det bwd':>8} "
             f"{'flash bwd':>9} {'x flash':>7}"]

    def g(key, fmt):  # a measurement that may be missing (baseline unavailable, not run)
        return format(r[key], fmt) if key in r else "-"

    for r in report["results"]:
        if r["op"] != "sparse_attention":
            continue
        lines.append(f"{r['pattern']:>10} {r['tokens']:>7} {r['check']:>5} {r['next_query_share']:>6.2f} "
                     f"{r['fwd_ms']:>9.2f} {g('pair_kernel_fwd_ms', '.2f'):>8} {r['TFLOPs']:>8.0f} {r['gather_GBps']:>11.0f} {g('sdpa_fwd_ms', '.2f'):>9} "
                     f"{g('speedup_vs_sdpa', '.2f'):>7} {g('flex_fwd_ms', '.2f'):>8} {g('bwd_ms', '.1f'):>9} "
                     f"{g('pair_kernel_bwd_ms', '.1f'):>9} {g('det_bwd_ms', '.1f'):>8} {g('flash_bwd_ms', '.2f'):>9} "
                     f"{g('bwd_speedup_vs_flash', '.3f'):>7}")
    lines.append(f"{'decode batch':>12} {'ctx':>7} {'check':>5} {'graph ms':>9} {'gather GB/s':>11} {'% copy':>7} "
                 f"{'kernels ms':>10} {'% copy':>7} {'dense SDPA ms':>13} {'x dense':>8}  "
                 "per layer in a graph of L layers")
    for r in report["results"]:
        if r["op"] == "sparse_attention_decode":
            lines.append(f"{r['batch']:>12} {r['context']:>7} {r['check']:>5} {r['graph_ms']:>9.4f} "
                         f"{r['gather_GBps']:>11.0f} {100 * r['gather_GBps'] / copy_gbps:>6.0f}% "
                         f"{r['kernels_ms']:>10.4f} {100 * r['kernels_GBps'] / copy_gbps:>6.0f}% "
                         f"{r['dense_sdpa_ms']:>13.3f} {r['speedup_vs_dense']:>8.1f}  L = {r['graph_layers']}: "
                         f"{r['per_layer_ms']:.4f} ms, {r['per_layer_GBps']:.0f} GB/s, "
                         f"{100 * r['per_layer_GBps'] / copy_gbps:.0f}% copy")
    return "\n".join(lines)
