"""Microbenchmark of the DSA lightning indexer on Keye shapes (H_I=16, D_I=64, top-2048; inferred, configurable).

Measured in one process, each after a self-check of sampled rows against the reference:
  indexer_scores   the score kernel over the whole causal triangle, in the op's query chunks (TFLOP/s with
                   2 * H_I * D_I FLOPs per causal pair, against the measured FP8 GEMM rate)
  indexer_prefill  scores + top-k (keye.ops.indexer_topk_prefill) against cuDNN dense causal SDPA for the
                   layer's main attention (32 query / 4 KV heads, d = 128, bf16) on the same token count
  indexer_decode   one new query per sequence against the paged cache: GB/s on the index-key cache bytes
                   (D_I + 4 per token) against the measured copy bandwidth; called directly, replayed from a
                   CUDA graph (no per-launch host cost), and the score kernel alone
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keye import ops
from keye.bench.timing import capture_graph, kernel_ms, median_ms, rel_err
from keye.ops.dsa_indexer import _CHUNK_BYTES, GROUP_KEYS, decode_uses_group_max, score_chunk_rows
from keye.ops.reference import dsa_indexer as ref

H_I, D_I, TOPK = 16, 64, 2048
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 4, 128


def fp8_gemm_tflops(device: torch.device, n: int = 8192) -> float:
    """torch._scaled_mm e4m3 n^3 rate (per-tensor scales, bf16 out) on random data."""
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as cuBLASLt wants
    one = torch.ones((), device=device)
    ms = median_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), device, 20)
    return 2 * n**3 / ms / 1e9


def sdpa_causal_ms(T: int, device: torch.device, reps: int) -> float | None:
    """cuDNN dense causal attention, 32/4 heads (K/V expanded to 32), d=128, bf16; None where cuDNN is unavailable."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, Q_HEADS, T, HEAD_DIM, device=device, dtype=torch.bfloat16)
    kv = [torch.randn(1, KV_HEADS, T, HEAD_DIM, device=device, dtype=torch.bfloat16)
          .repeat_interleave(Q_HEADS // KV_HEADS, 1) for _ in range(2)]
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return median_ms(lambda: F.scaled_dot_product_attention(q, *kv, is_causal=True), device, reps, warmup=2)
    except RuntimeError:
        return None


def _inputs(T: int, device: torch.device):
    q8, qs = ops.indexer_rotate_quantize(torch.randn(T, H_I, D_I, device=device, dtype=torch.bfloat16))
    k8, ks = ops.indexer_rotate_quantize(torch.randn(T, D_I, device=device, dtype=torch.bfloat16))
    return q8, qs, torch.randn(T, H_I, device=device), k8, ks


def selection_mismatch(idx, ref_scores, visible, topk: int, margin: float) -> str | None:
    """Compares a kernel selection idx [R, topk] (ascending columns, -1 empty) with the reference scores [R, L]
    of the same rows: the number of selected slots and their order must be right, and wherever the selected
    set differs from the reference's, every swapped element's reference score must lie within margin * (the
    row's largest |score|) of the reference's k-th score (a near-tie the kernel's rounding may break either
    way). Returns None when it matches, else a description."""
    want, _ = ref.select_topk(ref_scores, visible, topk)
    R, L = ref_scores.shape
    masked = ref_scores.masked_fill(torch.arange(L, device=ref_scores.device) >= visible.unsqueeze(1), float("-inf"))
    if not torch.equal((idx >= 0).sum(1), (want >= 0).sum(1)):
        return "wrong number of selected slots"
    if not torch.all((idx[:, 1:] > idx[:, :-1]) | (idx[:, 1:] < 0)):
        return "indices not in ascending column order"
    scale = masked.abs().masked_fill(masked.isinf(), 0).amax(1).clamp_min(1e-30)
    kth = masked.sort(1, descending=True).values[:, min(topk, L) - 1]
    for r in (~torch.all(idx == want, dim=1)).nonzero().flatten().tolist():
        swapped = set(idx[r][idx[r] >= 0].tolist()) ^ set(want[r][want[r] >= 0].tolist())
        gap = (masked[r, sorted(swapped)] - kth[r]).abs().max()
        if gap > margin * scale[r]:
            return f"row {r}: selection differs beyond near-ties (gap {float(gap):.3g}, row scale {float(scale[r]):.3g})"
    return None


def _check_rows(idx, q8, qs, w, k8, ks, rows, visible) -> bool:
    """Sampled rows against the reference (near-ties within 2% of the row's largest score may swap)."""
    full = ref.indexer_scores(q8[rows], qs[rows], w[rows], k8, ks)
    return selection_mismatch(idx, full, visible, TOPK, 2e-2) is None


def _score_chunks(q8, qs, w, k8, ks, max_chunk_bytes=_CHUNK_BYTES):
    """The score kernel alone over the causal triangle, in the same query chunks as the prefill op."""
    T, H, D = q8.shape
    ld, rows = score_chunk_rows(T, H, max_chunk_bytes)
    buf = torch.empty(min(rows, T) * ld, device=q8.device)

    def run():
        for a in range(0, T, rows):
            b = min(a + rows, T)
            torch.ops.keye.indexer_logits(q8[a:b], qs[a:b], w[a:b], k8, ks, a, buf[: (b - a) * ld].view(b - a, ld))
    return run


def _prefill_times(T: int, device: torch.device, reps: int) -> dict:
    q8, qs, w, k8, ks = _inputs(T, device)
    cu = torch.tensor([0, T], device=device)
    with ops.index_checks(False):
        idx = ops.indexer_topk_prefill(q8, qs, w, k8, ks, cu, TOPK)
        rows = torch.tensor(sorted({r for r in (0, TOPK - 1, TOPK, T // 2, T - 1) if r < T}), device=device)
        check = "ok" if _check_rows(idx[rows], q8, qs, w, k8, ks, rows, rows + 1) else "FAIL"
        scores_ms = median_ms(_score_chunks(q8, qs, w, k8, ks), device, reps, warmup=2)
        prefill_ms = median_ms(lambda: ops.indexer_topk_prefill(q8, qs, w, k8, ks, cu, TOPK), device, reps, warmup=2)
    pairs = T * (T + 1) // 2
    return {"op": "indexer_prefill", "tokens": T, "check": check, "scores_ms": scores_ms, "prefill_ms": prefill_ms,
            "topk_ms": prefill_ms - scores_ms, "scores_TFLOPs": 2 * H_I * D_I * pairs / scores_ms / 1e9}


def prefill_cases(tokens: list[int], device: torch.device, reps: int) -> list[dict]:
    records = []
    for T in tokens:
        r = max(3, reps // (1 + T // 16384))
        rec = _prefill_times(T, device, r)  # its inputs are freed before SDPA allocates
        sdpa_ms = sdpa_causal_ms(T, device, r)
        if sdpa_ms is not None:
            pairs = T * (T + 1) // 2
            rec.update(sdpa_ms=sdpa_ms, sdpa_TFLOPs=4 * Q_HEADS * HEAD_DIM * pairs / sdpa_ms / 1e9,
                       prefill_over_sdpa=rec["prefill_ms"] / sdpa_ms)
        records.append(rec)
    return records


def paged_cache(B: int, ctx: int, device: torch.device):
    """A paged index-key cache of B sequences of ctx random keys, pages scattered: (k_cache, k_scale_cache,
    block_table)."""
    pages = ctx // ref.PAGE_SIZE
    k8, ks = ops.indexer_rotate_quantize(torch.randn(B * ctx, D_I, device=device, dtype=torch.bfloat16))
    k_cache = k8.view(B * pages, ref.PAGE_SIZE, D_I)
    k_scale_cache = ks.view(B * pages, ref.PAGE_SIZE)
    block_table = torch.randperm(B * pages, device=device).int().view(B, pages)  # pages scattered
    return k_cache, k_scale_cache, block_table


def decode_cases(batches: list[int], contexts: list[int], device: torch.device, reps: int) -> list[dict]:
    records = []
    for ctx in contexts:
        for B in batches:
            k_cache, k_scale_cache, block_table = paged_cache(B, ctx, device)
            q8, qs = ops.indexer_rotate_quantize(torch.randn(B, 1, H_I, D_I, device=device, dtype=torch.bfloat16))
            w = torch.randn(B, 1, H_I, device=device)
            seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
            args = (q8, qs, w, k_cache, k_scale_cache, block_table, seq_lens, TOPK)
            with ops.index_checks(False):
                idx = ops.indexer_topk_decode(*args)
                pages = block_table[0].long()
                keys = k_cache[pages].reshape(-1, D_I)
                kscale = k_scale_cache[pages].reshape(-1)
                ok = _check_rows(idx[0], q8[0], qs[0], w[0], keys, kscale, torch.zeros(1, dtype=torch.long,
                                 device=device), torch.full((1,), ctx, device=device))
                ms = median_ms(lambda: ops.indexer_topk_decode(*args), device, reps)
                graph = capture_graph(lambda: ops.indexer_topk_decode(*args))  # without per-launch host cost
                graph_ms = median_ms(graph.replay, device, reps)
                kernels_ms = kernel_ms(graph.replay, device, reps=reps)
                buf = torch.empty(B, ctx, device=device)
                # The score kernel as the op runs it with the group maxima where the op asks for them; where it
                # selects from candidate lists (decode_uses_lists) the kernel without the lists' epilogue.
                gmax = (torch.empty(B, ctx // GROUP_KEYS, device=device)
                        if decode_uses_group_max(B, 1, H_I, ctx, TOPK) else None)
                scores_ms = median_ms(lambda: torch.ops.keye.indexer_logits_paged(
                    q8, qs, w, k_cache, k_scale_cache, block_table, seq_lens, buf, gmax), device, reps)
            nbytes = B * ctx * (D_I + 4)
            records.append({"op": "indexer_decode", "batch": B, "context": ctx, "check": "ok" if ok else "FAIL",
                            "decode_ms": ms, "graph_ms": graph_ms, "kernels_ms": kernels_ms, "scores_ms": scores_ms,
                            "bytes": nbytes, "kernels_GBps": nbytes / kernels_ms / 1e6,
                            "GBps": nbytes / ms / 1e6, "graph_GBps": nbytes / graph_ms / 1e6,
                            "scores_GBps": nbytes / scores_ms / 1e6})
    return records


def loss_cases(tokens: list[int], device: torch.device, check_tokens: int = 4096) -> list[dict]:
    """Indexer KL loss (dense warm-up and sparse stage), forward + backward, bf16 activations, one sequence:
    keye.ops.indexer_loss against the chunked reference (its specification) in the same run, same inputs.
    Accuracy is checked against the issue's fp32 reference (the reference on fp32 copies of the inputs) on the first
    check_tokens tokens: the reference keeps every chunk's gathered main keys for its backward (4 MB per row in
    fp32), which bounds the length it can be checked at."""
    from keye.ops import indexer_loss
    from keye.ops.reference.dsa_indexer_loss import indexer_loss as reference_loss

    def loss_and_grads(fn, q, w, k, qm, km, cu, indices):
        for t in (q, w, k):
            t.grad = None
        loss = fn(q, w, k, qm, km, cu, indices)
        loss.backward()
        return [loss.detach().float()] + [t.grad.float() for t in (q, w, k)]

    records = []
    for T in tokens:
        q = torch.randn(T, H_I, D_I, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(T, D_I, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(T, H_I, device=device, dtype=torch.bfloat16, requires_grad=True)
        qm = torch.randn(T, Q_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        km = torch.randn(T, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        pos = torch.arange(T, device=device).unsqueeze(1)
        sel = torch.randint(0, 1 << 30, (T, TOPK), device=device) % (pos + 1)  # random causal subsets
        sel = torch.where(torch.arange(TOPK, device=device) <= pos, sel, -1).int()
        C = min(T, check_tokens)
        small = [t[:C].detach().requires_grad_() for t in (q, w, k)]
        fp32 = [t.detach().float().requires_grad_() for t in small]
        for stage, indices in (("dense", None), ("sparse", sel)):
            args = (qm, km, torch.tensor([0, T]), indices)
            ms = median_ms(lambda: loss_and_grads(indexer_loss, q, w, k, *args), device, reps=1, warmup=1)
            ref_ms = median_ms(lambda: loss_and_grads(reference_loss, q, w, k, *args), device, reps=1, warmup=1)
            check = (qm[:C], km[:C], torch.tensor([0, C]), None if indices is None else indices[:C])
            got = loss_and_grads(indexer_loss, *small, *check)
            want = loss_and_grads(reference_loss, *fp32, check[0].float(), check[1].float(), *check[2:])
            errs = [rel_err(a, b) for a, b in zip(got, want)]  # loss, dq, dw, dk
            sane = all(bool(torch.isfinite(t).all()) for t in got) and max(errs) < 2e-2
            records.append({"op": "indexer_loss", "stage": stage, "tokens": T, "check": "ok" if sane else "FAIL",
                            "fwd_bwd_ms": ms, "reference_ms": ref_ms, "check_tokens": C, "max_rel_err": max(errs),
                            "rel_errs": errs})
    return records


def run(device: torch.device, reps: int, tokens=(8192, 32768, 65536, 131072), batches=(1, 8, 64),
        contexts=(32768, 131072), loss_tokens=(8192, 32768)) -> dict:
    ceilings = {"fp8_gemm_TFLOPs": fp8_gemm_tflops(device)}
    results = prefill_cases(list(tokens), device, reps) + decode_cases(list(batches), list(contexts), device, reps)
    results += loss_cases(list(loss_tokens), device)
    return {"ceilings": ceilings, "results": results}


def table(report: dict, copy_gbps: float) -> str:
    fp8 = report["ceilings"]["fp8_gemm_TFLOPs"]
    lines = [f"DSA indexer (H_I={H_I}, D_I={D_I}, top-{TOPK}); FP8 GEMM ceiling {fp8:.0f} TFLOP/s, "
             f"copy {copy_gbps:.0f} GB/s",
             f"{'prefill tokens':>14} {'check':>5} {'scores ms':>10} {'TFLOP/s':>8} {'% fp8':>6} {'top-k ms':>9} "
             f"{'total ms':>9} {'SDPA ms':>9} {'total/SDPA':>10}"]
    for r in report["results"]:
        if r["op"] != "indexer_prefill":
            continue
        sd = f"{r['sdpa_ms']:.2f}" if "sdpa_ms" in r else "-"
        ratio = f"{100 * r['prefill_over_sdpa']:.1f}%" if "sdpa_ms" in r else "-"
        lines.append(f"{r['tokens']:>14} {r['check']:>5} {r['scores_ms']:>10.3f} {r['scores_TFLOPs']:>8.0f} "
                     f"{100 * r['scores_TFLOPs'] / fp8:>5.0f}% {r['topk_ms']:>9.3f} {r['prefill_ms']:>9.3f} "
                     f"{sd:>9} {ratio:>10}")
    lines.append(f"{'decode batch':>14} {'ctx':>7} {'check':>5} {'total ms':>9} {'GB/s':>7} {'graph ms':>9} "
                 f"{'GB/s':>7} {'% copy':>7} {'kernels ms':>10} {'% copy':>7} {'scores ms':>10} {'GB/s':>7}")
    for r in report["results"]:
        if r["op"] == "indexer_decode":
            lines.append(f"{r['batch']:>14} {r['context']:>7} {r['check']:>5} {r['decode_ms']:>9.3f} "
                         f"{r['GBps']:>7.0f} {r['graph_ms']:>9.3f} {r['graph_GBps']:>7.0f} "
                         f"{100 * r['graph_GBps'] / copy_gbps:>6.0f}% {r['kernels_ms']:>10.3f} "
                         f"{100 * r['kernels_GBps'] / copy_gbps:>6.0f}% "
                         f"{r['scores_ms']:>10.3f} {r['scores_GBps']:>7.0f}")
    for r in report["results"]:
        if r["op"] == "indexer_loss":
            lines.append(f"indexer_loss {r['stage']:>6} {r['tokens']:>7} tokens {r['check']:>4}: forward + backward "
                         f"{r['fwd_bwd_ms']:.1f} ms, chunked reference {r['reference_ms']:.1f} ms "
                         f"({r['reference_ms'] / r['fwd_bwd_ms']:.1f}x); max rel. err. vs the fp32 reference at "
                         f"{r['check_tokens']} tokens {r['max_rel_err']:.1e}")
    return "\n".join(lines)
